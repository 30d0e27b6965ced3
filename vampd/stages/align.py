"""Registration: crop, sub-pixel shift and pad each MBI field; cam2 → cam1 reprojection.

docs/instrument.md §5. The PSF of every frame and field lands exactly on the output's geometric
centre ``((N-1)/2, (N-1)/2)``: the cutout origin follows the Cutout2D "partial" rule
``o = ceil(c - crop/2)`` and the residual shift ``(crop-1)/2 - (c - o)`` (in [-0.5, 0.5))
is *removed* with a Lanczos-4 interpolation (the reference doubles it instead, docs/instrument.md §13.1).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
from astropy.io import fits

from vampd.imaging import frame_center, shift_window, warp_similarity
from vampd.stages.centroids import intersect_diagonals  # one implementation (docs/instrument.md §3.4)

__all__ = [
    "ALIGN_METHODS",
    "pad_width",
    "aligned_size",
    "intersect_diagonals",
    "frame_centers_from_metrics",
    "align_cube",
    "align_region",
    "align_into",
    "variance_sum_nearest",
    "align_header",
    "similarity_from_spots",
    "reproject_cam2",
]

ALIGN_METHODS = ("dft", "com", "peak", "model")
_METRIC_KEYS = {"dft": "dft", "com": "com", "peak": "peak", "model": "model"}


def pad_width(crop_width: int) -> int:
    """NaN padding per side for ``pad = true``: ``2·floor(((crop/2)(√2−1))/2)`` (110 for 536).

    The padded frame can be rotated by any angle without losing the cropped square's corners.
    """
    return int(2 * math.floor(((crop_width / 2) * (math.sqrt(2) - 1)) / 2))


def aligned_size(crop_width: int, pad: bool = True) -> int:
    """Side ``N`` of the aligned frames: ``crop + 2·npad`` (756 for 536 with padding)."""
    return int(crop_width) + (2 * pad_width(crop_width) if pad else 0)


def frame_centers_from_metrics(metrics, method: str, default=None) -> np.ndarray:
    """Per-frame, per-field PSF centres from analysis metrics (docs/instrument.md §5.1).

    Parameters
    ----------
    metrics : mapping
        Arrays of shape ``(nfields, npsfs, nframes)``; keys ``{method}x`` / ``{method}y``
        (``dftx/dfty``, ``comx/comy``, ``peakx/peaky``, ``modelx/modely``, docs/instrument.md §13.6 fixed).
    method : {"dft", "com", "peak", "model"}
    default : array (nfields, 2), optional
        ``(y, x)`` used for a field whose centroid is NaN in every frame.

    Returns
    -------
    ndarray (nframes, nfields, 2)
        ``(y, x)``. With 4 PSFs the centre is the intersection of the diagonals, else PSF 0.
        Frames whose centre is NaN get the median centre of the cube for that field.
    """
    if method not in _METRIC_KEYS:
        raise ValueError(f"align.method: {method!r} not one of {ALIGN_METHODS}")
    prefix = _METRIC_KEYS[method]
    kx, ky = f"{prefix}x", f"{prefix}y"
    for key in (kx, ky):
        if key not in metrics:
            raise KeyError(
                f"align.method = {method!r} needs metric {key!r}, metrics have {sorted(metrics)}"
                + (" (set analysis.fit_psf_model = true)" if method == "model" else "")
            )
    x = np.asarray(metrics[kx], dtype=np.float64)
    y = np.asarray(metrics[ky], dtype=np.float64)
    if x.ndim != 3 or x.shape != y.shape:
        raise ValueError(f"metrics {kx}/{ky}: expected equal (nfields, npsfs, nframes), got {x.shape}/{y.shape}")
    pts = np.stack([y, x], axis=-1).transpose(2, 0, 1, 3)  # (nframes, nfields, npsfs, 2)
    centers = intersect_diagonals(pts) if pts.shape[2] == 4 else pts[:, :, 0, :].copy()
    bad = ~np.isfinite(centers).all(axis=-1)
    if bad.any():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            med = np.nanmedian(np.where(bad[..., None], np.nan, centers), axis=0)  # (nfields, 2)
        if default is not None:
            med = np.where(np.isfinite(med), med, np.asarray(default, dtype=np.float64))
        centers = np.where(bad[..., None], med[None], centers)
    return centers


def _field_geometry(centers_k: np.ndarray, crop: int, frame_shape) -> dict | None:
    """Cutout geometry of one field for every frame (shared by the aligners).

    ``centers_k`` (nframes, 2). Returns None when no centre is finite, else a dict with
    ``good`` (finite centres), ``origin`` (Cutout2D partial rule), ``q`` (sample offset in
    (−0.5, 0.5]) and ``lo``/``hi``: the cutout rows/cols that can see the frame for some
    frame (outside them every frame is NaN).
    """
    ny, nx = frame_shape
    good = np.isfinite(centers_k).all(axis=1)
    if not good.any():
        return None
    c = np.where(good[:, None], centers_k, centers_k[good][0])
    origin = np.ceil(c - crop / 2).astype(np.int64)  # Cutout2D partial rule
    q = c - origin - (crop - 1) / 2  # sample offset = −shift, in (−0.5, 0.5]
    lo = np.clip(np.min(-origin, axis=0) - 1, 0, crop)
    hi = np.clip(np.max(np.array([ny, nx]) - origin, axis=0) + 1, 0, crop)
    return {"good": good, "origin": origin, "q": q, "lo": lo, "hi": hi}


def _check_align_inputs(data, err, centers, crop_width):
    data = np.asarray(data)
    if data.ndim == 2:
        data = data[None]
    if data.ndim != 3:
        raise ValueError(f"align_cube: data must be (nframes, ny, nx), got shape {data.shape}")
    n = data.shape[0]
    if err is not None:
        err = np.asarray(err)
        if err.ndim == 2:
            err = err[None]
        if err.shape != data.shape:
            raise ValueError(f"align_cube: err shape {err.shape} differs from data shape {data.shape}")
    crop = int(crop_width)
    if crop < 1:
        raise ValueError(f"align.crop_width: {crop_width!r}, expected a positive integer")
    centers = np.asarray(centers, dtype=np.float64)
    if centers.ndim == 2:
        centers = np.broadcast_to(centers[None], (n,) + centers.shape)
    if centers.ndim != 3 or centers.shape[0] != n or centers.shape[2] != 2:
        raise ValueError(f"align_cube: centers must be (nframes={n}, nfields, 2), got shape {centers.shape}")
    return data, err, centers, crop


def align_cube(data, err, centers, crop_width: int, pad: bool = True):
    """Crop each frame and field around its centre and place the PSF on ``(N-1)/2``.

    Parameters
    ----------
    data : ndarray (nframes, ny, nx)
        Calibrated frames.
    err : ndarray (nframes, ny, nx) or None
        Errors, shifted the same way as the data (linear interpolation of σ, an
        approximation documented in :func:`vampd.imaging.shift_cube`).
    centers : array (nframes, nfields, 2) or (nfields, 2)
        PSF position ``(y, x)`` per frame and field in calibrated coordinates. A NaN centre
        gives an all-NaN frame.
    crop_width : int
        Side of the cutout.
    pad : bool
        Add ``pad_width(crop_width)`` NaN pixels on every side.

    Returns
    -------
    data4, err4 : float32 ndarrays (nframes, nfields, N, N)
        ``err4`` is None when ``err`` is None. Parts of a cutout outside the frame are NaN.

    See Also
    --------
    align_region, variance_sum_nearest : the pipeline's cheaper path for coadds (only the
        region that can hold data; summed variances instead of an aligned error cube).
    """
    data, err, centers, crop = _check_align_inputs(data, err, centers, crop_width)
    n, ny, nx = data.shape
    nfields = centers.shape[1]
    npad = pad_width(crop) if pad else 0
    size = crop + 2 * npad
    data4 = np.full((n, nfields, size, size), np.nan, np.float32)
    err4 = np.full((n, nfields, size, size), np.nan, np.float32) if err is not None else None
    for k in range(nfields):
        g = _field_geometry(centers[:, k, :], crop, (ny, nx))
        if g is None:
            continue
        lo, hi, origin, q, good = g["lo"], g["hi"], g["origin"], g["q"], g["good"]
        h, w = (hi - lo).tolist()
        if h <= 0 or w <= 0:
            continue
        ys, xs = slice(npad + lo[0], npad + hi[0]), slice(npad + lo[1], npad + hi[1])
        r0, c0 = origin[:, 0] + lo[0], origin[:, 1] + lo[1]
        shift_window(data, r0, c0, q[:, 0], q[:, 1], (h, w), data4[:, k, ys, xs])
        if err4 is not None:
            shift_window(err, r0, c0, q[:, 0], q[:, 1], (h, w), err4[:, k, ys, xs])
        if not good.all():
            data4[~good, k] = np.nan
            if err4 is not None:
                err4[~good, k] = np.nan
    return data4, err4


def align_region(centers, crop_width: int, pad: bool, frame_shape) -> tuple[slice, slice]:
    """Rows and columns of the aligned ``N×N`` frame that can hold data.

    The union over frames and fields of the cutout part that overlaps the frame (plus one
    pixel of interpolation margin), as :func:`align_cube` computes it; outside this region
    every aligned frame is NaN (the padding, and cutout parts beyond the frame edges), so
    a coadd needs to be computed only inside it.

    Parameters
    ----------
    centers : array (nframes, nfields, 2)
        All centres that will be aligned (e.g. the kept frames of a file).
    crop_width : int
    pad : bool
    frame_shape : (ny, nx)
        Calibrated frame shape.

    Returns
    -------
    (slice, slice)
        Empty slices when no centre is finite.
    """
    centers = np.asarray(centers, dtype=np.float64).reshape(-1, np.shape(centers)[-2], 2)
    crop = int(crop_width)
    npad = pad_width(crop) if pad else 0
    lo, hi = np.array([crop, crop]), np.array([0, 0])
    for k in range(centers.shape[1]):
        g = _field_geometry(centers[:, k, :], crop, tuple(frame_shape[-2:]))
        if g is None or (g["hi"] <= g["lo"]).any():
            continue
        lo, hi = np.minimum(lo, g["lo"]), np.maximum(hi, g["hi"])
    if (hi <= lo).any():
        return slice(npad, npad), slice(npad, npad)
    return slice(npad + int(lo[0]), npad + int(hi[0])), slice(npad + int(lo[1]), npad + int(hi[1]))


def align_into(data, centers, crop_width: int, pad: bool, region, out: np.ndarray, frames=None) -> np.ndarray:
    """:func:`align_cube` of the data restricted to ``region``, written into ``out``.

    ``out[:, k]`` equals ``align_cube(data, None, centers, crop_width, pad)[0][:, k, ys, xs]``
    for ``region = (ys, xs)`` from :func:`align_region` (bit for bit); the padding outside the
    region is not computed.

    Parameters
    ----------
    data : ndarray (nframes, ny, nx)
    centers : array (nframes, nfields, 2)
    crop_width : int
    pad : bool
    region : (slice, slice)
        Output rows/cols of the aligned frame (from :func:`align_region` of a superset of
        these centres).
    out : float32 ndarray (nframes, nfields, h, w)
        ``h, w`` = region size; any strides.
    frames : int array (nframes,), optional
        Indices into ``data`` of the frames to align (default: all); avoids copying a
        selection of frames.
    """
    data = np.asarray(data)
    if data.ndim == 2:
        data = data[None]
    if data.ndim != 3:
        raise ValueError(f"align_into: data must be (nframes, ny, nx), got shape {data.shape}")
    if frames is not None:
        frames = np.asarray(frames, dtype=np.int64).reshape(-1)
    n = len(frames) if frames is not None else data.shape[0]
    centers = np.asarray(centers, dtype=np.float64)
    if centers.ndim == 2:
        centers = np.broadcast_to(centers[None], (n,) + centers.shape)
    if centers.ndim != 3 or centers.shape[0] != n or centers.shape[2] != 2:
        raise ValueError(f"align_into: centers must be (nframes={n}, nfields, 2), got shape {centers.shape}")
    crop = int(crop_width)
    ny, nx = data.shape[-2:]
    npad = pad_width(crop) if pad else 0
    ys, xs = region
    h, w = ys.stop - ys.start, xs.stop - xs.start
    if out.shape != (n, centers.shape[1], h, w):
        raise ValueError(f"align_into: out shape {out.shape}, expected {(n, centers.shape[1], h, w)}")
    for k in range(centers.shape[1]):
        g = _field_geometry(centers[:, k, :], crop, (ny, nx))
        if g is None:
            out[:, k] = np.nan
            continue
        # this field's computable part, within the region (cutout coords)
        lo = np.maximum(g["lo"], [ys.start - npad, xs.start - npad])
        hi = np.minimum(g["hi"], [ys.stop - npad, xs.stop - npad])
        hh, ww = (hi - lo).tolist()
        if hh <= 0 or ww <= 0:
            out[:, k] = np.nan
            continue
        oy, ox = npad + lo[0] - ys.start, npad + lo[1] - xs.start
        if oy > 0 or ox > 0 or oy + hh < h or ox + ww < w:
            out[:, k] = np.nan  # field smaller than the region: the rest stays NaN
        origin, q, good = g["origin"], g["q"], g["good"]
        view = out[:, k, oy : oy + hh, ox : ox + ww]
        shift_window(data, origin[:, 0] + lo[0], origin[:, 1] + lo[1], q[:, 0], q[:, 1], (hh, ww), view, index=frames)
        if not good.all():
            out[~good, k] = np.nan
    return out


def variance_sum_nearest(err, centers, crop_width: int, pad: bool, region, out=None, frames=None) -> np.ndarray:
    """Sum over frames of the aligned variance σ², each frame shifted by the nearest whole pixel.

    The cheap error path of a coadd (``sqrt(Σσ²)/n`` only needs ``Σσ²``): instead of the
    Lanczos-shifted error cube of :func:`align_cube`, each frame's ``σ²`` is taken at the
    *nearest* source pixel of every output pixel, i.e. pure slicing. This is the same pixel
    that decides whether the aligned data is NaN (see :func:`vampd.imaging.shift_window`),
    so NaN σ (saturated, unusable flat) and parts outside the frame add 0 exactly where
    the data are NaN.
    Approximation: σ is not interpolated (the Lanczos path interpolates σ linearly, itself
    an approximation), so the error map is displaced by up to half a pixel.

    Parameters
    ----------
    err : ndarray (nframes_all, ny, nx), or a source of variances
        (:class:`vampd.stages.calerror.FrameVariance`: ``shape``, ``group_sum``, ``variance_at``)
    centers : array (nframes, nfields, 2)
        Centres of the frames summed (``frames`` selects them from ``err``).
    crop_width : int
    pad : bool
    region : (slice, slice)
        Output rows/cols (as for :func:`align_into`).
    out : float64 ndarray (nfields, h, w), optional
        Accumulator to add to (returned).
    frames : int array (nframes,), optional
        Indices into ``err`` of the frames (default: all, in order); avoids copying a
        selection of frames.

    Returns
    -------
    ndarray float64 (nfields, h, w)
    """
    if not hasattr(err, "group_sum"):
        err = np.asarray(err)
        if err.ndim == 2:
            err = err[None]
    frames = np.arange(err.shape[0]) if frames is None else np.asarray(frames, dtype=np.int64).reshape(-1)
    centers = np.asarray(centers, dtype=np.float64)
    if centers.ndim == 2:
        centers = np.broadcast_to(centers[None], (len(frames),) + centers.shape)
    if centers.ndim != 3 or centers.shape[0] != len(frames) or centers.shape[2] != 2:
        raise ValueError(
            f"variance_sum_nearest: centers must be (nframes={len(frames)}, nfields, 2), got shape {centers.shape}"
        )
    ny, nx = err.shape[-2:]
    crop = int(crop_width)
    npad = pad_width(crop) if pad else 0
    ys, xs = region
    h, w = ys.stop - ys.start, xs.stop - xs.start
    nf = centers.shape[1]
    if out is None:
        out = np.zeros((nf, h, w), np.float64)
    if len(frames) == 0 or h <= 0 or w <= 0:
        return out
    # frames shifted by the same whole pixel are summed first, then placed once
    for k in range(nf):
        g = _field_geometry(centers[:, k, :], crop, (ny, nx))
        if g is None:
            continue
        # nearest source pixel of output (y, x): origin + (y - npad) + round-half-up(q)
        near = g["origin"] + np.floor(g["q"] + 0.5).astype(np.int64) + np.array([ys.start, xs.start]) - npad
        for (r0, c0), sel in _shift_groups(near, g["good"]):
            y0, y1 = max(r0, 0), min(r0 + h, ny)
            x0, x1 = max(c0, 0), min(c0 + w, nx)
            if y1 > y0 and x1 > x0:
                dst = out[k, y0 - r0 : y1 - r0, x0 - c0 : x1 - c0]
                dst += _group_variance(err, frames[sel], slice(y0, y1), slice(x0, x1))
    return out


def _shift_groups(near: np.ndarray, good: np.ndarray):
    """``((r0, c0), frame positions)`` for each whole-pixel shift shared by good frames."""
    idx = np.flatnonzero(good)
    if idx.size == 0:
        return []
    keys, inv = np.unique(near[idx], axis=0, return_inverse=True)
    inv = inv.reshape(-1)
    return [((int(keys[j, 0]), int(keys[j, 1])), idx[inv == j]) for j in range(len(keys))]


def _group_variance(err, frames: np.ndarray, sy: slice, sx: slice) -> np.ndarray:
    """``Σ σ²`` over ``frames`` of the window ``(sy, sx)``, NaN σ counting 0.

    The frames are summed as they are (two passes per frame instead of four); the few pixels
    where some frame is NaN (saturation, an unusable flat) are summed again without them.
    ``err``: error cube, or a source of variances (``group_sum(frames, sy, sx)`` and
    ``variance_at(frames, ys, xs)``, e.g. :class:`vampd.stages.calerror.FrameVariance`).
    """
    source = hasattr(err, "group_sum")
    if source:
        acc = err.group_sum(frames, sy, sx)
    else:
        acc = np.square(err[frames[0], sy, sx], dtype=np.float32)
        tmp = np.empty_like(acc)
        for f in frames[1:]:
            np.square(err[f, sy, sx], out=tmp, dtype=np.float32)
            acc += tmp
    bad = np.isnan(acc)
    if bad.any():
        yy, xx = np.nonzero(bad)
        yy, xx = yy + sy.start, xx + sx.start
        if source:
            var = err.variance_at(frames, yy, xx)
        else:
            vals = err[frames[:, None], yy[None], xx[None]].astype(np.float32)
            var = vals * vals
        acc[bad] = np.nansum(var, axis=0)
    return acc


def align_header(header, method: str | None, fields, copy: bool = True) -> tuple[fits.Header, list[fits.Header]]:
    """Headers of an aligned product: primary (``DPP ALIGN METH``) and one per field.

    Parameters
    ----------
    header : fits.Header
    method : str or None
        Alignment method, or None when ``align = false`` (written as "none").
    fields : sequence of str
        Field names (``FIELD`` and ``EXTNAME`` of the per-field headers; empty: none built).
    copy : bool
        False: update ``header`` in place (it is returned as the primary header).
    """
    h = header.copy() if copy else header
    h["HIERARCH DPP ALIGN METH"] = (str(method) if method else "none", "registration method")
    field_headers = []
    for name in fields:
        fh = h.copy()
        fh["FIELD"] = (str(name), "MBI field / filter")
        fh["EXTNAME"] = str(name)
        field_headers.append(fh)
    return h, field_headers


# ---------------------------------------------------------------------------------------------
# cam2 -> cam1 reprojection (docs/instrument.md §5.6)
# ---------------------------------------------------------------------------------------------


def _spot_center(p: np.ndarray) -> np.ndarray:
    return intersect_diagonals(p) if len(p) == 4 else p.mean(axis=0)


def similarity_from_spots(spots_cam1, spots_cam2) -> tuple[float, float]:
    """Rotation and scale mapping camera-2 spot geometry onto camera 1 (no translation).

    Both inputs are ``(npsfs, 2)`` positions ``(y, x)`` in **calibrated** (already flipped,
    same sky parity) coordinates, e.g. centroid-file positions after the camera flip
    (the reference's extra mirroring is that raw→calibrated flip done by hand, docs/instrument.md §13.15).
    Each set is taken relative to its centre (diagonal intersection for 4 spots, else
    the mean); correspondences are the cyclic order by polar angle that fits best.
    With ``z = x + i·y`` (display origin lower-left, so +angle is counter-clockwise) the
    least-squares ``a = Σ conj(z2)·z1 / Σ|z2|²`` gives ``z1 ≈ a·z2``.

    Returns
    -------
    angle_deg, scale : float
        Apply as ``warp_similarity(cam2, angle_deg, scale)`` to match camera 1.
    """
    p1 = np.asarray(spots_cam1, dtype=np.float64).reshape(-1, 2)
    p2 = np.asarray(spots_cam2, dtype=np.float64).reshape(-1, 2)
    if len(p1) != len(p2) or len(p1) < 2:
        raise ValueError(f"reprojection needs the same number (>= 2) of spots per camera, got {len(p1)} and {len(p2)}")
    if not (np.isfinite(p1).all() and np.isfinite(p2).all()):
        raise ValueError("reprojection: non-finite spot positions")
    d1, d2 = p1 - _spot_center(p1), p2 - _spot_center(p2)
    z1 = d1[:, 1] + 1j * d1[:, 0]
    z2 = d2[:, 1] + 1j * d2[:, 0]
    z1 = z1[np.argsort(np.angle(z1))]
    z2 = z2[np.argsort(np.angle(z2))]
    fits_ = []
    for r in range(len(z1)):
        zr = np.roll(z2, r)
        a = np.sum(np.conj(zr) * z1) / np.sum(np.abs(zr) ** 2)
        fits_.append((float(np.sum(np.abs(z1 - a * zr) ** 2)), a))
    # a square spot pattern fits equally well after any multiple of 90 deg: the two cameras differ
    # by a small rotation, so among the (numerically) equally good fits take the smallest angle
    floor = min(f[0] for f in fits_)
    tol = floor + 1e-9 * float(np.sum(np.abs(z1) ** 2))
    a = min((f[1] for f in fits_ if f[0] <= tol), key=lambda a: abs(np.angle(a)))
    return float(np.degrees(np.angle(a))), float(np.abs(a))


def _blur_nan(frames: np.ndarray, sigma: float) -> np.ndarray:
    """NaN-aware 3×3 Gaussian blur (normalised convolution)."""
    from scipy import ndimage

    valid = np.isfinite(frames)
    filled = np.where(valid, frames, 0).astype(np.float32)
    kw = {"sigma": (0, sigma, sigma), "mode": "constant", "truncate": 1.0 / sigma if sigma < 1 else 1.0}
    num = ndimage.gaussian_filter(filled, **kw)
    den = ndimage.gaussian_filter(valid.astype(np.float32), **kw)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(valid, num / den, np.nan).astype(np.float32)


def reproject_cam2(data4, err4, angle_deg, scale):
    """Warp camera-2 aligned frames onto camera-1 astrometry (docs/instrument.md §5.6).

    Rotation by ``angle_deg`` (CCW as displayed) and magnification ``scale`` about the frame
    centre, per field, as returned by :func:`similarity_from_spots`. When ``scale < 1`` the
    frames are first smoothed by a 3×3 Gaussian with σ = 0.5·(1/scale − 1) against aliasing.
    Cubic spline, NaN outside; errors are warped the same way (approximation).

    Parameters
    ----------
    data4, err4 : ndarray (nframes, nfields, N, N); err4 may be None
    angle_deg, scale : float or array (nfields,)

    Returns
    -------
    data4, err4 : float32 ndarrays
    """
    data4 = np.asarray(data4)
    nf = data4.shape[1]
    angles = np.broadcast_to(np.asarray(angle_deg, dtype=np.float64), (nf,))
    scales = np.broadcast_to(np.asarray(scale, dtype=np.float64), (nf,))
    outs = []
    for arr in (data4, err4):
        if arr is None:
            outs.append(None)
            continue
        res = np.empty(arr.shape, np.float32)
        for k in range(nf):
            frames = np.asarray(arr[:, k], dtype=np.float32)
            if scales[k] < 1:
                sigma = 0.5 * (1 / scales[k] - 1)
                if sigma > 1e-3:
                    frames = _blur_nan(frames, sigma)
            res[:, k] = warp_similarity(frames, angles[k], scales[k], center=frame_center(frames.shape))
        outs.append(res)
    return outs[0], outs[1]

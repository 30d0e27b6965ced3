"""Array geometry shared by the stages, PDI and the simulator.

Conventions: arrays are ``(..., y, x)``; pixel (0, 0) is the centre of the first pixel;
images are displayed with the origin at the lower left. Positions are ``(y, x)``.
"""

from __future__ import annotations

import functools
import math
import os

import numpy as np
from numpy.lib.stride_tricks import as_strided
from scipy import ndimage

try:  # the compiled kernels (setup.py builds them when a C compiler is there; docs/design.md)
    from vampd import _kernels
except ImportError:  # pragma: no cover - the tests run the numpy twins by switching this to None
    _kernels = None
if os.environ.get("VAMPD_NO_KERNELS"):  # the numpy twins, e.g. to compare speed
    _kernels = None

__all__ = [
    "frame_center",
    "window_slices",
    "lanczos_weights",
    "shift_cube",
    "shift_window",
    "warp_similarity",
    "derotate",
]


def frame_center(shape) -> tuple[float, float]:
    """Geometric centre ``((ny - 1) / 2, (nx - 1) / 2)`` of the last two axes.

    Accepts a shape tuple or an array. ``(10, 10) -> (4.5, 4.5)``, ``(11, 11) -> (5, 5)``,
    ``(10, 100, 16, 11) -> (7.5, 5)``.
    """
    if hasattr(shape, "shape"):
        shape = shape.shape
    ny, nx = shape[-2], shape[-1]
    return (ny - 1) / 2, (nx - 1) / 2


def window_slices(center, size, shape) -> tuple[slice, slice]:
    """Slices of a square (or ``(h, w)``) window around ``center = (y, x)``.

    Uses astropy's Cutout2D "partial" rule: the origin along each axis is
    ``ceil(c - w / 2)``, then clipped to the frame, so edge windows are smaller.
    A 101x101 frame, centre (80, 50), window 31 gives rows 65:96 and cols 35:66.
    """
    if np.isscalar(size):
        size = (int(size), int(size))
    hy, hx = int(size[0]), int(size[1])
    ny, nx = shape[-2], shape[-1]
    y0 = math.ceil(center[0] - hy / 2)
    x0 = math.ceil(center[1] - hx / 2)
    return (slice(max(y0, 0), min(y0 + hy, ny)), slice(max(x0, 0), min(x0 + hx, nx)))


# ---------------------------------------------------------------------------------------------
# Sub-pixel shifts (separable Lanczos-4) and rotations
# ---------------------------------------------------------------------------------------------

LANCZOS_A = 4  # Lanczos order: 2·a = 8 taps per axis, as OpenCV INTER_LANCZOS4
_NTAP = 2 * LANCZOS_A
# Frames are processed in blocks of about this many source pixels so that the eight
# multiply-add passes of each axis run in cache (about 3x faster than whole-cube passes).
_BLOCK_PIXELS = 1 << 18
#: output block B of the banded matrix products in :func:`shift_window`: each output costs
#: B + 7 multiply-adds per axis; B = 8 measured ~10% faster than 16 at 536² (the extra taps
#: are exact zeros, so the values do not depend on B)
_BAND = 8


def lanczos_weights(frac) -> np.ndarray:
    """Lanczos-4 weights for interpolating at fractional offsets ``frac`` in [0, 1).

    Returns ``(n, 8)`` float32 weights for source samples at integer offsets
    ``-3, -2, ..., +4`` from ``floor(position)``, normalised to unit sum (flux-preserving,
    like OpenCV).
    """
    frac = np.asarray(frac, dtype=np.float64).reshape(-1)
    j = np.arange(-LANCZOS_A + 1, LANCZOS_A + 1)
    x = frac[:, None] - j[None, :]
    w = np.sinc(x) * np.sinc(x / LANCZOS_A)
    w /= w.sum(axis=1, keepdims=True)
    return w.astype(np.float32)


def _copy_clipped(dst, src, r0: int, c0: int) -> bool:
    """``dst[y, x] = src[r0 + y, c0 + x]`` where inside ``src``; returns True if clipped.

    Parts of ``dst`` that fall outside ``src`` are left untouched.
    """
    h, w = dst.shape[-2:]
    ny, nx = src.shape[-2:]
    ys, ye = max(r0, 0), min(r0 + h, ny)
    xs, xe = max(c0, 0), min(c0 + w, nx)
    if ye > ys and xe > xs:
        dst[..., ys - r0 : ye - r0, xs - c0 : xe - c0] = src[..., ys:ye, xs:xe]
    return not (ys == r0 and xs == c0 and ye == r0 + h and xe == c0 + w)


def _fill_outside(buf, shape, r0: int, c0: int) -> None:
    """Fill the parts of ``buf`` (a window at origin r0, c0) outside ``shape`` by edge replication.

    Call after copying the inside part. Replicating the edge ("nearest" border) avoids the
    ringing a zero border would cause in the last 4 rows/columns; a window entirely
    outside the frame is zeroed.
    """
    h, w = buf.shape
    ny, nx = shape[-2:]
    top, bot = min(max(-r0, 0), h), min(max(r0 + h - ny, 0), h)
    left, right = min(max(-c0, 0), w), min(max(c0 + w - nx, 0), w)
    if top + bot >= h or left + right >= w:
        buf.fill(0)
        return
    if top:
        buf[:top] = buf[top]
    if bot:
        buf[h - bot :] = buf[h - bot - 1]
    if left:
        buf[:, :left] = buf[:, left : left + 1]
    if right:
        buf[:, w - right :] = buf[:, w - right - 1 : w - right]


def _nan_outside(img, shape, r0: int, c0: int) -> None:
    """NaN the rows/cols of ``img`` whose source pixel ``(r0 + y, c0 + x)`` is outside ``shape``."""
    _fill_outside_value(img, shape, r0, c0, np.nan)


def _fill_outside_value(buf, shape, r0, c0, value) -> None:
    h, w = buf.shape
    ny, nx = shape[-2:]
    top, bot = min(max(-r0, 0), h), min(max(r0 + h - ny, 0), h)
    left, right = min(max(-c0, 0), w), min(max(c0 + w - nx, 0), w)
    if top:
        buf[:top] = value
    if bot:
        buf[h - bot :] = value
    if left:
        buf[:, :left] = value
    if right:
        buf[:, w - right :] = value


def shift_window(frames, row0, col0, qy, qx, shape, out, index=None) -> np.ndarray:
    """Resample a window of each frame at a per-frame sub-pixel position (Lanczos-4).

    For frame ``f``: ``out[f, y, x] = frames[f](row0[f] + y + qy[f], col0[f] + x + qx[f])``
    for ``y < shape[0]``, ``x < shape[1]``. This is the engine behind :func:`shift_cube`
    and the aligner's crop-and-shift (the window may extend beyond the frame).

    NaN handling: NaN enters the interpolation as 0 and the frame is extended beyond its
    edges by edge replication; an output pixel is set to NaN when its *nearest* source
    pixel is NaN or outside the frame, so a NaN never smears over more than its own
    (shifted) footprint. Pixels next to an interior NaN see it as a zero (a small dip
    within 4 px).

    Parameters
    ----------
    frames : ndarray, shape (nframes, ny, nx)
    row0, col0 : int arrays (nframes,)
        Integer origin of the window in each frame.
    qy, qx : float arrays (nframes,)
        Sub-pixel (or any) offsets of the sample grid.
    shape : (h, w)
    out : ndarray, shape (nframes, h, w) (any strides, e.g. a view into a larger array)
    index : int array (nframes,), optional
        Frame ``f`` of the output is ``frames[index[f]]`` (a selection without a copy);
        ``row0`` ... ``qx`` are per output frame.
    """
    n = frames.shape[0] if index is None else len(index)
    src_of = np.arange(n) if index is None else np.asarray(index, dtype=np.int64).reshape(n)
    h, w = int(shape[0]), int(shape[1])
    wy, ry, sy0 = _axis_taps(row0, qy, n)
    wx, rx, sx0 = _axis_taps(col0, qx, n)
    if _kernels is not None and frames.dtype == np.float32 and out.dtype == np.float32 and n and h and w:
        return _shift_compiled(frames, src_of, (wy, ry, sy0), (wx, rx, sx0), out)

    # Each axis is a banded matrix product: output block rows [bB, bB+B) are M^T @ source
    # rows [bB, bB+B+7), M (B+7, B) holding the 8 taps on its diagonals. The same M serves
    # every block of a frame, so both passes are batched BLAS products on strided views of
    # the source (no copies); ~(B+7)/8 more flops than 8 shifted multiply-adds but 2-4x
    # faster than 16 numpy passes per axis.
    bsz = _BAND
    nby, nbx = -(-h // bsz), -(-w // bsz)
    hb, wb = nby * bsz + _NTAP - 1, nbx * bsz + _NTAP - 1
    chunk = int(max(1, min(n, _BLOCK_PIXELS // max(hb * wb, 1))))
    dtype = np.result_type(frames.dtype, np.float32)
    src = np.zeros((chunk, hb, wb), dtype)  # rows/cols past h+7, w+7 stay 0 (discarded outputs)
    nanmask = np.empty((chunk, h + _NTAP - 1, w + _NTAP - 1), bool)
    ybuf = np.empty((chunk, nby, bsz, wb), dtype)
    xbuf = np.empty((chunk, nby * bsz, nbx * bsz), dtype)
    my_band = _band_matrices(wy, bsz).astype(dtype, copy=False).transpose(0, 2, 1)  # (n, B, B+7)
    mx_band = _band_matrices(wx, bsz).astype(dtype, copy=False)  # (n, B+7, B)
    for c0 in range(0, n, chunk):
        c1 = min(n, c0 + chunk)
        nc = c1 - c0
        s_all = src[:nc]
        s, m = s_all[:, : h + _NTAP - 1, : w + _NTAP - 1], nanmask[:nc]
        for i in range(nc):
            f = c0 + i
            frame = frames[src_of[f]]
            _copy_clipped(s[i], frame, int(sy0[f]), int(sx0[f]))
            _fill_outside(s[i], frame.shape, int(sy0[f]), int(sx0[f]))
        # NaN are few (saturation, unusable flat): found in one pass, then handled by index
        np.isnan(s, out=m)
        fi, yi, xi = np.unravel_index(np.flatnonzero(m), m.shape)
        s[fi, yi, xi] = 0
        o = _band_products(s_all, my_band[c0:c1], mx_band[c0:c1], ybuf[:nc], xbuf[:nc], bsz)
        dst = out[c0:c1]
        dst[...] = o[:, :h, :w]
        if fi.size:  # the output pixels whose nearest source pixel is NaN
            oy = yi - (LANCZOS_A - 1) - ry[c0 + fi]
            ox = xi - (LANCZOS_A - 1) - rx[c0 + fi]
            inside = (oy >= 0) & (oy < h) & (ox >= 0) & (ox < w)
            dst[fi[inside], oy[inside], ox[inside]] = np.nan
        for i in range(nc):
            f = c0 + i
            yy, xx = LANCZOS_A - 1 + ry[f], LANCZOS_A - 1 + rx[f]
            # nearest source pixel outside the frame -> NaN rows / columns
            _nan_outside(dst[i], frames.shape[-2:], int(sy0[f]) + yy, int(sx0[f]) + xx)
    return out


def _shift_compiled(frames, src_of, ytaps, xtaps, out) -> np.ndarray:
    """:func:`shift_window` with the compiled kernel (``vampd/_kernels.c``): the same sums,
    computed row by row from the frames; NaN marking as in the numpy path."""
    (wy, ry, sy0), (wx, rx, sx0) = ytaps, xtaps
    h, w = out.shape[-2:]
    nan_read = _kernels.lanczos_shift(
        frames,
        np.ascontiguousarray(src_of, np.int64),
        np.ascontiguousarray(sy0, np.int64),
        np.ascontiguousarray(sx0, np.int64),
        wy,
        wx,
        out,
    )
    for f in range(len(src_of)):
        frame = frames[src_of[f]]
        if nan_read[f]:  # rare (saturation, unusable flat): find the NaN in the frame's window
            win = np.empty((h + _NTAP - 1, w + _NTAP - 1), np.float32)
            _copy_clipped(win, frame, int(sy0[f]), int(sx0[f]))
            _fill_outside(win, frame.shape, int(sy0[f]), int(sx0[f]))
            yi, xi = np.nonzero(np.isnan(win))
            oy, ox = yi - (LANCZOS_A - 1) - ry[f], xi - (LANCZOS_A - 1) - rx[f]
            inside = (oy >= 0) & (oy < h) & (ox >= 0) & (ox < w)
            out[f, oy[inside], ox[inside]] = np.nan
        yy, xx = LANCZOS_A - 1 + ry[f], LANCZOS_A - 1 + rx[f]
        _nan_outside(out[f], frame.shape, int(sy0[f]) + yy, int(sx0[f]) + xx)
    return out


def _axis_taps(origin, q, n: int):
    """One axis of :func:`shift_window`: Lanczos weights, nearest-tap offset, first source index.

    Source rows used: ``origin + floor(q) - 3 .. origin + floor(q) + h + 3``; the nearest
    row's offset in the buffer is ``3 + round(t)`` (``t`` = fractional part of ``q``).
    """
    q = np.asarray(q, dtype=np.float64).reshape(n)
    origin = np.asarray(origin, dtype=np.int64).reshape(n)
    m = np.floor(q)
    t = q - m
    return lanczos_weights(t), (t >= 0.5).astype(np.int64), origin + m.astype(np.int64) - (LANCZOS_A - 1)


def _band_products(s_all, my_band, mx_band, ybuf, xbuf, bsz: int) -> np.ndarray:
    """Both banded passes of :func:`shift_window` for one chunk; returns ``xbuf`` (nc, nby*B, nbx*B)."""
    nc, nby, wb = ybuf.shape[0], ybuf.shape[1], ybuf.shape[3]
    nbx = xbuf.shape[2] // bsz
    st = s_all.strides
    yview = as_strided(s_all, (nc, nby, bsz + _NTAP - 1, wb), (st[0], bsz * st[1], st[1], st[2]), writeable=False)
    np.matmul(my_band[:, None], yview, out=ybuf)
    a2 = ybuf.reshape(nc, nby * bsz, wb)
    sa = a2.strides
    xview = as_strided(a2, (nc, nbx, nby * bsz, bsz + _NTAP - 1), (sa[0], bsz * sa[2], sa[1], sa[2]), writeable=False)
    so = xbuf.strides  # the product writes each block into place
    oview = as_strided(xbuf, (nc, nbx, nby * bsz, bsz), (so[0], bsz * so[2], so[1], so[2]))
    np.matmul(xview, mx_band[:, None], out=oview)
    return xbuf


def _band_matrices(weights: np.ndarray, bsz: int) -> np.ndarray:
    """``M[f, j + t, j] = weights[f, t]``: (n, bsz + ntap - 1, bsz) banded matrices."""
    n, ntap = weights.shape
    m = np.zeros((n, bsz + ntap - 1, bsz), weights.dtype)
    j = np.arange(bsz)
    for t in range(ntap):
        m[:, j + t, j] = weights[:, t : t + 1]
    return m


def shift_cube(cube, dy, dx, out=None) -> np.ndarray:
    """Shift each frame by its own sub-pixel offset: content moves from (y, x) to (y+dy, x+dx).

    Separable Lanczos-4 (8 taps per axis, as OpenCV ``INTER_LANCZOS4``) written as a
    weighted sum of shifted slices, vectorised over frames (no FFT, no wrap-around).
    Pixels whose nearest source pixel lies outside the frame (or is NaN) are NaN; the
    interpolation replicates the frame edge and treats NaN pixels as 0 (see
    :func:`shift_window`).

    Error cubes are shifted with the same call. That interpolates σ linearly rather than
    propagating σ² with squared weights; for |shift| ≤ 0.5 px it slightly overestimates
    σ for uncorrelated noise (Σw²σ² ≤ (Σwσ)²) and introduces pixel-to-pixel correlation,
    the same approximation as the reference pipeline.

    Parameters
    ----------
    cube : ndarray, shape (..., ny, nx)
        Leading axes are flattened into frames.
    dy, dx : float or array broadcastable to the leading shape
    out : ndarray, optional
        Output array (same shape as ``cube``).

    Returns
    -------
    ndarray
        Float array of ``cube``'s shape (float32 for float32/integer input).
    """
    cube = np.asarray(cube)
    if cube.ndim < 2:
        raise ValueError(f"shift_cube needs at least 2-D input, got shape {cube.shape}")
    lead = cube.shape[:-2]
    ny, nx = cube.shape[-2:]
    frames = cube.reshape((-1, ny, nx))
    n = frames.shape[0]
    dy = np.broadcast_to(np.asarray(dy, dtype=np.float64), lead).reshape(n)
    dx = np.broadcast_to(np.asarray(dx, dtype=np.float64), lead).reshape(n)
    dtype = np.result_type(cube.dtype, np.float32)
    if out is None:
        out = np.empty(cube.shape, dtype)
    out3 = out.reshape((-1, ny, nx))
    zeros = np.zeros(n, np.int64)
    shift_window(frames, zeros, zeros, -dy, -dx, (ny, nx), out3)
    return out


def _spline_sample(image, grid, order: int) -> np.ndarray:
    """NaN-safe ``map_coordinates`` of one 2-D image on a :func:`_similarity_grid`."""
    coords, nearest, outside = grid
    bad = ~np.isfinite(image)
    any_bad = bool(bad.any())
    img = np.where(bad, 0.0, image) if any_bad else image
    res = ndimage.map_coordinates(img, coords, order=order, mode="constant", cval=0.0, prefilter=order > 1)
    nan = outside
    if any_bad:
        nan = nan | bad.reshape(-1)[nearest]
    res[nan] = np.nan
    return res


@functools.lru_cache(maxsize=8)
def _similarity_grid(ny: int, nx: int, cy: float, cx: float, angle: float, scale: float):
    """Source coordinates of every output pixel, its nearest source pixel (flat, clipped) and
    whether that is outside the frame; cached (read-only): a set's data and variance frames,
    and frames sharing a derotation angle, reuse one grid (~6 MB at 536²)."""
    yy, xx = np.mgrid[0:ny, 0:nx].astype(np.float64)
    oy, ox = yy - cy, xx - cx
    th = math.radians(angle)
    c, s = math.cos(th), math.sin(th)
    # inverse map: source offset = R(−θ)·offset / scale
    sx = (ox * c + oy * s) / scale
    sy = (-ox * s + oy * c) / scale
    coords = np.stack([sy + cy, sx + cx])
    yi = np.rint(coords[0]).astype(np.int64)
    xi = np.rint(coords[1]).astype(np.int64)
    outside = (yi < 0) | (yi >= ny) | (xi < 0) | (xi >= nx)
    nearest = (np.clip(yi, 0, ny - 1) * nx + np.clip(xi, 0, nx - 1)).astype(np.int32 if ny * nx < 2**31 else np.int64)
    for a in (coords, nearest, outside):
        a.flags.writeable = False
    return coords, nearest, outside


def warp_similarity(image, angle_deg, scale=1.0, center=None, order: int = 3) -> np.ndarray:
    """Rotate CCW (as displayed, origin lower-left) by ``angle_deg`` and scale about ``center``.

    A pixel at offset (dx, dy) from the centre goes to
    ``scale · (dx cosθ − dy sinθ, dx sinθ + dy cosθ)``. Spline interpolation of ``order``
    via :func:`scipy.ndimage.map_coordinates`; NaN outside the frame and where the nearest
    source pixel is NaN. Leading axes are frames (same transform for each, or ``angle_deg``/
    ``scale`` arrays of the leading shape).
    """
    image = np.asarray(image)
    lead = image.shape[:-2]
    ny, nx = image.shape[-2:]
    frames = image.reshape((-1, ny, nx))
    n = frames.shape[0]
    angles = np.broadcast_to(np.asarray(angle_deg, dtype=np.float64), lead).reshape(n)
    scales = np.broadcast_to(np.asarray(scale, dtype=np.float64), lead).reshape(n)
    cy, cx = frame_center((ny, nx)) if center is None else (float(center[0]), float(center[1]))
    out = np.empty(frames.shape, np.result_type(image.dtype, np.float32))
    for i in range(n):
        grid = _similarity_grid(ny, nx, float(cy), float(cx), float(angles[i]), float(scales[i]))
        out[i] = _spline_sample(frames[i], grid, order)
    return out.reshape(image.shape)


def derotate(image, angle_deg, center=None, order: int = 3) -> np.ndarray:
    """Rotate by ``angle_deg`` counter-clockwise as displayed with origin lower-left (docs/instrument.md §5.5).

    A pixel at offset (dx, dy) from ``center`` (default the frame centre, ``(y, x)``) moves
    to (dx cosθ − dy sinθ, dx sinθ + dy cosθ); 5×5 with a 1 at (y=2, x=1): +90 → (1, 2),
    −90 → (3, 2). Cubic spline (``order``), NaN border. Leading axes are frames.
    """
    return warp_similarity(image, angle_deg, 1.0, center=center, order=order)

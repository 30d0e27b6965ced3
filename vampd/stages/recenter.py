"""Recenter a coadded image on its PSF (docs/instrument.md §5.4).

The PSF is re-measured in windows around the expected positions (centre of mass, peak,
DFT cross-correlation or a Moffat fit) and the image is shifted onto the frame centre.
Re-exported by :mod:`vampd.stages.coadd`.
"""

from __future__ import annotations

import math

import numpy as np

from vampd.imaging import frame_center, shift_window
from vampd.stages.analyze import fill_saturated

__all__ = ["measure_center", "recenter"]


def _windows(image2d: np.ndarray, centers: np.ndarray, size: int):
    """Full-size windows (NaN outside) at ``centers`` (npsfs, 2); returns (windows, origins)."""
    ny, nx = image2d.shape
    origins = np.ceil(centers - size / 2).astype(np.int64)
    wins = np.full((len(centers), size, size), np.nan, np.float64)
    for i, (oy, ox) in enumerate(origins):
        ys, ye = max(oy, 0), min(oy + size, ny)
        xs, xe = max(ox, 0), min(ox + size, nx)
        if ye > ys and xe > xs:
            wins[i, ys - oy : ye - oy, xs - ox : xe - ox] = image2d[ys:ye, xs:xe]
    return wins, origins


def _com(wins: np.ndarray) -> np.ndarray:
    w = np.nan_to_num(wins)
    yy, xx = np.indices(w.shape[1:])
    tot = w.sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.stack([(w * yy).sum(axis=(1, 2)) / tot, (w * xx).sum(axis=(1, 2)) / tot], axis=-1)


def _peak(wins: np.ndarray) -> np.ndarray:
    flat = np.nan_to_num(wins, nan=-np.inf).reshape(len(wins), -1)
    iy, ix = np.unravel_index(np.argmax(flat, axis=1), wins.shape[1:])
    return np.stack([iy, ix], axis=-1).astype(np.float64)


def _moffat_center(win: np.ndarray) -> np.ndarray:
    """Centre of a circular Moffat + constant fitted to one window (NaNs ignored)."""
    from scipy.optimize import least_squares

    ok = np.isfinite(win)
    if ok.sum() < 6:
        return np.array([np.nan, np.nan])
    yy, xx = np.indices(win.shape)
    y, x, z = yy[ok], xx[ok], win[ok]
    iy, ix = np.unravel_index(np.nanargmax(win), win.shape)
    amp0, bg0 = float(np.nanmax(win) - np.nanmedian(win)), float(np.nanmedian(win))

    def resid(p):
        a, y0, x0, gam, alpha, bg = p
        return a / (1 + ((y - y0) ** 2 + (x - x0) ** 2) / gam**2) ** alpha + bg - z

    p0 = [amp0, iy, ix, 3.0, 2.0, bg0]
    lo = [0, -0.5, -0.5, 0.5, 0.5, -np.inf]
    hi = [np.inf, win.shape[0] - 0.5, win.shape[1] - 0.5, win.shape[0], 6.0, np.inf]
    try:
        r = least_squares(resid, p0, bounds=(lo, hi))
    except ValueError:
        return np.array([np.nan, np.nan])
    return r.x[1:3]


def measure_center(image2d, centers, method: str, window_size: int, psf=None) -> np.ndarray:
    """PSF positions ``(npsfs, 2)`` measured in windows around the guesses ``centers``.

    ``method``: ``com`` (NaN-masked centre of mass), ``peak`` (argmax pixel), ``dft``
    (cross-correlation with ``psf`` of shape (window_size, window_size) via
    :func:`vampd.stages.dft.dft_centroid`; without a template it falls back to ``com``),
    ``model`` (Moffat fit in the window, docs/instrument.md §13.6 fixed). A saturated core (NaN) is first filled
    with the window's brightest value (:func:`vampd.stages.analyze.fill_saturated`).
    """
    centers = np.atleast_2d(np.asarray(centers, dtype=np.float64))
    size = int(window_size)
    wins, origins = _windows(np.asarray(image2d, dtype=np.float64), centers, size)
    wins = fill_saturated(wins)[0]  # a saturated (NaN) core measured as a clipped, symmetric PSF
    if method == "dft" and psf is not None:
        from vampd.stages.dft import dft_centroid

        psf = np.asarray(psf, dtype=np.float64)
        if psf.shape != (size, size):
            raise ValueError(f"recenter: synthetic PSF shape {psf.shape} differs from analysis.window_size = {size}")
        y, x = dft_centroid(wins, psf)
        pos = np.stack([np.asarray(y), np.asarray(x)], axis=-1).reshape(-1, 2)
    elif method in ("com", "dft"):
        pos = _com(wins)
    elif method == "peak":
        pos = _peak(wins)
    elif method == "model":
        pos = np.array([_moffat_center(w) for w in wins])
    else:
        raise ValueError(f"coadd.recenter_method: {method!r} not one of ('dft', 'com', 'peak', 'model')")
    return pos + origins


def _shift_finite(cube3: np.ndarray, ref3: np.ndarray, dy, dx) -> np.ndarray:
    """``shift_cube(cube3, dy, dx)`` computed only where it can be finite.

    An output pixel is finite only if its nearest source pixel is finite (``ref3`` is the
    cube itself: its NaN padding decides), so only the bounding box of the finite pixels,
    grown by the shift, is resampled; the rest is NaN. Identical to the full shift (the
    interpolation reads the whole frame, as :func:`vampd.imaging.shift_window` does).
    """
    nf, ny, nx = cube3.shape
    out = np.full(cube3.shape, np.nan, np.float32)
    for k in range(nf):
        fin = np.isfinite(ref3[k])
        rows, cols = np.flatnonzero(fin.any(axis=1)), np.flatnonzero(fin.any(axis=0))
        if rows.size == 0:
            continue
        my, mx = int(math.ceil(abs(dy[k]))) + 1, int(math.ceil(abs(dx[k]))) + 1
        y0, y1 = max(rows[0] - my, 0), min(rows[-1] + 1 + my, ny)
        x0, x1 = max(cols[0] - mx, 0), min(cols[-1] + 1 + mx, nx)
        shift_window(cube3[k : k + 1], [y0], [x0], [-dy[k]], [-dx[k]], (y1 - y0, x1 - x0), out[k : k + 1, y0:y1, x0:x1])
    return out


def recenter(image, err, method: str, window_size: int, psf=None, offsets=None):
    """Re-measure the PSF on a coadded image and shift it onto the frame centre (docs/instrument.md §5.4).

    Parameters
    ----------
    image, err : ndarray (nfields, N, N) or (N, N); err may be None
    method : {"dft", "com", "peak", "model"}
    window_size : int
        Measurement window (= ``analysis.window_size``, the synthetic PSF size; docs/instrument.md §13.7).
    psf : ndarray (window_size, window_size), optional
        Template for ``dft``.
    offsets : array (npsfs, 2) or (nfields, npsfs, 2), optional
        PSF offsets ``(y, x)`` from the field centre (centroid-file positions minus their
        per-field mean). Default: one PSF at the frame centre.

    Returns
    -------
    image, err : shifted copies (float32)
    (dy, dx) : float arrays (nfields,)
        The applied shifts (frame centre − measured centre). With 4 PSFs the measured centre is
        the intersection of the diagonals, else PSF 0. A field whose centre cannot be measured
        is not shifted.
    """
    from vampd.stages.centroids import intersect_diagonals

    image = np.asarray(image)
    squeeze = image.ndim == 2
    img3 = image[None] if squeeze else image
    nf = img3.shape[0]
    if offsets is None:
        offsets = np.zeros((nf, 1, 2))
    offsets = np.asarray(offsets, dtype=np.float64)
    if offsets.ndim == 2:
        offsets = np.broadcast_to(offsets[None], (nf,) + offsets.shape)
    if offsets.shape[0] != nf or offsets.shape[-1] != 2:
        raise ValueError(f"recenter: offsets shape {offsets.shape} does not match {nf} fields")
    fc = np.array(frame_center(img3.shape))
    dy, dx = np.zeros(nf), np.zeros(nf)
    for k in range(nf):
        pos = measure_center(img3[k], fc + offsets[k], method, window_size, psf=psf)
        c = intersect_diagonals(pos) if len(pos) == 4 else pos[0]
        if np.isfinite(c).all():
            dy[k], dx[k] = fc - c
    out = _shift_finite(img3.astype(np.float32, copy=False), img3, dy, dx)
    out_err = None
    if err is not None:
        e3 = np.asarray(err)
        e3 = e3[None] if e3.ndim == 2 else e3
        out_err = _shift_finite(e3.astype(np.float32, copy=False), e3, dy, dx)
        if squeeze:
            out_err = out_err[0]
    if squeeze:
        out = out[0]
    return out, out_err, (dy, dx)

"""Bad-pixel detection (the adaptive sigma clip of docs/instrument.md §2.5) and repair.

Static bad pixels (hot, dead, stuck) are found once on a master frame, then repaired in
every science frame by the median of their valid neighbours. Detecting them on the master
background rather than on science frames keeps stars from being "repaired".
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

__all__ = [
    "nanmedian_lastaxis",
    "tile_statistics",
    "bad_pixel_mask",
    "isolated_invalid",
    "repair_bad_pixels",
]

#: 1 / Phi^-1(3/4): converts a median absolute deviation to a Gaussian sigma.
MAD_TO_SIGMA = 1.482602218505602


def nanmedian_lastaxis(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """NaN-ignoring median along the last axis, fully vectorised.

    ``np.nanmedian`` falls back to a Python loop over rows when NaNs are present; this
    sorts once (NaNs go last) and picks the middle of the valid values.

    Returns
    -------
    median : ndarray
        ``a.shape[:-1]``, NaN where a row has no valid value.
    count : ndarray of int
        Number of valid values per row.
    """
    s = np.sort(a, axis=-1)
    n = np.count_nonzero(~np.isnan(s), axis=-1)
    lo = np.clip((n - 1) // 2, 0, None)[..., None]
    hi = np.clip(n // 2, 0, a.shape[-1] - 1)[..., None]
    med = 0.5 * (np.take_along_axis(s, lo, -1)[..., 0] + np.take_along_axis(s, hi, -1)[..., 0])
    return np.where(n > 0, med, np.nan).astype(a.dtype, copy=False), n


def tile_statistics(image: np.ndarray, box: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Median and robust sigma (1.4826 MAD) of ``box`` x ``box`` tiles, NaN-ignoring.

    The tiles are the boxes centred on the grid ``box/2, box/2 + box, ...`` along each axis
    separately (docs/instrument.md §2.5; the reference used ``shape[0]`` for both axes). A partial last tile
    along an axis holds the leftover rows/columns.

    Returns
    -------
    median, sigma : ndarray
        ``(ceil(ny / box), ceil(nx / box))``.
    """
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 2:
        raise ValueError(f"tile_statistics expects a 2-D image, got shape {image.shape}")
    ny, nx = image.shape
    ty, tx = -(-ny // box), -(-nx // box)
    padded = np.full((ty * box, tx * box), np.nan, np.float32)
    padded[:ny, :nx] = image
    tiles = padded.reshape(ty, box, tx, box).transpose(0, 2, 1, 3).reshape(ty, tx, box * box)
    med, _ = nanmedian_lastaxis(tiles)
    mad, _ = nanmedian_lastaxis(np.abs(tiles - med[..., None]))
    return med, MAD_TO_SIGMA * mad


def bad_pixel_mask(image: np.ndarray, box: int = 8, nsigma: float = 10.0) -> np.ndarray:
    """Adaptive sigma clip (docs/instrument.md §2.5): flag pixels more than ``nsigma`` sigma from their tile median.

    Parameters
    ----------
    image : ndarray (ny, nx)
        A frame without sources, normally a master background (dark).
    box : int
        Tile side [px].
    nsigma : float
        Clip threshold in units of the tile's robust sigma.

    Returns
    -------
    mask : ndarray of bool (ny, nx)
        True for bad pixels. Non-finite pixels are *not* flagged (they are already
        unusable and need no detection).

    Notes
    -----
    The tile sigma is 1.4826 x the median absolute deviation, not the plain standard
    deviation the reference uses: in a 64-pixel tile a single outlier can never be more
    than sqrt(63) ~ 7.9 plain standard deviations from the mean, so a 10-sigma clip with
    ``nanstd`` never flags an isolated hot pixel. Tile sigmas are floored at a tenth of
    the image-wide median tile sigma so that an unusually quiet tile does not flag its
    ordinary pixels.
    """
    image = np.asarray(image, dtype=np.float32)
    med, sig = tile_statistics(image, box)
    finite_sig = sig[np.isfinite(sig)]
    floor = 0.1 * float(np.median(finite_sig)) if finite_sig.size else 0.0
    sig = np.fmax(sig, floor)
    ny, nx = image.shape
    med_full = np.repeat(np.repeat(med, box, axis=0), box, axis=1)[:ny, :nx]
    sig_full = np.repeat(np.repeat(sig, box, axis=0), box, axis=1)[:ny, :nx]
    with np.errstate(invalid="ignore"):
        return np.abs(image - med_full) > nsigma * sig_full


def isolated_invalid(valid: np.ndarray, min_valid_neighbours: int = 5) -> np.ndarray:
    """Invalid pixels surrounded mostly by valid ones (dead pixels inside the beam).

    Used on flats: pixels outside the illuminated MBI fields are invalid too, but they are
    not "bad pixels" to repair. A pixel counts when at least ``min_valid_neighbours`` of
    its 8 neighbours are valid.
    """
    valid = np.asarray(valid, dtype=bool)
    counts = ndimage.correlate(valid.astype(np.uint8), np.ones((3, 3), np.uint8), mode="constant")
    return ~valid & (counts >= min_valid_neighbours)


def neighbour_table(mask: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Bad-pixel coordinates and, for each, the (clipped) coordinates of its window
    neighbours and whether each neighbour is usable (inside the frame, not bad itself)."""
    ys, xs = np.nonzero(mask)
    half = size // 2
    oy, ox = np.mgrid[-half : half + 1, -half : half + 1]
    keep = (oy != 0) | (ox != 0)
    oy, ox = oy[keep], ox[keep]
    ny, nx = mask.shape
    nby = ys[:, None] + oy[None, :]
    nbx = xs[:, None] + ox[None, :]
    inside = (nby >= 0) & (nby < ny) & (nbx >= 0) & (nbx < nx)
    nby = np.clip(nby, 0, ny - 1)
    nbx = np.clip(nbx, 0, nx - 1)
    usable = inside & ~mask[nby, nbx]
    return ys, xs, nby, nbx, usable


def repair_bad_pixels(
    cube: np.ndarray,
    mask: np.ndarray,
    err: np.ndarray | None = None,
    size: int = 5,
    max_elements: int = 4_000_000,
    neighbour_err=None,
    err_out: np.ndarray | None = None,
    table: tuple | None = None,
) -> int:
    """Replace masked pixels, in place, by the median of their valid neighbours.

    Parameters
    ----------
    cube : ndarray (nframes, ny, nx) or (ny, nx), float
        Modified in place.
    mask : ndarray of bool (ny, nx)
        Static bad pixels (the same in every frame).
    err : ndarray like ``cube``, optional
        Error cube, modified in place: a repaired pixel gets
        ``max(median neighbour error, 1.4826 MAD of the neighbour values) * sqrt(1 + pi / (2 n))``
        (the scatter term covers gradients such as a PSF wing; the factor is the extra
        variance of a median of ``n`` values).
    size : int
        Odd window side; neighbours are the ``size**2 - 1`` pixels around the bad one.
        NaN neighbours (e.g. saturated) and other bad pixels are ignored; a pixel with no
        valid neighbour becomes NaN.
    max_elements : int
        Frames are processed in blocks so the gathered neighbour array stays below this.
    neighbour_err : callable, optional
        Instead of ``err``: ``neighbour_err(values, nby, nbx)`` gives the errors of neighbour
        pixels ``(nby, nbx)`` from their (unrepaired) values, shape ``(F, nbad, size**2 - 1)``
        (when the error cube is not computed, see :mod:`vampd.stages.calerror`).
    table : tuple, optional
        :func:`neighbour_table` of ``(mask, size)``, precomputed for repeated calls.
    err_out : ndarray (nframes, nbad), optional
        Receives the repaired pixels' errors (order of ``np.nonzero(mask)``), with
        ``err`` or ``neighbour_err``.

    Returns
    -------
    int
        Number of bad pixels per frame that were repaired (``mask.sum()``).
    """
    mask = np.asarray(mask, dtype=bool)
    squeeze = cube.ndim == 2
    if squeeze:
        cube = cube[None]
        err = None if err is None else err[None]
    if mask.shape != cube.shape[-2:]:
        raise ValueError(f"bad-pixel mask shape {mask.shape} does not match frame shape {cube.shape[-2:]}")
    if size < 3 or size % 2 == 0:
        raise ValueError(f"repair window size must be odd and >= 3, got {size}")
    nbad = int(mask.sum())
    if nbad == 0:
        return 0
    ys, xs, nby, nbx, usable = neighbour_table(mask, size) if table is None else table
    nframes = cube.shape[0]
    step = max(1, max_elements // max(1, nby.size))
    dtype = cube.dtype
    for f0 in range(0, nframes, step):
        fs = slice(f0, min(f0 + step, nframes))
        got = cube[fs, nby, nbx]
        vals = np.where(usable, got, np.nan)  # (F, M, K)
        med, n = nanmedian_lastaxis(vals)
        cube[fs, ys, xs] = med
        if err is not None or neighbour_err is not None:
            enb = err[fs, nby, nbx] if err is not None else neighbour_err(got, nby, nbx)
            enb = np.where(usable, enb, np.nan)
            emed, _ = nanmedian_lastaxis(enb)
            with np.errstate(invalid="ignore"):
                mad, _ = nanmedian_lastaxis(np.abs(vals - med[..., None]))
                inflate = np.sqrt(1.0 + (math.pi / 2.0) / np.maximum(n, 1))
                e = np.fmax(emed, MAD_TO_SIGMA * mad) * inflate
            e = np.where(n > 0, e, np.nan).astype(dtype, copy=False)
            if err is not None:
                err[fs, ys, xs] = e
            if err_out is not None:
                err_out[fs] = e
    return nbad

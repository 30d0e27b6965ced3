"""Strehl ratio estimate (docs/instrument.md §3.2): the pixel-deconvolved, Fourier-interpolated peak of
the image over its aperture flux, divided by the same ratio for the synthetic PSF.

Estimates are rejected (NaN) outside [0, 1.1] rather than the reference's [0, 1] (see
:func:`strehl_ratio`); the pixel response is deconvolved with the continuous ``sinc``.
"""

from __future__ import annotations

import numpy as np

from vampd.stages.aperture import aperture_photometry, gather_boxes
from vampd.stages.dft import upsampled_peak

__all__ = ["STREHL_BOX", "STREHL_MAX", "normalized_peak", "strehl_ratio", "template_norm_peak"]

#: Side of the sub-image used for the Strehl peak (as in the reference).
STREHL_BOX = 20
#: Largest Strehl estimate still reported (noise pushes perfect frames slightly above 1).
STREHL_MAX = 1.1


def normalized_peak(
    data: np.ndarray,
    cy: np.ndarray,
    cx: np.ndarray,
    radius: float,
    flux: np.ndarray | None = None,
    background: np.ndarray | float = 0.0,
    box: int = STREHL_BOX,
    factor: int = 4,
) -> np.ndarray:
    """Pixel-deconvolved, Fourier-interpolated peak divided by the aperture flux (docs/instrument.md §3.2, Strehl).

    A ``box``-px sub-image with origin ``floor(c) - box/2`` (as the reference) is cut per frame,
    background-subtracted, interpolated on a ``1/factor`` px grid around ``c`` after dividing its
    spectrum by the pixel transfer function, and its maximum is divided by ``flux`` (the aperture
    sum of ``radius`` px at ``c``; computed if not given).
    """
    data = np.asarray(data)
    if data.ndim == 2:
        data = data[None]
    n = data.shape[0]
    cy = np.broadcast_to(np.asarray(cy, dtype=np.float64), (n,))
    cx = np.broadcast_to(np.asarray(cx, dtype=np.float64), (n,))
    ok = np.isfinite(cy) & np.isfinite(cx)
    fy = np.floor(np.where(ok, cy, 0)).astype(np.int64)
    fx = np.floor(np.where(ok, cx, 0)).astype(np.int64)
    half = box // 2
    y0, x0 = fy - half, fx - half
    sub = gather_boxes(data, y0, x0, box) - np.asarray(background, dtype=np.float64).reshape(-1, 1, 1)
    centers = np.stack([cy - y0, cx - x0], axis=1)
    peak = upsampled_peak(sub, factor=factor, centers=np.where(ok[:, None], centers, half), search=1.0)
    if flux is None:
        flux = aperture_photometry(data, cy, cx, radius)[0]
    with np.errstate(divide="ignore", invalid="ignore"):
        out = peak / flux
    return np.where(ok, out, np.nan)


def strehl_ratio(norm_peak: np.ndarray, psf_norm_peak: float, upper: float = STREHL_MAX) -> np.ndarray:
    """``S = P_img / P_psf``; values outside ``[0, upper]`` (failed estimates) become NaN.

    The reference rejects S > 1. With noise, a near-diffraction-limited frame legitimately
    measures slightly above 1, and rejecting it would make frame selection on Strehl drop the
    best frames, so values up to ``upper`` (default :data:`STREHL_MAX` = 1.1) are kept as measured.
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        s = np.asarray(norm_peak, dtype=np.float64) / psf_norm_peak
    return np.where((s >= 0) & (s <= upper), s, np.nan)


_PSF_NORM_CACHE: dict[tuple, float] = {}


def template_norm_peak(psf: np.ndarray, radius: float) -> float:
    """Normalised peak of a synthetic PSF template at its geometric centre (:func:`normalized_peak`).

    Cached on the template's bytes and ``radius``: the template rarely changes.
    """
    psf = np.ascontiguousarray(psf, dtype=np.float64)
    key = (psf.shape, hash(psf.tobytes()), float(radius))
    if key not in _PSF_NORM_CACHE:
        if len(_PSF_NORM_CACHE) > 64:
            _PSF_NORM_CACHE.clear()
        cy, cx = (psf.shape[0] - 1) / 2, (psf.shape[1] - 1) / 2
        _PSF_NORM_CACHE[key] = float(normalized_peak(psf[None], np.array([cy]), np.array([cx]), radius)[0])
    return _PSF_NORM_CACHE[key]

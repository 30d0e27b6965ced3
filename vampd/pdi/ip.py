"""Residual instrumental-polarisation correction (docs/instrument.md §9.6).

The reference uses ``p_Q = median(Q)/median(I_Q)`` and ``p_U = median(U)/median(I_U)`` over an
aperture (radius ``ip_radius``) or annulus (``ip_radius``, ``ip_radius2``) centred on the frame
centre. vampd's default is the ratio of overlap-weighted **sums** ``ΣwQ/ΣwI_Q`` (a documented
deviation): with ADI the diffraction pattern (spiders) rotates between the members of a set,
so the instrumental polarisation leaking from I is not pixel-wise proportional to I_Q and the
ratio of medians, dominated by the faint outer pixels, leaves ~0.5 % on the star (measured on a
simulated night with 1 % injected IP); the flux-weighted ratio removes it to < 0.05 %. The
weighted median is kept as ``statistic="median"``. Then
``Q ← Q − p_Q·I_Q``, ``U ← U − p_U·I_U``. With ``p`` treated as a constant the correction is
linear in the member images, so :func:`ip_correct_weights` updates the weight matrix and the
errors stay exact (``σ_Q² = Σ (w_Q − p_Q w_IQ)² σ²``, the covariance of Q and I_Q included).
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

from vampd.imaging import frame_center

__all__ = ["region_weights", "weighted_median", "measure_ip", "ip_correct_weights", "ip_header_values"]


@lru_cache(maxsize=16)
def _region(
    shape: tuple[int, int], center: tuple[float, float], method: str, r1: float, r2: float | None
) -> np.ndarray:
    from photutils.aperture import CircularAnnulus, CircularAperture

    pos = (center[1], center[0])  # photutils takes (x, y)
    if method == "aperture":
        ap = CircularAperture(pos, r=r1)
    elif method == "annulus":
        if r2 is None or r2 <= r1:
            raise ValueError(f"polarimetry.ip_radius2 = {r2!r} must be > ip_radius = {r1!r} for an annulus")
        ap = CircularAnnulus(pos, r_in=r1, r_out=r2)
    else:
        raise ValueError(f"polarimetry.ip_method = {method!r}, expected 'aperture' or 'annulus'")
    w = ap.to_mask(method="exact").to_image(shape)
    if w is None:
        return np.zeros(shape)
    w.setflags(write=False)
    return w


def region_weights(
    shape, method: str = "aperture", r1: float = 15.0, r2: float | None = None, center=None
) -> np.ndarray:
    """Fractional-overlap weights ``(ny, nx)`` of the IP region (frame centre by default)."""
    shape = (int(shape[-2]), int(shape[-1]))
    c = frame_center(shape) if center is None else (float(center[0]), float(center[1]))
    return _region(shape, c, method, float(r1), None if r2 is None else float(r2))


def weighted_median(values: np.ndarray, weights: np.ndarray) -> float:
    """Median of ``values`` with ``weights`` (NaNs and zero weights ignored): the smallest value
    whose cumulative weight reaches half the total (mean of the two middle values at an exact half)."""
    v = np.asarray(values, float).ravel()
    w = np.asarray(weights, float).ravel()
    ok = np.isfinite(v) & (w > 0)
    if not ok.any():
        return math.nan
    v, w = v[ok], w[ok]
    order = np.argsort(v)
    v, w = v[order], w[order]
    cw = np.cumsum(w)
    half = 0.5 * cw[-1]
    i = int(np.searchsorted(cw, half))
    if i < len(v) - 1 and math.isclose(cw[i], half, rel_tol=1e-12):
        return float(0.5 * (v[i] + v[i + 1]))
    return float(v[min(i, len(v) - 1)])


def measure_ip(stokes: np.ndarray, region: np.ndarray, statistic: str = "sum") -> tuple[float, float]:
    """``(p_Q, p_U)`` of one field from its ``(4, ny, nx)`` (I_Q, I_U, Q, U) cube.

    ``statistic="sum"`` (default): ratio of overlap-weighted sums ``ΣwQ/ΣwI_Q``;
    ``"median"``: the reference's ratio of (weighted) medians.
    """
    iq, iu, q, u = stokes
    if statistic == "sum":
        ok = region > 0
        with np.errstate(invalid="ignore", divide="ignore"):
            s = [float(np.nansum(np.where(ok, region * p, 0.0))) for p in (iq, iu, q, u)]
            pq = s[2] / s[0] if s[0] else math.nan
            pu = s[3] / s[1] if s[1] else math.nan
        return pq, pu
    miq, miu = weighted_median(iq, region), weighted_median(iu, region)
    pq = weighted_median(q, region) / miq if miq else math.nan
    pu = weighted_median(u, region) / miu if miu else math.nan
    return float(pq), float(pu)


def ip_correct_weights(weights: np.ndarray, pq: float, pu: float) -> np.ndarray:
    """Weight rows after ``Q ← Q − p_Q I_Q``, ``U ← U − p_U I_U`` (rows I_Q, I_U, Q, U)."""
    w = np.asarray(weights, float).copy()
    w[2] = w[2] - pq * w[0]
    w[3] = w[3] - pu * w[1]
    return w


def ip_header_values(pq: float, pu: float) -> dict[str, float]:
    """``IP_POL`` = hypot(p_Q, p_U) and ``IP_ANG`` = ½·deg(atan2(p_U, p_Q))."""
    return {"pq": pq, "pu": pu, "pol": math.hypot(pq, pu), "ang": 0.5 * math.degrees(math.atan2(pu, pq))}

"""Stokes products (docs/instrument.md §9.7, §9.8): cylindrical Stokes, LP_I, AoLP, stellar polarisation.

Frame: North up, East left (derotated), centre = the frame centre ``(c_y, c_x)``,
``θ = atan2(c_x − x, y − c_y) + φ`` (angle East of North):

* azimuthal: ``Q_φ = −Q cos2θ − U sin2θ``, ``U_φ = Q sin2θ − U cos2θ`` (Q_φ > 0 for tangential
  polarisation); radial: ``Q_r = −Q_φ``, ``U_r = −U_φ``;
* ``LP_I = sqrt(Q² + U²)``, ``AOLP = ½·atan2(U, Q)`` [rad] with ``σ = ½·hypot(Q σ_U, U σ_Q)/LP²``
  (the reference forgets the ½).
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

from vampd.imaging import frame_center

__all__ = [
    "product_names",
    "cylindrical_stokes",
    "stokes_products",
    "star_polarization",
]


def product_names(cyl_stokes: str = "azimuthal") -> list[str]:
    """``I_Q, I_U, Q, U, Q_PHI, U_PHI, LP_I, AOLP`` (``Q_R, U_R`` for ``"radial"``)."""
    if cyl_stokes == "radial":
        return ["I_Q", "I_U", "Q", "U", "Q_R", "U_R", "LP_I", "AOLP"]
    if cyl_stokes != "azimuthal":
        raise ValueError(f"polarimetry.cyl_stokes = {cyl_stokes!r}, expected 'azimuthal' or 'radial'")
    return ["I_Q", "I_U", "Q", "U", "Q_PHI", "U_PHI", "LP_I", "AOLP"]


@lru_cache(maxsize=8)
def _cos_sin(shape: tuple[int, int], center: tuple[float, float], phi_deg: float):
    ny, nx = shape
    y = np.arange(ny, dtype=float)[:, None]
    x = np.arange(nx, dtype=float)[None, :]
    theta = np.arctan2(center[1] - x, y - center[0]) + math.radians(phi_deg)
    c2, s2 = np.cos(2 * theta), np.sin(2 * theta)
    c2.setflags(write=False)
    s2.setflags(write=False)
    return c2, s2


def cylindrical_stokes(q, u, eq, eu, center=None, phi_deg: float = 0.0, mode: str = "azimuthal"):
    """(Q_φ, U_φ, σ_Qφ, σ_Uφ) — or (Q_r, U_r, …) for ``mode="radial"`` — of (…, ny, nx) maps."""
    q, u = np.asarray(q, float), np.asarray(u, float)
    shape = (q.shape[-2], q.shape[-1])
    c = frame_center(shape) if center is None else (float(center[0]), float(center[1]))
    c2, s2 = _cos_sin(shape, c, float(phi_deg))
    qphi = -q * c2 - u * s2
    uphi = q * s2 - u * c2
    eqphi = np.hypot(c2 * eq, s2 * eu)
    euphi = np.hypot(s2 * eq, c2 * eu)
    if mode == "radial":
        return -qphi, -uphi, eqphi, euphi
    if mode != "azimuthal":
        raise ValueError(f"polarimetry.cyl_stokes = {mode!r}, expected 'azimuthal' or 'radial'")
    return qphi, uphi, eqphi, euphi


def stokes_products(stokes: np.ndarray, err: np.ndarray, cyl_stokes: str = "azimuthal", phi_deg: float = 0.0):
    """The eight product planes and their errors from ``(…, 4, ny, nx)`` (I_Q, I_U, Q, U).

    Returns
    -------
    data, err : ndarray (…, 8, ny, nx) float32
        Planes of :func:`product_names`.
    """
    s = np.asarray(stokes, float)
    e = np.asarray(err, float)
    iq, iu, q, u = (s[..., i, :, :] for i in range(4))
    eiq, eiu, eq, eu = (e[..., i, :, :] for i in range(4))
    qc, uc, eqc, euc = cylindrical_stokes(q, u, eq, eu, phi_deg=phi_deg, mode=cyl_stokes)
    with np.errstate(invalid="ignore", divide="ignore"):
        lp = np.hypot(q, u)
        elp = np.hypot(u * eu, q * eq) / lp
        aolp = 0.5 * np.arctan2(u, q)
        eaolp = 0.5 * np.hypot(q * eu, u * eq) / (lp * lp)
    data = np.stack([iq, iu, q, u, qc, uc, lp, aolp], axis=-3)
    errs = np.stack([eiq, eiu, eq, eu, eqc, euc, elp, eaolp], axis=-3)
    return data.astype(np.float32), errs.astype(np.float32)


@lru_cache(maxsize=8)
def _phot_weights(shape, center, r_ap, r_in, r_out):
    from photutils.aperture import CircularAnnulus, CircularAperture

    pos = (center[1], center[0])
    ap = CircularAperture(pos, r=r_ap).to_mask(method="exact").to_image(shape)
    ann = None
    if r_in is not None and r_out is not None and r_out > r_in:
        ann = CircularAnnulus(pos, r_in=r_in, r_out=r_out).to_mask(method="exact").to_image(shape)
    return ap, ann


def star_polarization(
    stokes: np.ndarray, err: np.ndarray, aper_rad: float = 8.0, ann_rad=None, center=None
) -> dict[str, float]:
    """Aperture photometry of I_Q, I_U, Q, U at the frame centre and the star's polarisation.

    Parameters
    ----------
    stokes, err : ndarray (4, ny, nx)
    aper_rad : float
        Aperture radius [px] (``analysis.phot_aper_rad``).
    ann_rad : (r_in, r_out) or None
        Background annulus (``analysis.phot_ann_rad``): its weighted mean per pixel times the
        aperture area is subtracted.

    Returns
    -------
    dict
        ``IQ, IQ_ERR, IU, IU_ERR, Q, Q_ERR, U, U_ERR, DOLP, DOLP_ERR`` and ``AOLP``,
        ``AOLP_ERR`` in **degrees**, ``AOLP = ½·atan2(u, q)`` with ``q = Q/I_Q``, ``u = U/I_U``.
    """
    s = np.asarray(stokes, float)
    e = np.asarray(err, float)
    shape = s.shape[-2:]
    c = frame_center(shape) if center is None else (float(center[0]), float(center[1]))
    r_in, r_out = (None, None) if not ann_rad else (float(ann_rad[0]), float(ann_rad[1]))
    ap, ann = _phot_weights(tuple(shape), c, float(aper_rad), r_in, r_out)
    out: dict[str, float] = {}
    for i, name in enumerate(("IQ", "IU", "Q", "U")):
        img = np.nan_to_num(s[i])
        var = np.nan_to_num(e[i] ** 2)
        flux = float((ap * img).sum())
        fvar = float((ap * ap * var).sum())
        if ann is not None and ann.sum() > 0:
            area = float(ap.sum())
            bkg = float((ann * img).sum() / ann.sum())
            flux -= bkg * area
            fvar += float((ann * ann * var).sum()) * (area / ann.sum()) ** 2
        out[name] = flux
        out[name + "_ERR"] = math.sqrt(fvar)
    with np.errstate(all="ignore"):
        q = out["Q"] / out["IQ"] if out["IQ"] else math.nan
        u = out["U"] / out["IU"] if out["IU"] else math.nan
        sq = math.hypot(out["Q_ERR"] / out["IQ"], out["Q"] * out["IQ_ERR"] / out["IQ"] ** 2) if out["IQ"] else math.nan
        su = math.hypot(out["U_ERR"] / out["IU"], out["U"] * out["IU_ERR"] / out["IU"] ** 2) if out["IU"] else math.nan
    p = math.hypot(q, u)
    out["DOLP"] = p
    out["DOLP_ERR"] = math.hypot(q * sq, u * su) / p if p > 0 else math.hypot(sq, su)
    out["AOLP"] = 0.5 * math.degrees(math.atan2(u, q))
    out["AOLP_ERR"] = 0.5 * math.degrees(math.hypot(q * su, u * sq) / (p * p)) if p > 0 else math.nan
    return out

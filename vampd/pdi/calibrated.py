"""Stokes products in the specphot unit (issue 6: "running Stokes products carry the calibrated unit").

The e-/s Stokes products stay what they are; the calibrated unit goes into a *companion* file next
to each one, named after the unit (:func:`calibrated_path`):

* ``pdi/{name}_stokes_coll_{unit}.fits`` — ``(8, N, N)`` + ``ERR`` + field header HDUs;
* ``pdi/{name}_stokes_cube_{unit}.fits`` — ``(nfields, 8, N, N)`` (MBI only).

``{unit}`` is the specphot slug (``jy``, ``jyas2``, ``contrast``). Every plane but ``AOLP``
(radians) is multiplied by the factor of its field, errors by its absolute value. With several
fields each field gets its own factor in the cube and the collapse over fields is the mean of the
*calibrated* fields (polar products recomputed from the mean I_Q, I_U, Q, U), exactly as the e-/s
collapse is made from the e-/s fields.

The factor per field is :func:`vampd.specphot.pdi_unit_factor` of the product's ``OBJECT`` and
field list, over both cameras: the median over every calibrated file of that target. It changes
when a new sequence is calibrated, so the companion is rebuilt from the e-/s product whenever the
e-/s product or the factors change (:func:`update_calibrated_running` is called by the PDI trigger
after each file and by the specphot trigger after each calibrated sequence). That makes it

* idempotent: the companion records a fingerprint of its inputs (size and mtime of the e-/s file,
  unit, factors); an unchanged fingerprint means nothing is written;
* restart-safe: it is derived from files on disk only (no state of its own) and written
  atomically, so a crash between the e-/s product and its companion is repaired by the next call;
* late-calibration aware: a sequence calibrated after sets were already accumulated updates the
  companion at once (the specphot trigger's call).

A running product that mixes several targets (its Stokes table lists more than one ``OBJECT``)
has no single factor: no companion is written for it.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from astropy.io import fits

from vampd.fitsio import write_fits_atomic
from vampd.pdi.cards import set_card
from vampd.pdi.stokes import stokes_products

__all__ = [
    "AOLP_PLANE",
    "calibrated_path",
    "scale_stokes",
    "mean_over_fields",
    "calibrated_stokes",
    "write_calibrated",
    "update_calibrated_running",
]

log = logging.getLogger("vampd.pdi")

#: index of the angle plane (rad) in the 8 product planes: never scaled
AOLP_PLANE = 7
_FP_KEY = "HIERARCH DPP FLUX SRCFP"


def calibrated_path(path: os.PathLike | str, unit: str) -> Path:
    """``…/{stem}_{unit slug}.fits`` next to the e-/s product ``path``."""
    from vampd.specphot.factors import slug

    p = Path(path)
    return p.with_name(f"{p.name[: -len('.fits')] if p.name.endswith('.fits') else p.stem}_{slug(unit)}.fits")


def scale_stokes(
    data8: np.ndarray, err8: np.ndarray, factors: Sequence[float] | float
) -> tuple[np.ndarray, np.ndarray]:
    """Multiply ``(…, nfields, 8, N, N)`` (or ``(8, N, N)``) product planes by per-field factors.

    Planes 0–6 (I_Q, I_U, Q, U, Q_φ, U_φ, LP_I) are fluxes and are scaled; ``AOLP`` is an angle
    and is left alone. Errors are scaled by ``|factor|``.

    Parameters
    ----------
    data8, err8 : ndarray
        Products with the 8 planes on axis -3 and the fields on axis -4 (if any).
    factors : float or sequence of float
        One per field (or one for all).

    Returns
    -------
    data, err : float32 ndarrays (new arrays)
    """
    d = np.asarray(data8, np.float64)
    e = np.asarray(err8, np.float64)
    if d.shape[-3] != 8:
        raise ValueError(f"scale_stokes: data of shape {d.shape}, expected 8 product planes on axis -3")
    f = np.atleast_1d(np.asarray(factors, np.float64))
    plane = np.ones(8)
    if d.ndim >= 4:
        if f.size not in (1, d.shape[-4]):
            raise ValueError(f"scale_stokes: {f.size} factors for {d.shape[-4]} fields (data {d.shape})")
        g = np.broadcast_to(f, (d.shape[-4],))[:, None] * plane[None, :]  # (nf, 8)
    else:
        if f.size != 1:
            raise ValueError(f"scale_stokes: {f.size} factors for a single-field product {d.shape}")
        g = f[0] * plane
    g = np.array(g)
    g[..., AOLP_PLANE] = 1.0
    g = g[..., None, None]
    return (d * g).astype(np.float32), (e * np.abs(g)).astype(np.float32)


def mean_over_fields(
    cube8: np.ndarray, ecube8: np.ndarray, cyl_stokes: str = "azimuthal"
) -> tuple[np.ndarray, np.ndarray]:
    """Mean over fields of ``(nfields, 8, N, N)`` (NaN-aware, error RSS / n); the polar products
    are recomputed from the mean I_Q, I_U, Q, U → ``(8, N, N)`` (same as the e-/s collapse)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        n = np.sum(np.isfinite(cube8[:, :4]), axis=0)
        nn = np.where(n > 0, n, np.nan)
        m = np.nansum(cube8[:, :4], axis=0) / nn
        e = np.sqrt(np.nansum(np.asarray(ecube8[:, :4], np.float64) ** 2, axis=0)) / nn
    d, s = stokes_products(m[None], e[None], cyl_stokes)
    return d[0], s[0]


def calibrated_stokes(cube8, ecube8, factors: Sequence[float], cyl_stokes: str = "azimuthal") -> dict[str, np.ndarray]:
    """Calibrated products of a ``(nfields, 8, N, N)`` cube: ``cube``, ``ecube`` (each field by its
    own factor) and ``coll``, ``ecoll`` (``(8, N, N)``: the field itself, or the mean of the
    calibrated fields)."""
    cube, ecube = scale_stokes(cube8, ecube8, factors)
    if cube.shape[0] == 1:
        coll, ecoll = cube[0], ecube[0]
    else:
        coll, ecoll = mean_over_fields(cube, ecube, cyl_stokes)
    return {"cube": cube, "ecube": ecube, "coll": coll, "ecoll": ecoll}


def _unit_header(
    h: fits.Header, unit: str, fields: Sequence[str], factors: Sequence[float], field: str | None = None
) -> fits.Header:
    h = h.copy()
    set_card(h, "BUNIT", unit, "specphot unit; AOLP in rad")
    set_card(h, "HIERARCH DPP FLUX UNIT", unit, "specphot unit")
    for f, v in zip(fields, factors, strict=True):
        if field is None or f == field:
            set_card(h, f"HIERARCH DPP FLUX FACTOR {f}", float(v), f"e-/s -> {unit}")
    return h


def write_calibrated(
    path_coll: os.PathLike | str,
    path_cube: os.PathLike | str | None,
    cube8: np.ndarray,
    ecube8: np.ndarray,
    header: fits.Header,
    field_hdus: Sequence[fits.ImageHDU],
    fields: Sequence[str],
    unit: str,
    factors: Mapping[str, float],
    cyl_stokes: str = "azimuthal",
    extra: Mapping[str, tuple] | None = None,
) -> dict[str, Path]:
    """Write the calibrated companion(s) of an e-/s Stokes product.

    Parameters
    ----------
    path_coll, path_cube : path
        The e-/s collapse and (MBI) cube; the companions go next to them (:func:`calibrated_path`).
    cube8, ecube8 : ndarray (nfields, 8, N, N)
        The e-/s products per field.
    header : Header
        Primary header of the e-/s collapse (``FIELD = COMB`` for MBI is kept).
    field_hdus : sequence of ImageHDU
        Header-only HDUs, one per field.
    factors : dict field → factor
        Must hold every field.
    extra : dict keyword → (value, comment), optional
        More primary cards (provenance).

    Returns
    -------
    dict
        ``{"coll_unit": path[, "cube_unit": path]}``.
    """
    missing = [f for f in fields if f not in factors or not math.isfinite(float(factors[f]))]
    if missing:
        raise ValueError(
            f"no {unit} factor for field(s) {', '.join(missing)} (factors for {', '.join(factors) or 'none'})"
        )
    fac = [float(factors[f]) for f in fields]
    prods = calibrated_stokes(cube8, ecube8, fac, cyl_stokes)
    hdr = _unit_header(header, unit, fields, fac)
    for k, v in (extra or {}).items():
        set_card(hdr, k, *(v if isinstance(v, tuple) else (v,)))
    fh = [
        fits.ImageHDU(header=_unit_header(h.header, unit, fields, fac, field=f), name=h.name)
        for f, h in zip(fields, field_hdus, strict=True)
    ]
    out: dict[str, Path] = {}
    if len(fields) > 1 and path_cube is not None:
        chdr = hdr.copy()
        chdr.remove("FIELD", ignore_missing=True)
        out["cube_unit"] = write_fits_atomic(
            calibrated_path(path_cube, unit),
            fits.HDUList(
                [
                    fits.PrimaryHDU(prods["cube"], header=chdr),
                    fits.ImageHDU(prods["ecube"], name="ERR"),
                    *[h.copy() for h in fh],
                ]
            ),
        )
    out["coll_unit"] = write_fits_atomic(
        calibrated_path(path_coll, unit),
        fits.HDUList([fits.PrimaryHDU(prods["coll"], header=hdr), fits.ImageHDU(prods["ecoll"], name="ERR"), *fh]),
    )
    return out


# ------------------------------------------------------------------------------------------------
# the running products


def _targets_in_table(path: Path) -> set[str]:
    if not path.exists():
        return set()
    with open(path, newline="") as fh:
        return {r.get("OBJECT", "") for r in csv.DictReader(fh)} - {""}


def _fingerprint(src: Sequence[Path], unit: str, factors: Mapping[str, float]) -> str:
    stat = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in src]
    payload = json.dumps([stat, unit, sorted(factors.items())], default=str)
    return hashlib.sha1(payload.encode()).hexdigest()[:16]


def update_calibrated_running(outdir: os.PathLike | str, name: str, cyl_stokes: str = "azimuthal") -> dict[str, Path]:
    """Bring the calibrated companions of the running Stokes products up to date.

    Reads ``pdi/{name}_stokes_coll.fits`` (and ``_stokes_cube.fits`` with several fields), looks
    up the factors of its ``OBJECT`` and fields (:func:`vampd.specphot.pdi_unit_factor`) and
    writes the companions when the e-/s product or the factors changed since the last call (see
    the module docstring). Does nothing (returns ``{}``) while no sequence of the target is
    calibrated, when nothing changed, or when the running product mixes targets.

    Returns
    -------
    dict
        The paths written by :func:`write_calibrated`.
    """
    from vampd.pdi.running import running_paths
    from vampd.specphot.factors import pdi_unit_factor

    paths = running_paths(outdir, name)
    coll_p, cube_p = paths["coll"], paths["cube"]
    if not coll_p.exists():
        return {}
    header = fits.getheader(coll_p)
    target = str(header.get("OBJECT", ""))
    with fits.open(coll_p) as h:
        fields = [x.header.get("FIELD", x.name) for x in h[1:] if x.name != "ERR"]
    targets = _targets_in_table(paths["table"])
    if len(targets) > 1:
        log.warning("running Stokes products mix targets %s: no calibrated companion", ", ".join(sorted(targets)))
        return {}
    unit, factors = pdi_unit_factor(outdir, target, ",".join(fields))
    if unit == "e-/s" or not factors:
        return {}
    src = [coll_p] + ([cube_p] if len(fields) > 1 else [])
    if len(fields) > 1 and not cube_p.exists():
        return {}
    fp = _fingerprint(src, unit, {f: factors.get(f) for f in fields})
    out_p = calibrated_path(coll_p, unit)
    if out_p.exists():
        try:
            if fits.getheader(out_p).get(_FP_KEY.replace("HIERARCH ", "")) == fp:
                return {}
        except OSError:
            pass  # unreadable companion: rewrite it
    with fits.open(src[-1]) as h:
        cube = np.asarray(h[0].data, np.float32)
        ecube = np.asarray(h["ERR"].data, np.float32)
        if cube.ndim == 3:
            cube, ecube = cube[None], ecube[None]
        hdr = fits.getheader(coll_p)
    with fits.open(coll_p) as h:
        fhdus = [fits.ImageHDU(header=x.header.copy(), name=x.name) for x in h[1:] if x.name != "ERR"]
    for k in ("BITPIX", "NAXIS", "NAXIS1", "NAXIS2", "NAXIS3", "NAXIS4", "EXTEND", "SIMPLE"):
        hdr.remove(k, ignore_missing=True, remove_all=True)
    written = write_calibrated(
        coll_p,
        cube_p,
        cube,
        ecube,
        hdr,
        fhdus,
        fields,
        unit,
        factors,
        cyl_stokes,
        extra={_FP_KEY: (fp, "inputs of this companion")},
    )
    log.info(
        "running Stokes products of %s in %s (factor %s)",
        target,
        unit,
        ", ".join(f"{f} {factors[f]:.4g}" for f in fields),
    )
    return written

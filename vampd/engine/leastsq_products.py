"""Products of the least-squares accumulators (``polarimetry.method = "leastsq"``, issue 13).

:func:`refresh_group` solves one group's accumulator after every change (cheap) to record the
running Q_φ S/N in the ledger, and rewrites its products at a bounded rate (``leastsq_refresh_files``
accumulator generations — about one per recorded file — or ``leastsq_refresh_seconds`` seconds since
the last refresh; always with ``force``):

* ``pdi/{name}_stokes_coll.fits`` (the group just updated) — ``(8, N, N)`` planes
  ``I_Q, I_U, Q, U, Q_PHI, U_PHI, LP_I, AOLP`` (or ``Q_R, U_R``) + ``ERR`` + one header HDU per
  field, exactly the layout of the difference methods (per-camera scale: ``I_Q = I_U = ½ I``);
  with several groups in the night also ``pdi/{name}_{target}_{filter}_stokes_coll.fits``;
* ``…_stokes_cube.fits`` (MBI: ``(nfields, 8, N, N)``), ``…_footprint.fits`` (fraction of the
  cubes covering each pixel), and the specphot companions ``…_{unit}.fits`` when the target is
  calibrated (:func:`vampd.pdi.calibrated.write_calibrated`).

Header: ``DPP PDI METHOD = leastsq``, ``DPP PDI LSQ NCUBES`` (every cube used), ``DPP PDI LSQ
NHWP {angle}`` (cubes per HWP angle), ``DPP PDI LSQ NDEGEN {field}`` (degenerate pixels, NaN),
``DPP PDI LSQ MAXCOND``, ``DPP PDI QPHI SNR``, the IP cards and the star's polarisation as for a set.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import numpy as np
from astropy.io import fits

from vampd.fitsio import write_fits_atomic
from vampd.instrument.wcs import apply_wcs
from vampd.pdi.cards import set_card, strip_structural
from vampd.pdi.ip import ip_header_values
from vampd.pdi.leastsq import LeastSqProducts, solve_products, solve_snr
from vampd.pdi.stokes import product_names, star_polarization

__all__ = ["refresh_group", "product_paths", "write_products"]

log = logging.getLogger("vampd.pdi")


def product_paths(outdir, name: str, label: str | None) -> dict[str, Path]:
    """``pdi/{name}[_{label}]_stokes_coll.fits``, ``_stokes_cube.fits``, ``_footprint.fits``."""
    stem = name if not label else f"{name}_{label}"
    pdi = Path(outdir) / "pdi"
    return {
        "coll": pdi / f"{stem}_stokes_coll.fits",
        "cube": pdi / f"{stem}_stokes_cube.fits",
        "footprint": pdi / f"{stem}_footprint.fits",
    }


def _header(ledger, key: str, pcfg) -> fits.Header:
    """Primary header of the group's latest product (WCS North up), without structural cards."""
    rows = [r for r in ledger.lsq_members(key) if r["error"] is None]
    prods = {r["file"]: r["product"] for r in ledger.lsq_inputs()}
    for r in reversed(rows):
        p = prods.get(r["file"])
        if p and Path(p).exists():
            h = fits.getheader(p)
            break
    else:
        h = fits.Header()
    h = strip_structural(h, ("U_CAMERA", "U_FLC", "RET-ANG1", "DEROTANG"))
    if pcfg.derotate and "RA" in h:
        try:
            h = apply_wcs(h, 0.0)
        except Exception:  # noqa: BLE001 -- a header without a usable WCS keeps none
            pass
    return h


def _cards(
    h: fits.Header, res: LeastSqProducts, fields, pcfg, ncubes: int, coverage: dict, tint: float, star: dict
) -> None:
    h["CTYPE3"] = ("STOKES", "plane axis")
    h["STOKES"] = (",".join(product_names(pcfg.cyl_stokes)), "Stokes product planes")
    set_card(h, "BUNIT", "e-/s", "per camera; I_Q = I_U = I/2; AOLP in rad")
    set_card(h, "HIERARCH DPP PDI METHOD", "leastsq", "per-pixel least squares over every cube")
    set_card(h, "HIERARCH DPP PDI MMCORR", True, "Mueller model inverted per cube")
    set_card(
        h,
        "HIERARCH DPP PDI MM MODEL",
        "ideal"
        if pcfg.use_ideal_mm
        else (f"table {Path(pcfg.mm_table).name}" if pcfg.mm_table else "ideal (no mm_table given)"),
        "Mueller-model parameters",
    )
    set_card(h, "HIERARCH DPP PDI HWPSYNC", bool(pcfg.hwp_adi_sync), "HWP pupil-tracking")
    set_card(h, "HIERARCH DPP PDI IPCORR", bool(pcfg.ip_correct), "residual IP removed")
    set_card(h, "HIERARCH DPP PDI LSQ NCUBES", int(ncubes), "cubes in the least-squares solution")
    for ang, n in coverage.items():
        set_card(h, f"HIERARCH DPP PDI LSQ NHWP {ang}", int(n), "cubes at this HWP angle")
    set_card(h, "HIERARCH DPP PDI LSQ MAXCOND", float(pcfg.leastsq_max_cond), "degenerate above (Frobenius)")
    set_card(h, "HIERARCH DPP PDI QPHI SNR", _finite(res.snr), "Q_phi flux S/N in the S/N annulus")
    h["TINT"] = (0.5 * tint, "[s] total integration (per camera)")
    h["NCOADD"] = (int(ncubes), "cubes combined")
    for j, f in enumerate(fields):
        set_card(h, f"HIERARCH DPP PDI LSQ NDEGEN {f}", int(res.ndegenerate[j]), "degenerate pixels (NaN)")
        if j < len(res.ip) and res.ip[j] is not None:
            v = ip_header_values(*res.ip[j])
            set_card(h, f"HIERARCH DPP PDI IP_PQ {f}", v["pq"], "residual IP (Q/I)")
            set_card(h, f"HIERARCH DPP PDI IP_PU {f}", v["pu"], "residual IP (U/I)")
            set_card(h, f"HIERARCH DPP PDI IP_POL {f}", v["pol"], "residual IP degree")
            set_card(h, f"HIERARCH DPP PDI IP_ANG {f}", v["ang"], "[deg] residual IP angle")
            set_card(h, f"HIERARCH DPP PDI IP_METH {f}", pcfg.ip_method, "IP region")
        if f in star:
            sp = star[f]
            for nm in ("IQ", "IU", "Q", "U"):
                set_card(h, f"HIERARCH DPP PDI {nm} FLUX {f}", sp[nm], "[e-/s] aperture flux")
                set_card(h, f"HIERARCH DPP PDI {nm} FLUX_ERR {f}", sp[nm + "_ERR"], "[e-/s] aperture flux error")
            set_card(h, f"HIERARCH DPP PDI DOLP {f}", _finite(sp["DOLP"]), "star degree of linear polarisation")
            set_card(h, f"HIERARCH DPP PDI DOLP_ERR {f}", _finite(sp["DOLP_ERR"]), "error of DOLP")
            set_card(h, f"HIERARCH DPP PDI AOLP {f}", _finite(sp["AOLP"]), "[deg] star AoLP = 1/2 atan2(U, Q)")
            set_card(h, f"HIERARCH DPP PDI AOLP_ERR {f}", _finite(sp["AOLP_ERR"]), "[deg] error of AOLP")


def _finite(v) -> float:
    return float(v) if v is not None and math.isfinite(v) else -999.0


def write_products(
    outdir,
    name: str,
    label: str | None,
    res: LeastSqProducts,
    header: fits.Header,
    fields,
    pcfg,
    footprint: np.ndarray,
    unit_factors=None,
) -> dict[str, Path]:
    """Write coll (+ cube for MBI), footprint and specphot companions; returns the paths."""
    from vampd.pdi.calibrated import write_calibrated

    paths = product_paths(outdir, name, label)
    names = product_names(pcfg.cyl_stokes)
    fhdus = []
    for f in fields:
        fh = fits.Header()
        fh["CTYPE3"] = "STOKES"
        fh["STOKES"] = ",".join(names)
        fh["FIELD"] = (f, "MBI field / filter")
        for k, v in header.items():
            if k.startswith("DPP PDI") and k.endswith(f" {f}"):
                set_card(fh, f"HIERARCH {k}", v)
        fhdus.append(fits.ImageHDU(header=fh, name=f))
    out: dict[str, Path] = {}
    chdr = header.copy()
    if len(fields) > 1:
        out["cube"] = write_fits_atomic(
            paths["cube"],
            fits.HDUList(
                [
                    fits.PrimaryHDU(res.data8, header=header),
                    fits.ImageHDU(res.err8, name="ERR"),
                    *[h.copy() for h in fhdus],
                ]
            ),
        )
        chdr["FIELD"] = ("COMB", "mean over fields")
    out["coll"] = write_fits_atomic(
        paths["coll"],
        fits.HDUList([fits.PrimaryHDU(res.coll, header=chdr), fits.ImageHDU(res.ecoll, name="ERR"), *fhdus]),
    )
    fhdr = fits.Header()
    fhdr["COMMENT"] = "fraction of the least-squares cubes covering each pixel"
    out["footprint"] = write_fits_atomic(
        paths["footprint"],
        fits.HDUList([fits.PrimaryHDU(footprint[0] if len(fields) == 1 else footprint, header=fhdr)]),
    )
    if unit_factors is not None and unit_factors[1]:
        unit, factors = unit_factors
        try:
            out.update(
                write_calibrated(
                    paths["coll"],
                    paths["cube"],
                    res.data8,
                    res.err8,
                    chdr,
                    fhdus,
                    fields,
                    unit,
                    factors,
                    pcfg.cyl_stokes,
                )
            )
        except ValueError as exc:
            log.warning("%s: no calibrated companion: %s", paths["coll"].name, exc)
    return out


def _star(res: LeastSqProducts, fields, analysis, coronagraphic: bool) -> dict:
    if coronagraphic:
        return {}
    aper = float(getattr(analysis, "phot_aper_rad", 8.0) or 8.0) if analysis is not None else 8.0
    ann = getattr(analysis, "phot_ann_rad", None) if analysis is not None else None
    return {f: star_polarization(res.stokes[j], res.err[j], aper, ann) for j, f in enumerate(fields)}


def refresh_group(ledger, cfg, outdir, key: str, force: bool = False) -> dict:
    """Solve ``key``'s accumulator, record its Q_φ S/N, and rewrite its products when due.

    Returns ``{"key", "ncubes", "snr", "written": {kind: path} or {}}``.
    """
    from vampd.engine.leastsq_trigger import _label, _name, load_accumulator

    pcfg = cfg.polarimetry
    row = next((r for r in ledger.lsq_accumulators() if r["key"] == key), None)
    gen, acc = load_accumulator(ledger, outdir, key)
    if row is None or acc is None or acc.ncubes <= 0 or acc.n is None:
        return {"key": key, "ncubes": 0, "snr": None, "written": {}}
    fields = json.loads(row["fields"] or "[]") or [f"F{j}" for j in range(acc.n.shape[0])]
    stats = json.loads(row["stats"] or "{}")
    since = gen - int(stats.get("gen", 0))  # generations (≈ files: one per engine call) since the last refresh
    age = time.time() - float(row["solved_at"] or 0.0)
    due = force or since >= pcfg.leastsq_refresh_files or age >= pcfg.leastsq_refresh_seconds
    if not due:  # the live figure only
        snr = solve_snr(acc, pcfg)
        ledger.lsq_snr(key, snr)
        return {"key": key, "ncubes": acc.ncubes, "snr": snr, "written": {}}
    res = solve_products(acc, pcfg)
    written: dict = {}
    name = _name(cfg)
    target, filt = key.split("|")[1:]
    coverage = ledger.lsq_coverage(key)
    star = _star(res, fields, cfg.analysis, cfg.coronagraphic)
    hdr = _header(ledger, key, pcfg)
    _cards(hdr, res, fields, pcfg, acc.ncubes, coverage, acc.tint, star)
    with np.errstate(invalid="ignore", divide="ignore"):
        foot = (acc.n / max(acc.ncubes, 1)).astype(np.float32)
    unit = None
    from vampd.engine.specphot_trigger import specphot_enabled

    if specphot_enabled(cfg):
        from vampd.specphot import pdi_unit_factor

        unit = pdi_unit_factor(outdir, target, ",".join(fields))
    groups = ledger.lsq_accumulators(name)
    labels = [None] + ([_label(target, filt)] if len(groups) > 1 else [])
    if force and len(groups) > 1:
        labels = [_label(target, filt)]  # the night's final products: one file per group
    for lab in labels:
        written.update(
            {
                (k if lab is None else f"{k}_group"): str(p)
                for k, p in write_products(outdir, name, lab, res, hdr, fields, pcfg, foot, unit).items()
            }
        )
    stats = {
        "gen": gen,
        "ndegenerate": dict(zip(fields, res.ndegenerate, strict=True)),
        "ncovered": dict(zip(fields, res.ncovered, strict=True)),
        "coverage": coverage,
        "written": written,
        "star_dolp": {f: s["DOLP"] for f, s in star.items()},
        "ip": dict(zip(fields, res.ip, strict=False)),
    }  # no IP entries with ip_correct off
    ledger.lsq_solved(key, acc.ncubes, res.snr, stats)
    return {"key": key, "ncubes": acc.ncubes, "snr": res.snr, "written": written, "ndegenerate": res.ndegenerate}


def final_info(outdir, cfg) -> list[dict]:
    """The report's PDI groups from the least-squares products on disk (read-only ledger):
    ``target``, ``fields``, ``nsets`` (0), ``nfiles`` (cubes), ``paths`` and one pseudo-set whose
    header is the product's (IP and star cards for the report's IP table)."""
    from vampd.engine.ledger import Ledger

    try:
        led = Ledger(outdir, readonly=True)
    except FileNotFoundError:
        return []
    try:
        rows = led.lsq_accumulators(cfg.name or "vampd")
    finally:
        led.close()
    out = []
    for r in rows:
        stats = json.loads(r["stats"] or "{}")
        w = stats.get("written", {})
        paths = {k.replace("_group", ""): v for k, v in w.items() if k.endswith("_group")} or {
            k: v for k, v in w.items() if not k.endswith("_group")
        }
        if "coll" not in paths or not Path(paths["coll"]).exists():
            continue
        hdr = fits.getheader(paths["coll"])
        out.append(
            {
                "target": r["target"],
                "fields": json.loads(r["fields"] or "[]"),
                "nsets": 0,
                "nfiles": int(r["solved_ncubes"] or 0),
                "paths": paths,
                "sets": [{"key": r["key"], "path": paths["coll"], "mjd": None, "header": hdr}],
            }
        )
    return out

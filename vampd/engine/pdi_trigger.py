"""PDI trigger: after each reduced file, rebuild the HWP sets from the ledger, process newly
complete sets, update the running Stokes products, write per-file Mueller matrices and the
diagnostic difference images (domain doc §9, §10, §14).

The engine calls :func:`on_file_done` after a file's products are recorded and :func:`on_finalize`
at the end of the night. Nothing is cached between calls: the set assignment is recomputed from
the ledger's file rows every time (:func:`vampd.pdi.sets.assemble_sets`); sets recorded
``complete`` (and sets found invalid while processing) are permanent and their members are
excluded from the rebuild; open and broken rows are rewritten to match the rebuild.

Crash safety: per complete set the order is set file → accumulator (atomic NPZ, knows which set
keys it holds) → running products → ledger row. A crash anywhere repeats the unfinished steps
on the next call without double counting.

With specphot on, every rebuild ends with :func:`refresh_calibrated`: the running products'
companions in the specphot unit (``pdi/{name}_stokes_coll_{unit}.fits``, MBI cube too) follow
the e-/s products and the target's factors (see :mod:`vampd.pdi.calibrated`).
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

from astropy.io import fits

from vampd.fitsio import read_header
from vampd.instrument.headers import header_summary
from vampd.pdi.diffimages import (
    diff_paths,
    match_double,
    match_single,
    near_records,
    write_double_diff,
    write_single_diff,
)
from vampd.pdi.mmfiles import file_mueller, mm_path, write_mm_file
from vampd.pdi.process import SetInvalid, load_member, make_set_stokes, write_set_file
from vampd.pdi.calibrated import update_calibrated_running
from vampd.pdi.running import RunningStokes, append_table_row, running_paths, write_running_products
from vampd.pdi.sets import HWPSet, all_slots, assemble_sets

__all__ = ["on_file_done", "on_finalize", "update_sets", "set_members", "stokes_path", "refresh_calibrated"]

log = logging.getLogger("vampd.pdi")
_INVALID = "invalid: "


def _name(cfg) -> str:
    return cfg.name or "vampd"


def stokes_path(outdir, cfg, index: int) -> Path:
    """``pdi/stokes/{name}_stokes_{index:03d}.fits``."""
    return Path(outdir) / "pdi" / "stokes" / f"{_name(cfg)}_stokes_{index:03d}.fits"


def _coadded(ledger) -> dict[str, str]:
    return {
        r["file"]: r["path"]
        for r in ledger.conn.execute("SELECT file, path FROM products WHERE kind='coadded'").fetchall()
    }


def _set_rows(ledger) -> list:
    """Set rows, oldest first (read straight from the ledger's ``sets`` table)."""
    return ledger.conn.execute("SELECT * FROM sets ORDER BY id").fetchall()


def _delete_sets(ledger, keys) -> None:
    """Remove open/broken set rows that the rebuild no longer produces."""
    keys = list(keys)
    if keys:
        with ledger.transaction():
            ledger.conn.executemany("DELETE FROM sets WHERE key=?", [(k,) for k in keys])


def set_members(ledger) -> list[dict]:
    """Member records for :func:`assemble_sets` from the ledger: done files with a coadded
    product, and parked files (their raw header gives the slot, when readable)."""
    prods = _coadded(ledger)
    out = []
    for r in ledger.conn.execute(
        "SELECT path, state, target, filter, camera, flc, hwp, mjd, nframes FROM files WHERE state IN ('done', 'parked')"
    ).fetchall():
        rec = dict(r)
        if rec["state"] == "done":
            if rec["path"] not in prods:
                continue
            rec["product"] = prods[rec["path"]]
        elif rec["hwp"] is None or rec["mjd"] is None:
            try:
                summary = header_summary(read_header(rec["path"]))
            except Exception:  # noqa: BLE001 -- an unreadable parked file simply has no slot
                continue
            rec.update({k: summary.get(k) for k in ("target", "filter", "camera", "flc", "hwp", "mjd")})
        out.append(rec)
    return out


# ------------------------------------------------------------------------------------------------
# per-file work


def write_file_mm(cfg, outdir, product: str) -> Path | None:
    """Per-file Mueller matrices ``pdi/mm/…_mm.fits`` of one coadded product."""
    with fits.open(product) as hdul:
        header = hdul[0].header.copy()
        fields = [h.name for h in hdul[1:] if h.name != "ERR" and h.data is None] or [
            str(header.get("FILTER01", "F0"))
        ]
    mm, desc = file_mueller(header, fields, cfg.polarimetry, path=product)
    return write_mm_file(mm_path(outdir, product), mm, header, fields, desc)


def write_diff_images(ledger, cfg, outdir, path: str) -> list[Path]:
    """Single (and, with ``save_double``, double) difference images involving ``path``."""
    tol = cfg.polarimetry.hwp_tolerance if cfg.polarimetry is not None else 0.1
    recs = near_records(ledger, path)  # linear nights: indexed query, spans cached (harden)
    pairs = match_single(recs, tol)
    name = _name(cfg)
    written = []
    for a, b in pairs:
        if str(path) in (a["path"], b["path"]):
            written.append(write_single_diff(diff_paths(outdir, name, a["product"])["single"], a["product"], b["product"]))
    if cfg.diff_images.save_double:
        for pa, pb in match_double(pairs, tol):
            if str(path) in (pa[0]["path"], pa[1]["path"], pb[0]["path"], pb[1]["path"]):
                written.append(
                    write_double_diff(
                        diff_paths(outdir, name, pa[0]["product"])["double"],
                        pa[0]["product"], pa[1]["product"], pb[0]["product"], pb[1]["product"],
                    )
                )
    return written


# ------------------------------------------------------------------------------------------------
# sets


def _reason(s: HWPSet) -> str | None:
    parts = []
    if s.reason:
        parts.append(s.reason)
    if s.missing and s.state != "complete":
        parts.append("missing: " + ", ".join(s.missing))
    if s.duplicates:
        parts.append("duplicates skipped: " + ", ".join(Path(p).name for p in s.duplicates))
    return "; ".join(parts) or None


def _process_set(ledger, cfg, outdir, key: str, products: list[str], acc: RunningStokes) -> dict:
    """Stokes file + accumulator + running products of one complete set; returns a summary."""
    pc = cfg.polarimetry
    t0 = time.perf_counter()
    if key in acc:
        index = acc.keys.index(key)
        return {"key": key, "index": index, "path": str(stokes_path(outdir, cfg, index)), "skipped": True}
    index = acc.nsets
    members = [load_member(p) for p in products]
    result = make_set_stokes(members, pc, pc.method, cfg.analysis, cfg.coronagraphic)
    spath = write_set_file(stokes_path(outdir, cfg, index), result, index, key, products)
    tint = float(result.header.get("TINT", 0.0) or 0.0)
    acc.add(key, result.stokes, result.err, tint if math.isfinite(tint) else 0.0)
    acc.save()
    name = _name(cfg)
    hdr = result.header.copy()
    hdr["HIERARCH DPP PDI SET INDEX"] = index
    hdr["HIERARCH DPP PDI SET KEY"] = key
    write_running_products(outdir, name, acc, hdr, result.field_headers, result.fields, pc.cyl_stokes)
    append_table_row(running_paths(outdir, name)["table"], hdr)
    return {"key": key, "index": index, "path": str(spath), "star": result.star, "seconds": time.perf_counter() - t0}


def update_sets(ledger, cfg, outdir, final: bool = False) -> dict:
    """Rebuild the set assignment from the ledger and act on it (see the module docstring).

    Returns ``{"processed": [...], "complete": n, "open": n, "broken": n, "invalid": [...]}``.
    """
    pc = cfg.polarimetry
    if pc is None:
        return {}
    mode = pc.method
    rows = {r["key"]: r for r in _set_rows(ledger)}
    locked = {}
    for k, r in rows.items():
        if r["state"] == "complete" or (r["state"] == "broken" and str(r["reason"] or "").startswith(_INVALID)):
            locked[k] = [m["path"] for m in json.loads(r["members"] or "[]")]
    members = set_members(ledger)
    by_path = {m["path"]: m for m in members}
    asm = assemble_sets(members, mode, pc.hwp_tolerance, pc.set_timeout, final, locked)
    acc = RunningStokes.load(running_paths(outdir, _name(cfg))["accumulator"])
    summary = {"processed": [], "invalid": []}

    # sets recorded complete whose Stokes file never made it into the accumulator (crash)
    for k, r in rows.items():
        if r["state"] == "complete" and k not in acc:
            paths = [m["path"] for m in json.loads(r["members"] or "[]")]
            prods = [by_path[p]["product"] for p in paths if p in by_path and "product" in by_path[p]]
            if len(prods) == len(all_slots(mode)):
                try:
                    summary["processed"].append(_process_set(ledger, cfg, outdir, k, prods, acc))
                except (SetInvalid, OSError) as exc:
                    log.error("set %s: %s", k, exc)

    current = set()
    for s in asm.complete:
        current.add(s.key)
        prods = [s.members[slot]["product"] for slot in all_slots(mode)]
        try:
            info = _process_set(ledger, cfg, outdir, s.key, prods, acc)
        except SetInvalid as exc:
            ledger.upsert_set(s.key, mode, "broken", s.member_list(), _INVALID + str(exc))
            summary["invalid"].append({"key": s.key, "reason": str(exc)})
            ledger.event("warning", f"HWP set {s.key} broken: {exc}")
            continue
        members_json = s.member_list()
        ledger.upsert_set(s.key, mode, "complete", members_json, _reason(s))
        summary["processed"].append(info)
    for s in asm.open + asm.broken:
        current.add(s.key)
        r = rows.get(s.key)
        reason = _reason(s)
        if r is not None and r["state"] == s.state and r["reason"] == reason and r["members"] == json.dumps(s.member_list()):
            continue
        if s.key in locked:
            continue
        ledger.upsert_set(s.key, mode, s.state, s.member_list(), reason)
    stale = [k for k, r in rows.items() if k not in current and k not in locked and r["state"] in ("open", "broken")]
    _delete_sets(ledger, stale)
    summary.update(complete=len(asm.complete), open=len(asm.open), broken=len(asm.broken), rejected=asm.rejected)
    cal = refresh_calibrated(cfg, outdir)
    if cal:
        summary["calibrated"] = cal
    return summary


def refresh_calibrated(cfg, outdir) -> dict:
    """Rewrite the running Stokes products' companions in the specphot unit if the e-/s products
    or the target's factors changed (:func:`vampd.pdi.calibrated.update_calibrated_running`).

    Called after every set rebuild and by the specphot trigger after a calibrated sequence.
    Returns the written paths (``{}`` if nothing to do); a failure is logged, never raised.
    """
    from vampd.engine.specphot_trigger import specphot_enabled

    if cfg.polarimetry is None or not specphot_enabled(cfg):
        return {}
    try:
        return {k: str(v) for k, v in update_calibrated_running(outdir, _name(cfg), cfg.polarimetry.cyl_stokes).items()}
    except Exception as exc:  # noqa: BLE001 -- the e-/s products stand; the next call retries
        log.error("running Stokes products in the specphot unit not written: %s", exc)
        return {"error": str(exc)}


# ------------------------------------------------------------------------------------------------
# engine hooks


def on_file_done(ledger, cfg, outdir, path: str) -> dict:
    """Called by the engine after ``path``'s products are recorded in the ledger (or after it
    was parked: then only the sets are rebuilt).

    Writes the file's Mueller matrices (PDI on), its difference images (``diff_images``) and
    rebuilds/processes the HWP sets. Errors of one step are logged and reported in the
    returned dict; they never undo the file's own products.
    """
    out: dict = {}
    prod = _coadded(ledger).get(str(path))
    if prod is None:
        # a parked file (unreadable, truncated) still occupies its slot: its set may now be
        # complete-but-unusable, so rebuild (otherwise the set stays "open" if it came last)
        row = ledger.conn.execute("SELECT state FROM files WHERE path=?", (str(path),)).fetchone()
        if cfg.polarimetry is not None and row is not None and row["state"] == "parked":
            out["sets"] = update_sets(ledger, cfg, outdir, final=False)
        return out
    if cfg.polarimetry is not None and cfg.polarimetry.mm_correct:
        try:
            out["mm"] = str(write_file_mm(cfg, outdir, prod))
        except Exception as exc:  # noqa: BLE001 -- reported, the set step will fail specifically
            out["mm_error"] = str(exc)
            log.warning("%s: Mueller matrix not written: %s", Path(path).name, exc)
    if cfg.diff_images.make_diff:
        try:
            out["diff"] = [str(p) for p in write_diff_images(ledger, cfg, outdir, path)]
        except Exception as exc:  # noqa: BLE001
            out["diff_error"] = str(exc)
            log.warning("%s: difference images failed: %s", Path(path).name, exc)
    if cfg.polarimetry is not None:
        out["sets"] = update_sets(ledger, cfg, outdir, final=False)
    return out


def on_finalize(ledger, cfg, outdir) -> dict:
    """End of night: process what completed and close every incomplete set as broken."""
    if cfg.polarimetry is None:
        return {}
    return {"sets": update_sets(ledger, cfg, outdir, final=True)}

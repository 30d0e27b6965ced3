"""PDI trigger: after each reduced file, rebuild the HWP sets from the ledger, process newly
complete sets, update the running Stokes products, write per-file Mueller matrices and the
diagnostic difference images (docs/instrument.md §9, §10, §14).

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
import os
import time
from pathlib import Path

from astropy.io import fits

from vampd.engine import pdi_members
from vampd.pdi.calibrated import update_calibrated_running
from vampd.pdi.diffimages import (
    diff_paths,
    match_double,
    match_single,
    near_records,
    write_double_diff,
    write_single_diff,
)
from vampd.pdi.mmfiles import file_mueller, mm_path, write_mm_file
from vampd.pdi.process import SetInvalid, make_set_stokes, write_set_file
from vampd.pdi.running import RunningStokes, append_table_row, running_paths, write_running_products
from vampd.pdi.sets import WALL_TIMEOUT, HWPSet, all_slots, assemble_sets, slot_label

__all__ = [
    "on_file_done",
    "on_finalize",
    "update_sets",
    "check_timeouts",
    "late_members",
    "stokes_path",
    "refresh_calibrated",
]

log = logging.getLogger("vampd.pdi")
_INVALID = "invalid: "


def _name(cfg) -> str:
    return cfg.name or "vampd"


def stokes_path(outdir, cfg, index: int) -> Path:
    """``pdi/stokes/{name}_stokes_{index:03d}.fits``."""
    return Path(outdir) / "pdi" / "stokes" / f"{_name(cfg)}_stokes_{index:03d}.fits"


# ------------------------------------------------------------------------------------------------
# per-file work


def write_file_mm(cfg, outdir, product: str) -> Path | None:
    """Per-file Mueller matrices ``pdi/mm/…_mm.fits`` of one coadded product."""
    with fits.open(product) as hdul:
        header = hdul[0].header.copy()
        fields = [h.name for h in hdul[1:] if h.name != "ERR" and h.data is None] or [str(header.get("FILTER01", "F0"))]
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
            written.append(
                write_single_diff(diff_paths(outdir, name, a["product"])["single"], a["product"], b["product"])
            )
    if cfg.diff_images.save_double:
        for pa, pb in match_double(pairs, tol):
            if str(path) in (pa[0]["path"], pa[1]["path"], pb[0]["path"], pb[1]["path"]):
                written.append(
                    write_double_diff(
                        diff_paths(outdir, name, pa[0]["product"])["double"],
                        pa[0]["product"],
                        pa[1]["product"],
                        pb[0]["product"],
                        pb[1]["product"],
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
    loaded = [pdi_members.get(p, bool(pc.derotate)) for p in products]
    members, rotated = [m for m, _ in loaded], [r for _, r in loaded]
    result = make_set_stokes(members, pc, pc.method, cfg.analysis, cfg.coronagraphic, rotated)
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
    pdi_members.forget(products)
    return {"key": key, "index": index, "path": str(spath), "star": result.star, "seconds": time.perf_counter() - t0}


def _permanent_break(reason) -> bool:
    """A broken set that stays broken: found invalid, or given up by the wall-clock timeout (a
    member arriving later must not revive it, docs/instrument.md §14)."""
    return str(reason or "").startswith((_INVALID, WALL_TIMEOUT))


def _locked_keys(rows: dict) -> set:
    """Permanent sets: complete, found invalid or given up by the wall-clock timeout."""
    return {
        k
        for k, r in rows.items()
        if r["state"] == "complete" or (r["state"] == "broken" and _permanent_break(r["reason"]))
    }


def _backfill_taken(ledger, rows: dict, locked: set) -> None:
    """Ledgers written before the ``pdi_taken`` table: record the permanent sets' members once."""
    if locked and ledger.taken_count() == 0:
        for k in locked:
            ledger.take(k, [m["path"] for m in json.loads(rows[k]["members"] or "[]")])


_WINDOW_DAYS = 0.01  # taken members older than the oldest free one by more than this cannot matter


def _candidates(ledger, cfg, outdir, final: bool, now=None) -> tuple[list[dict], dict, dict | None, list[dict]]:
    """``(members, locked, cube_of, unplaced)``: the set members (HWP blocks with
    ``combine.method = "pdi"``, else cubes with their index in their HWP block), the permanent
    sets' members among them (key → paths; kept near the free ones to recognise duplicates),
    and the parked files without a recorded slot (their header could not be read): they are in
    no set, only named in reasons. Only the open part of the night is read (``pdi_taken``).
    """
    from vampd.engine.blocks import block_members, blocks_enabled, update_blocks
    from vampd.pdi.blocks import cube_index

    files = ledger.pdi_files(_WINDOW_DAYS)
    unplaced = [f for f in files if f["state"] == "parked" and (f["hwp"] is None or f["mjd"] is None)]
    if blocks_enabled(cfg):
        update_blocks(ledger, cfg, outdir, final=final, now=now)
        members = block_members(ledger)
        cube_of = None
    else:
        members = [f for f in files if f["state"] == "done" or (f["hwp"] is not None and f["mjd"] is not None)]
        members = [m for m in members if not str(m.get("taken") or "").startswith("block:")]
        cube_of = cube_index([m for m in members if m["state"] == "done"], cfg.polarimetry.hwp_tolerance)
    locked: dict[str, list] = {}
    for m in members:
        if m.get("taken") and not str(m["taken"]).startswith("block:"):
            locked.setdefault(m["taken"], []).append(m["path"])
    return members, locked, cube_of, unplaced


def _written(rec: dict) -> float:
    """When a file was written: its mtime (recorded, else ``lstat``, which never blocks or reads),
    else its arrival time. Files are written in time order, even when they arrive together."""
    if rec.get("mtime_ns"):
        return float(rec["mtime_ns"]) / 1e9
    try:
        return os.lstat(rec["path"]).st_mtime
    except (OSError, TypeError, ValueError):
        return float(rec.get("t_complete") or 0.0)


def _blame(asm, unplaced: list[dict]) -> None:
    """Name the bad files in the reasons of the incomplete sets whose writing span holds them
    (or the nearest one): a bad file breaks at most the set whose slot it would have filled."""
    sets = [s for s in asm.open + asm.broken if s.members]
    if not sets or not unplaced:
        return
    spans = []
    for s in sets:
        t = [_written(m) for m in s.members.values()]
        spans.append((min(t), max(t), s))
    for f in sorted(unplaced, key=lambda r: (_written(r), r["path"])):
        t = _written(f)
        _lo, _hi, s = min(
            spans, key=lambda sp: (0.0 if sp[0] <= t <= sp[1] else min(abs(t - sp[0]), abs(t - sp[1])), sp[0])
        )
        err = str(f.get("error") or "unreadable").split(": ", 1)[-1][:120]
        note = f"bad file {Path(f['path']).name} ({err})"
        s.reason = f"{s.reason}; {note}" if s.reason else note


def _uneven(s: HWPSet) -> str | None:
    """For block members: "uneven HWP blocks: ..." when their numbers of cubes differ."""
    n = {slot: int(m.get("ncubes") or 0) for slot, m in s.members.items() if m.get("ncubes")}
    if not n or len(set(n.values())) <= 1:
        return None
    common = max(set(n.values()), key=lambda v: (list(n.values()).count(v), v))
    odd = ", ".join(f"{slot_label(k)} has {v} cube(s)" for k, v in n.items() if v != common)
    return f"uneven HWP blocks: {odd}, the others {common}"


def _process_complete(ledger, cfg, outdir, asm, acc, summary) -> None:
    mode = cfg.polarimetry.method
    for s in asm.complete:
        prods = [s.members[slot]["product"] for slot in all_slots(mode)]
        try:
            info = _process_set(ledger, cfg, outdir, s.key, prods, acc)
        except SetInvalid as exc:
            ledger.upsert_set(s.key, mode, "broken", s.member_list(), _INVALID + str(exc))
            ledger.take(s.key, [m["path"] for m in s.member_list()])
            summary["invalid"].append({"key": s.key, "reason": str(exc)})
            ledger.event("warning", f"HWP set {s.key} broken: {exc}")
            continue
        reason = "; ".join(r for r in (_reason(s), _uneven(s)) if r) or None
        ledger.upsert_set(s.key, mode, "complete", s.member_list(), reason)
        ledger.take(s.key, [m["path"] for m in s.member_list()])
        summary["processed"].append(info)


def _product_of(ledger, by_path: dict, path: str) -> str | None:
    """The reduced product of a set member (a cube's coadd, or an HWP block's own product)."""
    if path in by_path and by_path[path].get("product"):
        return by_path[path]["product"]
    prod = next((r["path"] for r in ledger.products(path) if r["kind"] == "coadded"), None)
    return prod or (path if Path(path).parent.name == "coadded" and Path(path).exists() else None)


def _resume_recorded(ledger, cfg, outdir, rows, by_path, acc, summary) -> None:
    """Sets recorded complete whose Stokes file never made it into the accumulator (crash)."""
    mode = cfg.polarimetry.method
    done = set(acc.keys)
    for k, r in rows.items():
        if r["state"] == "complete" and k not in done:
            paths = [m["path"] for m in json.loads(r["members"] or "[]")]
            prods = [p2 for p2 in (_product_of(ledger, by_path, p) for p in paths) if p2]
            if len(prods) == len(all_slots(mode)):
                try:
                    summary["processed"].append(_process_set(ledger, cfg, outdir, k, prods, acc))
                except (SetInvalid, OSError) as exc:
                    log.error("set %s: %s", k, exc)


def update_sets(ledger, cfg, outdir, final: bool = False, now: float | None = None) -> dict:
    """Rebuild the set assignment from the ledger and act on it (see the module docstring).

    ``now``: apply the wall-clock timeout (:func:`check_timeouts`) to the blocks and, once no
    HWP block is still open or being coadded, to the sets.
    Returns ``{"processed": [...], "complete": n, "open": n, "broken": n, "invalid": [...]}``.
    """
    pc = cfg.polarimetry
    if pc is None:
        return {}
    if pc.method == "leastsq":  # no sets: every cube goes into the normal equations (issue 13)
        from vampd.engine import leastsq_trigger

        return {"leastsq": leastsq_trigger.sync(ledger, cfg, outdir, final=final)}
    mode = pc.method
    rows = {r["key"]: r for r in ledger.set_rows()}
    permanent = _locked_keys(rows)
    _backfill_taken(ledger, rows, permanent)
    members, locked, cube_of, unplaced = _candidates(ledger, cfg, outdir, final, now)
    by_path = {m["path"]: m for m in members}
    if now is not None and ledger.block_rows(("open", "ready", "running")):
        now = None  # a block still filling or being coadded may complete a set: sets wait for it
    asm = assemble_sets(
        members, mode, pc.hwp_tolerance, pc.set_timeout, final, locked, cube_of, ledger.unfinished_horizon(), now
    )
    _blame(asm, unplaced)
    acc = RunningStokes.load(running_paths(outdir, _name(cfg))["accumulator"])
    summary = {"processed": [], "invalid": []}
    _resume_recorded(ledger, cfg, outdir, rows, by_path, acc, summary)
    _process_complete(ledger, cfg, outdir, asm, acc, summary)
    for path, key in late_members(
        rows.values(), [s for s in asm.open + asm.broken if s.key not in rows], by_path, pc.set_timeout
    ):
        msg = f"late member {Path(path).name}: HWP set {key} was already given up by the timeout; not added to it"
        log.warning(msg)
        ledger.event("warning", msg)
    current = {s.key for s in asm.complete}
    for s in asm.open + asm.broken:
        current.add(s.key)
        r = rows.get(s.key)
        reason = _reason(s)
        if (
            r is not None
            and r["state"] == s.state
            and r["reason"] == reason
            and r["members"] == json.dumps(s.member_list())
        ):
            continue
        if s.key in permanent:
            continue
        ledger.upsert_set(s.key, mode, s.state, s.member_list(), reason)
        if s.state == "broken" and _permanent_break(reason):  # given up for good: members taken
            ledger.take(s.key, [m["path"] for m in s.member_list()])
            ledger.event("warning", f"HWP set {s.key} given up: {reason}")
            log.warning("HWP set %s given up: %s", s.key, reason)
    ledger.delete_sets(
        k for k, r in rows.items() if k not in current and k not in permanent and r["state"] in ("open", "broken")
    )
    summary.update(complete=len(asm.complete), open=len(asm.open), broken=len(asm.broken), rejected=asm.rejected)
    # derotate the open sets' members now, so that completing a set costs only its last member
    pdi_members.warm([m["product"] for s in asm.open for m in s.members.values() if m.get("product")], pc.derotate)
    cal = refresh_calibrated(cfg, outdir)
    if cal:
        summary["calibrated"] = cal
    return summary


def late_members(rows, new_sets: list[HWPSet], by_path: dict, timeout: float) -> list[tuple[str, str]]:
    """``[(path, key)]``: members of newly formed sets that would have filled an empty slot of a
    set given up by the wall-clock timeout (same target and filter, observed within its time
    span plus ``timeout``). That set stays as it was; the member is only named."""
    out = []
    for r in rows:
        if r["state"] != "broken" or not str(r["reason"] or "").startswith(WALL_TIMEOUT):
            continue
        mem = json.loads(r["members"] or "[]")
        mjds = [float(by_path[m["path"]]["mjd"]) for m in mem if m["path"] in by_path]
        if not mjds:
            continue
        filled = {m["slot"] for m in mem}
        for s in new_sets:
            if r["key"].split(":")[1:3] != [s.target, s.filter]:
                continue
            for slot, m in s.members.items():
                t = float(m["mjd"])
                if slot_label(slot) not in filled and min(mjds) <= t <= max(mjds) + timeout / 86400.0:
                    out.append((str(m["path"]), r["key"]))
    return out


def check_timeouts(ledger, cfg, outdir, now: float | None = None) -> dict:
    """The daemon's periodic wall-clock check (every few seconds, on the trigger thread).

    ``polarimetry.set_timeout`` s after its last cube arrived, an open HWP block closes even
    when no further file arrives (it is then coadded like any closed block and may complete its
    set); once the files stopped arriving for that long and no block is left open or being
    coadded, the open sets are given up (broken for good, their members taken). Cheap when
    there is nothing to do: ledger counts only. Returns what was done (``{}`` if nothing).
    """
    from vampd.engine.blocks import blocks_enabled, update_blocks

    pc = cfg.polarimetry
    if pc is None or pc.method == "leastsq" or not pc.set_timeout:
        return {}
    now = time.time() if now is None else now
    out: dict = {}
    if blocks_enabled(cfg) and ledger.block_counts()["open"]:
        res = update_blocks(ledger, cfg, outdir, now=now)
        if res["closed"]:
            out["blocks"] = res
    last = ledger.last_arrival()
    quiet = last is not None and now - last > pc.set_timeout
    # the stream stopped: stale sets are given up (not while a block may still complete one)
    if quiet and ledger.set_counts().get("open") and not ledger.block_rows(("open", "ready", "running")):
        out["sets"] = update_sets(ledger, cfg, outdir, now=now)
    return out


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
    prod = next((r["path"] for r in ledger.products(str(path)) if r["kind"] == "coadded"), None)
    if prod is None:
        # a parked file: it may complete-but-break or end a set, so rebuild (what the ledger
        # recorded only: its header is never read here)
        row = ledger.get(str(path))
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
    from vampd.engine.blocks import blocks_enabled, run_ready_inline, update_blocks

    out = {}
    if blocks_enabled(cfg):  # close the last blocks and coadd them here (no pool at finalize)
        update_blocks(ledger, cfg, outdir, final=True)
        out["blocks"] = run_ready_inline(ledger, cfg, outdir)
    out["sets"] = update_sets(ledger, cfg, outdir, final=True)
    return out

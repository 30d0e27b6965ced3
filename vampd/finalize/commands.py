"""``vampd finalize CONFIG [-o OUTDIR] [--mean|--ivar]``: flush the night, write the final products
and the night report.

Steps
-----
1. **Flush** (only when no live daemon owns the ledger): files still pending, queued, interrupted or
   failed-with-retries are processed by the same runner as ``vampd run``; files that cannot be
   (vanished, truncated) are parked with the reason. Then the PDI trigger's ``on_finalize``
   processes the remaining complete HWP sets and closes open ones as broken (``end of night``),
   the specphot trigger's ``on_finalize`` calibrates the remaining sequences, and the diagnostic
   difference images are (re)written when ``diff_images.make_diff``.
   With a live daemon nothing is written to the ledger: it is read through a snapshot (SQLite
   backup API → memory, one consistent state), pending files are listed as "daemon still
   running", open sets stay open.
2. **Products** (:mod:`vampd.finalize.products`) from the snapshot and the per-set files.
3. **Report** (:mod:`vampd.finalize.report`): ``report.md`` + PNG previews.

Determinism: products carry no wall-clock time (provenance = version, config hash, calibration
files, counts); inputs are sorted; the report is deterministic too (it has no finalize timestamp),
so a second finalize rewrites every file byte-identically.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from vampd import __version__

__all__ = ["cmd_finalize", "finalize", "ledger_snapshot", "flush"]

log = logging.getLogger("vampd.finalize")


def ledger_snapshot(outdir):
    """An in-memory copy of the night's ledger taken in one read transaction, so a running
    daemon's later commits do not change what finalize sees (:meth:`Ledger.snapshot`)."""
    from vampd.engine.ledger import Ledger

    return Ledger.snapshot(outdir)


def _daemon_pid(outdir) -> int | None:
    from vampd.engine.ledger import Ledger, daemon_alive

    try:
        led = Ledger(outdir, readonly=True)
    except FileNotFoundError:
        return None
    try:
        info = led.daemon_info()
    finally:
        led.close()
    if info is not None and info["pid"] != os.getpid() and daemon_alive(info):
        return int(info["pid"])
    return None


def flush(cfg, config_path, outdir, jobs: int | None = None) -> dict:
    """Process what is left and close the night's sets (see the module docstring, step 1).

    Returns ``{"daemon": pid or None, "processed": n, "pdi": {...}, "specphot": [...], "diff": n}``.
    """
    from vampd.engine import pdi_trigger, specphot_trigger
    from vampd.engine.ledger import Ledger

    out: dict = {"daemon": _daemon_pid(outdir), "processed": 0, "pdi": {}, "specphot": [], "diff": 0}
    if out["daemon"] is not None:
        log.warning("daemon pid %d owns the ledger: finalize reads a snapshot and flushes nothing", out["daemon"])
        return out
    led = Ledger(outdir)
    try:
        todo = led.paths_in_states(("pending", "queued", "running", "failed"))
    finally:
        led.close()
    if todo:
        from vampd.engine.commands import open_engine

        _cfg, _out, eled, pool, runner = open_engine(str(config_path), str(outdir), jobs)
        try:
            summary = runner.run_batch(todo)
            out["processed"] = summary["processed"]
        finally:
            pool.shutdown(timeout=0)
            eled.close()
    led = Ledger(outdir)
    try:
        out["pdi"] = pdi_trigger.on_finalize(led, cfg, outdir)
        out["specphot"] = specphot_trigger.on_finalize(led, cfg, outdir)
        if cfg.diff_images.make_diff:
            for p in led.paths_in_states(("done",), by_time=True):
                out["diff"] += len(pdi_trigger.write_diff_images(led, cfg, outdir, p))
    finally:
        led.close()
    return out


# ------------------------------------------------------------------------------------------------


def read_night(led) -> dict:
    """Everything the products and the report need from a ledger snapshot, sorted; the report's
    tables come from their own queries (``state_table``, ``target_table``)."""
    files = [dict(r) for r in led.all_files()]
    for f in files:
        try:
            f["metrics"] = json.loads(f["metrics"] or "{}")
        except ValueError:
            f["metrics"] = {}
    sets = [dict(r) for r in led.set_rows()]
    for s in sets:
        s["members"] = json.loads(s["members"] or "[]")
    daemon = led.daemon_info()
    return {
        "files": files,
        "products": [dict(r) for r in led.product_rows()],
        "sets": sets,
        "specphot": [dict(r) for r in led.specphot_rows()],
        "daemon": dict(daemon) if daemon else None,
        "state_table": led.state_table(),
        "target_table": led.target_table(),
    }


def finalize(cfg, config_path, outdir, method: str = "median", jobs: int | None = None, do_flush: bool = True) -> dict:
    """Flush, write the final products and the report; returns a summary dict."""
    from vampd.finalize import products as P
    from vampd.finalize.report import write_report

    outdir = Path(outdir)
    name = cfg.name or "vampd"
    fl = flush(cfg, config_path, outdir, jobs) if do_flush else {"daemon": None, "processed": 0}
    snap = ledger_snapshot(outdir)
    try:
        night = read_night(snap)
    finally:
        snap.close()
    night["flush"] = {"daemon": fl.get("daemon"), "processed": fl.get("processed", 0)}
    written: dict[str, list[str]] = {}

    # output header table of the reduced products
    coadded = sorted({p["path"] for p in night["products"] if p["kind"] == "coadded" and os.path.exists(p["path"])})
    rows = P.header_table_rows(coadded) if coadded else []
    if rows:
        written["table"] = [str(P.write_table_csv(outdir / "aux" / f"{name}_table.csv", rows))]
    calib = sorted({str(r[k]) for r in rows for k in ("BACKFILE", "FLATFILE") if r.get(k)})
    counts = {s: sum(f["state"] == s for f in night["files"]) for s in ("done", "parked", "failed", "pending")}
    set_counts = {s: sum(x["state"] == s for x in night["sets"]) for s in ("complete", "broken", "open")}
    provenance = {
        "DPP CONFIG HASH": (cfg.config_hash(), "processing config hash"),
        "DPP FINAL NFILES DONE": (counts["done"], "files reduced this night"),
        "DPP FINAL NFILES PARKED": (counts["parked"], "files given up"),
        "DPP FINAL NSETS BROKEN": (set_counts["broken"], "HWP sets closed incomplete"),
    }
    for i, c in enumerate(calib):
        provenance[f"DPP FINAL CALIB{i}"] = (c, "calibration file used")

    # ADI cubes per target
    if cfg.save_adi_cubes and rows:
        targets = sorted({str(r.get("OBJECT", "unknown")) for r in rows})
        for t in targets:
            sub = [r for r in rows if str(r.get("OBJECT", "unknown")) == t]
            label = None if len(targets) == 1 else P.group_label(t, [])
            for k, p in P.write_adi_cubes(outdir, name, sub, label).items():
                written.setdefault(k, []).append(str(p))

    # final PDI collapse per (target, fields)
    pdi_info = _final_pdi(cfg, outdir, name, night, method, provenance, written) if cfg.polarimetry else []

    # specphot summary per target
    sp_rows = specphot_summary(night["specphot"])
    if sp_rows:
        written["specphot"] = [str(P.write_table_csv(outdir / "aux" / f"{name}_specphot_summary.csv", sp_rows))]

    # difference images already on disk
    diffs = sorted(str(p) for p in (outdir / "diff").rglob("*.fits")) if (outdir / "diff").exists() else []
    if diffs:
        written["diff"] = diffs

    report = write_report(outdir, cfg, night, pdi_info, written, sp_rows, provenance, method, config_path)
    return {"written": written, "report": report, "flush": fl, "counts": counts, "sets": set_counts, "pdi": pdi_info}


def _final_pdi(cfg, outdir: Path, name: str, night: dict, method: str, provenance: dict, written: dict) -> list[dict]:
    """The final Stokes products per (target, fields) from the complete sets' files; returns the
    report's description of each group and adds the written paths to ``written``."""
    from vampd.engine.specphot_trigger import specphot_enabled
    from vampd.finalize import products as P

    if cfg.polarimetry.method == "leastsq":  # issue 13: one solved image per group, no sets
        from vampd.engine.leastsq_products import final_info

        pdi_info = final_info(outdir, cfg)
        for g in pdi_info:
            for k, p in g["paths"].items():
                written.setdefault(k, []).append(str(p))
        return pdi_info
    pdi_info: list[dict] = []
    complete = {s["key"]: s for s in night["sets"] if s["state"] == "complete"}
    paths = sorted((outdir / "pdi" / "stokes").glob(f"{name}_stokes_*.fits"))
    sets = []
    for p in paths:
        s = P.load_set_file(p)
        if s.key in complete or not night["sets"]:
            sets.append(s)
    groups: dict[tuple, list] = {}
    for s in sets:
        groups.setdefault((s.target, tuple(s.fields)), []).append(s)
    for (target, fields), members in sorted(groups.items()):
        label = None if len(groups) == 1 else P.group_label(target, fields)
        files = sorted(
            {
                m["path"]
                for s in members
                if s.key in complete
                for m in complete[s.key]["members"]
                if isinstance(m, dict) and "path" in m
            }
        )
        unit = None
        if specphot_enabled(cfg):
            from vampd.specphot import pdi_unit_factor

            unit = pdi_unit_factor(outdir, target, ",".join(fields))
        w = P.write_final_pdi(
            outdir,
            name,
            members,
            method,
            cfg.polarimetry.cyl_stokes,
            nfiles=len(files) or None,
            provenance=provenance,
            label=label,
            unit_factors=unit,
        )
        for k, p in w.items():
            written.setdefault(k, []).append(str(p))
        pdi_info.append(
            {
                "target": target,
                "fields": list(fields),
                "nsets": len(members),
                "nfiles": len(files),
                "paths": {k: str(v) for k, v in w.items()},
                "sets": [{"key": s.key, "path": s.path, "mjd": s.mjd, "header": s.header} for s in members],
            }
        )
    return pdi_info


def specphot_summary(rows: list[dict]) -> list[dict]:
    """One row per (target, filter, camera, unit) of the done specphot sequences: number of
    sequences and files, median factor per field."""
    import numpy as np

    acc: dict[tuple, dict] = {}
    for r in rows:
        if r["state"] != "done":
            continue
        key = (str(r["target"]), str(r["filter"]), int(r["camera"] or 0), str(r["unit"]))
        a = acc.setdefault(key, {"source": r["source"], "nseq": 0, "files": set(), "factors": {}})
        a["nseq"] += 1
        a["files"].update(json.loads(r["members"] or "[]"))
        fac = json.loads(r["factors"] or "{}").get("per_file", {})
        for _stem, per in sorted(fac.items()):
            for fld, v in per.items():
                a["factors"].setdefault(fld, []).append(float(v))
    out = []
    for (target, filt, cam, unit), a in sorted(acc.items()):
        row = {
            "target": target,
            "filter": filt,
            "camera": cam,
            "unit": unit,
            "source": a["source"],
            "sequences": a["nseq"],
            "files": len(a["files"]),
        }
        for fld, v in sorted(a["factors"].items()):
            row[f"factor_{fld}"] = f"{float(np.median(v)):.6g}"
        out.append(row)
    return out


def cmd_finalize(args: argparse.Namespace) -> int:
    """CLI entry: ``vampd finalize CONFIG [-o OUTDIR] [--mean | --ivar]``."""
    from vampd.config import load_config
    from vampd.engine.runner import resolve_outdir

    try:
        cfg = load_config(args.config)
    except (ValueError, OSError) as exc:
        print(f"vampd finalize: {exc}", file=sys.stderr)
        return 2
    outdir = resolve_outdir(cfg, args.config, getattr(args, "outdir", None))
    method = "median"
    if getattr(args, "mean", False):
        method = "mean"
    if getattr(args, "ivar", False):
        method = "ivar"
    try:
        res = finalize(cfg, args.config, outdir, method, getattr(args, "jobs", None))
    except (ValueError, OSError) as exc:
        print(f"vampd finalize: {exc}", file=sys.stderr)
        return 2
    c, s = res["counts"], res["sets"]
    daemon = res["flush"].get("daemon")
    print(
        f"vampd finalize {__version__}: {c['done']} file(s) done, {c['parked']} parked; sets {s['complete']} complete, "
        f"{s['broken']} broken, {s['open']} open; report {res['report']}"
        + (f" (daemon pid {daemon} still running: snapshot only)" if daemon else "")
    )
    return 0

"""One-shot summary of a night, read (only) from the ledger."""

from __future__ import annotations

import datetime as _dt
import os
import time
from contextlib import nullcontext

from vampd.engine.ledger import Ledger, daemon_alive

__all__ = ["collect_status", "format_status"]


def _iso(t: float | None) -> str | None:
    if t is None:
        return None
    return _dt.datetime.fromtimestamp(t, _dt.UTC).isoformat(timespec="seconds")


def collect_status(outdir: os.PathLike | str, now: float | None = None, ledger: Ledger | None = None) -> dict:
    """Counts of files and sets, daemon liveness and the last finished file.

    ``files.done`` counts files whose recorded per-file products all exist on disk; a
    ``done`` row with a missing product is counted as ``pending`` (the daemon will redo it).
    ``parked`` counts files given up (the word the live view and finalize use); ``failed``
    (kept for scripts) counts parked files plus those that failed and will be retried.
    ``ledger``: an open
    (read-only) ledger to read through, e.g. inside the live view's single read transaction.
    """
    now = time.time() if now is None else now
    with nullcontext(ledger) if ledger is not None else Ledger(outdir, readonly=True) as led:
        counts = led.counts()
        done, missing = led.done_products_complete()
        pending = counts["pending"] + counts["queued"] + counts["running"] + missing
        info = led.daemon_info()
        last = led.last_done()
        errors = [
            {"path": r["path"], "state": r["state"], "tries": r["tries"], "error": r["error"]}
            for r in led.problem_files()
        ]
        lat = led.done_latencies()
        sets = led.set_counts()
        lsq = led.lsq_status()  # least-squares accumulators (issue 13); [] without
        blocks = led.block_counts()  # HWP blocks (combine.method = "pdi")
    lat.sort()
    out = {
        "outdir": str(os.path.abspath(outdir)),
        "files": {
            "total": sum(counts.values()),
            "done": done,
            "failed": counts["failed"] + counts["parked"],  # kept for scripts: failed or parked
            "pending": pending,
            "running": counts["running"],
            "parked": counts["parked"],
            "ignored": counts["ignored"],
        },
        "sets": {"complete": sets["complete"], "broken": sets["broken"], "open": sets["open"]},
        # HWP blocks (combine.method = "pdi") by state; closed = ready, running, done or failed
        "blocks": {**blocks, "closed": sum(n for k, n in blocks.items() if k != "open")},
        "daemon": {
            "alive": daemon_alive(info, now=now),
            "pid": info["pid"] if info else None,
            "started": _iso(info["started"]) if info else None,
            "heartbeat": _iso(info["heartbeat"]) if info else None,
            "stopped": _iso(info["stopped"]) if info else None,
            "status": info["status"] if info else None,
        },
        "last_file": None,
        "latency": {
            "median": lat[len(lat) // 2] if lat else None,
            "p95": lat[min(len(lat) - 1, int(0.95 * len(lat)))] if lat else None,
        },
        "errors": errors,
    }
    if lsq:
        out["leastsq"] = lsq
    if last is not None:
        out["last_file"] = {
            "path": last["path"],
            "done": _iso(last["t_done"]),
            "latency": last["latency"],
            "target": last["target"],
            "filter": last["filter"],
            "camera": last["camera"],
            "flc": last["flc"],
            "hwp": last["hwp"],
            "mjd": last["mjd"],
        }
    return out


def _one_line(text: str | None) -> str:
    return " ".join(str(text or "").split())


def format_status(st: dict) -> str:
    """Plain multi-line text of :func:`collect_status`."""
    f, s, d = st["files"], st["sets"], st["daemon"]
    if d["alive"]:
        dline = f"running (pid {d['pid']}, since {d['started']})"
    elif d["pid"] is None:
        dline = "never started (batch runs only)"
    else:
        dline = f"not running (last pid {d['pid']}, {d['status']}, last heartbeat {d['heartbeat']})"
    lines = [
        f"ledger  {st['outdir']}",
        f"daemon  {dline}",
        f"files   {f['total']} total: {f['done']} done, {f['parked']} parked, {f['failed'] - f['parked']} to retry, "
        f"{f['pending']} pending",
        f"sets    {s['complete']} complete, {s['broken']} broken, {s['open']} open",
    ]
    b = st.get("blocks") or {}
    if b.get("open") or b.get("closed"):
        lines.append(
            f"blocks  {b['open']} open, {b['closed']} closed ({b.get('done', 0)} coadded,"
            f" {b.get('ready', 0) + b.get('running', 0)} to coadd, {b.get('failed', 0)} failed)"
        )
    for a in st.get("leastsq", []):
        cov = " ".join(f"{h}:{n}" for h, n in a["coverage"].items())
        snr = f"{a['snr']:.1f}" if a["snr"] is not None else "-"
        lines.append(
            f"lsq     {a['target']} {a['filter']}: {a['ncubes']} cubes ({a['rejected']} rejected), "
            f"Q_phi S/N {snr}, HWP {cov}"
        )
    if st["latency"]["median"] is not None:
        lines.append(f"latency median {st['latency']['median']:.2f} s, p95 {st['latency']['p95']:.2f} s")
    if st["last_file"]:
        lf = st["last_file"]
        lines.append(
            f"last    {os.path.basename(lf['path'])} done at {lf['done']} (wall clock; "
            f"{lf['target'] or '?'}, {lf['filter'] or '?'})"
        )
    for e in st["errors"][:10]:
        name = os.path.basename(e["path"])
        err = _one_line(e["error"]).replace(e["path"], name)
        err = err[len(name) + 2 :] if err.startswith(f"{name}: ") else err
        lines.append(f"{e['state']:<7} {name} (tries {e['tries']}): {err}")
    if len(st["errors"]) > 10:
        lines.append(f"        … and {len(st['errors']) - 10} more")
    return "\n".join(lines)

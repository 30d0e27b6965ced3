"""``vampd run`` (batch, the same engine and ledger as ``watch``) and ``vampd calib``."""

from __future__ import annotations

import argparse
import logging
import os
import sys

__all__ = ["cmd_run", "cmd_calib", "open_engine"]

log = logging.getLogger(__name__)


def open_engine(config_path: str, outdir: str | None, jobs: int | None, force: bool = False):
    """Load the config and build ``(cfg, outdir, ledger, pool, runner)`` for ``run``/``watch``.

    The worker function is ``vampd.engine.pipeline:process_file``; the environment variable
    ``VAMPD_PROCESS=module:function`` substitutes another one (debugging and tests).
    """
    from vampd.config import load_config
    from vampd.engine.ledger import Ledger, daemon_alive
    from vampd.engine.pool import DEFAULT_PROCESS, WorkerPool
    from vampd.engine.runner import Runner, resolve_outdir, watch_settings

    cfg = load_config(config_path)
    out = resolve_outdir(cfg, config_path, outdir)
    w = watch_settings(cfg)
    ledger = Ledger(out)
    info = ledger.daemon_info()
    if info is not None and info["pid"] != os.getpid() and daemon_alive(info):
        ledger.close()
        raise ValueError(f"another vampd daemon (pid {info['pid']}) owns {ledger.path}; stop it first")
    pool = WorkerPool(
        workers=jobs or w["workers"],
        memory_limit=int(w["memory_limit_gb"] * 1024**3),
        process=os.environ.get("VAMPD_PROCESS", DEFAULT_PROCESS),
    )
    runner = Runner(cfg, out, ledger, pool, force=force)
    return cfg, out, ledger, pool, runner


def close_sequences(ledger, cfg, outdir, since: float = 0.0) -> dict:
    """End of a batch: every target sequence is complete, so spectrophotometry calibrates the
    ones still open and brings the running Stokes products' companions up to date.

    Returns ``{}`` when specphot is off, else ``{"sequences": calibrated sequences of the night,
    "new": calibrated now, "failed": failed now, "unit": unit, "where": [paths]}``; ``where`` lists
    ``specphot/`` and the running products written at or after ``since`` (the run's start).
    """
    from pathlib import Path

    from vampd.engine import specphot_trigger

    if not specphot_trigger.specphot_enabled(cfg):
        return {}
    from vampd.specphot.factors import slug

    done = specphot_trigger.on_finalize(ledger, cfg, outdir)
    rows = ledger.specphot_rows("done")
    where = [str(Path(outdir) / "specphot")] if rows else []
    # the running Stokes products' companions in the unit, if this run brought them up to date
    where += sorted(
        str(p) for p in (Path(outdir) / "pdi").glob(f"*_{slug(cfg.specphot.unit)}.fits") if p.stat().st_mtime >= since
    )
    return {
        "sequences": len(rows),
        "new": sum(d.get("state") == "done" for d in done),
        "failed": sum(d.get("state") == "failed" for d in done),
        "unit": cfg.specphot.unit,
        "where": where,
    }


def _summary_line(summary: dict, states: list[str], ledger_path, interrupted: bool) -> str:
    parked = sum(s == "parked" for s in states)
    retry = sum(s == "failed" for s in states)
    line = (
        f"vampd run: {summary['given']} file(s), {summary['processed']} processed, "
        f"{summary['done']} done, {parked} parked"
    )
    if retry:
        line += f", {retry} to retry"
    if interrupted:
        left = sum(s in ("pending", "queued", "running", "missing") for s in states)
        line += f", {left} left for the next run (interrupted)"
    return line + f" in {summary['seconds']:.1f} s; ledger {ledger_path}"


def cmd_run(args: argparse.Namespace) -> int:
    """Reduce the given files once; a second identical run does nothing. At the end the target
    sequences are closed and calibrated (spectrophotometry), so calibrated products exist when it
    returns.

    Exit status 0 if every given file ends done, 1 if any was parked or failed, 2 on a usage
    problem, 130 after Ctrl-C (running files are drained and recorded, the summary printed).
    """
    import time

    from vampd.engine.pool import DEFAULT_PROCESS, prestart, stop_fork_server

    prestart(os.environ.get("VAMPD_PROCESS", DEFAULT_PROCESS))  # the workers' imports overlap ours
    try:
        cfg, out, ledger, pool, runner = open_engine(args.config, args.outdir, args.jobs, args.force)
    except (ValueError, OSError) as exc:
        stop_fork_server()
        print(f"vampd run: {exc}", file=sys.stderr)
        return 2
    pool.start()  # spawn and warm the workers while the inputs are scanned and registered
    t0, interrupted, sp = time.time(), False, {}
    try:
        summary = runner.run_batch(list(args.files))
        sp = close_sequences(ledger, cfg, out, since=t0)
    except KeyboardInterrupt:
        interrupted = True
        print("vampd run: interrupted; waiting for the running files (Ctrl-C again to abandon them)", file=sys.stderr)
        try:
            runner.drain(cfg.watch.stop_timeout)
        except KeyboardInterrupt:
            runner.drain(0)
        # a file marked running whose job the interrupt kept from the pool (between the two)
        # is in flight nowhere now: pending again, for the next run
        ledger.reset_interrupted()
        summary = {
            "given": len(args.files),
            "processed": runner.n_done + runner.n_failed,
            "done": runner.n_done,
            "seconds": time.time() - t0,
        }
    finally:
        pool.shutdown(timeout=0)
    states = [(ledger.get(os.path.abspath(p)) or {"state": "missing"})["state"] for p in args.files]
    print(_summary_line(summary, states, ledger.path, interrupted))
    if sp:
        print(
            f"vampd run: spectrophotometry ({sp['unit']}): {sp['sequences']} sequence(s) calibrated"
            + (f", {sp['failed']} failed (see the ledger events)" if sp["failed"] else "")
            + (f"; products in {', '.join(sp['where'])}" if sp["where"] else "")
        )
    ledger.close()
    if interrupted:
        return 130
    return 1 if any(s in ("failed", "parked") for s in states) else 0


def cmd_calib(args: argparse.Namespace) -> int:
    """Build master backgrounds and flats from raw darks/flats; one line per master."""
    from pathlib import Path

    from vampd.stages.calibfiles import build_masters

    quiet = logging.getLogger("vampd.stages.calibfiles")
    saved = quiet.level
    quiet.setLevel(logging.WARNING)  # its "wrote master …" records would repeat the lines below
    try:
        written = build_masters(list(args.files), args.outdir, args.method, args.force)
    finally:
        quiet.setLevel(saved)
    for p in written or []:
        kind = "flat" if Path(p).parent.name == "flat" else "background"
        print(f"{kind:<10}  {p}")
    if not written:
        print(f"vampd calib: no dark, sky or flat among the {len(args.files)} file(s) (DATA-TYP)", file=sys.stderr)
        return 1
    return 0

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


def cmd_run(args: argparse.Namespace) -> int:
    """Reduce the given files once; a second identical run does nothing.

    Exit status 0 if every given file ends done, 1 if any failed, 2 on a usage problem.
    """
    try:
        cfg, out, ledger, pool, runner = open_engine(args.config, args.outdir, args.jobs, args.force)
    except (ValueError, OSError) as exc:
        print(f"vampd run: {exc}", file=sys.stderr)
        return 2
    pool.start()  # spawn and warm the workers while the inputs are scanned and registered
    try:
        summary = runner.run_batch(list(args.files))
    finally:
        pool.shutdown(timeout=0)
    states = [(ledger.get(os.path.abspath(p)) or {"state": "missing"})["state"] for p in args.files]
    nfail = sum(s in ("failed", "parked") for s in states)
    print(
        f"vampd run: {summary['given']} file(s), {summary['processed']} processed, "
        f"{summary['done']} done, {nfail} failed in {summary['seconds']:.1f} s; ledger {ledger.path}"
    )
    ledger.close()
    return 1 if nfail else 0


def cmd_calib(args: argparse.Namespace) -> int:
    """Build master backgrounds and flats from raw darks/flats."""
    from vampd.stages.calibfiles import build_masters

    written = build_masters(list(args.files), args.outdir, args.method, args.force)
    for p in written or []:
        print(p)
    return 0

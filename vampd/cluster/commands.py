"""``vampd reprocess CONFIG NIGHT_DIR... [-o OUTROOT] [--scheduler ADDRESS | --local N]``."""

from __future__ import annotations

import argparse
import logging
import os
import sys

__all__ = ["add_arguments", "cmd_reprocess"]

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``vampd reprocess`` (imports nothing optional)."""
    p.add_argument("config", help="configuration TOML file")
    p.add_argument("nights", nargs="+", metavar="NIGHT_DIR", help="directories of raw files, one per night")
    p.add_argument(
        "-o",
        "--outroot",
        default=None,
        help="one output directory per night below this (default: [watch].outdir or the config's directory)",
    )
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--scheduler",
        default=None,
        metavar="ADDRESS",
        help="join a running Dask scheduler, e.g. tcp://host:8786 (default: [cluster].scheduler)",
    )
    g.add_argument(
        "--local",
        type=int,
        default=None,
        metavar="N",
        help="start a local cluster of N worker processes (default: [cluster].local_workers or [watch].workers)",
    )
    p.add_argument("--force", action="store_true", help="redo work even if products are up to date")
    p.add_argument("--no-finalize", action="store_true", help="do not finalize the nights at the end")
    p.add_argument("--no-progress", action="store_true", help="log lines instead of the progress display")


def _check_workers(client, process: str, nights: list, outroot) -> str | None:
    """Every worker imports the chain and sees the nights and the output root; else the problem."""
    from vampd import __version__
    from vampd.cluster.tasks import probe

    samples = [str(night_dir) for night_dir in nights]
    answers = client.run(probe, process, samples, [str(outroot)])
    problems = []
    for addr, a in sorted(answers.items()):
        if a["error"]:
            problems.append(f"worker {addr}: cannot import the vampd chain ({a['error']})")
        elif a["vampd"] != __version__:
            problems.append(f"worker {addr}: vampd {a['vampd']}, client vampd {__version__} (install the same version)")
        for m in a["missing"]:
            problems.append(f"worker {addr}: does not see {m} (not on a shared filesystem?)")
        for d in a["unwritable"]:
            problems.append(f"worker {addr}: cannot write {d}")
    loose = sorted(addr for addr, a in answers.items() if a.get("blas") != "1")
    if loose:  # not fatal: slower (threads fight over the cores), same products
        log.warning(
            "%d worker(s) without OPENBLAS_NUM_THREADS=1 (e.g. %s): set it in the workers' environment",
            len(loose),
            loose[0],
        )
    return "\n".join(problems) or None


def _load_checked(args: argparse.Namespace):
    """The configuration if it loads and every night directory is usable; else None (message printed)."""
    from vampd.cluster.executor import MissingDistributed, require_distributed
    from vampd.cluster.reprocess import check_labels
    from vampd.config import load_config

    try:
        require_distributed()
        cfg = load_config(args.config)
    except (MissingDistributed, ValueError, OSError) as exc:
        print(f"vampd reprocess: {exc}", file=sys.stderr)
        return None
    missing = [d for d in args.nights if not os.path.isdir(d)]
    if missing:
        print(f"vampd reprocess: night directory not found: {', '.join(missing)}", file=sys.stderr)
        return None
    try:
        check_labels(list(args.nights))
    except ValueError as exc:
        print(f"vampd reprocess: {exc}", file=sys.stderr)
        return None
    return cfg


def _run_nights(args: argparse.Namespace, cfg, outroot, shared) -> list:
    """Reprocess the nights on ``shared``, with the progress display unless ``--no-progress``."""
    from vampd.cluster.progress import NightProgress
    from vampd.cluster.reprocess import reprocess

    kwargs = {"force": args.force, "finalize": not args.no_finalize}
    if args.no_progress:
        return reprocess(cfg, args.config, list(args.nights), outroot, shared, **kwargs)
    if not getattr(args, "verbose", 0):  # per-file lines would scroll the bars away
        logging.getLogger("vampd.engine.runner").setLevel(logging.WARNING)
    with NightProgress() as display:
        nights = reprocess(cfg, args.config, list(args.nights), outroot, shared, progress=display, **kwargs)
        display(nights, force=True)
    return nights


def cmd_reprocess(args: argparse.Namespace) -> int:
    """Reprocess whole nights on Dask; exit 0 if every file ends done, 1 if any failed, 2 on a problem."""
    from vampd.cluster.executor import ClusterPool, connect
    from vampd.cluster.progress import summary_line
    from vampd.engine.pool import DEFAULT_PROCESS
    from vampd.engine.runner import resolve_outdir, watch_settings

    cfg = _load_checked(args)
    if cfg is None:
        return 2
    cc = cfg.cluster
    outroot = resolve_outdir(cfg, args.config, args.outroot)
    outroot.mkdir(parents=True, exist_ok=True)
    w = watch_settings(cfg)
    scheduler = args.scheduler or (None if args.local else cc.scheduler)
    n_local = args.local or cc.local_workers or w["workers"]
    per_worker = int(w["memory_limit_gb"] * 1024**3 / n_local)
    process = os.environ.get("VAMPD_PROCESS", DEFAULT_PROCESS)
    try:
        client, cluster = connect(scheduler, n_local, per_worker, cc.dashboard_address)
    except (OSError, TimeoutError, ValueError) as exc:
        print(f"vampd reprocess: cannot reach the Dask scheduler {scheduler}: {exc}", file=sys.stderr)
        return 2
    try:
        shared = ClusterPool(client, cc.oversubscribe, cc.memory_fraction, process)
        shared.refresh(wait_for_workers=120.0)
        where = scheduler or f"local cluster of {n_local} process(es)"
        print(f"vampd reprocess: {shared.n_workers} worker(s) on {where}; dashboard {shared.dashboard()}", flush=True)
        problem = _check_workers(client, process, list(args.nights), outroot)
        if problem:
            print(f"vampd reprocess: {problem}", file=sys.stderr)
            return 2
        try:
            nights = _run_nights(args, cfg, outroot, shared)
        except (ValueError, FileNotFoundError) as exc:
            print(f"vampd reprocess: {exc}", file=sys.stderr)
            return 2
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
    nfail = 0
    for n in nights:
        print(summary_line(n))
        nfail += n.counts.get("parked", 0) + n.counts.get("failed", 0) + (n.stopped is not None)
    return 1 if nfail else 0

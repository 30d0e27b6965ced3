"""``vampd watch`` (the streaming daemon) and ``vampd retry`` (un-park files)."""

from __future__ import annotations

import argparse
import logging
import os
import sys

__all__ = ["cmd_watch", "cmd_retry"]


def cmd_watch(args: argparse.Namespace) -> int:
    """Watch the input directories and reduce files as they arrive, until SIGTERM/SIGINT.

    Exit status (documented in the README; the systemd units do not restart on 2-6):
    0 clean stop; 2 unusable configuration or arguments; 3 output directory missing or not
    writable; 4 corrupt (or newer) ledger; 5 no input directory configured; 6 another live
    daemon owns the output directory; 75 the disk is full before a ledger exists (retried).
    """
    import signal

    # a stop request during start-up (opening the ledger, spawning workers) must still end in
    # a clean drain and exit 0, not in the default handler's death by SIGTERM
    from vampd import early_stop_signals as early  # handlers may already be in place (vampd/__init__)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: early.append(signum))

    from vampd.errors import EXIT_USAGE, StartupError
    from vampd.watch.daemon import Daemon

    try:
        daemon = Daemon(args.config, inputs=args.input, outdir=args.outdir, jobs=args.jobs, poll=args.poll)
    except StartupError as exc:
        print(f"vampd watch: {exc}", file=sys.stderr)
        return exc.code
    except (ValueError, OSError) as exc:
        print(f"vampd watch: {exc}", file=sys.stderr)
        return EXIT_USAGE
    daemon.stop_requested = bool(early)
    code = daemon.run()
    # the drain is done and the ledger closed: leave now, without waiting on library threads
    # (a stuck observer or executor thread must not keep a stopped daemon alive)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def cmd_retry(args: argparse.Namespace) -> int:
    """Put parked (and waiting) files back to pending with their tries reset.

    All of them, the given files, or those of one error kind (``--kind``). A running daemon
    picks them up at its next tick; otherwise the next ``watch``/``run``. Exit 0, or 2 if
    there is no ledger.
    """
    from vampd.engine.ledger import Ledger

    try:
        ledger = Ledger(args.outdir)
    except Exception as exc:  # noqa: BLE001 -- one line, no traceback
        print(f"vampd retry: {args.outdir}: {exc}", file=sys.stderr)
        return 2
    with ledger:
        paths = [os.path.abspath(p) for p in args.files] or None
        n = ledger.retry_parked(paths, kinds=args.kind or None)
    print(f"vampd retry: {n} file(s) back to pending in {ledger.path}")
    return 0

"""``vampd watch``: the streaming daemon."""

from __future__ import annotations

import argparse
import sys

__all__ = ["cmd_watch"]


def cmd_watch(args: argparse.Namespace) -> int:
    """Watch the input directories and reduce files as they arrive, until SIGTERM/SIGINT.

    Exit status 0 after a clean stop, 2 if the configuration or arguments are unusable or
    another live daemon owns the output directory.
    """
    import signal

    # a stop request during start-up (opening the ledger, spawning workers) must still end in
    # a clean drain and exit 0, not in the default handler's death by SIGTERM
    from vampd import early_stop_signals as early  # handlers may already be in place (vampd/__init__)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: early.append(signum))

    from vampd.watch.daemon import Daemon

    try:
        daemon = Daemon(args.config, inputs=args.input, outdir=args.outdir, jobs=args.jobs, poll=args.poll)
    except (ValueError, OSError) as exc:
        print(f"vampd watch: {exc}", file=sys.stderr)
        return 2
    daemon.stop_requested = bool(early)
    return daemon.run()

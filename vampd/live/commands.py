"""``vampd status`` (and, later, ``vampd live``)."""

from __future__ import annotations

import argparse
import json
import sys

__all__ = ["cmd_status"]


def cmd_status(args: argparse.Namespace) -> int:
    """Print a one-shot summary of the ledger in ``args.outdir`` (``--json`` for machines).

    Exit status 0, or 2 if there is no ledger there.
    """
    from vampd.live.status import collect_status, format_status

    try:
        st = collect_status(args.outdir)
    except FileNotFoundError as exc:
        print(f"vampd status: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(st, indent=2))
    else:
        print(format_status(st))
    return 0

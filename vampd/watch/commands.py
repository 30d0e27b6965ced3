"""``vampd watch`` (the streaming daemon), ``vampd retry`` (un-park files) and ``vampd status``
(the one-shot summary, with each problem file's error kind and next retry)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Iterable, Mapping

__all__ = ["cmd_watch", "cmd_retry", "cmd_status", "problem_details", "problem_note"]


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
    from vampd.engine.ledger import printable

    with ledger:
        paths = [os.path.abspath(p) for p in args.files] or None
        queued = ledger.requeue_parked(paths, kinds=args.kind or None)
    print(f"vampd retry: {len(queued)} file(s) back to pending in {ledger.path}")
    for key in queued:  # which ones: the operator checks that the intended files were re-queued
        print(f"  {printable(key)}")
    return 0


def problem_details(rows: Iterable[Mapping], now: float) -> dict[str, dict]:
    """``error_kind``, ``t_retry`` (ISO UTC) and ``retry_in`` (s, ≥ 0) per problem file path.

    Parameters
    ----------
    rows : iterable of mappings
        :meth:`Ledger.problem_files` rows (``path``, ``state``, ``error_kind``, ``t_retry``).
    now : float
        The reading time (epoch s).

    Returns
    -------
    dict
        ``{path: {"error_kind", "t_retry", "retry_in"}}``; ``t_retry``/``retry_in`` are None for
        parked files (no automatic retry).
    """
    import datetime as dt

    out = {}
    for r in rows:
        kind = r["error_kind"] or ("permanent" if r["state"] == "parked" else "transient")
        t = r["t_retry"] if r["state"] == "failed" else None
        if r["state"] == "failed" and t is None:
            t = now  # an old row without a backoff time: due at the next tick
        out[r["path"]] = {
            "error_kind": kind,
            "t_retry": None if t is None else dt.datetime.fromtimestamp(t, dt.UTC).isoformat(timespec="seconds"),
            "retry_in": None if t is None else max(0, round(t - now)),
        }
    return out


def problem_note(e: Mapping) -> str:
    """``"transient, retry in 42 s"``, ``"transient, retry due now"`` or ``"parked: permanent"``."""
    if e.get("state") == "parked" or e.get("retry_in") is None:
        return f"parked: {e.get('error_kind') or 'permanent'}"
    when = f"retry in {e['retry_in']} s" if e["retry_in"] > 0 else "retry due now"
    return f"{e.get('error_kind') or 'transient'}, {when}"


def _problem_line(e: Mapping) -> str:
    name = os.path.basename(e["path"])
    err = " ".join(str(e.get("error") or "").split()).replace(e["path"], name)
    err = err[len(name) + 2 :] if err.startswith(f"{name}: ") else err
    return f"{e['state']:<7} {name} ({problem_note(e)}; tries {e['tries']}): {err}"


def cmd_status(args: argparse.Namespace) -> int:
    """Print a one-shot summary of the ledger in ``args.outdir`` (``--json`` for machines).

    Each problem file also gets its ``error_kind`` and, for a failed file, when it is retried
    (``t_retry``, ``retry_in``). Exit status 0, or 2 if there is no ledger there.
    """
    import json

    from vampd.engine.ledger import Ledger
    from vampd.live.snapshot import status_with_alerts
    from vampd.live.status import format_status

    now = time.time()
    try:
        st = status_with_alerts(args.outdir, now=now)
        with Ledger(args.outdir, readonly=True) as led:
            details = problem_details(led.problem_files(), now)
    except FileNotFoundError as exc:
        print(f"vampd status: {exc}", file=sys.stderr)
        return 2
    none = {"error_kind": None, "t_retry": None, "retry_in": None}  # gone between the two reads
    st["errors"] = [{**e, **details.get(e["path"], none)} for e in st["errors"]]
    if args.json:
        print(json.dumps(st, indent=2))
        return 0
    print(format_status({**st, "errors": []}))
    for e in st["errors"][:10]:
        print(_problem_line(e))
    if len(st["errors"]) > 10:
        print(f"        … and {len(st['errors']) - 10} more")
    for a in st.get("alerts", []):
        print(f"alert   {a['level']}: {a['message']}")
    return 0

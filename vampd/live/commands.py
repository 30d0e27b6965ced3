"""``vampd status`` (and, later, ``vampd live``)."""

from __future__ import annotations

import argparse
import sys

__all__ = ["cmd_live"]


def cmd_live(args: argparse.Namespace) -> int:
    """Full-screen live view of the ledger in ``args.outdir`` (read-only; quit with q or Ctrl-C).

    ``--once`` renders one frame to stdout at the terminal size (``COLUMNS``/``LINES``) and
    exits: 0, or 2 if there is no ledger there.
    """
    import logging
    import os
    import time

    from rich.console import Console

    from vampd.live.alerts import alerts_config_for, compute_alerts
    from vampd.live.snapshot import take_snapshot
    from vampd.live.view import render

    config = getattr(args, "config", None)

    def frame(width: int, height: int):
        snap = take_snapshot(args.outdir, config_path=config)
        alerts = compute_alerts(snap, alerts_config_for(snap), snap.taken)
        return snap, render(snap, width, height, alerts)

    if args.once:
        console = Console(highlight=False)
        width, height = console.size
        height = int(os.environ.get("LINES", height) or height)
        console = Console(width=width, height=height, highlight=False)
        snap, view = frame(width, height)
        console.print(view)
        return 0 if snap.ledger_found else 2

    from rich.live import Live

    console = Console(highlight=False)
    # stray log records must not corrupt the display: hold them and print them on exit
    held: list[logging.LogRecord] = []

    class _Hold(logging.Handler):
        def emit(self, record):
            held.append(record)
            del held[:-200]

    root = logging.getLogger("vampd")
    saved = root.handlers[:], root.propagate
    root.handlers[:] = [_Hold()]
    root.propagate = False
    logging.captureWarnings(True)
    keys = _Keys()
    try:
        with (
            keys,
            Live(
                console=console,
                screen=True,
                auto_refresh=False,
                redirect_stdout=True,
                redirect_stderr=True,
                transient=False,
            ) as live,
        ):
            while True:
                width, height = console.size
                _snap, view = frame(width, height)
                live.update(view, refresh=True)
                deadline = time.monotonic() + max(float(getattr(args, "refresh", 1.0) or 1.0), 0.1)
                while time.monotonic() < deadline:
                    if keys.pressed(min(0.1, max(deadline - time.monotonic(), 0.0))) in ("q", "Q"):
                        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        root.handlers[:], root.propagate = saved
        logging.captureWarnings(False)
        fmt = logging.Formatter("%(levelname)s %(name)s: %(message)s")
        for rec in held[-20:]:
            print(fmt.format(rec), file=sys.stderr)


class _Keys:
    """Single key presses from a terminal stdin (cbreak mode), restored on exit."""

    def __init__(self):
        self.fd = None
        self.saved = None

    def __enter__(self):
        try:
            import termios
            import tty

            if sys.stdin.isatty():
                self.fd = sys.stdin.fileno()
                self.saved = termios.tcgetattr(self.fd)
                tty.setcbreak(self.fd)
        except (ImportError, OSError, ValueError):
            self.fd = None
        return self

    def __exit__(self, *exc):
        if self.fd is not None and self.saved is not None:
            import termios

            termios.tcsetattr(self.fd, termios.TCSADRAIN, self.saved)

    def pressed(self, timeout: float) -> str | None:
        import select
        import time

        if self.fd is None:
            time.sleep(timeout)
            return None
        r, _, _ = select.select([self.fd], [], [], timeout)
        if r:
            import os

            return os.read(self.fd, 1).decode(errors="ignore")
        return None

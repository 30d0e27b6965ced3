"""Logging set-up: plain line-oriented records (no ANSI) unless on a terminal."""

from __future__ import annotations

import logging
import sys


def setup_logging(verbosity: int = 0) -> None:
    """Configure the root ``vampd`` logger once; INFO by default, DEBUG with ``-v``."""
    level = logging.DEBUG if verbosity > 0 else logging.INFO
    root = logging.getLogger("vampd")
    if root.handlers:
        root.setLevel(level)
        return
    handler = logging.StreamHandler(sys.stderr)
    if sys.stderr.isatty():
        fmt = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
    else:  # the journal adds its own timestamps; keep lines plain and greppable
        fmt = "%(levelname)s %(name)s: %(message)s"
    handler.setFormatter(logging.Formatter(fmt, datefmt="%H:%M:%S"))
    root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False

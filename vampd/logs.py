"""Logging set-up: plain line-oriented records (no ANSI) unless on a terminal.

Every record names its level and logger (``WARNING vampd.config: …``), in the daemon, in batch
runs and in the worker processes (:func:`setup_worker_logging`). Configuration warnings
(:class:`~vampd.config.models.ConfigWarning`) are printed as one such line, never as Python's
``file.py:280: ConfigWarning`` warning text.
"""

from __future__ import annotations

import logging
import sys
import warnings

__all__ = ["setup_logging", "setup_worker_logging", "PLAIN_FORMAT"]

PLAIN_FORMAT = "%(levelname)s %(name)s: %(message)s"
_TTY_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
_WORKER_FORMAT = "%(levelname)s %(name)s [worker %(process)d]: %(message)s"


def _level(verbosity: int, quiet: int) -> int:
    if quiet and quiet > 0:
        return logging.WARNING if quiet == 1 else logging.ERROR
    return logging.DEBUG if verbosity and verbosity > 0 else logging.INFO


def _show_config_warnings() -> None:
    """Route ConfigWarning through the ``vampd.config`` logger as one clean line."""
    previous = warnings.showwarning
    if getattr(previous, "_vampd", False):
        return

    def show(message, category, filename, lineno, file=None, line=None):
        from vampd.config.models import ConfigWarning

        if isinstance(category, type) and issubclass(category, ConfigWarning):
            logging.getLogger("vampd.config").warning("%s", message)
        else:
            previous(message, category, filename, lineno, file, line)

    show._vampd = True  # type: ignore[attr-defined]
    warnings.showwarning = show


def setup_logging(verbosity: int = 0, quiet: int = 0) -> None:
    """Configure the root ``vampd`` logger once: INFO by default, DEBUG with ``-v``, WARNING
    with ``-q`` (ERROR with ``-qq``)."""
    level = _level(verbosity, quiet)
    root = logging.getLogger("vampd")
    _show_config_warnings()
    if root.handlers:
        root.setLevel(level)
        return
    handler = logging.StreamHandler(sys.stderr)
    # the journal adds its own timestamps; keep lines plain and greppable there
    fmt = _TTY_FORMAT if sys.stderr.isatty() else PLAIN_FORMAT
    handler.setFormatter(logging.Formatter(fmt, datefmt="%H:%M:%S"))
    root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False


def setup_worker_logging(level: int = logging.INFO) -> None:
    """Worker processes: the same plain ``LEVEL logger [worker pid]: message`` lines on stderr."""
    root = logging.getLogger("vampd")
    if root.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(_WORKER_FORMAT))
    root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False
    _show_config_warnings()

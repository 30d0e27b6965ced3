"""vampd's own exception types and the one rule that says retry or park.

* :class:`PermanentError`: the input itself is unusable (not FITS, truncated for good, a
  calibration frame, a header the instrument never writes). Retrying cannot help: the file
  is parked with the message until it changes.
* :class:`TransientError`: the input or the machine may be fine a moment later (a file
  still growing, the output disk full or read-only, memory short). Retried with backoff.

Domain errors of the stages (``HeaderError``, ``CalibrationError``, ...) are permanent; they
are named in :func:`classify` rather than inferred from a builtin base class: a builtin
``ValueError`` raised deep inside numpy or astropy is *not* a verdict on the file, so it is
retried (and parked after ``max_tries``), never parked on first sight.
"""

from __future__ import annotations

import errno
import importlib

__all__ = [
    "VampdError",
    "PermanentError",
    "TransientError",
    "OutputError",
    "StartupError",
    "classify",
    "OUTPUT_ERRNOS",
    "EXIT_OK",
    "EXIT_USAGE",
    "EXIT_OUTPUT",
    "EXIT_LEDGER",
    "EXIT_INPUT",
    "EXIT_BUSY",
]


class VampdError(Exception):
    """Base of vampd's own errors."""


class PermanentError(VampdError):
    """The input is unusable as it is: park it (until it changes or ``vampd retry``)."""


class TransientError(VampdError):
    """May succeed later: retry with backoff."""


class OutputError(TransientError):
    """The output directory cannot take a write now (full, read-only, no permission).

    The daemon pauses intake while this lasts; the file is not charged a try.
    """

    def __init__(self, path: str, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class StartupError(VampdError):
    """The daemon cannot start: one line naming the path and the cause, and an exit code."""

    def __init__(self, message: str, code: int):
        self.code = code
        super().__init__(message)


#: documented exit codes of ``vampd watch`` (the units list 2-6 in ``RestartPreventExitStatus=``)
EXIT_OK = 0
EXIT_USAGE = 2  # unusable configuration or arguments
EXIT_OUTPUT = 3  # output directory missing/unwritable/full at start-up
EXIT_LEDGER = 4  # corrupt or too-new ledger
EXIT_INPUT = 5  # no input directory configured
EXIT_BUSY = 6  # another live daemon owns the output directory

#: errno values that mean "the output side cannot take a write now"
OUTPUT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})
#: errno values of a machine under pressure (retry later)
_TRANSIENT_ERRNOS = OUTPUT_ERRNOS | {
    errno.EIO,
    errno.EAGAIN,
    errno.EMFILE,
    errno.ENFILE,
    errno.ENOMEM,
    errno.EINTR,
    errno.EBUSY,
    errno.ETIMEDOUT,
    errno.ESTALE,
}

# the stages' own verdicts on an input (module, class): permanent
_DOMAIN_ERRORS = (
    ("vampd.instrument.headers", "HeaderError"),
    ("vampd.stages.calibrate", "CalibrationError"),
    ("vampd.stages.select", "SelectionError"),
    ("vampd.stages.centroids", "CentroidError"),
    ("vampd.instrument.filters", "FilterError"),
    ("vampd.instrument.mueller", "MuellerTableError"),
    ("vampd.config.models", "ConfigError"),
    ("vampd.pdi.process", "SetInvalid"),
)


def _domain_types() -> tuple[type, ...]:
    out = []
    for module, name in _DOMAIN_ERRORS:
        try:
            out.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):  # a stage renamed its error: it is then transient
            continue
    return tuple(out)


def classify(exc: BaseException) -> str:
    """``"permanent"``, ``"output"`` (output side full/read-only: pause, no try charged) or
    ``"transient"`` for an exception raised while processing one file."""
    if isinstance(exc, OutputError):
        return "output"
    if isinstance(exc, TransientError):
        return "transient"
    if isinstance(exc, PermanentError):
        return "permanent"
    if isinstance(exc, OSError) and exc.errno in OUTPUT_ERRNOS and _is_output(exc):
        return "output"
    if isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS:
        return "transient"
    if isinstance(exc, MemoryError):
        return "transient"
    if isinstance(exc, _domain_types()):
        return "permanent"
    return "transient"


def _is_output(exc: OSError) -> bool:
    """An errno-carrying error about a write (ENOSPC/EDQUOT/EROFS are always writes)."""
    return exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS) or bool(
        exc.filename and str(exc.filename).endswith(".part")
    )

"""Logger-like streaming of a simulated night, with fault injection.

The instrument's logger writes each cube to ``NAME.fits.<pid>.<tid>.tmp``, renames it to
``NAME.fits`` when complete, then writes ``NAME.txt`` with one line per frame.
:func:`stream_night` does the same at a chosen cadence (it is :func:`simulate_night` with
``stream=True``), so a watcher or the daemon's tests can run against it in a thread or a
subprocess.

Faults (``SimConfig.faults``), each applied to one science file:

``truncated``
    the data part is cut to half its length (header intact);
``corrupt``
    header bytes [720, 2640) (the cards after BSCALE: telescope, target, times) replaced
    by random non-ASCII bytes; the FITS structure (SIMPLE, BITPIX, NAXISn, END, size)
    stays intact;
``nonfits``
    ``NAME.fits`` holds plain text;
``missing_keyword``
    ``U_CAMERA`` dropped from the header (the data are fine);
``zero_byte``
    ``NAME.fits`` is empty.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np

__all__ = ["FAULTS", "fault_targets", "apply_fault", "stream_night"]

FAULTS = ("truncated", "corrupt", "nonfits", "missing_keyword", "zero_byte")

_ALIASES = {
    "truncate": "truncated",
    "non-fits": "nonfits",
    "non_fits": "nonfits",
    "notfits": "nonfits",
    "missing-keyword": "missing_keyword",
    "missing": "missing_keyword",
    "zero-byte": "zero_byte",
    "zero": "zero_byte",
    "empty": "zero_byte",
}


def canonical_fault(name: str) -> str:
    """Normalise a fault name (accepts ``non-fits``, ``zero-byte``, ...)."""
    key = str(name).strip().lower()
    key = _ALIASES.get(key, key)
    if key not in FAULTS:
        raise ValueError(f"unknown fault {name!r}; expected one of {', '.join(FAULTS)}")
    return key


def fault_targets(nfiles: int, faults) -> dict[int, str]:
    """Science-file indices that get each fault: evenly spread, never the first 4 files.

    Returns ``{file_index: fault}``; more faults than eligible files raise ValueError.
    """
    faults = [canonical_fault(f) for f in faults]
    if not faults:
        return {}
    first = min(4, max(nfiles - len(faults), 0))
    eligible = nfiles - first
    if len(faults) > eligible:
        raise ValueError(f"{len(faults)} faults requested but only {eligible} science files can take one")
    idx = first + (np.arange(len(faults)) + 1) * eligible // (len(faults) + 1)
    idx = np.minimum(idx, nfiles - 1)
    # resolve collisions by moving forward
    used: dict[int, str] = {}
    for i, f in zip(idx.tolist(), faults, strict=True):
        while i in used:
            i = first + (i + 1 - first) % eligible
        used[i] = f
    return used


def apply_fault(fault: str, tmp: Path, header_bytes: int, data_bytes: int, rng: np.random.Generator) -> str:
    """Damage a complete temporary file in place; returns a description for truth.json.

    ``missing_keyword`` is applied when the header is built (see ``night``), not here.
    """
    tmp = Path(tmp)
    if fault == "truncated":
        keep = header_bytes + data_bytes // 2
        os.truncate(tmp, keep)
        return f"cut to {keep} bytes (header {header_bytes} + half of {data_bytes} data bytes)"
    if fault == "corrupt":
        lo, hi = 720, min(2640, header_bytes)
        with open(tmp, "r+b") as fh:
            fh.seek(lo)
            fh.write(rng.integers(128, 256, hi - lo, dtype=np.uint8).tobytes())
        return f"header bytes [{lo}, {hi}) replaced by random non-ASCII bytes"
    if fault == "nonfits":
        with open(tmp, "w") as fh:
            fh.write("this is not a FITS file: the logger wrote text here\n" * 8)
        return "replaced by plain text"
    if fault == "zero_byte":
        os.truncate(tmp, 0)
        return "truncated to 0 bytes"
    if fault == "missing_keyword":
        return "U_CAMERA removed from the header"
    raise ValueError(f"unknown fault {fault!r}")


def stream_night(
    outdir, config=None, cadence: float = 1.0, stop_event: threading.Event | None = None, **overrides
) -> dict:
    """Write a simulated night file by file at ``cadence`` seconds, like the logger.

    Parameters
    ----------
    outdir : path-like
        Output directory (``raw/``, ``calib/``, ``truth.json`` below it).
    config : SimConfig, optional
        Simulation configuration (default ``SimConfig(**overrides)``).
    cadence : float
        Seconds to sleep after each raw file (and its sidecar) appears.
    stop_event : threading.Event, optional
        Set it to stop after the current file.

    Returns
    -------
    dict
        The truth dictionary (also written to ``outdir/truth.json`` before the first file).
    """
    from vampd.simulate.night import SimConfig, simulate_night

    if config is None:
        config = SimConfig(**overrides)
    elif overrides:
        config = config.replace(**overrides)
    return simulate_night(outdir, config, stream=True, cadence=cadence, stop_event=stop_event)

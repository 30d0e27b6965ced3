"""Shared pieces of the live view: the file row of a snapshot, what it is (camera, times), the
small on-disk read cache and the formatting helpers of the panels."""

from __future__ import annotations

import datetime as _dt
import math
import os
from dataclasses import dataclass

from rich.text import Text

__all__ = [
    "FileRow",
    "STATE_STYLES",
    "camera_of",
    "obs_time",
    "night_label",
    "num",
    "cached",
    "dur",
    "ut",
    "mjd_ut",
    "fmt",
    "flux_str",
    "state_text",
]

STATE_STYLES = {
    "done": "green",
    "failed": "red",
    "parked": "magenta",
    "pending": "dim",
    "queued": "dim",
    "running": "cyan",
    "ignored": "dim",
}


@dataclass
class FileRow:
    """One ``files`` row with its quicklook metrics unpacked."""

    path: str
    state: str
    camera: int | None = None
    flc: str | None = None
    hwp: float | None = None
    filter: str | None = None
    target: str | None = None
    exptime: float | None = None
    mjd: float | None = None
    nframes: int | None = None
    obs_mod: str | None = None
    stage: str | None = None
    tries: int = 0
    error: str | None = None
    nkept: int | None = None
    strehl: float | None = None
    fwhm: float | None = None
    flux: float | None = None
    offset: float | None = None
    nsat: int | None = None  # frames with a saturated PSF core
    latency: float | None = None
    t_seen: float | None = None
    t_complete: float | None = None
    t_done: float | None = None

    @property
    def name(self) -> str:
        return os.path.basename(self.path)

    @property
    def t_arrival(self) -> float | None:
        """When the file was complete on disk (or first seen)."""
        return self.t_complete if self.t_complete is not None else self.t_seen


def camera_of(row: FileRow | dict) -> int | None:
    """The camera of a file: the recorded ``U_CAMERA``, else the name (VMPA → 1, VMPB → 2)."""
    cam = row.camera if isinstance(row, FileRow) else row.get("camera")
    if cam is not None:
        try:
            return int(cam)
        except (TypeError, ValueError):
            pass
    name = os.path.basename(row.path if isinstance(row, FileRow) else str(row.get("path", "")))
    if name.startswith("VMPA"):
        return 1
    if name.startswith("VMPB"):
        return 2
    return None


def obs_time(row: FileRow) -> float | None:
    """Unix time of the observation (MJD), else of the file's arrival (wall clock)."""
    if row.mjd is not None:
        return (row.mjd - 40587.0) * 86400.0
    return row.t_arrival


def night_label(mjd: float | None) -> str | None:
    """The HST date on which the night began (noon to noon HST) of an MJD (UT)."""
    if mjd is None or not math.isfinite(mjd):
        return None
    t = _dt.datetime(1858, 11, 17, tzinfo=_dt.UTC) + _dt.timedelta(days=float(mjd))
    return (t - _dt.timedelta(hours=22)).date().isoformat()


def num(v) -> float | None:
    """``v`` as a finite float, else None."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def cached(cache: dict, path: str, fn):
    """``fn(path)`` memoised in ``cache`` by (path, mtime); None if the file is gone or unreadable."""
    try:
        key = (path, os.stat(path).st_mtime_ns)
    except OSError:
        return None
    if key not in cache:
        if len(cache) > 4096:
            cache.clear()
        try:
            cache[key] = fn(path)
        except (OSError, ValueError, KeyError, TypeError, IndexError):
            cache[key] = None
    return cache[key]


# -- formatting -------------------------------------------------------------------------------------
def dur(s: float | None) -> str:
    """A duration in seconds as ``12s``, ``3m04s`` or ``2h05m``."""
    if s is None or not math.isfinite(s):
        return "–"
    s = max(0.0, s)
    if s < 60:
        return f"{s:.0f}s"
    if s < 3600:
        return f"{int(s // 60)}m{int(s % 60):02d}s"
    return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m"


def ut(t: float | None) -> str:
    """A Unix time as ``HH:MM:SS`` UT."""
    if t is None:
        return "–"
    return _dt.datetime.fromtimestamp(t, _dt.UTC).strftime("%H:%M:%S")


def mjd_ut(mjd: float | None) -> str | None:
    """An MJD as ``HH:MM:SS`` UT (None without one)."""
    if mjd is None:
        return None
    return ut((mjd - 40587.0) * 86400.0)


def fmt(v: float | None, spec: str = ".2f") -> str:
    """``v`` formatted with ``spec``, or ``–`` when missing or not finite."""
    return "–" if v is None or not math.isfinite(v) else format(v, spec)


def flux_str(v: float | None) -> str:
    """A flux: an integer below 10⁴, else ``1.23e5``."""
    if v is None or not math.isfinite(v):
        return "–"
    if abs(v) < 1e4:
        return f"{v:.0f}"
    e = int(math.floor(math.log10(abs(v))))
    return f"{v / 10**e:.2f}e{e}"


def state_text(state: str) -> Text:
    """A file state in its colour."""
    return Text(state, style=STATE_STYLES.get(state, ""))

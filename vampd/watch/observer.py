"""Directory watching: which names are candidates, when a file is complete, and the
watchdog observer with its overflow/rescan plumbing.

Events are only hints. Every path is first classified without blocking (``lstat``, then
``stat`` through a symlink, then a non-blocking open in the byte layer): only a regular
file (or a symlink to one) can be a raw file; a FIFO, a device, a directory named
``*.fits``, a symlink loop, a dangling link or an unreadable file is an ``error`` verdict
with the reason, at once. A candidate file is *complete* when its FITS structure is whole
(exact END card, data and padding as BITPIX/NAXISn imply: :mod:`vampd.fitsbytes`), its
size and mtime have not changed for ``settle_time`` seconds and, when the config expects
one, its ``.txt`` sidecar has NAXIS3 lines. A file that never completes becomes an error
after ``complete_timeout`` seconds. Nothing about one path raises out of the tracker.
Periodic and on-demand rescans of the directories catch whatever the events missed
(inotify queue overflow, NFS, a restarted observer).
"""

from __future__ import annotations

import fnmatch
import logging
import os
import queue
import stat
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from watchdog.events import FileSystemEventHandler

from vampd.errors import VampdError
from vampd.filenames import NOT_UTF8
from vampd.fitsbytes import (
    IncompleteFits,
    NotFitsError,
    VanishedError,
    data_layout,
    decompressed_bytes,
    kind_of,
    open_regular,
)
from vampd.fitsio import output_stem

__all__ = [
    "is_candidate",
    "scan_directories",
    "sidecar_path",
    "sidecar_lines",
    "classify_path",
    "Completeness",
    "CompletenessTracker",
    "Watcher",
]

log = logging.getLogger(__name__)

DEFAULT_PATTERNS = ("*.fits", "*.fits.fz")


def is_candidate(path: os.PathLike | str, patterns: Iterable[str] = DEFAULT_PATTERNS) -> bool:
    """True for a raw-file name worth watching.

    Hidden names (``.x``), editor/backup names (``x~``, ``~x``), the instrument logger's
    temporaries (``NAME.fits.<pid>.<tid>.tmp``), partial writes (``.part``) and names that
    match none of ``patterns`` are ignored.
    """
    name = os.path.basename(os.fspath(path))
    if not name or name.startswith((".", "~")) or name.endswith(("~", ".tmp", ".part", ".swp")):
        return False
    return any(fnmatch.fnmatch(name, p) for p in patterns)


def scan_directories(
    roots: Iterable[os.PathLike | str], patterns: Iterable[str] = DEFAULT_PATTERNS, recursive: bool = False
) -> list[str]:
    """Absolute paths of every candidate file under ``roots`` (sorted; missing roots skipped)."""
    patterns = tuple(patterns)
    out: list[str] = []
    for root in roots:
        root = os.path.abspath(root)
        if not os.path.isdir(root):
            continue
        try:
            walker: Iterator = os.walk(root) if recursive else iter([(root, [], os.listdir(root))])
        except OSError as exc:  # unreadable root: the daemon's input check reports it
            log.warning("watch: cannot list %s: %s", root, exc.strerror)
            continue
        for dirpath, dirnames, names in walker:
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            out.extend(os.path.join(dirpath, n) for n in names if is_candidate(n, patterns))
    return sorted(set(out))


def sidecar_path(path: os.PathLike | str) -> Path:
    """The logger's sidecar of a raw file: ``NAME.txt`` next to ``NAME.fits``."""
    path = Path(path)
    return path.with_name(output_stem(path) + ".txt")


def sidecar_lines(path: os.PathLike | str) -> int | None:
    """Number of non-empty lines of the sidecar, or None if there is none."""
    try:
        fd = open_regular(sidecar_path(path))  # a FIFO named NAME.txt must not block
    except VampdError:
        return None
    with os.fdopen(fd, "rb") as fh:
        return sum(1 for line in fh if line.strip())


def classify_path(path: str) -> tuple[tuple | None, str | None]:
    """``(signature, problem)`` of a path, without opening it.

    ``signature`` is ``(size, mtime_ns, inode)`` of the file (through a symlink); ``problem``
    is None for a regular file, else why the path can never be a raw file (or ``"gone"``).
    """
    try:
        lst = os.lstat(path)
    except FileNotFoundError:
        return None, "gone"
    except OSError as exc:
        return None, f"cannot stat: {exc.strerror}"
    st = lst
    if stat.S_ISLNK(lst.st_mode):
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return (lst.st_size, lst.st_mtime_ns, lst.st_ino), "dangling symlink"
        except OSError as exc:
            why = "symlink loop" if exc.errno == 40 else f"cannot follow the symlink: {exc.strerror}"
            return (lst.st_size, lst.st_mtime_ns, lst.st_ino), why
    sig = (st.st_size, st.st_mtime_ns, st.st_ino)
    if not stat.S_ISREG(st.st_mode):
        return sig, f"not a regular file ({kind_of(st.st_mode)})"
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return sig, NOT_UTF8
    return sig, None


@dataclass
class Completeness:
    """Verdict on one file: ``state`` is ``complete``, ``waiting`` or ``error``."""

    path: str
    state: str
    reason: str
    nbytes: int = 0  # cube bytes as float32 (NAXIS1·NAXIS2·NAXIS3·4), for memory admission
    t_complete: float = 0.0


@dataclass
class _Entry:
    first_seen: float
    sig: tuple | None = None
    changed: float = 0.0
    reason: str = "not checked yet"


@dataclass
class CompletenessTracker:
    """Files seen but not yet complete, with the time each was first seen.

    Call :meth:`add` for every hint (event or scan) and :meth:`check` periodically;
    a file leaves the tracker when it is complete, has timed out, or has vanished.
    """

    settle_time: float = 0.5
    complete_timeout: float = 120.0
    expect_sidecar: bool = False
    entries: dict[str, _Entry] = field(default_factory=dict)

    def add(self, path: str, now: float | None = None) -> None:
        now = time.time() if now is None else now
        if path not in self.entries:
            self.entries[path] = _Entry(first_seen=now, changed=now)

    def __len__(self) -> int:
        return len(self.entries)

    def postpone(self, seconds: float) -> None:
        """Time spent paused (intake stopped) does not count towards ``complete_timeout``."""
        for e in self.entries.values():
            e.first_seen += seconds

    def __contains__(self, path: str) -> bool:
        return path in self.entries

    def check(self, now: float | None = None) -> list[Completeness]:
        """Verdicts for files that are complete, in error or gone (``state='gone'``)."""
        now = time.time() if now is None else now
        out: list[Completeness] = []
        for path in list(self.entries):
            verdict = self._check_one(path, self.entries[path], now)
            if verdict is not None:
                del self.entries[path]
                out.append(verdict)
        return out

    def _check_one(self, path: str, e: _Entry, now: float) -> Completeness | None:
        try:
            return self._judge(path, e, now)
        except Exception as exc:  # noqa: BLE001 -- whatever one path does, it stays with that path
            log.debug("watch: %r", path, exc_info=True)
            return Completeness(path, "error", f"cannot be checked ({type(exc).__name__}: {exc})")

    def _judge(self, path: str, e: _Entry, now: float) -> Completeness | None:
        sig, problem = classify_path(path)
        if problem == "gone":
            return Completeness(path, "gone", "file vanished before it was complete")
        if problem is not None:
            return Completeness(path, "error", problem)
        side = sidecar_path(path)
        nbytes, nframes, lay = 0, 1, None
        try:
            lay = data_layout(path)
            shape = lay.image_shape
            nframes = shape[0] if len(shape) >= 3 else 1
            nbytes = decompressed_bytes(lay)
            ok, reason = True, "complete"
            if sig[0] > lay.padded_end:  # bytes appended after a whole FITS structure are not
                sig = (lay.padded_end, sig[2])  # content: settle on the structure alone
        except IncompleteFits as exc:
            ok, reason = False, str(exc).removeprefix(path + ": ")
            not_fits = False
        except VanishedError:
            return Completeness(path, "gone", "file vanished before it was complete")
        except NotFitsError as exc:  # final once settled (the first card may still be on its way)
            ok, reason = False, str(exc).removeprefix(path + ": ")
            not_fits = True
        except VampdError as exc:  # unreadable: final for this version
            return Completeness(path, "error", str(exc).removeprefix(path + ": "))
        else:
            not_fits = False
        if self.expect_sidecar:
            try:
                sst = os.stat(side)
                sig += (sst.st_size, sst.st_mtime_ns)
            except OSError:
                sig += (None,)
        if sig != e.sig:
            e.sig, e.changed = sig, now
        settled = now - e.changed >= self.settle_time
        if not_fits and settled:
            return Completeness(path, "error", reason)
        if ok:
            if self.expect_sidecar:
                nlines = sidecar_lines(path)
                if nlines is None:
                    ok, reason = False, f"sidecar {side.name} missing (expected {nframes} lines)"
                elif nlines != nframes:
                    ok, reason = False, f"sidecar {side.name} has {nlines} lines, NAXIS3 = {nframes}"
            if ok and settled:
                return Completeness(path, "complete", "complete", nbytes, now)
        e.reason = reason if not ok else "settling"
        if now - e.first_seen > self.complete_timeout:
            return Completeness(path, "error", f"incomplete after {self.complete_timeout:g} s: {e.reason}")
        return None


class _Handler(FileSystemEventHandler):
    """watchdog event handler: pushes candidate paths (or a rescan request) to a queue.

    It never blocks the observer thread: if the queue is full the event is dropped and a
    rescan is requested instead (backpressure without losing files).
    """

    def __init__(self, watcher: Watcher):
        self.w = watcher

    def dispatch(self, event) -> None:  # watchdog calls dispatch(event)
        try:
            kind = event.event_type
            if kind == "moved":
                path = event.dest_path
            elif kind == "events_lost":  # watchdog ≥ 6: the kernel queue overflowed
                self.w.overflows += 1
                self.w.request_rescan("inotify queue overflow")
                return
            elif kind in ("created", "modified", "closed"):
                # not "closed_no_write"/"opened": those are vampd's own reads (and readers')
                path = event.src_path
            elif kind == "deleted":
                if os.fsdecode(event.src_path).rstrip("/") in self.w.roots:
                    self.w.request_rescan("a watched root was deleted")
                return
            else:
                return
            path = os.fsdecode(path)
            if event.is_directory:
                if kind in ("created", "moved") and self.w.recursive:
                    # files may have landed before the new directory's watch existed
                    self.w.request_rescan(f"new directory {path}")
                return
            if is_candidate(path, self.w.patterns):
                self.w.push(path)
        except Exception:  # never let the observer thread die on one event
            log.exception("watch: error handling %r", event)


def _events_lost_supported() -> bool:
    try:
        from watchdog.events import EVENT_TYPE_EVENTS_LOST  # noqa: F401
    except ImportError:
        return False
    return True


class _OverflowHook(logging.Handler):
    """Fallback for watchdog < 6, whose inotify backend reports ``IN_Q_OVERFLOW`` only as a
    log warning: this handler turns that warning into a rescan request. With a watchdog that
    delivers ``EventsLostEvent`` it is not installed."""

    def __init__(self, watcher: Watcher):
        super().__init__(logging.WARNING)
        self.w = watcher

    def emit(self, record: logging.LogRecord) -> None:
        if "overflow" in record.getMessage().lower():
            self.w.overflows += 1
            self.w.request_rescan("inotify queue overflow")


class Watcher:
    """A watchdog observer (inotify, or polling) on the input directories.

    Hints are consumed with :meth:`drain`; :meth:`healthy` and :meth:`restart` let the
    daemon supervise the observer thread; :meth:`take_rescan` tells it when a full rescan
    is due (overflow, a root that vanished or came back, a full event queue).
    """

    def __init__(
        self,
        roots: Iterable[os.PathLike | str],
        patterns: Iterable[str] = DEFAULT_PATTERNS,
        recursive: bool = False,
        poll: bool = False,
        poll_interval: float = 2.0,
        queue_size: int = 10000,
    ):
        self.roots = [os.path.abspath(r).rstrip("/") for r in roots]
        self.patterns = tuple(patterns)
        self.recursive = recursive
        self.poll = poll
        self.poll_interval = poll_interval
        self.queue: queue.Queue[str] = queue.Queue(maxsize=queue_size)
        self._rescan = threading.Event()
        self.rescan_reasons: deque[str] = deque(maxlen=100)  # recent ones (bounded: all night)
        self.overflows = 0
        self.restarts = 0
        self.observer = None
        self._root_ids: dict[str, tuple | None] = {}
        self._hook = _OverflowHook(self)

    # -- hints ------------------------------------------------------------------------------
    def push(self, path: str) -> None:
        try:
            self.queue.put_nowait(path)
        except queue.Full:
            self.request_rescan("event queue full")

    def request_rescan(self, reason: str) -> None:
        if not self._rescan.is_set():
            log.info("watch: rescan requested (%s)", reason)
        self.rescan_reasons.append(reason)
        self._rescan.set()

    def take_rescan(self) -> bool:
        """True (once) if a rescan has been requested since the last call."""
        if self._rescan.is_set():
            self._rescan.clear()
            return True
        return False

    def drain(self, limit: int = 100000) -> list[str]:
        out: list[str] = []
        while len(out) < limit:
            try:
                out.append(self.queue.get_nowait())
            except queue.Empty:
                break
        return out

    def scan(self) -> list[str]:
        return scan_directories(self.roots, self.patterns, self.recursive)

    # -- observer lifecycle -----------------------------------------------------------------------
    def _root_id(self, root: str) -> tuple | None:
        try:
            st = os.stat(root)
            return (st.st_dev, st.st_ino)
        except OSError:
            return None

    def start(self) -> None:
        from watchdog.observers import Observer
        from watchdog.observers.polling import PollingObserver

        if not _events_lost_supported():
            logging.getLogger("watchdog.observers.inotify_c").addHandler(self._hook)
        obs = PollingObserver(timeout=self.poll_interval) if self.poll else Observer()
        for root in self.roots:
            self._root_ids[root] = self._root_id(root)
            if self._root_ids[root] is None:
                log.warning("watch: %s does not exist (yet); will rescan when it appears", root)
                continue
            obs.schedule(_Handler(self), root, recursive=self.recursive)
        obs.daemon = True
        obs.start()
        self.observer = obs
        log.info("watch: %s observer on %s", "polling" if self.poll else "inotify", ", ".join(self.roots))

    def stop(self) -> None:
        logging.getLogger("watchdog.observers.inotify_c").removeHandler(self._hook)
        if self.observer is not None:
            try:
                self.observer.stop()
                self.observer.join(timeout=5)
            except Exception:  # a dead observer may fail to stop; nothing to keep
                log.debug("watch: observer stop failed", exc_info=True)
            self.observer = None

    def healthy(self) -> bool:
        """The observer thread is alive and every root is the one it watches."""
        if self.observer is None or not self.observer.is_alive():
            return False
        return all(self._root_id(r) == self._root_ids.get(r) for r in self.roots)

    def restart(self, reason: str) -> None:
        log.warning("watch: restarting the observer (%s)", reason)
        self.stop()
        self.restarts += 1
        self.start()
        self.request_rescan(reason)

    def supervise(self) -> bool:
        """Restart the observer if its thread died or a root vanished/reappeared.

        Returns True if the observer was healthy.
        """
        if self.observer is None or not self.observer.is_alive():
            self.restart("observer thread died")
            return False
        for r in self.roots:
            rid = self._root_id(r)
            if rid != self._root_ids.get(r):
                self.restart(f"watched root {r} {'disappeared' if rid is None else 'changed'}")
                return False
        return True

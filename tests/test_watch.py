"""Watcher: candidate names, completeness (structure, settle, sidecar, timeout), the real
inotify/polling observer with the logger's tmp-then-rename pattern, and overflow rescans."""

from __future__ import annotations

import io
import logging
import os
import time

import numpy as np
import pytest
from astropy.io import fits

from vampd.fitsbytes import data_layout
from vampd.watch.observer import (
    CompletenessTracker,
    Watcher,
    is_candidate,
    scan_directories,
    sidecar_lines,
    sidecar_path,
)


def fits_bytes(nframes=3, ny=8, nx=10) -> bytes:
    data = (np.arange(nframes * ny * nx) % 60000).astype(np.uint16).reshape(nframes, ny, nx)
    buf = io.BytesIO()
    fits.PrimaryHDU(data).writeto(buf)
    return buf.getvalue()


def write_raw(path, nframes=3, sidecar=True, tmp_rename=True):
    """Write like the instrument logger: NAME.fits.<pid>.<tid>.tmp, then rename; sidecar after."""
    data = fits_bytes(nframes)
    if tmp_rename:
        tmp = path.with_name(f"{path.name}.{os.getpid()}.1234.tmp")
        tmp.write_bytes(data)
        os.rename(tmp, path)
    else:
        path.write_bytes(data)
    if sidecar:
        sidecar_path(path).write_text("".join(f"{i} 0.0\n" for i in range(nframes)))
    return str(path)


@pytest.mark.parametrize(
    "name,ok",
    [
        ("VMPA00021059.fits", True),
        ("VMPA00021059.fits.fz", True),
        ("VMPA00021059.fits.1234.5678.tmp", False),
        (".VMPA00021059.fits", False),
        ("VMPA00021059.fits~", False),
        ("~VMPA00021059.fits", False),
        ("VMPA00021059.txt", False),
        (".a.fits.x1.part", False),
        ("notes.csv", False),
    ],
)
def test_is_candidate(name, ok):
    assert is_candidate(f"/data/{name}") is ok


def test_scan_directories(tmp_path):
    (tmp_path / "vcam1").mkdir()
    (tmp_path / "vcam2" / ".hidden").mkdir(parents=True)
    for rel in ["vcam1/a.fits", "vcam2/b.fits", "vcam2/b.txt", "vcam2/.hidden/c.fits", "top.fits", "x.fits.9.9.tmp"]:
        (tmp_path / rel).write_bytes(b"")
    assert scan_directories([tmp_path]) == [str(tmp_path / "top.fits")]
    assert scan_directories([tmp_path], recursive=True) == [
        str(tmp_path / "top.fits"),
        str(tmp_path / "vcam1/a.fits"),
        str(tmp_path / "vcam2/b.fits"),
    ]
    assert scan_directories([tmp_path / "missing"]) == []


def test_layout_and_sidecar(tmp_path):
    p = tmp_path / "a.fits"
    write_raw(p, nframes=4, tmp_rename=False)
    assert data_layout(p).shape == (4, 8, 10)
    assert sidecar_path(p) == tmp_path / "a.txt"
    assert sidecar_path(tmp_path / "b.fits.fz") == tmp_path / "b.txt"
    assert sidecar_lines(p) == 4
    assert sidecar_lines(tmp_path / "none.fits") is None


def test_tracker_waits_for_whole_file_and_settle(tmp_path):
    p = tmp_path / "a.fits"
    data = fits_bytes(3)
    p.write_bytes(data[:3000])  # header whole, data short
    tr = CompletenessTracker(settle_time=0.5, complete_timeout=60)
    tr.add(str(p), now=100.0)
    assert tr.check(now=100.0) == []
    assert "data truncated" in tr.entries[str(p)].reason
    p.write_bytes(data)
    assert tr.check(now=100.2) == []  # changed just now: settling
    [v] = tr.check(now=100.8)
    assert (v.state, v.nbytes) == ("complete", 3 * 8 * 10 * 4)
    assert len(tr) == 0


def test_tracker_sidecar(tmp_path):
    p = tmp_path / "a.fits"
    write_raw(p, nframes=3, sidecar=False, tmp_rename=False)
    tr = CompletenessTracker(settle_time=0.0, complete_timeout=60, expect_sidecar=True)
    tr.add(str(p), now=0.0)
    assert tr.check(now=1.0) == []
    assert tr.entries[str(p)].reason == "sidecar a.txt missing (expected 3 lines)"
    sidecar_path(p).write_text("1\n2\n")
    assert tr.check(now=2.0) == []
    assert tr.entries[str(p)].reason == "sidecar a.txt has 2 lines, NAXIS3 = 3"
    sidecar_path(p).write_text("1\n2\n3\n")
    [v] = tr.check(now=2.0)
    assert v.state == "complete"


def test_tracker_timeout_and_bad_files(tmp_path):
    trunc, zero, junk, gone = (tmp_path / n for n in ("t.fits", "z.fits", "j.fits", "g.fits"))
    trunc.write_bytes(fits_bytes(3)[:3000])
    zero.write_bytes(b"")
    junk.write_bytes(b"this is not FITS at all\n" * 10)
    gone.write_bytes(b"")
    tr = CompletenessTracker(settle_time=0.5, complete_timeout=5)
    for p in (trunc, zero, junk, gone):
        tr.add(str(p), now=0.0)
    assert tr.check(now=0.0) == []  # first look starts the settle clock
    gone.unlink()
    out = {os.path.basename(v.path): v for v in tr.check(now=1.0)}
    assert out["g.fits"].state == "gone"
    assert (out["j.fits"].state, out["j.fits"].reason) == ("error", "not a FITS file (no SIMPLE card)")
    assert set(out) == {"g.fits", "j.fits"}
    out = {os.path.basename(v.path): v for v in tr.check(now=6.0)}
    assert out["t.fits"].reason == "incomplete after 5 s: data truncated: 3000 bytes on disk, 3360 expected from NAXISn"
    assert out["z.fits"].reason == "incomplete after 5 s: zero-byte file"


def _wait_paths(w: Watcher, want: set[str], timeout=10.0) -> set[str]:
    seen: set[str] = set()
    t0 = time.time()
    while time.time() - t0 < timeout and not want <= seen:
        seen |= set(w.drain())
        time.sleep(0.05)
    return seen


@pytest.mark.parametrize("poll", [False, True])
def test_watcher_sees_renamed_and_copied_files(tmp_path, poll):
    (tmp_path / "vcam1").mkdir()
    w = Watcher([tmp_path], recursive=True, poll=poll, poll_interval=0.2)
    w.start()
    try:
        assert w.healthy()
        a = write_raw(tmp_path / "vcam1" / "VMPA00000001.fits")  # tmp-then-rename
        b = write_raw(tmp_path / "VMPA00000002.fits", tmp_rename=False)  # write and close
        seen = _wait_paths(w, {a, b})
        assert {a, b} <= seen
        assert all(is_candidate(p) for p in seen)  # no .tmp or .txt names leak through
    finally:
        w.stop()


def test_watcher_new_subdirectory_requests_rescan(tmp_path):
    w = Watcher([tmp_path], recursive=True)
    w.start()
    try:
        (tmp_path / "vcam2").mkdir()
        t0 = time.time()
        while not w.take_rescan() and time.time() - t0 < 5:
            time.sleep(0.05)
        assert any("new directory" in r for r in w.rescan_reasons)
    finally:
        w.stop()


def test_overflow_warning_triggers_rescan_that_finds_everything(tmp_path):
    """watchdog reports IN_Q_OVERFLOW only as a log warning; the hook turns it into a rescan."""
    w = Watcher([tmp_path])
    w.start()
    w.stop()  # no events: only the rescan can find the files
    logging.getLogger("watchdog.observers.inotify_c").addHandler(w._hook)
    try:
        paths = {write_raw(tmp_path / f"VMPA{i:08d}.fits", tmp_rename=False) for i in range(20)}
        assert not w.take_rescan()
        logging.getLogger("watchdog.observers.inotify_c").warning(
            "Inotify queue overflowed; filesystem events were lost"
        )
        assert w.take_rescan() and w.overflows == 1
        assert set(w.scan()) == paths
    finally:
        logging.getLogger("watchdog.observers.inotify_c").removeHandler(w._hook)


MAXQ = "/proc/sys/fs/inotify/max_queued_events"


@pytest.mark.skipif(not os.access(MAXQ, os.W_OK), reason="needs root to lower max_queued_events")
def test_real_inotify_overflow(tmp_path):
    """A real kernel queue overflow (the limit is lowered only while the watch is created)."""
    with open(MAXQ) as fh:
        old = fh.read().strip()
    try:
        with open(MAXQ, "w") as fh:
            fh.write("8")
        w = Watcher([tmp_path], queue_size=100000)
        w.start()
    finally:
        with open(MAXQ, "w") as fh:
            fh.write(old)
    try:
        for i in range(400):
            (tmp_path / f"f{i:04d}.fits").write_bytes(b"SIMPLE")
        t0 = time.time()
        while not w.overflows and time.time() - t0 < 10:
            time.sleep(0.05)
        assert w.overflows >= 1
        assert w.take_rescan()
        assert len(w.scan()) == 400
    finally:
        w.stop()


def test_supervise_restarts_dead_observer_and_vanished_root(tmp_path):
    root = tmp_path / "night"
    root.mkdir()
    w = Watcher([root])
    w.start()
    try:
        w.observer.stop()
        w.observer.join(5)
        assert not w.healthy()
        assert w.supervise() is False and w.restarts == 1 and w.healthy()
        w.take_rescan()
        root.rmdir()
        assert w.supervise() is False and w.restarts == 2
        root.mkdir()
        assert w.supervise() is False and w.restarts == 3  # came back: watch the new one
        assert w.take_rescan()
        p = write_raw(root / "VMPA00000009.fits")
        assert p in _wait_paths(w, {p})
    finally:
        w.stop()

"""The daemon and `vampd run` end to end: real subprocesses, real signals, a real ledger.

Files are written the way the instrument's logger writes them (``NAME.fits.<pid>.<tid>.tmp``
then rename, then a ``.txt`` sidecar with one line per frame).
"""

from __future__ import annotations

import io
import json
import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from astropy.io import fits

TESTS = Path(__file__).resolve().parent
PROCESS = os.environ.get("VAMPD_TEST_PROCESS", "test_daemon:small_process")


# -- a small stand-in for the science pipeline (same interface as process_file) -------------------
def small_process(path, cfg, outdir, force=False):
    """Median image of the cube → ``metrics/{stem}_metrics.npz`` (atomic), with a short sleep."""
    from vampd.fitsio import InputError, output_stem, save_npz_atomic

    try:
        with fits.open(path, memmap=False) as hdul:
            cube, hdr = np.asarray(hdul[0].data, dtype=np.float32), hdul[0].header
    except (OSError, ValueError, TypeError) as exc:
        raise InputError(path, f"cannot read FITS data ({exc})") from exc
    if cube.ndim != 3:
        raise InputError(path, f"expected a 3-D cube, found {cube.ndim}-D data")
    if "EXPTIME" not in hdr:
        raise ValueError(f"{path}: header keyword EXPTIME missing (expected exposure time in s)")
    time.sleep(float(os.environ.get("VAMPD_TEST_SLEEP", "0.05")))
    stem = output_stem(path)
    out = Path(outdir) / "metrics" / f"test_{stem}_metrics.npz"
    save_npz_atomic(out, median=np.median(cube, axis=0))
    return SimpleNamespace(
        path=str(path),
        products=[("metrics", str(out))],
        summary={"target": hdr.get("OBJECT"), "exptime": hdr["EXPTIME"], "nframes": cube.shape[0]},
        metrics={"nframes": cube.shape[0], "flux": float(cube.sum())},
    )


# -- helpers --------------------------------------------------------------------------------------
def raw_bytes(i: int, nframes=4, ny=16, nx=16, exptime=True) -> bytes:
    rng = np.random.default_rng(i)
    data = rng.integers(100, 200, (nframes, ny, nx)).astype(np.uint16)
    hdr = fits.Header()
    hdr["OBJECT"] = "HD 1234"
    if exptime:
        hdr["EXPTIME"] = 0.1
    buf = io.BytesIO()
    fits.PrimaryHDU(data, hdr).writeto(buf)
    return buf.getvalue()


def logger_write(path: Path, data: bytes, nframes=4) -> Path:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.140{random.randint(0, 999)}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data[: len(data) // 2])
        fh.flush()
        fh.write(data[len(data) // 2 :])
    os.rename(tmp, path)
    path.with_suffix(".txt").write_text("".join(f"{k} 60000.{k}\n" for k in range(nframes)))
    return path


def write_config(path: Path, **watch) -> Path:
    from vampd.config import load_config, save_config
    from vampd.config.presets import render_preset  # noqa: F401  (the preset machinery must exist)

    subprocess.run([sys.executable, "-m", "vampd", "new", str(path), "-f"], check=True, capture_output=True)
    cfg = load_config(path)
    w = dict(settle_time=0.1, complete_timeout=3.0, reconcile_interval=2.0, stop_timeout=20.0,
             expect_sidecar=True, workers=2, max_tries=2)
    w.update(watch)
    for k, v in w.items():
        setattr(cfg.watch, k, v)
    save_config(cfg, path)
    return path


def env(**extra) -> dict:
    e = dict(os.environ)
    e.update(OPENBLAS_NUM_THREADS="1", VAMPD_PROCESS=PROCESS, PYTHONPATH=f"{TESTS}{os.pathsep}{e.get('PYTHONPATH', '')}")
    e.update(extra)
    return e


def start_daemon(cfg: Path, raw: Path, out: Path, *extra, **envx) -> subprocess.Popen:
    log = open(out.parent / "daemon.log", "ab")
    return subprocess.Popen(
        [sys.executable, "-m", "vampd", "watch", str(cfg), "-i", str(raw), "-o", str(out), *extra],
        env=env(**envx), stdout=log, stderr=log,
    )


def status(out: Path, must=True) -> dict:
    p = subprocess.run([sys.executable, "-m", "vampd", "status", str(out), "--json"], env=env(),
                       capture_output=True, text=True, timeout=60)
    if not must and p.returncode == 2 and "ledger" in p.stderr:
        return {"files": {"done": -1, "failed": -1}}  # not created yet
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def wait_for(cond, timeout=60.0, every=0.2):
    t0 = time.time()
    while time.time() - t0 < timeout:
        v = cond()
        if v:
            return v
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s")


def ledger_rows(out: Path) -> dict:
    con = sqlite3.connect(f"file:{out / 'vampd.sqlite'}?mode=ro", uri=True)
    con.row_factory = sqlite3.Row
    rows = {r["path"]: dict(r) for r in con.execute("SELECT * FROM files")}
    con.close()
    return rows


def ledger_products(out: Path) -> list[dict]:
    con = sqlite3.connect(f"file:{out / 'vampd.sqlite'}?mode=ro", uri=True)
    con.row_factory = sqlite3.Row
    rows = [dict(r) for r in con.execute("SELECT * FROM products")]
    con.close()
    return rows


def stop(proc: subprocess.Popen, timeout=30) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout)


@pytest.fixture
def night(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "night.toml")
    return SimpleNamespace(raw=raw, out=out, cfg=cfg, tmp=tmp_path)


# -- tests ----------------------------------------------------------------------------------------
def test_run_twice_does_nothing_the_second_time(night):
    files = [str(logger_write(night.raw / f"VMPA{i:08d}.fits", raw_bytes(i))) for i in range(6)]
    cmd = [sys.executable, "-m", "vampd", "run", str(night.cfg), *files, "-o", str(night.out), "-j", "2"]
    p1 = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=120)
    assert p1.returncode == 0, p1.stderr
    assert "6 processed, 6 done, 0 failed" in p1.stdout
    mtimes = {p["path"]: os.stat(p["path"]).st_mtime_ns for p in ledger_products(night.out)}
    assert len(mtimes) == 6
    p2 = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=120)
    assert p2.returncode == 0 and "0 processed, 0 done" in p2.stdout
    assert {p: os.stat(p).st_mtime_ns for p in mtimes} == mtimes
    assert all(r["nprocessed"] == 1 and r["state"] == "done" for r in ledger_rows(night.out).values())
    # --force redoes them; a bad file is a specific error and exit status 1
    bad = night.raw / "VMPA00000099.fits"
    bad.write_bytes(raw_bytes(99)[:3000])
    p3 = subprocess.run(cmd[:5] + [str(bad)] + cmd[5:] + ["--force"], env=env(), capture_output=True, text=True, timeout=120)
    assert p3.returncode == 1
    rows = ledger_rows(night.out)
    assert all(rows[f]["nprocessed"] == 2 for f in files)
    assert rows[str(bad)]["state"] == "parked"
    assert "data truncated: 3000 bytes on disk" in rows[str(bad)]["error"]


def test_watch_streams_bad_files_and_sigterm(night):
    good = [logger_write(night.raw / f"VMPA{i:08d}.fits", raw_bytes(i)) for i in range(3)]  # already there
    proc = start_daemon(night.cfg, night.raw, night.out)
    try:
        good += [logger_write(night.raw / f"VMPA{i:08d}.fits", raw_bytes(i)) for i in range(3, 10)]
        # the bad ones: truncated (never completes), zero bytes, not FITS, keyword missing, corrupt data
        (night.raw / "VMPB00000001.fits").write_bytes(raw_bytes(1)[:4000])
        (night.raw / "VMPB00000002.fits").write_bytes(b"")
        (night.raw / "VMPB00000003.fits").write_bytes(b"\x00garbage, not FITS\n" * 100)
        logger_write(night.raw / "VMPB00000004.fits", raw_bytes(4, exptime=False))
        corrupt = bytearray(raw_bytes(5))
        corrupt[2880 - 80 : 2880] = b"NAXIS3  =                 -7 / broken".ljust(80)  # overwrite END
        corrupt[2880:2880] = b"END".ljust(80) + b" " * 2800
        logger_write(night.raw / "VMPB00000005.fits", bytes(corrupt))
        (night.raw / "VMPA00000050.fits.123.456.tmp").write_bytes(b"partial")  # ignored
        (night.raw / ".hidden.fits").write_bytes(b"")  # ignored

        def settled():
            st = status(night.out, must=False)
            return st if st["files"]["done"] == 10 and st["files"]["failed"] == 5 else None

        st = wait_for(settled, timeout=60)
        assert st["daemon"]["alive"] and st["daemon"]["pid"] == proc.pid
        assert st["files"] == {**st["files"], "total": 15, "pending": 0}
        errors = {os.path.basename(e["path"]): e["error"] for e in st["errors"]}
        assert "incomplete after 3 s: data truncated: 4000 bytes on disk, 4928 expected" in errors["VMPB00000001.fits"]
        assert "zero-byte file" in errors["VMPB00000002.fits"]
        assert "not a FITS file (no SIMPLE card)" in errors["VMPB00000003.fits"]
        assert "EXPTIME missing" in errors["VMPB00000004.fits"]
        assert "cannot read FITS data (Header missing END card.)" in errors["VMPB00000005.fits"]
        assert st["last_file"]["path"] in {str(p) for p in good}
        assert proc.poll() is None  # still running
    finally:
        t0 = time.time()
        rc = stop(proc)
    assert rc == 0 and time.time() - t0 < 20
    st = status(night.out)
    assert not st["daemon"]["alive"] and st["daemon"]["stopped"]


def test_sigkill_restarts_lose_nothing_redo_nothing(night):
    """The daemon is SIGKILLed at random moments while a night streams in; each restart resumes."""
    rng = random.Random(7)
    n = 40
    envx = {"VAMPD_TEST_SLEEP": "0.15"}
    proc = start_daemon(night.cfg, night.raw, night.out, **envx)
    recorded: dict[str, int] = {}
    kills = 0
    try:
        for i in range(n):
            logger_write(night.raw / f"VMPA{i:08d}.fits", raw_bytes(i))
            time.sleep(0.03)
            if i % 8 == 5:
                time.sleep(rng.uniform(0.1, 0.8))
                # products already recorded must never be rewritten
                for p in ledger_products(night.out):
                    recorded.setdefault(p["path"], p["mtime_ns"])
                proc.send_signal(signal.SIGKILL)
                proc.wait(10)
                kills += 1
                proc = start_daemon(night.cfg, night.raw, night.out, **envx)
        wait_for(lambda: status(night.out, must=False)["files"]["done"] == n, timeout=90)
    finally:
        assert stop(proc) == 0
    assert kills >= 5
    rows = ledger_rows(night.out)
    assert len(rows) == n and all(r["state"] == "done" and r["nprocessed"] == 1 for r in rows.values())
    prods = ledger_products(night.out)
    assert len(prods) == n and len({p["file"] for p in prods}) == n
    assert len(list((night.out / "metrics").glob("*.npz"))) == n  # one product per input, no stray
    for path, mtime in recorded.items():
        assert os.stat(path).st_mtime_ns == mtime
    st = status(night.out)
    assert st["files"] == {**st["files"], "total": n, "done": n, "failed": 0, "pending": 0}


def test_sighup_reload_requeues_changed_config_and_sd_notify(night):
    sock_path = str(night.tmp / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(sock_path)
    sock.settimeout(0.5)
    for i in range(3):
        logger_write(night.raw / f"VMPA{i:08d}.fits", raw_bytes(i))
    proc = start_daemon(night.cfg, night.raw, night.out, NOTIFY_SOCKET=sock_path, WATCHDOG_USEC="2000000")
    msgs: list[str] = []

    def got(prefix):
        try:
            msgs.extend(sock.recv(4096).decode().split("\n"))
        except TimeoutError:
            pass
        return any(m.startswith(prefix) for m in msgs)

    try:
        wait_for(lambda: got("READY=1"), timeout=30, every=0)
        wait_for(lambda: got("WATCHDOG=1"), timeout=30, every=0)
        wait_for(lambda: status(night.out, must=False)["files"]["done"] == 3, timeout=60)
        assert any(m.startswith("STATUS=") and "done" in m for m in msgs)
        before = {p["path"]: p["mtime_ns"] for p in ledger_products(night.out)}
        # a [watch]-only change does not redo anything; a processing change does
        text = night.cfg.read_text()
        night.cfg.write_text(text.replace("stop_timeout = 20.0", "stop_timeout = 19.0"))
        proc.send_signal(signal.SIGHUP)
        time.sleep(1.5)
        assert {p["path"]: p["mtime_ns"] for p in ledger_products(night.out)} == before
        night.cfg.write_text(text.replace('method = "median"', 'method = "mean"', 1))
        assert text != night.cfg.read_text()
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: all(r["nprocessed"] == 2 for r in ledger_rows(night.out).values()), timeout=60)
        assert stop(proc) == 0
        wait_for(lambda: got("STOPPING=1"), timeout=5, every=0)
    finally:
        stop(proc)
        sock.close()


def test_burst_and_overflow_rescan(night):
    """A burst of small files with a tiny event queue: the full queue turns into rescans, nothing is lost."""
    cfg = write_config(night.tmp / "burst.toml", queue_size=1, expect_sidecar=False, reconcile_interval=600.0)
    n = int(os.environ.get("VAMPD_TEST_BURST", "300"))
    proc = start_daemon(cfg, night.raw, night.out, VAMPD_TEST_SLEEP="0")
    try:
        time.sleep(1.0)
        data = raw_bytes(0, nframes=1, ny=4, nx=4)
        for i in range(n):
            logger_write(night.raw / f"VMPA{i:08d}.fits", data, nframes=1)
        wait_for(lambda: status(night.out, must=False)["files"]["done"] == n, timeout=120, every=0.5)
    finally:
        assert stop(proc) == 0
    log = (night.tmp / "daemon.log").read_text()
    assert "rescan requested (event queue full)" in log

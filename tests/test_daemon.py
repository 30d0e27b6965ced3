"""The daemon and `vampd run` end to end: real subprocesses, real signals, a real ledger, the
real per-file pipeline (``vampd.engine.pipeline.process_file``) on simulated raw files.

Files arrive the way the instrument's logger writes them (``vampd.simulate.stream``:
``NAME.fits.<pid>.<tid>.tmp``, rename, then a ``NAME.txt`` sidecar with one line per frame),
with injected faults.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import apply_fast_watch

pytestmark = pytest.mark.slow  # every test here runs real daemons in subprocesses (8-30 s each)

FAULTS = ("truncated", "corrupt", "nonfits", "missing_keyword", "zero_byte")


def sim_config(**kw):
    """A small, fast simulated night (16 files per HWP cycle: 2 cameras x 2 FLC x 4 HWP)."""
    from vampd.simulate.night import SimConfig

    base = dict(size=32, nframes=2, ncycles=1, n_hot=0, n_dead=0, calib=False)
    base.update(kw)
    return SimConfig(**base)


def simulate(root: Path, **kw) -> list[Path]:
    from vampd.simulate.night import simulate_night

    simulate_night(root, sim_config(**kw))
    return sorted((root / "raw").glob("*.fits"))


class Streamer:
    """``stream_night`` in a thread."""

    def __init__(self, root: Path, cadence: float, **kw):
        from vampd.simulate.stream import stream_night

        self.stop_event = threading.Event()
        self.error: BaseException | None = None

        def run():
            try:
                stream_night(root, sim_config(**kw), cadence=cadence, stop_event=self.stop_event)
            except BaseException as exc:  # surfaced by join()
                self.error = exc

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def alive(self) -> bool:
        return self.thread.is_alive()

    def join(self, timeout=180):
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "stream did not finish"
        if self.error:
            raise self.error


def write_config(path: Path, preset: str | None = None, sections: dict | None = None, **watch) -> Path:
    """A config file: ``vampd new`` (or ``preset`` in-process), ``[watch]`` options ``watch`` and
    ``sections = {"analysis.strehl": False, ...}`` overrides."""
    from vampd.config import load_config, save_config

    if preset is None:
        subprocess.run([sys.executable, "-m", "vampd", "new", str(path), "-f"], check=True, capture_output=True)
        cfg = load_config(path)
    else:
        from vampd.config.presets import preset_config

        cfg = preset_config(preset, "t")
    apply_fast_watch(cfg, **watch)
    for key, v in (sections or {}).items():
        section, _, name = key.partition(".")
        if name:
            setattr(getattr(cfg, section), name, v)
        else:
            setattr(cfg, section, v)
    save_config(cfg, path)
    return path


def env(**extra) -> dict:
    e = dict(os.environ)
    e.update(OPENBLAS_NUM_THREADS="1")
    e.pop("VAMPD_PROCESS", None)  # the real vampd.engine.pipeline:process_file
    e.update(extra)
    return e


def start_daemon(cfg: Path, raw: Path, out: Path, *extra, **envx) -> subprocess.Popen:
    with open(out.parent / "daemon.log", "ab") as log:  # the child keeps its own descriptor
        return subprocess.Popen(
            [sys.executable, "-m", "vampd", "watch", str(cfg), "-i", str(raw), "-o", str(out), *extra],
            env=env(**envx),
            stdout=log,
            stderr=log,
        )


def status(out: Path, must=True) -> dict:
    p = subprocess.run(
        [sys.executable, "-m", "vampd", "status", str(out), "--json"],
        env=env(),
        capture_output=True,
        text=True,
        timeout=180,
    )
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


def counts(out: Path) -> dict:
    """File states straight from the ledger (cheap polling; ``vampd status`` is a subprocess)."""
    try:
        con = sqlite3.connect(f"file:{out / 'vampd.sqlite'}?mode=ro", uri=True, timeout=5)
        c = dict(con.execute("SELECT state, COUNT(*) FROM files GROUP BY state").fetchall())
        con.close()
    except sqlite3.Error:
        c = {}
    return {k: c.get(k, 0) for k in ("pending", "queued", "running", "done", "failed", "parked")}


def ledger_products(out: Path) -> list[dict]:
    con = sqlite3.connect(f"file:{out / 'vampd.sqlite'}?mode=ro", uri=True)
    con.row_factory = sqlite3.Row
    rows = [dict(r) for r in con.execute("SELECT * FROM products")]
    con.close()
    return rows


def stop(proc: subprocess.Popen, timeout=90) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()  # never leave a daemon behind: it would fail later tests (ResourceWarning)
        proc.wait()
        raise


@pytest.fixture
def night(tmp_path):
    (tmp_path / "raw").mkdir()
    return SimpleNamespace(out=tmp_path / "out", cfg=write_config(tmp_path / "night.toml"), tmp=tmp_path)


# -- tests ----------------------------------------------------------------------------------------
def test_run_twice_does_nothing_the_second_time(night):
    files = [str(p) for p in simulate(night.tmp, faults=("truncated",))]
    truth = json.loads((night.tmp / "truth.json").read_text())
    bad = [str(night.tmp / f["path"]) for f in truth["faults"]]
    cmd = [sys.executable, "-m", "vampd", "run", str(night.cfg), *files, "-o", str(night.out), "-j", "2"]
    p1 = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300)
    assert p1.returncode == 1, p1.stderr  # one file is truncated
    assert "16 file(s), 15 processed, 15 done, 1 parked" in p1.stdout
    rows = ledger_rows(night.out)
    assert rows[bad[0]]["state"] == "parked"
    assert "data truncated" in rows[bad[0]]["error"] and "bytes on disk" in rows[bad[0]]["error"]
    prods = ledger_products(night.out)
    mtimes = {p["path"]: os.stat(p["path"]).st_mtime_ns for p in prods}
    assert {p["kind"] for p in prods} >= {"metrics", "coadded"} and len({p["file"] for p in prods}) == 15
    p2 = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300)
    assert p2.returncode == 1 and "0 processed, 0 done, 1 parked" in p2.stdout
    assert {p: os.stat(p).st_mtime_ns for p in mtimes} == mtimes
    assert all(r["nprocessed"] == 1 for r in ledger_rows(night.out).values() if r["state"] == "done")
    st = status(night.out)
    assert st["files"] == {**st["files"], "total": 16, "done": 15, "failed": 1, "pending": 0}
    assert not st["daemon"]["alive"] and st["daemon"]["pid"] is None


def test_watch_stream_with_faults_then_sigterm(night):
    """Every fault ends as a specific ledger error; the daemon keeps running; the rest finish."""
    raw = night.tmp / "raw"
    proc = start_daemon(night.cfg, raw, night.out)
    try:
        wait_for(lambda: (night.out / "vampd.sqlite").exists(), timeout=30)
        streamer = Streamer(night.tmp, cadence=0.05, faults=FAULTS)
        (raw / "VMPA09999999.fits.4242.4243.tmp").write_bytes(b"a logger temporary")  # ignored
        (raw / ".VMPA09999998.fits").write_bytes(b"")  # hidden: ignored
        streamer.join()

        def settled():
            st = status(night.out, must=False)
            return st if st["files"]["done"] == 11 and st["files"]["failed"] == 5 else None

        st = wait_for(settled, timeout=120)
        assert proc.poll() is None and st["daemon"]["alive"] and st["daemon"]["pid"] == proc.pid
        assert st["files"] == {**st["files"], "total": 16, "pending": 0}
        errors = {os.path.basename(e["path"]): e["error"] for e in st["errors"]}
        truth = json.loads((night.tmp / "truth.json").read_text())
        fault = {f["fault"]: os.path.basename(f["path"]) for f in truth["faults"]}
        assert set(fault) == set(FAULTS) and set(fault.values()) == set(errors)
        assert "incomplete after 3 s: data truncated:" in errors[fault["truncated"]]
        assert "header keyword DATA-TYP: missing" in errors[fault["corrupt"]]  # header cards garbled
        assert "not a FITS file (no SIMPLE card)" in errors[fault["nonfits"]]
        assert "header keyword U_CAMERA: missing" in errors[fault["missing_keyword"]]
        assert "incomplete after 3 s: zero-byte file" in errors[fault["zero_byte"]]
        assert all(e["state"] == "parked" for e in st["errors"])
        assert st["last_file"] is not None and st["last_file"]["target"]
    finally:
        t0 = time.time()
        rc = stop(proc)
    assert rc == 0 and time.time() - t0 < 20
    st = status(night.out)
    assert not st["daemon"]["alive"] and st["daemon"]["stopped"]


def test_sigkill_restarts_lose_nothing_redo_nothing(night):
    """The 64-file night streams in (logger pattern and sidecars); the daemon is SIGKILLed 5 times
    at random moments while jobs are running and restarted each time, then SIGTERMed while jobs
    are running (exit 0 within the stop timeout) and restarted once more. Every file ends done
    exactly once, one product of each kind per input, products recorded before a kill keep their
    mtime, and ``vampd status --json`` agrees (its ``done`` counts files whose products exist)."""
    n, nkills, stop_timeout = 64, 5, 20.0
    rng = random.Random(11)
    raw = night.tmp / "raw"
    proc = start_daemon(night.cfg, raw, night.out)
    streamer = Streamer(night.tmp, cadence=0.2, ncycles=4, size=64, nframes=10)  # jobs long enough to hit
    recorded: dict[str, int] = {}
    kills: list[dict] = []

    def snapshot():  # products recorded so far must never be rewritten
        for p in ledger_products(night.out):
            recorded.setdefault(p["path"], p["mtime_ns"])

    def busy_after(done_before):
        c = counts(night.out)
        return c if c["running"] > 0 and c["done"] > done_before else None

    # spread over the night: the i-th kill once more than marks[i] files are done
    marks = sorted(rng.sample(range(2, n - 12), nkills))
    try:
        while len(kills) < nkills:
            # once this incarnation has recorded a file, at a random moment while a job runs
            before = max(counts(night.out)["done"], marks[len(kills)])
            wait_for(lambda before=before: busy_after(before), timeout=90, every=0.01)
            time.sleep(rng.uniform(0.0, 0.03))
            c = counts(night.out)
            if c["running"] == 0:
                continue  # the moment passed: wait for the next job
            snapshot()
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            kills.append(c)
            proc = start_daemon(night.cfg, raw, night.out)
        before = counts(night.out)["done"]
        c = wait_for(lambda: busy_after(before), timeout=90, every=0.01)
        snapshot()
        t0 = time.time()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(stop_timeout + 30)
        t_stop = time.time() - t0
        assert rc == 0 and t_stop < stop_timeout, (rc, t_stop)
        after = counts(night.out)
        assert after["running"] == 0 and after["done"] >= c["done"]  # drained, nothing left running
        proc = start_daemon(night.cfg, raw, night.out)
        streamer.join()
        wait_for(lambda: counts(night.out)["done"] == n, timeout=180, every=0.2)
    finally:
        streamer.stop_event.set()
        assert stop(proc) == 0
    print(
        f"\n{n} files, {len(kills)} SIGKILLs at done={[k['done'] for k in kills]} with running="
        f"{[k['running'] for k in kills]}; SIGTERM with {c['running']} running: exit 0 in {t_stop:.2f} s"
    )
    assert len(kills) == nkills and all(k["running"] > 0 and k["done"] < n for k in kills)
    rows = ledger_rows(night.out)
    assert len(rows) == n and all(r["state"] == "done" and r["nprocessed"] == 1 for r in rows.values())
    prods = ledger_products(night.out)
    kinds = {p["kind"] for p in prods}
    assert {"metrics", "coadded"} <= kinds
    for kind in kinds:
        assert sorted(p["file"] for p in prods if p["kind"] == kind) == sorted(rows)  # one per input
    assert len(list((night.out / "coadded").glob("*.fits"))) == n
    assert len(recorded) >= len(kinds) * kills[0]["done"]
    assert all(os.stat(p).st_mtime_ns == m for p, m in recorded.items())
    st = status(night.out)
    assert st["files"] == {**st["files"], "total": n, "done": n, "failed": 0, "pending": 0, "running": 0}
    # `done` counts recorded files whose products exist: one product gone -> that file is pending
    gone = next(p["path"] for p in prods if p["kind"] == "coadded")
    os.unlink(gone)
    st = status(night.out)
    assert st["files"] == {**st["files"], "total": n, "done": n - 1, "pending": 1}


def test_sighup_reload_and_sd_notify(night):
    """READY/WATCHDOG/STATUS/STOPPING reach $NOTIFY_SOCKET; SIGHUP with a [watch]-only change
    redoes nothing, a processing change redoes every file."""
    simulate(night.tmp)
    sock_path = str(night.tmp / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(sock_path)
    sock.settimeout(0.5)
    msgs: list[str] = []
    reading = threading.Event()

    def reader():  # like systemd: the notify socket is always drained (sends never block the daemon)
        while not reading.is_set():
            try:
                msgs.extend(sock.recv(4096).decode().split("\n"))
            except (TimeoutError, OSError):
                pass

    threading.Thread(target=reader, daemon=True).start()

    def got(prefix):
        return any(m.startswith(prefix) for m in list(msgs))

    proc = start_daemon(night.cfg, night.tmp / "raw", night.out, NOTIFY_SOCKET=sock_path, WATCHDOG_USEC="2000000")
    try:
        wait_for(lambda: got("READY=1"), timeout=30)
        wait_for(lambda: status(night.out, must=False)["files"]["done"] == 16, timeout=120)
        wait_for(lambda: got("WATCHDOG=1"), timeout=10)
        assert any(m.startswith("STATUS=") and "done" in m for m in msgs)
        before = {p["path"]: p["mtime_ns"] for p in ledger_products(night.out)}
        text = night.cfg.read_text()
        night.cfg.write_text(text.replace("stop_timeout = 20.0", "stop_timeout = 19.0"))
        proc.send_signal(signal.SIGHUP)
        time.sleep(2.0)
        assert {p["path"]: p["mtime_ns"] for p in ledger_products(night.out)} == before
        changed = text.replace('method = "median"', 'method = "mean"', 1)
        assert changed != text
        night.cfg.write_text(changed)
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: all(r["nprocessed"] == 2 for r in ledger_rows(night.out).values()), timeout=120)
        after = {p["path"]: p["mtime_ns"] for p in ledger_products(night.out)}
        assert all(after[p] > before[p] for p in before)
        assert stop(proc) == 0
        wait_for(lambda: got("STOPPING=1"), timeout=5)
    finally:
        try:
            stop(proc)
        finally:
            reading.set()
            sock.close()


def test_burst_and_full_queue_rescan(night):
    """A burst of 1000 tiny files (16x16, one frame; quicklook without Strehl) with a one-event
    queue: the full queue becomes rescans, every file is processed exactly once."""
    n = int(os.environ.get("VAMPD_TEST_BURST", "1000"))
    src = simulate(night.tmp / "sim", nframes=1, size=16)[0]
    cfg = write_config(
        night.tmp / "burst.toml",
        preset="quicklook",
        queue_size=1,
        reconcile_interval=600.0,
        sections={"analysis.strehl": False, "align.crop_width": 16},
    )
    raw = night.tmp / "raw"
    proc = start_daemon(cfg, raw, night.out)
    try:
        wait_for(lambda: (night.out / "vampd.sqlite").exists(), timeout=30)
        t0 = time.time()
        for i in range(n):
            dst = raw / f"VMPA{i:08d}.fits"
            tmp = dst.with_name(dst.name + ".77.88.tmp")
            shutil.copyfile(src, tmp)
            os.rename(tmp, dst)
            shutil.copyfile(src.with_suffix(".txt"), dst.with_suffix(".txt"))
        t_written = time.time() - t0
        wait_for(lambda: counts(night.out)["done"] == n, timeout=300, every=0.5)
        t_done = time.time() - t0
    finally:
        assert stop(proc) == 0
    print(f"\nburst: {n} files written in {t_written:.1f} s, all done {t_done:.1f} s after the first")
    assert "rescan requested (event queue full)" in (night.tmp / "daemon.log").read_text()
    rows = ledger_rows(night.out)
    assert len(rows) == n and all(r["state"] == "done" and r["nprocessed"] == 1 for r in rows.values())
    assert len(list((night.out / "coadded").glob("*.fits"))) == n
    assert status(night.out)["files"]["done"] == n


# -- PDI inside the daemon ------------------------------------------------------------------------
PDI = {"align.crop_width": 48, "polarimetry.use_ideal_mm": True}


def set_rows(out: Path) -> list[dict]:
    con = sqlite3.connect(f"file:{out / 'vampd.sqlite'}?mode=ro", uri=True, timeout=5)
    con.row_factory = sqlite3.Row
    rows = [dict(r) for r in con.execute("SELECT * FROM sets ORDER BY id")]
    con.close()
    return rows


def daemon_running(out: Path, proc: subprocess.Popen) -> bool:
    """This daemon has passed its start-up (catch-up rescan and triggers) and ticks."""
    try:
        con = sqlite3.connect(f"file:{out / 'vampd.sqlite'}?mode=ro", uri=True, timeout=5)
        row = con.execute("SELECT pid, status FROM daemon WHERE id=1").fetchone()
        con.close()
    except sqlite3.Error:
        return False
    return row is not None and row[0] == proc.pid and row[1] in ("running", "degraded")


def set_done(out: Path, name: str = "t") -> bool:
    try:
        complete = [r for r in set_rows(out) if r["state"] == "complete"]
    except sqlite3.Error:
        return False
    return (
        len(complete) == 1
        and (out / "pdi" / "stokes" / f"{name}_stokes_000.fits").exists()
        and (out / "pdi" / f"{name}_stokes_coll.fits").exists()
    )


def test_pdi_set_completes_in_the_daemon(night):
    """One HWP cycle (16 files, triple difference) streams into `vampd watch`: the set completes in
    the ledger and its Stokes file and the running collapse exist while the daemon runs."""
    cfg = write_config(night.tmp / "pdi.toml", preset="pdi-triplediff", sections=PDI)
    proc = start_daemon(cfg, night.tmp / "raw", night.out)
    try:
        Streamer(night.tmp, cadence=0.05, size=64).join()
        wait_for(lambda: set_done(night.out), timeout=120, every=0.2)
        assert proc.poll() is None
        (row,) = set_rows(night.out)
        members = json.loads(row["members"])
        assert row["mode"] == "triplediff" and len(members) == 16
        assert {m["path"] for m in members} == {str(p) for p in (night.tmp / "raw").glob("*.fits")}
        assert len(list((night.out / "pdi" / "stokes").glob("*_stokes_*.fits"))) == 1
        assert status(night.out)["sets"] == {"complete": 1, "broken": 0, "open": 0}
    finally:
        assert stop(proc) == 0


def test_pdi_set_of_a_file_recorded_before_a_kill_is_processed_at_restart(night):
    """The ledger a SIGKILL leaves between the 16th file's record and its set update: 15 files
    recorded with their triggers (one open set), the 16th recorded without (here: by `vampd run`
    with the same per-file settings and no [polarimetry] -- same config hash, so nothing is
    redone). The restarted daemon processes the set at start-up, once; a second restart adds no set."""
    files = [str(p) for p in simulate(night.tmp, size=64)]
    cfg = write_config(night.tmp / "pdi.toml", preset="pdi-triplediff", sections=PDI)
    cut = write_config(
        night.tmp / "cut.toml",
        preset="pdi-triplediff",
        sections={**PDI, "polarimetry": None, "diff_images.make_diff": False},
    )
    from vampd.config import load_config
    from vampd.engine.runner import config_hash_of

    assert config_hash_of(load_config(cfg)) == config_hash_of(load_config(cut))

    def run(c, paths):
        p = subprocess.run(
            [sys.executable, "-m", "vampd", "run", str(c), *paths, "-o", str(night.out), "-j", "2"],
            env=env(),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert p.returncode == 0, p.stdout + p.stderr

    run(cfg, files[:15])
    (row,) = set_rows(night.out)
    assert row["state"] == "open" and len(json.loads(row["members"])) == 15
    run(cut, files[15:])
    assert counts(night.out)["done"] == 16 and not set_done(night.out)
    mtimes = {p["path"]: p["mtime_ns"] for p in ledger_products(night.out)}
    for _ in range(2):
        proc = start_daemon(cfg, night.tmp / "raw", night.out)
        try:
            wait_for(lambda proc=proc: daemon_running(night.out, proc), timeout=90, every=0.1)
            # the start-up pass runs in the trigger thread: READY and the loop do not wait for it
            wait_for(lambda: set_done(night.out), timeout=120, every=0.2)
            assert proc.poll() is None
        finally:
            assert stop(proc) == 0
        (row,) = set_rows(night.out)
        assert row["state"] == "complete" and len(json.loads(row["members"])) == 16
        assert len(list((night.out / "pdi" / "stokes").glob("*.fits"))) == 1
    assert all(r["nprocessed"] == 1 for r in ledger_rows(night.out).values())
    assert {p["path"]: p["mtime_ns"] for p in ledger_products(night.out)} == mtimes


def test_lost_product_is_redone_at_daemon_start(night):
    """A product lost after its file was recorded (power cut before the directory entry reached
    the disk, or deleted by hand) is noticed at start-up and only that file is redone."""
    files = [str(p) for p in simulate(night.tmp)]
    cmd = [sys.executable, "-m", "vampd", "run", str(night.cfg), *files, "-o", str(night.out), "-j", "2"]
    assert subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300).returncode == 0
    prods = ledger_products(night.out)
    victim = next(p for p in prods if p["kind"] == "coadded")
    others = {p["path"]: os.stat(p["path"]).st_mtime_ns for p in prods if p["file"] != victim["file"]}
    os.unlink(victim["path"])
    assert status(night.out)["files"]["done"] == len(files) - 1
    proc = start_daemon(night.cfg, night.tmp / "raw", night.out)
    try:
        wait_for(lambda: os.path.exists(victim["path"]), timeout=60)
        wait_for(lambda: status(night.out)["files"]["done"] == len(files), timeout=60)
    finally:
        assert stop(proc) == 0
    rows = ledger_rows(night.out)
    assert rows[victim["file"]]["nprocessed"] == 2
    assert all(r["nprocessed"] == 1 for p, r in rows.items() if p != victim["file"])
    assert {p: os.stat(p).st_mtime_ns for p in others} == others  # nothing else rewritten

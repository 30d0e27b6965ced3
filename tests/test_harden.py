"""All night, unattended: odd paths, byte-exact completeness, a full disk, the watchdog ping
during set science, bounded shutdown under CPU load, umask-honouring products, start-up
refusals and `vampd retry`. Real daemons in subprocesses, real files, real signals."""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import shutil
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

sys.path.insert(0, str(Path(__file__).parent))
from test_daemon import (  # noqa: E402
    PDI,
    Streamer,
    counts,
    env,
    ledger_rows,
    set_done,
    simulate,
    stop,
    wait_for,
    write_config,
)

from vampd.watch.observer import CompletenessTracker  # noqa: E402

SETPRIV = shutil.which("setpriv")


def start(cfg: Path, raw: Path, out: Path, *extra, drop_dac: bool = False, **envx) -> subprocess.Popen:
    """`vampd watch` in a subprocess; with ``drop_dac`` root loses CAP_DAC_OVERRIDE/READ_SEARCH,
    so a mode-000 file is unreadable to it as to any unprivileged daemon user."""
    log = open(out.parent / "daemon.log", "ab")
    cmd = [sys.executable, "-m", "vampd", "watch", str(cfg), "-i", str(raw), "-o", str(out), *extra]
    if drop_dac and os.geteuid() == 0 and SETPRIV:
        cmd = [SETPRIV, "--inh-caps=-all", "--bounding-set=-dac_override,-dac_read_search", "--", *cmd]
    try:
        return subprocess.Popen(cmd, env=env(**envx), stdout=log, stderr=log)
    finally:
        log.close()  # the child has its own descriptor


def heartbeat(out: Path) -> float:
    try:
        con = sqlite3.connect(f"file:{out / 'vampd.sqlite'}?mode=ro", uri=True, timeout=5)
        row = con.execute("SELECT heartbeat FROM daemon WHERE id=1").fetchone()
        con.close()
    except sqlite3.Error:
        return 0.0
    return row[0] if row and row[0] else 0.0


def fits_with_endtime(nframes=2, n=16) -> bytes:
    h = fits.Header([("ENDTIME", "10:00:00", "starts with END"), ("END_OF", 1)])
    buf = io.BytesIO()
    fits.PrimaryHDU(np.ones((nframes, n, n), np.float32), header=h).writeto(buf)
    return buf.getvalue()


@pytest.fixture
def night(tmp_path):
    (tmp_path / "raw").mkdir()
    return SimpleNamespace(out=tmp_path / "out", tmp=tmp_path, raw=tmp_path / "raw")


# -- completeness ---------------------------------------------------------------------------------
def test_endtime_file_cut_at_every_card_never_complete_then_once(tmp_path):
    raw = fits_with_endtime()
    p = tmp_path / "cut.fits"
    tr = CompletenessTracker(settle_time=0.0, complete_timeout=1e9)
    tr.add(str(p), now=0.0)
    t = 0.0
    for n in range(80, len(raw), 80):
        p.write_bytes(raw[:n])
        for _ in range(2):  # settled at this size
            t += 1.0
            assert tr.check(now=t) == [], n
    p.write_bytes(raw)
    (v,) = tr.check(now=t + 1)
    assert (v.state, v.nbytes) == ("complete", 2 * 16 * 16 * 4)
    assert tr.check(now=t + 2) == [] and str(p) not in tr


# -- odd paths in a watched PDI night -------------------------------------------------------------
@pytest.mark.slow
def test_odd_paths_in_a_watched_pdi_night(night):
    """FIFO, /dev/zero and /dev/urandom symlinks, a directory named a.fits, a symlink loop, a
    non-UTF-8 name, an unreadable file, a vanishing file, junk, an ENDTIME file completed late,
    a complete file that keeps growing: the daemon stays up and beats, the HWP set completes,
    each odd path has at most one ledger row and at most max_tries error lines."""
    cfg = write_config(
        night.tmp / "pdi.toml", preset="pdi-triplediff", sections=PDI, max_tries=2, complete_timeout=60.0
    )
    raw = night.raw
    proc = start(cfg, raw, night.out, drop_dac=True)
    grow = raw / "grow.fits"
    cut = raw / "cut.fits"
    try:
        wait_for(lambda: heartbeat(night.out) > 0, timeout=60)
        os.mkfifo(raw / "fifo.fits")
        (raw / "zero.fits").symlink_to("/dev/zero")
        (raw / "urandom.fits").symlink_to("/dev/urandom")
        (raw / "a.fits").mkdir()
        (raw / "loop.fits").symlink_to(raw / "loop.fits")
        with open(os.fsencode(raw) + b"/caf\xe9.fits", "wb") as fh:
            fh.write(b"SIMPLE  = junk" + b" " * 100)
        locked = raw / "locked.fits"
        locked.write_bytes(fits_with_endtime())
        locked.chmod(0)
        (raw / "junk.fits").write_bytes(b"\x00junk" * 40)
        (raw / "gone.fits").write_bytes(b"SIMPLE  =")
        (raw / "gone.fits").unlink()
        # cut and grow: real raw files of another target (their own open set)
        extra = simulate(night.tmp / "x", size=32, targets=("MWC480",))
        with fits.open(extra[0]) as hdul:
            hdul[0].header["ENDTIME"] = ("10:00:00.000", "a keyword that starts with END")
            buf = io.BytesIO()
            hdul.writeto(buf)
        full = buf.getvalue()
        end_card = next(i for i in range(0, len(full), 80) if full[i : i + 8] == b"END     ")
        shutil.copy(extra[0].with_suffix(".txt"), raw / "cut.txt")
        shutil.copy(extra[1].with_suffix(".txt"), raw / "grow.txt")
        cut.write_bytes(full[:end_card])  # ENDTIME there, the END card not yet
        grow.write_bytes(extra[1].read_bytes())
        Streamer(night.tmp, cadence=0.05, size=64).join()
        beats = []
        for i in range(12):  # the growing file: appended after it is complete
            with open(grow, "ab") as fh:
                fh.write(b"\0" * 100)
            beats.append(heartbeat(night.out))
            time.sleep(0.5)
            if i == 6:
                cut.write_bytes(full)  # completed late: processed once
        wait_for(lambda: set_done(night.out), timeout=180, every=0.5)
        wait_for(lambda: counts(night.out)["pending"] + counts(night.out)["running"] == 0, timeout=60)
        time.sleep(6.0)  # a few reconciliations (2 s) and retries later
        assert proc.poll() is None
        assert beats[-1] > beats[0] and heartbeat(night.out) > beats[-1]
        rows = ledger_rows(night.out)
        names = {os.path.basename(p): r for p, r in rows.items()}
        for odd in ("fifo.fits", "zero.fits", "urandom.fits", "a.fits", "loop.fits", "junk.fits"):
            assert names[odd]["state"] == "parked", odd
        assert "FIFO" in names["fifo.fits"]["error"] and "directory" in names["a.fits"]["error"]
        assert "character device" in names["zero.fits"]["error"] and "symlink loop" in names["loop.fits"]["error"]
        assert names["caf\\xe9.fits"]["error"].endswith("caf\\xe9.fits: file name is not valid UTF-8: rename it")
        if SETPRIV and os.geteuid() == 0:
            assert "permission denied" in names["locked.fits"]["error"]
        assert "gone.fits" not in names
        assert names["cut.fits"]["state"] == "done" and names["cut.fits"]["nprocessed"] == 1
        assert names["grow.fits"]["state"] == "done" and names["grow.fits"]["nprocessed"] == 1
        assert sum(r["state"] == "done" for r in rows.values()) >= 16 + 2 - 0
        log = (night.tmp / "daemon.log").read_text(errors="replace")
        for odd in ("fifo.fits", "zero.fits", "urandom.fits", "a.fits", "loop.fits", "junk.fits", "locked.fits"):
            lines = [ln for ln in log.splitlines() if odd in ln and ("ERROR" in ln or "WARNING" in ln)]
            assert 1 <= len(lines) <= 2, (odd, lines)
        assert "Traceback" not in log
        # products honour the umask (022 → 0644)
        modes = {oct(os.stat(p).st_mode & 0o777) for p in (night.out / "coadded").glob("*.fits")}
        assert modes == {"0o644"}
        assert oct(os.stat(night.out / "pdi" / "stokes" / "t_stokes_000.fits").st_mode & 0o777) == "0o644"
    finally:
        assert stop(proc) == 0
        shutil.rmtree(raw / "a.fits", ignore_errors=True)


# -- full disk ------------------------------------------------------------------------------------
def _can_mount() -> bool:
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    probe = Path("/tmp") / f"vampd-mnt-probe-{os.getpid()}"
    probe.mkdir(exist_ok=True)
    ok = (
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(probe)], capture_output=True).returncode
        == 0
    )
    if ok:
        subprocess.run(["umount", str(probe)])
    probe.rmdir()
    return ok


@pytest.mark.slow
@pytest.mark.skipif(not _can_mount(), reason="needs root and tmpfs mounts to make a small full disk")
def test_full_disk_pauses_intake_and_loses_nothing(night):
    """The output is a 24 MB tmpfs; a filler takes all its space for ~15 s mid-stream: the
    daemon does not exit, says it paused, and every file is done exactly once afterwards."""
    out = night.out
    out.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(out)], check=True)
    try:
        cfg = write_config(night.tmp / "q.toml", preset="quicklook", sections={"analysis.strehl": False})
        proc = start(cfg, night.raw, out)
        try:
            wait_for(lambda: heartbeat(out) > 0, timeout=60)
            streamer = Streamer(night.tmp, cadence=0.3, size=32)
            wait_for(lambda: counts(out)["done"] >= 3, timeout=120)
            filler = out / "filler"
            with open(filler, "wb", buffering=0) as fh:  # fill the disk (unbuffered: no flush at close)
                try:
                    while True:
                        fh.write(b"\0" * 65536)
                except OSError:
                    pass
            t_full = time.time()
            wait_for(lambda: "intake paused" in (night.tmp / "daemon.log").read_text(), timeout=60)
            while time.time() - t_full < 15:
                assert proc.poll() is None
                time.sleep(1)
            filler.unlink()
            streamer.join()
            wait_for(lambda: counts(out)["done"] == 16, timeout=180, every=0.5)
            assert proc.poll() is None
            rows = ledger_rows(out)
            assert len(rows) == 16 and all(r["state"] == "done" and r["nprocessed"] == 1 for r in rows.values())
            assert "intake resumed" in (night.tmp / "daemon.log").read_text()
        finally:
            assert stop(proc) == 0
    finally:
        subprocess.run(["umount", "-l", str(out)])


# -- the watchdog ping never waits on set science -------------------------------------------------
@pytest.mark.slow
def test_watchdog_ping_under_2s_while_a_536px_set_is_processed(night):
    sock_path = str(night.tmp / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(sock_path)
    sock.settimeout(0.2)
    cfg = write_config(
        night.tmp / "pdi.toml",
        preset="pdi-triplediff",
        sections={"align.crop_width": 536, "polarimetry.use_ideal_mm": True},
    )
    simulate(night.tmp / "sim", size=536, nframes=2)
    proc = start(cfg, night.raw, night.out, NOTIFY_SOCKET=sock_path, WATCHDOG_USEC="1000000")
    pings: list[float] = []
    try:

        def got_ready():
            try:
                return "READY=1" in sock.recv(4096).decode()
            except TimeoutError:
                return False

        wait_for(got_ready, timeout=60, every=0)
        for p in sorted((night.tmp / "sim" / "raw").iterdir()):
            shutil.copy(p, night.raw / (p.name + ".1.1.tmp"))
            os.rename(night.raw / (p.name + ".1.1.tmp"), night.raw / p.name)
        t_end = time.time() + 600
        # until the set is done, and long enough for 8 pings however fast the set was
        while time.time() < t_end and not (set_done(night.out) and len(pings) >= 8):
            try:
                if "WATCHDOG=1" in sock.recv(4096).decode():
                    pings.append(time.time())
            except TimeoutError:
                pass
        assert set_done(night.out), "the set did not complete"
    finally:
        assert stop(proc) == 0
        sock.close()
    gaps = np.diff(pings)
    print(f"\nwatchdog pings: {len(pings)}, max gap {gaps.max():.2f} s, median {np.median(gaps):.2f} s")
    assert len(pings) >= 8 and gaps.max() < 2.0


# -- shutdown under CPU load ----------------------------------------------------------------------
def _burn(stop_at: float) -> None:
    x = 0
    while time.time() < stop_at:
        x += 1


@pytest.mark.slow
def test_shutdown_completes_within_stop_timeout_under_cpu_load(night):
    cfg = write_config(night.tmp / "q.toml", preset="quicklook", stop_timeout=5.0, sections={"analysis.strehl": False})
    simulate(night.tmp, size=32)  # 16 files already there: work in flight at the SIGTERM
    proc = start(cfg, night.raw, night.out)
    burners = [multiprocessing.get_context("spawn").Process(target=_burn, args=(time.time() + 120,)) for _ in range(4)]
    try:
        wait_for(lambda: counts(night.out)["running"] > 0 or counts(night.out)["done"] > 0, timeout=120, every=0.1)
        for b in burners:
            b.start()
        time.sleep(1.0)
        t0 = time.time()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(60)
        took = time.time() - t0
    finally:
        for b in burners:
            b.kill()
        if proc.poll() is None:
            proc.kill()
    assert rc == 0 and took < 5.0 + 10.0, took
    rows = ledger_rows(night.out)
    assert all(r["state"] in ("done", "pending") for r in rows.values())  # abandoned work goes back


# -- start-up refusals, missing input, retry ------------------------------------------------------
def test_startup_refusals_one_line_and_exit_codes(night):
    cfg = write_config(night.tmp / "q.toml", preset="quicklook")
    a_file = night.tmp / "not-a-dir"
    a_file.write_text("x")

    def watch(out, raw=night.raw):
        return subprocess.run(
            [sys.executable, "-m", "vampd", "watch", str(cfg), "-i", str(raw), "-o", str(out)],
            env=env(),
            capture_output=True,
            text=True,
            timeout=120,
        )

    p = watch(a_file / "out")
    assert p.returncode == 3 and p.stderr.count("\n") == 1 and str(a_file / "out") in p.stderr, p.stderr
    bad = night.tmp / "badledger"
    bad.mkdir()
    (bad / "vampd.sqlite").write_bytes(b"this is not a database" * 100)
    p = watch(bad)
    assert p.returncode == 4 and p.stderr.count("\n") == 1 and "vampd.sqlite" in p.stderr and "corrupt" in p.stderr
    assert "Traceback" not in p.stderr


@pytest.mark.slow
def test_missing_input_is_an_alert_and_retry_unparks(night):
    from vampd.cli import main
    from vampd.engine.ledger import Ledger

    cfg = write_config(night.tmp / "q.toml", preset="quicklook")
    proc = start(cfg, night.tmp / "typo", night.out)
    try:
        wait_for(lambda: "ALERT: input directory" in (night.tmp / "daemon.log").read_text(), timeout=60)
        assert proc.poll() is None
    finally:
        assert stop(proc) == 0
    with Ledger(night.out) as led:
        led.record_failure(str(night.raw / "x.fits"), "boom", 1, permanent=True)
        assert led.get(str(night.raw / "x.fits"))["state"] == "parked"
    assert main(["retry", str(night.out)]) == 0
    with Ledger(night.out) as led:
        row = led.get(str(night.raw / "x.fits"))
        assert (row["state"], row["tries"]) == ("pending", 0)
        assert json.dumps(led.counts())


# -- memory admission -----------------------------------------------------------------------------
def test_memory_admission_from_the_decompressed_size_and_over_limit_parked(tmp_path):
    from vampd.config.presets import preset_config
    from vampd.engine.ledger import Ledger
    from vampd.engine.pool import WorkerPool
    from vampd.engine.runner import Runner

    data = (np.arange(8 * 64 * 64) % 3000).astype(np.int16).reshape(8, 64, 64)
    fz = tmp_path / "VMPA00000001.fits.fz"
    fits.HDUList([fits.PrimaryHDU(), fits.CompImageHDU(data)]).writeto(fz)
    assert fz.stat().st_size < 8 * 64 * 64 * 4 / 2  # compressed: the file size says little
    cfg = preset_config("quicklook", "m")
    led = Ledger(tmp_path / "out")
    pool = WorkerPool(workers=1, memory_limit=10 * 8 * 64 * 64 * 4)  # room for 10 cubes
    runner = Runner(cfg, tmp_path / "out", led, pool)
    runner.offer(fz)
    row = led.get(str(fz))
    factor = runner.settings["memory_factor"]
    assert runner._nbytes(row) == int(8 * 64 * 64 * 4 * factor)  # float32 cube x memory_factor
    pool.memory_limit = int(8 * 64 * 64 * 4 * factor) - 1  # one byte short: parked, never run
    assert runner.pump() == 0 and not pool.jobs
    row = led.get(str(fz))
    assert row["state"] == "parked" and "over the memory limit" in row["error"] and row["error_kind"] == "memory"
    led.close()


# -- worker death is charged only to the file that ran alone --------------------------------------
def fake_process(path, cfg, outdir, force):
    """A stand-in for the per-file chain: the file named *poison* kills its worker."""
    if "poison" in os.path.basename(path):
        os._exit(9)
    time.sleep(0.5)
    prod = Path(outdir) / (Path(path).stem + ".metrics")
    prod.write_text("ok")
    return SimpleNamespace(products=[("metrics", str(prod))], summary={}, metrics={})


@pytest.mark.slow
def test_worker_death_charges_only_the_file_that_ran_alone(tmp_path):
    from vampd.config.presets import preset_config
    from vampd.engine.ledger import Ledger
    from vampd.engine.pool import WorkerPool
    from vampd.engine.runner import Runner

    files = [tmp_path / "a_good.fits", tmp_path / "b_poison.fits"]
    for i, f in enumerate(files):
        f.write_bytes(bytes([i]) * 100)
    led = Ledger(tmp_path / "out")
    pool = WorkerPool(workers=2, memory_limit=1 << 30, process="test_harden:fake_process")
    runner = Runner(preset_config("quicklook", "w"), tmp_path / "out", led, pool)
    pool.start(warm=False)
    try:
        for f in files:
            runner.offer(f, nbytes=1)
        deadline = time.time() + 180
        while time.time() < deadline:
            runner.pump()
            runner.collect(timeout=0.2)
            if led.get(str(files[1]))["state"] == "failed" and led.get(str(files[0]))["state"] == "done":
                break
        good, bad = led.get(str(files[0])), led.get(str(files[1]))
        assert (good["state"], good["tries"]) == ("done", 0)
        assert (bad["state"], bad["tries"]) == ("failed", 1) and "worker process died" in bad["error"]
        assert pool.crashes >= 1
    finally:
        pool.shutdown(0)
        led.close()


def env_process(path, cfg, outdir, force):
    """A stand-in for the per-file chain that reports the worker's ``VAMPD_TEST_ENV``."""
    return SimpleNamespace(products=[], summary={"env": os.environ.get("VAMPD_TEST_ENV")}, metrics={})


def test_pool_workers_get_the_environment_of_the_pool_start_and_the_server_is_reaped(tmp_path, monkeypatch):
    """Workers forked from a fork server started earlier still see the parent's environment as it
    is when the pool starts (as spawned ones would), and shutting the pool down stops the server."""
    from multiprocessing import forkserver

    from vampd.engine.pool import WorkerPool, prestart

    prestart("test_harden:env_process")  # the server's own environment is older
    monkeypatch.setenv("VAMPD_TEST_ENV", "set after the server started")
    pool = WorkerPool(workers=1, memory_limit=1 << 30, process="test_harden:env_process")
    pool.start()
    try:
        pool.submit(str(tmp_path / "x.fits"), 1, None, tmp_path)
        results, deadline = [], time.time() + 120
        while not results and time.time() < deadline:
            results = pool.collect(timeout=0.5)
        assert len(results) == 1 and results[0].ok, results
        assert results[0].summary == {"env": "set after the server started"}
    finally:
        pool.shutdown(0)
    assert getattr(forkserver._forkserver, "_forkserver_pid", None) is None  # stopped and reaped


def test_growing_file_settles_on_its_fits_structure(tmp_path):
    """Bytes appended after a whole FITS structure do not keep the file 'settling' forever."""
    raw = fits_with_endtime()
    p = tmp_path / "grow.fits"
    p.write_bytes(raw)
    tr = CompletenessTracker(settle_time=1.0, complete_timeout=10.0)
    tr.add(str(p), now=0.0)
    assert tr.check(now=0.0) == []
    for t in (0.5, 1.0, 1.5):  # appended at every look
        with open(p, "ab") as fh:
            fh.write(b"\0" * 100)
        out = tr.check(now=t)
    assert [(v.state, v.nbytes) for v in out] == [("complete", 2 * 16 * 16 * 4)]


def test_config_change_does_not_requeue_rejected_paths(tmp_path):
    from vampd.engine.ledger import Ledger

    led = Ledger(tmp_path / "out")
    led.record_failure(
        str(tmp_path / "fifo.fits"), "not a regular file (FIFO)", 1, permanent=True, kind="rejected", identity=(0, 1, 2)
    )
    assert led.requeue_config("new-hash") == 0
    assert led.get(str(tmp_path / "fifo.fits"))["state"] == "parked"
    led.close()


def test_non_utf8_name_one_message_from_observer_and_runner(tmp_path):
    """The watcher's classification and a batch run give the same words for a name that is not
    valid UTF-8 (the ledger keeps the escaped name)."""
    from vampd.cli import main
    from vampd.engine.ledger import Ledger
    from vampd.watch.observer import classify_path

    msg = "file name is not valid UTF-8: rename it"
    src = simulate(tmp_path / "sim", size=32)[0]
    odd = os.fsdecode(os.fsencode(tmp_path) + b"/caf\xe9.fits")
    shutil.copy(src, odd)
    assert classify_path(odd)[1] == msg
    cfg = write_config(tmp_path / "q.toml", preset="quicklook")
    assert main(["run", str(cfg), odd, "-o", str(tmp_path / "out")]) == 1
    with Ledger(tmp_path / "out", readonly=True) as led:
        (row,) = led.problem_files()
    assert row["path"].endswith("/caf\\xe9.fits") and row["error"] == f"{row['path']}: {msg}"
    assert (row["state"], row["error_kind"]) == ("parked", "rejected")

"""Ledger: identity, decisions, retries, crash safety (real SQLite files, real subprocesses)."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import subprocess
import sys
import textwrap
import time

import pytest

from vampd.engine.ledger import SCHEMA_VERSION, Ledger, content_hash, file_identity, pid_alive


def _write(path, data: bytes):
    path.write_bytes(data)
    return str(path)


def _product(tmp_path, name, data=b"p"):
    p = tmp_path / "out" / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    return str(p)


def test_content_hash_first_and_last_mib(tmp_path):
    mib = 1024 * 1024
    data = bytes(range(256)) * (3 * mib // 256) + b"tail"
    path = tmp_path / "big.bin"
    path.write_bytes(data)
    expected = hashlib.sha1(str(len(data)).encode() + data[:mib] + data[-mib:]).hexdigest()
    assert content_hash(path) == expected
    # a change in the middle (outside both MiB) is not seen; one in the last MiB is
    mid = bytearray(data)
    mid[len(data) // 2] ^= 1
    path.write_bytes(bytes(mid))
    assert content_hash(path) == expected
    mid[-2] ^= 1
    path.write_bytes(bytes(mid))
    assert content_hash(path) != expected


def test_schema_wal_and_readonly(tmp_path):
    with Ledger(tmp_path) as led:
        assert led.schema_version == SCHEMA_VERSION
        assert led.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert led.path == tmp_path.resolve() / "vampd.sqlite"
    ro = Ledger(tmp_path, readonly=True)
    with pytest.raises(sqlite3.OperationalError):
        ro.conn.execute("INSERT INTO events (time, level, message) VALUES (1, 'x', 'y')")
    ro.close()
    with pytest.raises(FileNotFoundError, match="no ledger"):
        Ledger(tmp_path / "nothing", readonly=True)


def test_register_decisions(tmp_path):
    f = _write(tmp_path / "a.fits", b"x" * 5000)
    led = Ledger(tmp_path / "out")
    assert led.register(f, "h1") == "new"
    assert led.get(f)["state"] == "pending"
    assert led.register(f, "h1") == "pending"  # still to do
    prod = _product(tmp_path, "a_coll.fits")
    led.mark_running(f)
    lat = led.record_done(f, [("coadded", prod)], {"target": "AB Aur", "camera": 1, "hwp": 22.5}, {"nframes": 3})
    assert lat >= 0
    row = led.get(f)
    assert (row["state"], row["target"], row["camera"], row["hwp"]) == ("done", "AB Aur", 1, 22.5)
    assert led.register(f, "h1") == "done"  # nothing to do
    # touched, same content: still done, new mtime recorded
    os.utime(f, ns=(1_000_000_000, 2_000_000_000))
    assert led.register(f, "h1") == "done"
    assert led.get(f)["mtime_ns"] == 2_000_000_000
    # config hash changed
    assert led.register(f, "h2") == "config"
    assert led.get(f)["config_hash"] == "h1"  # until the redo is recorded (tells the runner to force)
    led.record_done(f, [("coadded", prod)], config_hash="h2")
    assert led.register(f, "h2") == "done"
    # content changed
    _write(tmp_path / "a.fits", b"y" * 5000)
    assert led.register(f, "h2") == "changed"
    led.record_done(f, [("coadded", prod)])
    # product deleted: not done any more
    os.unlink(prod)
    assert led.register(f, "h2") == "missing-product"
    assert led.get(f)["nprocessed"] == 3
    assert led.counts()["pending"] == 1


def test_record_done_requires_products(tmp_path):
    f = _write(tmp_path / "a.fits", b"x")
    led = Ledger(tmp_path / "out")
    led.register(f, "h")
    with pytest.raises(FileNotFoundError):
        led.record_done(f, [("coadded", str(tmp_path / "out" / "missing.fits"))])
    assert led.get(f)["state"] == "pending"
    assert led.products(f) == []


def test_retries_then_parked(tmp_path):
    f = _write(tmp_path / "a.fits", b"x")
    g = _write(tmp_path / "b.fits", b"y")
    led = Ledger(tmp_path / "out")
    led.register(f, "h")
    led.register(g, "h")
    t0 = time.time()
    assert led.record_failure(f, "boom 1", max_tries=3) == "failed"
    # backoff: a repeated offer does not retry at once; retry_due does when the wait is over
    assert led.register(f, "h") == "failed"
    assert t0 + 4.5 <= led.next_retry() <= time.time() + 5.5
    assert led.retry_due(t0 + 1) == 0
    assert led.retry_due(time.time() + 6) == 1 and led.get(f)["state"] == "pending"
    assert led.record_failure(f, "boom 2", max_tries=3) == "failed"
    assert led.next_retry() >= time.time() + 19  # 5 s · 4
    assert led.record_failure(f, "boom 3", max_tries=3) == "parked"
    row = led.get(f)
    assert (row["state"], row["tries"], row["error"]) == ("parked", 3, "boom 3")
    assert led.register(f, "h") == "parked"
    # a bad input is parked at once
    assert led.record_failure(g, "b.fits: header has no NAXIS3", max_tries=3, permanent=True) == "parked"
    assert [e["message"] for e in led.events()][-1] == "b.fits: header has no NAXIS3"
    # a new version of the file starts over
    _write(tmp_path / "b.fits", b"zz")
    assert led.register(g, "h") == "changed"
    assert led.get(g)["tries"] == 0 and led.get(g)["error"] is None
    # vampd retry: parked → pending, tries reset; a success resets the count too
    assert led.retry_parked() == 1
    assert (led.get(f)["state"], led.get(f)["tries"]) == ("pending", 0)
    assert led.record_failure(f, "boom 4", max_tries=3) == "failed"
    led.record_done(f, [])
    assert led.get(f)["tries"] == 0


def test_rejected_identity_and_odd_names(tmp_path):
    led = Ledger(tmp_path / "out")
    bad = os.fsdecode(os.fsencode(str(tmp_path)) + b"/caf\xe9.fits")
    key = led.record_failure(bad, "not UTF-8", 1, permanent=True, kind="rejected", identity=(10, 20, 30))
    assert key == "parked"
    row = led.get(bad)  # the key escapes the invalid byte; lookups by the raw name find it
    assert row["path"].endswith("caf\\xe9.fits") and (row["size"], row["mtime_ns"], row["ino"]) == (10, 20, 30)
    assert led.known_stats()[row["path"]] == (10, 20, "parked", 30)


def test_reset_interrupted_and_requeue_config(tmp_path):
    led = Ledger(tmp_path / "out")
    paths = [_write(tmp_path / f"{i}.fits", bytes([i])) for i in range(4)]
    for p in paths:
        led.register(p, "h")
    led.mark_running(paths[0])
    led.conn.execute("UPDATE files SET state='queued' WHERE path=?", (paths[1],))
    prod = _product(tmp_path, "p2")
    led.record_done(paths[2], [("metrics", prod)])
    assert led.reset_interrupted() == 2
    assert led.counts()["pending"] == 3 and led.counts()["done"] == 1
    assert [r["path"] for r in led.next_pending(10, exclude=[paths[3]])] == paths[:2]
    assert led.requeue_config("h") == 0
    assert led.requeue_config("other") == 1
    assert led.get(paths[2])["state"] == "pending"


def test_killed_writer_leaves_no_partial_commit(tmp_path):
    """A process SIGKILLed inside a transaction leaves the ledger as it was before it."""
    f = _write(tmp_path / "a.fits", b"x")
    out = tmp_path / "out"
    led = Ledger(out)
    led.register(f, "h")
    led.close()
    code = textwrap.dedent(
        f"""
        import os, signal
        from vampd.engine.ledger import Ledger
        led = Ledger({str(out)!r})
        led.conn.execute("BEGIN IMMEDIATE")
        led.conn.execute("UPDATE files SET state='done' WHERE path=?", ({f!r},))
        led.conn.execute("INSERT INTO products VALUES (?, 'coadded', '/nowhere', 0, 0, 0)", ({f!r},))
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], timeout=60)
    assert proc.returncode == -9
    led = Ledger(out)
    assert led.get(f)["state"] == "pending"
    assert led.products(f) == []


def test_daemon_row_and_pid_alive(tmp_path):
    led = Ledger(tmp_path)
    led.daemon_start(os.getpid(), "cfg.toml", "abc")
    led.heartbeat()
    info = led.daemon_info()
    assert info["pid"] == os.getpid() and info["status"] == "running" and info["stopped"] is None
    led.daemon_stop()
    assert led.daemon_info()["status"] == "stopped"
    assert pid_alive(os.getpid())
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    assert not pid_alive(proc.pid)
    assert not pid_alive(None)


def test_sets_counts(tmp_path):
    led = Ledger(tmp_path)
    led.upsert_set("cam1-001", "triplediff", "open", ["a", "b"])
    led.upsert_set("cam1-001", "triplediff", "complete", ["a", "b", "c", "d"])
    led.upsert_set("cam1-002", "triplediff", "broken", ["e"], reason="timeout")
    assert led.set_counts() == {"open": 0, "complete": 1, "broken": 1}


def test_identity_fields(tmp_path):
    f = _write(tmp_path / "a.fits", b"abc")
    ident = file_identity(f)
    assert ident.size == 3 and ident.mtime_ns == os.stat(f).st_mtime_ns
    assert ident.chash == hashlib.sha1(b"3" + b"abc").hexdigest()


def test_pool_memory_admission():
    """At most `workers` jobs; the sum of running estimates stays under the limit, but a
    single job larger than the limit still runs alone."""
    from concurrent.futures import Future

    from vampd.engine.pool import WorkerPool, _Job, estimate_bytes

    assert estimate_bytes(256, 256, 50, 6.0) == 256 * 256 * 50 * 4 * 6
    pool = WorkerPool(workers=3, memory_limit=100)
    assert pool.admissible(1000)  # alone, even if too big
    pool.jobs["a"] = _Job("a", 80, Future(), 0.0)
    assert not pool.admissible(30) and pool.admissible(20)
    pool.jobs["b"] = _Job("b", 10, Future(), 0.0)
    assert pool.running_bytes == 90 and pool.admissible(10) and not pool.admissible(11)
    pool.jobs["c"] = _Job("c", 0, Future(), 0.0)
    assert not pool.admissible(0)  # all workers busy


def test_bytes_appended_after_the_fits_structure_are_not_content(tmp_path):
    import io

    import numpy as np
    from astropy.io import fits

    buf = io.BytesIO()
    fits.PrimaryHDU(np.ones((2, 8, 8), np.float32)).writeto(buf)
    f = tmp_path / "a.fits"
    f.write_bytes(buf.getvalue())
    before = file_identity(f)
    with open(f, "ab") as fh:
        fh.write(b"\0" * 100)
    after = file_identity(f)
    assert after.chash == before.chash and after.size == before.size + 100
    with open(f, "r+b") as fh:  # a changed data byte is new content
        fh.seek(2880 + 5)
        fh.write(b"\x7f")
    assert file_identity(f).chash != before.chash


def _pdi_ledger(tmp_path, rng):
    """A ledger of 120 done and parked files at random MJDs (a few without one), some taken."""
    led = Ledger(tmp_path / "out")
    prod = _write(tmp_path / "p.fits", b"p")
    paths = []
    for i in range(120):
        f = _write(tmp_path / f"f{i:03d}.fits", bytes([i]))
        led.register(f, "h")
        mjd = None if i % 29 == 0 else 60000.0 + float(rng.uniform(0, 0.05))
        if i % 7 == 3:
            led.record_failure(f, "bad", max_tries=1, permanent=True)
            with led.transaction():
                led.conn.execute("UPDATE files SET mjd=? WHERE path=?", (mjd, f))
        else:
            led.record_done(f, [("coadded", prod)], {"mjd": mjd})
        paths.append(f)
    return led, paths


def _windowed_by_definition(rows: list[dict], window: float) -> list[dict]:
    """``pdi_files(window)`` by its definition: free rows, and taken rows no older than the
    oldest free done file minus ``window`` (none when there is no free done file with an MJD)."""
    free_done = [r["mjd"] for r in rows if r["state"] == "done" and r["taken"] is None and r["mjd"] is not None]
    lo = min(free_done) - window if free_done else None
    return [r for r in rows if r["taken"] is None or (lo is not None and r["mjd"] is not None and r["mjd"] >= lo)]


def test_pdi_files_window_equals_its_definition(tmp_path):
    """The indexed window query (issue 18: per-file cost independent of the night's length)
    returns exactly the rows the definition selects, in the same order, as files are taken."""
    import numpy as np

    rng = np.random.default_rng(3)
    led, paths = _pdi_ledger(tmp_path, rng)
    order = sorted(paths, key=lambda p: (led.get(p)["mjd"] is None, led.get(p)["mjd"] or 0))
    for step in range(0, 121, 20):  # take the oldest files, 20 at a time, as sets complete
        if step:
            led.take(f"set{step}", order[step - 20 : step])
        full = led.pdi_files()
        for window in (0.0, 0.005, 0.02):
            assert led.pdi_files(window) == _windowed_by_definition(full, window), (step, window)
    plan = led.conn.execute(
        "EXPLAIN QUERY PLAN SELECT MIN(mjd) FROM files INDEXED BY files_free WHERE state = 'done' AND taken IS NULL"
    ).fetchall()
    assert "files_free" in str([tuple(r) for r in plan])


def test_ledger_from_before_the_taken_column_is_migrated(tmp_path):
    """A ledger written before ``files.taken`` existed: opening it marks what ``pdi_taken``
    holds, so the window still leaves out exactly the taken files."""
    import numpy as np

    led, paths = _pdi_ledger(tmp_path, np.random.default_rng(4))
    led.take("old", paths[:50])
    expected = led.pdi_files(0.001)
    with led.transaction():  # back to the old schema: no column, no triggers, no partial index
        for name in ("pdi_taken_mark", "pdi_taken_unmark"):
            led.conn.execute(f"DROP TRIGGER {name}")
        led.conn.execute("DROP INDEX files_free")
        led.conn.execute("ALTER TABLE files DROP COLUMN taken")
    led.close()
    again = Ledger(tmp_path / "out")
    assert again.conn.execute("SELECT COUNT(*) FROM files WHERE taken = 1").fetchone()[0] == 50
    assert again.pdi_files(0.001) == expected

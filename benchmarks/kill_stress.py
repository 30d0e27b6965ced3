"""Kill stress: stream a simulated night into a watched directory, SIGKILL the daemon at
random moments while jobs are running (default 20 times, spread over the night), restart it
each time, SIGTERM it once while jobs run (exit 0 within the stop timeout), and check
exactly-once at the end.

    python benchmarks/kill_stress.py [--files 64] [--kills 20] [--workdir DIR] [--seed 1]

Exit status 0 when every file is done exactly once (ledger counts, one product of each kind
per input, products recorded before a kill keep their mtime) and `vampd status --json` agrees.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path


def sh(*args, **kw):
    return subprocess.run([sys.executable, "-m", "vampd", *args], capture_output=True, text=True, **kw)


def status(out: Path) -> dict:
    p = sh("status", str(out), "--json")
    return json.loads(p.stdout) if p.returncode == 0 else {"files": {"done": 0, "failed": 0}}


def rows(out: Path, sql: str) -> list[dict]:
    con = sqlite3.connect(f"file:{out / 'vampd.sqlite'}?mode=ro", uri=True)
    con.row_factory = sqlite3.Row
    r = [dict(x) for x in con.execute(sql)]
    con.close()
    return r


def rows_kv(out: Path, sql: str, args: tuple = ()) -> list[tuple]:
    con = sqlite3.connect(f"file:{out / 'vampd.sqlite'}?mode=ro", uri=True, timeout=5)
    r = con.execute(sql, args).fetchall()
    con.close()
    return r


STOP_TIMEOUT = 20.0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=64, help="raw files (multiple of 16)")
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--cadence", type=float, default=None, help="seconds between files (default 1)")
    # jobs of ~0.1 s: with tiny cubes the daemon is idle between files and a kill rarely finds a job
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--nframes", type=int, default=100)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args(argv)

    from _watchnight import watch_night

    from vampd.simulate.night import SimConfig
    from vampd.simulate.stream import stream_night

    work, out, cfgp = watch_night(
        "kill",
        args.workdir,
        settle_time=0.1,
        complete_timeout=10.0,
        reconcile_interval=5.0,
        expect_sidecar=True,
        workers=2,
        stop_timeout=STOP_TIMEOUT,
    )
    log = open(work / "daemon.log", "ab")

    def start():
        return subprocess.Popen(
            [sys.executable, "-m", "vampd", "watch", str(cfgp), "-i", str(work / "raw"), "-o", str(out)],
            stdout=log,
            stderr=log,
        )

    sim = SimConfig(
        size=args.size,
        nframes=args.nframes,
        ncycles=max(1, args.files // 16),
        n_hot=0,
        n_dead=0,
        calib=False,
        seed=args.seed,
    )
    n = 16 * sim.ncycles
    cadence = args.cadence if args.cadence is not None else 1.0
    rng = random.Random(args.seed)
    # the i-th kill once more than marks[i] files are done (kills spread over the night), at a
    # moment when a job started by the current incarnation of the daemon is running
    marks = sorted(rng.sample(range(1, max(args.kills + 2, n - 8)), args.kills))
    t0 = time.time()
    proc = start()
    stream = threading.Thread(target=stream_night, args=(work, sim), kwargs={"cadence": cadence}, daemon=True)
    stream.start()
    recorded: dict[str, int] = {}
    kills = busy_kills = 0
    problems = []

    def states() -> dict:
        try:
            c = dict(rows_kv(out, "SELECT state, COUNT(*) FROM files GROUP BY state"))
        except sqlite3.Error:
            c = {}
        return {k: c.get(k, 0) for k in ("pending", "queued", "running", "done", "failed", "parked")}

    def busy_after(done_before: int, since: float, timeout: float = 120.0) -> dict | None:
        """Wait until more than ``done_before`` files are done and a job started at or after
        ``since`` (by this incarnation of the daemon) is running."""
        t_end = time.time() + timeout
        while time.time() < t_end:
            c = states()
            if c["running"] > 0 and c["done"] > done_before:
                try:
                    fresh = rows_kv(
                        out, "SELECT COUNT(*) FROM files WHERE state='running' AND t_started >= ?", (since,)
                    )
                except sqlite3.Error:
                    fresh = [(0,)]
                if fresh[0][0]:
                    return c
            time.sleep(0.02)
        return None

    def snapshot() -> None:
        if (out / "vampd.sqlite").exists():
            for p in rows(out, "SELECT path, mtime_ns FROM products"):
                recorded.setdefault(p["path"], p["mtime_ns"])

    t_start = time.time()  # when the current incarnation was started
    while kills < args.kills:
        before = marks[kills]
        if busy_after(before, t_start) is None:
            problems.append(f"kill {kills + 1}: no running job after {before} done within 120 s")
            break
        time.sleep(rng.uniform(0.0, 0.1))
        c = states()
        if c["running"] == 0:
            continue  # that job ended: a random moment of the next one
        snapshot()
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        busy_kills += 1
        print(f"kill {kills}: {c['done']}/{n} done, {c['running']} running ({time.time() - t0:.0f} s)", flush=True)
        t_start = time.time()
        proc = start()
    # one SIGTERM while jobs run: a clean drain, exit 0 within the stop timeout
    c = busy_after(states()["done"], t_start)
    snapshot()
    t_term = time.time()
    proc.send_signal(signal.SIGTERM)
    rc_term = proc.wait(120)
    t_stop = time.time() - t_term
    print(
        f"SIGTERM with {c['running'] if c else 0} running: exit {rc_term} in {t_stop:.2f} s "
        f"(stop timeout {STOP_TIMEOUT:g} s)",
        flush=True,
    )
    if rc_term != 0 or t_stop >= STOP_TIMEOUT:
        problems.append(f"SIGTERM during processing: exit {rc_term} after {t_stop:.1f} s")
    proc = start()
    stream.join()
    t_end = time.time() + 300
    while states()["done"] < n and time.time() < t_end:
        time.sleep(0.5)
    # a SIGTERM before the interpreter has even started vampd kills it by default: stop the
    # daemon once it has recorded its start (its handlers are in place by then)
    while time.time() < t_end and rows_kv(out, "SELECT pid FROM daemon") != [(proc.pid,)]:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(60)

    files = rows(out, "SELECT path, state, nprocessed FROM files")
    prods = rows(out, "SELECT file, kind, path, mtime_ns FROM products")
    if rc != 0:
        problems.append(f"SIGTERM exit status {rc}")
    if len(files) != n or any(f["state"] != "done" or f["nprocessed"] != 1 for f in files):
        problems.append(
            f"ledger: {len(files)} files, states {sorted({f['state'] for f in files})}, "
            f"nprocessed {sorted({f['nprocessed'] for f in files})}"
        )
    for kind in {p["kind"] for p in prods}:
        if sorted(p["file"] for p in prods if p["kind"] == kind) != sorted(f["path"] for f in files):
            problems.append(f"products of kind {kind} are not one per input")
    rewritten = [p for p, m in recorded.items() if os.stat(p).st_mtime_ns != m]
    if rewritten:
        problems.append(f"{len(rewritten)} recorded products were rewritten")
    st = status(out)
    if (st["files"]["total"], st["files"]["done"], st["files"]["failed"], st["files"]["pending"]) != (n, n, 0, 0):
        problems.append(f"status disagrees: {st['files']}")
    print(
        f"{kills} SIGKILLs ({busy_kills} with jobs running) + 1 SIGTERM (stop {t_stop:.2f} s), {n} files, {len(recorded)} products checked for rewrite, {time.time() - t0:.0f} s; "
        f"work dir {work}"
    )
    for p in problems:
        print("FAIL:", p)
    print("OK" if not problems else "FAILED")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())

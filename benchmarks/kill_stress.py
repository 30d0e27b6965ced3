"""Kill stress: stream a simulated night into a watched directory, SIGKILL the daemon at
random moments (default 20 times), restart it each time, and check exactly-once at the end.

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
import tempfile
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=64, help="raw files (multiple of 16)")
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--cadence", type=float, default=None,
                    help="seconds between files (default: spread the stream over the kills, ~8 s per kill)")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--nframes", type=int, default=20)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args(argv)

    from vampd.config import load_config, save_config
    from vampd.simulate.night import SimConfig
    from vampd.simulate.stream import stream_night

    os.environ["OPENBLAS_NUM_THREADS"] = "1"
    work = Path(args.workdir or tempfile.mkdtemp(prefix="vampd-kill-"))
    (work / "raw").mkdir(parents=True, exist_ok=True)
    out = work / "out"
    cfgp = work / "night.toml"
    sh("new", str(cfgp), "-f", check=True)
    cfg = load_config(cfgp)
    for k, v in dict(settle_time=0.1, complete_timeout=10.0, reconcile_interval=5.0, expect_sidecar=True,
                     workers=2, stop_timeout=20.0).items():
        setattr(cfg.watch, k, v)
    save_config(cfg, cfgp)
    log = open(work / "daemon.log", "ab")

    def start():
        return subprocess.Popen([sys.executable, "-m", "vampd", "watch", str(cfgp), "-i", str(work / "raw"),
                                 "-o", str(out)], stdout=log, stderr=log)

    sim = SimConfig(size=args.size, nframes=args.nframes, ncycles=max(1, args.files // 16), n_hot=0, n_dead=0,
                    calib=False, seed=args.seed)
    n = 16 * sim.ncycles
    cadence = args.cadence if args.cadence is not None else max(0.2, 8.0 * args.kills / n)
    rng = random.Random(args.seed)
    t0 = time.time()
    proc = start()
    stream = threading.Thread(target=stream_night, args=(work, sim), kwargs={"cadence": cadence}, daemon=True)
    stream.start()
    recorded: dict[str, int] = {}
    kills = busy_kills = 0
    while kills < args.kills or stream.is_alive():
        before = status(out)["files"]["done"]
        t_wait = time.time()
        while before < n and status(out)["files"]["done"] <= before and time.time() - t_wait < 60:
            time.sleep(0.1)
        time.sleep(rng.uniform(0.0, 0.5))
        if (out / "vampd.sqlite").exists():
            for p in rows(out, "SELECT path, mtime_ns FROM products"):
                recorded.setdefault(p["path"], p["mtime_ns"])
        st = status(out)["files"]
        busy = st.get("running", 0) > 0
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        busy_kills += busy
        print(f"kill {kills}: {st['done']}/{n} done{' (jobs running)' if busy else ''}", flush=True)
        proc = start()
    stream.join()
    t_end = time.time() + 300
    while status(out)["files"]["done"] < n and time.time() < t_end:
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(60)

    files = rows(out, "SELECT path, state, nprocessed FROM files")
    prods = rows(out, "SELECT file, kind, path, mtime_ns FROM products")
    problems = []
    if rc != 0:
        problems.append(f"SIGTERM exit status {rc}")
    if len(files) != n or any(f["state"] != "done" or f["nprocessed"] != 1 for f in files):
        problems.append(f"ledger: {len(files)} files, states {sorted({f['state'] for f in files})}, "
                        f"nprocessed {sorted({f['nprocessed'] for f in files})}")
    for kind in {p["kind"] for p in prods}:
        if sorted(p["file"] for p in prods if p["kind"] == kind) != sorted(f["path"] for f in files):
            problems.append(f"products of kind {kind} are not one per input")
    rewritten = [p for p, m in recorded.items() if os.stat(p).st_mtime_ns != m]
    if rewritten:
        problems.append(f"{len(rewritten)} recorded products were rewritten")
    st = status(out)
    if (st["files"]["total"], st["files"]["done"], st["files"]["failed"], st["files"]["pending"]) != (n, n, 0, 0):
        problems.append(f"status disagrees: {st['files']}")
    print(f"{kills} kills ({busy_kills} with jobs running), {n} files, {len(recorded)} products checked for rewrite, {time.time() - t0:.0f} s; "
          f"work dir {work}")
    for p in problems:
        print("FAIL:", p)
    print("OK" if not problems else "FAILED")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())

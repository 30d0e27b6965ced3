"""Latency: time from a raw file being complete to its products being recorded in the ledger.

    python benchmarks/latency.py [--files 16] [--size 256] [--nframes 50] [--workers 2] [--cadence 2]

A simulated night streams into a watched directory (logger pattern: tmp, rename, sidecar);
the daemon runs with the given workers. Two latencies are reported per file, median and p95:

* ``ledger``: from the moment the watcher judged the file complete (structure + sidecar +
  settle time) to the commit of its products (the ledger's ``latency`` column);
* ``end-to-end``: from the sidecar's mtime (the logger's last write) to the commit, which
  adds the settle time and the watcher's detection delay.

The first file of each worker pays the worker start-up (imports, PSF model) and is reported
separately. Target: median <= 1 s for a 50-frame 256x256 cube on 2 workers.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def pct(values, q):
    v = sorted(values)
    return v[min(len(v) - 1, int(round(q * (len(v) - 1))))] if v else float("nan")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=16, help="raw files (multiple of 16)")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--nframes", type=int, default=50)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--cadence", type=float, default=2.0)
    ap.add_argument("--settle", type=float, default=0.2)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    from vampd.config import load_config, save_config
    from vampd.simulate.night import SimConfig
    from vampd.simulate.stream import stream_night

    os.environ["OPENBLAS_NUM_THREADS"] = "1"
    work = Path(args.workdir or tempfile.mkdtemp(prefix="vampd-latency-"))
    (work / "raw").mkdir(parents=True, exist_ok=True)
    out = work / "out"
    cfgp = work / "night.toml"
    subprocess.run([sys.executable, "-m", "vampd", "new", str(cfgp), "-f"], check=True, capture_output=True)
    cfg = load_config(cfgp)
    for k, v in dict(settle_time=args.settle, expect_sidecar=True, workers=args.workers).items():
        setattr(cfg.watch, k, v)
    save_config(cfg, cfgp)
    log = open(work / "daemon.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "vampd", "watch", str(cfgp), "-i", str(work / "raw"), "-o",
                             str(out)], stdout=log, stderr=log)
    try:
        sim = SimConfig(size=args.size, nframes=args.nframes, ncycles=max(1, args.files // 16), calib=False)
        stream_night(work, sim, cadence=args.cadence)
        n = 16 * sim.ncycles
        t_end = time.time() + 600
        while time.time() < t_end:
            try:
                con = sqlite3.connect(f"file:{out / 'vampd.sqlite'}?mode=ro", uri=True)
                done = con.execute("SELECT COUNT(*) FROM files WHERE state IN ('done','parked')").fetchone()[0]
                con.close()
            except sqlite3.Error:
                done = 0
            if done >= n:
                break
            time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)
    con = sqlite3.connect(f"file:{out / 'vampd.sqlite'}?mode=ro", uri=True)
    rows = con.execute("SELECT path, latency, t_done, t_started FROM files WHERE state='done' ORDER BY t_done").fetchall()
    con.close()
    warm = rows[args.workers:]  # the first file per worker includes the worker start-up
    ledger_lat = [r[1] for r in warm]
    e2e = [r[2] - os.stat(Path(r[0]).with_suffix(".txt")).st_mtime for r in warm]
    cold = [r[2] - os.stat(Path(r[0]).with_suffix(".txt")).st_mtime for r in rows[: args.workers]]
    res = {
        "files": len(rows), "size": args.size, "nframes": args.nframes, "workers": args.workers,
        "ledger_median_s": pct(ledger_lat, 0.5), "ledger_p95_s": pct(ledger_lat, 0.95),
        "e2e_median_s": pct(e2e, 0.5), "e2e_p95_s": pct(e2e, 0.95), "cold_start_s": cold,
        "settle_s": args.settle,
    }
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        print(f"{res['files']} files of {args.nframes}x{args.size}^2 on {args.workers} workers "
              f"(first {args.workers} excluded: cold start {', '.join(f'{c:.1f}' for c in cold)} s)")
        print(f"complete -> recorded: median {res['ledger_median_s']:.2f} s, p95 {res['ledger_p95_s']:.2f} s")
        print(f"logger done -> recorded (incl. settle {args.settle} s): median {res['e2e_median_s']:.2f} s, "
              f"p95 {res['e2e_p95_s']:.2f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

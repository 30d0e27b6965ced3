"""Whole-command benchmark: wall and CPU time of `vampd run` on 4, 16 and 64 files, and `vampd --help`.

    OPENBLAS_NUM_THREADS=1 python benchmarks/commands.py               # 64 files of 50 x 256², 2 workers
    OPENBLAS_NUM_THREADS=1 python benchmarks/commands.py --keep /tmp/bc   # keep the night, then
    OPENBLAS_NUM_THREADS=1 python benchmarks/commands.py --reuse /tmp/bc --repeat 3

A night of 64 raw cubes (50 × 256², 4 HWP cycles) and its masters are simulated once; then each
``vampd run`` (the reference-format config ``configs/benchmark.toml`` without PDI, ``-j 2``) is a
fresh subprocess writing into a fresh output directory, exactly as a user runs it. For each count
the best of ``--repeat`` runs is kept. A straight-line fit of wall time against the number of
files gives the fixed cost (intercept: interpreter start, imports, worker spawn, ledger) and the
marginal cost per file.

CPU seconds (user + sys of the command and all its workers, from ``RUSAGE_CHILDREN``) are printed
beside the wall time: on a loaded machine the wall time is unreliable, CPU time is not.
``CPU/2`` is the wall time on two idle cores if the command's work split evenly over both (a lower
bound: the main process's start-up is serial).
Peak memory is the largest resident set of any one process of the command (``ru_maxrss``).

The on-disk PSF cache (``VAMPD_CACHE_DIR``) lives in the work dir; the first ``vampd run`` fills
it (reported as the cold run), the timed runs find it.

Targets (issue 15): 64 files ≤ 2.9 s; fixed cost ≤ 0.8 s; peak ≤ 235 MB per process;
``vampd --help`` ≤ 0.3 s.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COUNTS = (4, 16, 64)
REFERENCE_64 = 28.9  # s, vampires_dpp on the same 64-file night (issue 15)


def _env(work: Path) -> dict:
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", VAMPD_CACHE_DIR=str(work / "cache"))
    env.pop("VAMPD_PROCESS", None)
    return env


def _timed(cmd: list[str], env: dict) -> tuple[float, float, float]:
    """(wall s, CPU s of the process tree, peak RSS MB of its largest process)."""
    # a small wrapper process per command: its RUSAGE_CHILDREN covers exactly this command's tree
    wrap = [sys.executable, "-c", _WRAPPER, *cmd]
    proc = subprocess.run(wrap, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}")
    wall, cpu, rss = proc.stdout.strip().splitlines()[-1].split()[1:]
    return float(wall), float(cpu), float(rss) / 1024.0


_WRAPPER = """
import resource, subprocess, sys, time
t = time.perf_counter()
rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=sys.stdout).returncode
wall = time.perf_counter() - t
r = resource.getrusage(resource.RUSAGE_CHILDREN)
if rc:
    sys.exit(rc)
print("TIMED", wall, r.ru_utime + r.ru_stime, r.ru_maxrss)
"""


def _night(work: Path, nfiles: int, size: int, nframes: int) -> tuple[list[str], Path]:
    from vampd.config import load_config, save_config
    from vampd.simulate.night import SimConfig, simulate_night
    from vampd.stages.calibfiles import build_masters

    if not (work / "night").is_dir():
        simulate_night(work / "night", SimConfig(size=size, nframes=nframes, ncycles=max(1, -(-nfiles // 16)), seed=1))
        build_masters(sorted(glob.glob(str(work / "night" / "calib" / "*.fits"))), work / "masters")
    cfg = load_config(ROOT / "configs" / "benchmark.toml")
    cfg.calibrate.calib_directory = work / "masters"
    cfg.align.crop_width = size
    cfgp = work / "bench.toml"
    save_config(cfg, cfgp)
    return sorted(glob.glob(str(work / "night" / "raw" / "*.fits")))[:nfiles], cfgp


def _fit(xs, ys) -> tuple[float, float]:
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - b * mx, b


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--nframes", type=int, default=50)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeat", type=int, default=2, help="runs per file count (best kept)")
    p.add_argument("--keep", default=None, help="keep the work dir here")
    p.add_argument("--reuse", default=None, help="reuse a work dir made by --keep")
    args = p.parse_args(argv)

    work = Path(args.reuse or args.keep or tempfile.mkdtemp(prefix="vampd-cmd-"))
    work.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    files, cfgp = _night(work, max(COUNTS), args.size, args.nframes)
    print(
        f"vampd command benchmark: {args.nframes} x {args.size}^2 per cube, -j {args.workers} "
        f"(night ready in {time.perf_counter() - t:.1f} s; CPU {os.cpu_count()} cores)"
    )
    env = _env(work)
    vampd = [sys.executable, "-m", "vampd"]

    helps = [_timed([*vampd, "--help"], env) for _ in range(5)]
    hw = statistics.median(h[0] for h in helps)
    hc = statistics.median(h[1] for h in helps)
    print(
        f"  vampd --help: {hw:.3f} s wall, {hc:.3f} s CPU (median of 5; target <= 0.3 s) "
        f"{'PASS' if hw <= 0.3 else 'FAIL'}"
    )

    def run(n: int, tag: str):
        out = work / f"out-{tag}"
        shutil.rmtree(out, ignore_errors=True)
        return _timed([*vampd, "run", str(cfgp), *files[:n], "-o", str(out), "-j", str(args.workers)], env)

    shutil.rmtree(work / "cache", ignore_errors=True)
    cold = run(2, "cold")
    print(f"  cold PSF cache, 2 files: {cold[0]:.2f} s wall, {cold[1]:.2f} s CPU (fills the cache)")
    best = {}
    for n in COUNTS:
        runs = [run(n, f"{n}-{i}") for i in range(max(1, args.repeat))]
        best[n] = min(runs)
        w, c, m = best[n]
        print(
            f"  vampd run {n:3d} files: {w:6.2f} s wall, {c:6.2f} s CPU, peak {m:5.0f} MB/process "
            f"(all walls: {', '.join(f'{r[0]:.2f}' for r in runs)})"
        )
    ns = list(COUNTS)
    a, b = _fit(ns, [best[n][0] for n in ns])
    ac, bc = _fit(ns, [best[n][1] for n in ns])
    w64, c64, m64 = best[64]
    print(
        f"  wall fit: fixed {a:.2f} s + {1e3 * b:.0f} ms/file (target fixed <= 0.8 s) {'PASS' if a <= 0.8 else 'FAIL'}"
    )
    print(f"  CPU fit:  fixed {ac:.2f} s + {1e3 * bc:.0f} ms/file ({1e3 * bc / args.nframes:.2f} ms CPU/frame)")
    print(
        f"  64 files: {w64:.2f} s wall (target <= 2.9 s) {'PASS' if w64 <= 2.9 else 'FAIL'}; "
        f"CPU/2 = {c64 / 2:.2f} s; {REFERENCE_64 / w64:.1f}x the reference's {REFERENCE_64} s"
    )
    print(f"  peak memory {m64:.0f} MB per process (target <= 235 MB) {'PASS' if m64 <= 235 else 'FAIL'}")
    if not args.keep and not args.reuse:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Peak memory of reducing one production-size cube (prints figures; asserts nothing).

Simulates a single 536² × 2000-frame raw cube (1.15 GB on disk, 2.3 GB as float32 data + error)
and reduces it with ``process_file`` in a fresh process with small RAM budgets, so that the
chunked path (calibrate twice, disk-backed coadd store) is the one measured. Prints the cube
size and the process's peak resident memory.

    OPENBLAS_NUM_THREADS=1 python benchmarks/memory.py [--nframes 2000 --size 536]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, resource, sys, time, tracemalloc
from vampd.config.presets import preset_config
from vampd.engine.pipeline import process_file
cfg = preset_config("quicklook", "mem")
cfg.align.crop_width = int(sys.argv[3])
tracemalloc.start()  # numpy reports its buffers to tracemalloc: the heap, without mapped files
t = time.perf_counter()
r = process_file(sys.argv[1], cfg, sys.argv[2])
print(json.dumps({"seconds": time.perf_counter() - t, "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "heap_peak": tracemalloc.get_traced_memory()[1], "nframes": r.metrics["nframes"]}))
"""


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=536)
    p.add_argument("--nframes", type=int, default=2000)
    p.add_argument("--hold-mb", type=int, default=256, help="VAMPD_HOLD_BYTES for the run (MB)")
    args = p.parse_args(argv)

    from vampd.simulate.night import SimConfig, simulate_night

    work = Path(tempfile.mkdtemp(prefix="vampd-mem-"))
    try:
        t = time.perf_counter()
        simulate_night(work / "night", SimConfig(size=args.size, nframes=args.nframes, max_files=1, calib=False))
        raw = sorted((work / "night" / "raw").glob("*.fits"))[0]
        t_sim = time.perf_counter() - t
        env = dict(
            os.environ,
            OPENBLAS_NUM_THREADS="1",
            VAMPD_HOLD_BYTES=str(args.hold_mb << 20),
            VAMPD_COADD_RAM_BYTES=str(args.hold_mb << 20),
        )
        out = subprocess.run(
            [sys.executable, "-c", CHILD, str(raw), str(work / "out"), str(args.size)],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        res = json.loads(out.stdout.strip().splitlines()[-1])
        cube = raw.stat().st_size
        calibrated = args.size * args.size * args.nframes * 8
        print(f"vampd memory benchmark: one {args.size}^2 x {args.nframes}-frame cube (simulated in {t_sim:.0f} s)")
        print(f"  raw cube on disk {cube / 2**30:.2f} GiB; calibrated data+error would be {calibrated / 2**30:.2f} GiB")
        print(f"  reduced in {res['seconds']:.1f} s with RAM budgets of {args.hold_mb} MB")
        print(f"  peak heap (numpy buffers, tracemalloc): {res['heap_peak'] / 2**30:.2f} GiB")
        print(
            f"  peak resident set incl. memory-mapped file pages: {res['maxrss_kb'] / 2**20:.2f} GiB"
            " (the raw file and the coadd store are mapped; those pages are reclaimable cache)"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

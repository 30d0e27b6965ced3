"""PDI burst: the per-file trigger work (Mueller matrices, difference images, set rebuild and
processing) over a 1024-file PDI night, recorded in a ledger one by one.

The per-file chain itself does not depend on the night's length; the trigger work after each
file did (difference images re-read every finished product's header: quadratic). Reports the
mean trigger time of the first and the last 100 files (target: last within 20 % of first),
wall and process CPU time.

    OPENBLAS_NUM_THREADS=1 python benchmarks/pdi_burst.py [--files 1024] [--size 32] [--no-diff]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from pdi_latency import write_products  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

from vampd.config.presets import preset_config
from vampd.engine import pdi_trigger
from vampd.engine.ledger import Ledger


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=1024)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--no-diff", action="store_true", help="difference images off")
    args = ap.parse_args(argv)
    cfg = preset_config("pdi-triplediff")
    cfg.name = "bench"
    cfg.polarimetry.use_ideal_mm = True
    cfg.align.crop_width = args.size
    cfg.diff_images.make_diff = not args.no_diff
    cfg.diff_images.save_double = not args.no_diff
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        outdir = Path(tmp)
        led = Ledger(outdir)
        wall, cpu = [], []
        for cycle in range(args.files // 16):
            for path, summary in write_products(outdir, args.size, cycle, rng):
                led.register(path, "bench")
                led.record_done(str(path), [("coadded", str(path))], summary)
                t0, c0 = time.perf_counter(), time.process_time()
                pdi_trigger.on_file_done(led, cfg, outdir, str(path))
                wall.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)
        w, c = np.array(wall), np.array(cpu)
        first, last = c[:100].mean(), c[-100:].mean()
        print(
            f"pdi burst: {len(w)} files, diff images {'off' if args.no_diff else 'on'}, {args.size}² "
            f"(machine shared and loaded: CPU time is the figure)"
        )
        print(f"  trigger per file, first 100: {1e3 * w[:100].mean():.1f} ms wall, {1e3 * first:.1f} ms CPU")
        print(f"  trigger per file, last 100:  {1e3 * w[-100:].mean():.1f} ms wall, {1e3 * last:.1f} ms CPU")
        print("  per tenth (ms CPU): " + " ".join(f"{1e3 * x.mean():.1f}" for x in np.array_split(c, 10)))
        ok = last <= 1.2 * first
        print(
            f"{'PASS' if ok else 'FAIL'}: last/first = {last / first:.2f} (target <= 1.20); total {w.sum():.0f} s wall"
        )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())

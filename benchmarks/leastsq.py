"""Least-squares polarimetry cost (issue 13): per added cube and per solve, at 256² and 536².

Prints, per frame size, wall and CPU (process user+sys) milliseconds for

* ``contribution``: the per-cube terms from a derotated image and its variance (w, w·d);
* ``derotate``: derotation of one cube's image (cubic) and variance (linear), as the engine does;
* ``add``: adding a contribution to the normal equations (in place);
* ``persist``: writing the accumulator generation (atomic NPZ, fsync) — once per engine call;
* ``solve``: closed-form 3×3 solve + condition numbers for every pixel;
* ``products``: solve + IP correction + the 8 Stokes product planes (what a refresh computes).

Usage: ``OPENBLAS_NUM_THREADS=1 python benchmarks/leastsq.py [--sizes 256 536] [--repeat 10]``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from vampd.config.presets import preset_config
from vampd.fitsio import save_npz_atomic
from vampd.imaging import derotate
from vampd.instrument.mueller import instrument_mueller
from vampd.pdi.leastsq import LeastSqAccumulator, contribution, solve_normal, solve_products


def _timed(fn, repeat: int) -> tuple[float, float]:
    """Median wall and mean CPU ms per call."""
    walls = []
    c0 = time.process_time()
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        walls.append(time.perf_counter() - t)
    cpu = (time.process_time() - c0) / repeat
    return 1e3 * float(np.median(walls)), 1e3 * cpu


def bench(n: int, repeat: int, nfields: int = 1, weights: str = "equal") -> dict[str, tuple[float, float]]:
    rng = np.random.default_rng(0)
    img = (1000 + rng.normal(0, 10, (nfields, n, n))).astype(np.float32)
    var = np.full((nfields, n, n), 100.0, np.float32)
    rows = np.stack([instrument_mueller(-40, 55, 120, 22.5, 30, "A", 1, None, "cmos")[0, :3]] * nfields)
    acc = LeastSqAccumulator()
    cubes = []
    for k in range(16):  # a full cycle so that the solve is non-degenerate
        h = (0.0, 45.0, 22.5, 67.5)[k // 4]
        r = instrument_mueller(-40 + k, 55, 120, h, 30, "AB"[k % 2], 1 + (k // 2) % 2, None, "cmos")[0, :3]
        cubes.append(contribution(img, var, np.stack([r] * nfields), weights=weights))
        acc.add(cubes[-1])
    c = cubes[0]
    out = {
        "derotate": _timed(lambda: (derotate(img, 12.3, order=3), derotate(var, 12.3, order=1)), repeat),
        "contribution": _timed(lambda: contribution(img, var, rows, weights=weights), repeat),
        "add": _timed(lambda: acc.add(c), repeat),
    }
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as d:
        p = Path(d) / "acc.npz"
        out["persist"] = _timed(lambda: save_npz_atomic(p, compress=False, **acc.arrays()), max(3, repeat // 3))
        out["persist_MB"] = (p.stat().st_size / 1e6, 0.0)
    out["solve"] = _timed(lambda: solve_normal(acc.a, acc.b, acc.n, c=acc.c), repeat)
    pcfg = preset_config("pdi-triplediff").polarimetry
    pcfg.leastsq_weights = weights
    out["products"] = _timed(lambda: solve_products(acc, pcfg), max(3, repeat // 3))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 536])
    ap.add_argument("--fields", type=int, default=1, help="MBI fields per cube")
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--weights", choices=["equal", "ivar"], default="equal")
    a = ap.parse_args(argv)
    print(
        f"least squares, {a.fields} field(s), {a.weights} weights; wall = median ms per call, "
        "cpu = process user+sys ms per call"
    )
    for n in a.sizes:
        r = bench(n, a.repeat, a.fields, a.weights)
        per_cube = sum(r[k][0] for k in ("derotate", "contribution", "add"))
        per_cube_cpu = sum(r[k][1] for k in ("derotate", "contribution", "add"))
        print(f"\n{n}x{n}: accumulator generation {r['persist_MB'][0]:.1f} MB")
        for k in ("derotate", "contribution", "add", "persist", "solve", "products"):
            print(f"  {k:13s} wall {r[k][0]:8.2f} ms   cpu {r[k][1]:8.2f} ms")
        print(
            f"  per added cube (derotate + contribution + add): wall {per_cube:.1f} ms, cpu {per_cube_cpu:.1f} ms;"
            f" + persist {r['persist'][0]:.1f} ms per engine call"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

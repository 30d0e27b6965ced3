"""Cost of the PDI trigger's bookkeeping per file against the length of the night (issue 18 item 5).

Builds ledgers of N done files (16 per HWP cycle, one cube per slot; tiny stand-in products, no
FITS is read by the part measured) whose complete sets are already locked, then times
``pdi_trigger.update_sets`` after one more file of an open cycle. Prints wall and CPU time per call
for each N; flat numbers mean the per-file work does not grow with the night.

Usage: ``OPENBLAS_NUM_THREADS=1 python benchmarks/pdi_trigger.py [N ...]`` (default 256 1024 4096).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from vampd.config.presets import preset_config
from vampd.engine import pdi_trigger
from vampd.engine.ledger import Ledger
from vampd.pdi.running import RunningStokes, running_paths
from vampd.pdi.sets import all_slots, slot_label


def build(out: Path, n: int):
    led = Ledger(out)
    prod_dir = out / "coadded"
    prod_dir.mkdir(parents=True, exist_ok=True)
    slots = all_slots("triplediff")
    ncyc = n // 16
    acc = RunningStokes.load(running_paths(out, "b")["accumulator"])
    with led.transaction():
        for i in range(ncyc * 16):
            c, s = divmod(i, 16)
            h, flc, cam = slots[s]
            path = f"/raw/VMP{'AB'[cam - 1]}{10000 + i:08d}.fits"
            prod = prod_dir / f"b_{i}_coll.fits"
            prod.touch()
            led.conn.execute(
                "INSERT INTO files (path, size, mtime_ns, chash, state, target, filter, camera, flc, hwp, mjd,"
                " nframes, exptime, t_complete) VALUES (?,?,?,?, 'done', 'T', 'F', ?,?,?,?, 2, 0.02, ?)",
                (path, 1, i, "x", cam, flc, h, 60000 + c * 1e-3 + s * 1e-5, float(i)),
            )
            led.conn.execute("INSERT INTO products VALUES (?, 'coadded', ?, 0, 0, 0)", (path, str(prod)))
    # lock every complete cycle but the last, as the trigger would have
    for c in range(ncyc - 1):
        members = [
            {
                "slot": slot_label(slots[s]),
                "path": f"/raw/VMP{'AB'[slots[s][2] - 1]}{10000 + 16 * c + s:08d}.fits",
                "state": "done",
            }
            for s in range(16)
        ]
        key = f"triplediff:T:F:k{c}"
        led.upsert_set(key, "triplediff", "complete", members)
        acc.add(key, np.zeros((1, 4, 8, 8)), np.ones((1, 4, 8, 8)))
    acc.save()
    # the last cycle: remove one member so the set stays open (nothing to process)
    last = f"/raw/VMP{'AB'[slots[15][2] - 1]}{10000 + 16 * (ncyc - 1) + 15:08d}.fits"
    led.conn.execute("DELETE FROM files WHERE path=?", (last,))
    return led, acc


def main(sizes) -> None:
    cfg = preset_config("pdi-triplediff")
    cfg.name = "b"
    cfg.diff_images.make_diff = False
    print(f"{'N files':>8} {'wall ms/call':>13} {'cpu ms/call':>12}   (machine shared, loaded)")
    for n in sizes:
        with tempfile.TemporaryDirectory() as d:
            out = Path(d)
            led, acc = build(out, n)
            pdi_trigger.update_sets(led, cfg, out)  # warm
            reps = 5
            w0, c0 = time.perf_counter(), time.process_time()
            for _ in range(reps):
                pdi_trigger.update_sets(led, cfg, out)
            w, c = (time.perf_counter() - w0) / reps, (time.process_time() - c0) / reps
            print(f"{n:8d} {1e3 * w:13.1f} {1e3 * c:12.1f}")
            led.close()


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [256, 1024, 4096])

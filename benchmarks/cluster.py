"""``vampd reprocess`` on Dask: scheduler overhead, throughput with 1 and 2 workers, scaling model.

    OPENBLAS_NUM_THREADS=1 python benchmarks/cluster.py                    # 128², 20 frames, 32 files
    OPENBLAS_NUM_THREADS=1 python benchmarks/cluster.py --size 256 --nframes 50 --cycles 2

1. **Scheduler overhead**: tasks carrying the real payload (the config, a result dict of the
   size a file returns) through ``client.submit`` → worker → client, one at a time (round trip)
   and many in flight (tasks/s the client+scheduler sustain).
2. **Per-file cost and throughput**: one simulated PDI night (triple difference, sets and
   finalize on the client) reprocessed with a ``LocalCluster`` of 1 and then 2 workers; wall
   time, files/s, worker CPU per file (from the tasks), client CPU per file (ledger, triggers,
   PDI sets, Dask client and, in a local cluster, the scheduler), bytes read and written per file.
3. **Model**: throughput(W) = min(W / t_file, 1 / t_client, 1 / t_sched, BW / bytes_per_file);
   printed for 32 and 256 workers with the limiting term.

CPU times are reported beside wall times: on a shared machine the wall figures are noisy.
"""

from __future__ import annotations

import argparse
import os
import pickle
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")


def echo(cfg, payload):
    """A task that does nothing but carry the real payload both ways."""
    return payload


def _config(size: int, diff: bool = True, preset: str = "pdi-triplediff"):
    from vampd.config.presets import preset_config

    cfg = preset_config(preset, "bench")
    cfg.diff_images.make_diff = diff
    cfg.align.crop_width = min(256, size - 16)
    cfg.coadd.method = "median"
    if cfg.polarimetry is not None:
        cfg.polarimetry.use_ideal_mm = True
    cfg.cluster.dashboard_address = ":0"
    return cfg


def scheduler_overhead(client, cfg, result_bytes: int, n: int = 400) -> dict:
    """Round-trip latency of one task and sustained tasks/s with many in flight."""
    import distributed

    payload = {"products": [("coadded", "x" * 80)] * 2, "summary": {"pad": "x" * max(0, result_bytes - 300)}}
    client.submit(echo, cfg, payload, pure=False).result()  # warm
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(50):
        client.submit(echo, cfg, payload, pure=False).result()
    rtt = (time.perf_counter() - t0) / 50
    t0, c0 = time.perf_counter(), time.process_time()
    futs = [client.submit(echo, cfg, payload, pure=False, key=f"echo-{i}") for i in range(n)]
    distributed.wait(futs)
    for f in futs:
        f.result()
    wall = time.perf_counter() - t0
    cpu = time.process_time() - c0
    del futs
    return {
        "rtt_ms": 1e3 * rtt,
        "tasks_per_s": n / wall,
        "client_cpu_ms_per_task": 1e3 * cpu / n,
        "cfg_bytes": len(pickle.dumps(cfg)),
    }


class _Meter:
    """Client CPU spent inside a few engine methods (benchmark instrumentation only)."""

    def __init__(self):
        self.cpu: dict[str, float] = {}
        self._saved: list = []

    def wrap(self, owner, name: str, label: str) -> None:
        fn = getattr(owner, name)

        def timed(*a, **k):
            c = time.process_time()
            try:
                return fn(*a, **k)
            finally:
                self.cpu[label] = self.cpu.get(label, 0.0) + time.process_time() - c

        self._saved.append((owner, name, fn))
        setattr(owner, name, timed)

    def restore(self) -> None:
        for owner, name, fn in reversed(self._saved):
            setattr(owner, name, fn)
        self._saved.clear()


def run_night(raw: Path, out: Path, cfg, workers: int) -> dict:
    """Reprocess one night on a fresh LocalCluster of ``workers`` processes; figures per file.

    The workers are warmed first (imports), as ``vampd reprocess`` does; the client's CPU is
    split into the scheduling loop (intake, recording, PDI triggers, Dask client and the
    in-process scheduler) and the night's finalize.
    """
    import statistics

    from vampd.cluster.executor import ClusterPool, connect
    from vampd.cluster.reprocess import reprocess
    from vampd.cluster.tasks import probe
    from vampd.config import save_config
    from vampd.finalize.commands import finalize

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    cfg_path = out / "bench.toml"
    save_config(cfg, cfg_path)
    process = "vampd.engine.pipeline:process_file"
    client, cluster = connect(None, workers, 2 * 1024**3, ":0")
    try:
        shared = ClusterPool(client, process=process)
        shared.refresh(wait_for_workers=120)
        client.run(probe, process, [str(raw)], [str(out)])  # warm start
        over = scheduler_overhead(client, cfg, 3000) if workers == 1 else None
        from vampd.engine.ledger import Ledger
        from vampd.engine.runner import Runner

        meter = _Meter()
        meter.wrap(Runner, "offer", "intake (register, content hash)")
        meter.wrap(Ledger, "record_done", "record_done (one fsynced transaction)")
        meter.wrap(Runner, "triggers", "PDI/specphot triggers (mm, diff images, sets)")
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            nights = reprocess(cfg, str(cfg_path), [str(raw)], out, shared, finalize=False)
        finally:
            meter.restore()
        wall, ccpu = time.perf_counter() - t0, time.process_time() - c0
    finally:
        client.close()
        cluster.close()
    night = nights[0]
    t1, c1 = time.perf_counter(), time.process_time()
    finalize(cfg, str(cfg_path), out / night.label)
    fwall, fcpu = time.perf_counter() - t1, time.process_time() - c1
    nfiles = night.counts.get("done", 0)
    raw_bytes = sum(os.path.getsize(p) for p in night.paths)
    out_bytes = sum(p.stat().st_size for p in (out / night.label).rglob("*") if p.is_file())
    wcpu = night.pool.cpu
    return {
        "workers": workers,
        "files": nfiles,
        "wall_s": wall,
        "files_per_s": nfiles / wall,
        "worker_cpu_s_per_file": statistics.median(wcpu),
        "worker_cpu_mean": sum(wcpu) / len(wcpu),
        "task_wall_s_per_file": statistics.median(night.pool.elapsed),
        "client_cpu_s_per_file": ccpu / max(1, nfiles),
        "finalize_wall_s": fwall,
        "finalize_cpu_s": fcpu,
        "read_mb_per_file": raw_bytes / 1e6 / max(1, nfiles),
        "write_mb_per_file": out_bytes / 1e6 / max(1, nfiles),
        "overhead": over,
        "client_split": {k: v / max(1, nfiles) for k, v in meter.cpu.items()},
    }


def model(r: dict, over: dict, fs_gbps: float, workers: int) -> tuple[float, str]:
    """Predicted files/s at ``workers`` and the limiting term."""
    terms = {
        "workers (per-file CPU)": workers / r["worker_cpu_s_per_file"],
        # finalize taken as linear in the night's files (conservative)
        "client (ledger + PDI triggers + finalize)": 1.0
        / max(r["client_cpu_s_per_file"] + r["finalize_cpu_s"] / r["files"], 1e-9),
        "scheduler (tasks/s)": over["tasks_per_s"],
        f"filesystem ({fs_gbps:g} GB/s)": fs_gbps * 1e3 / (r["read_mb_per_file"] + r["write_mb_per_file"]),
    }
    name = min(terms, key=terms.get)
    return terms[name], name


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--nframes", type=int, default=20)
    ap.add_argument("--cycles", type=int, default=2, help="HWP cycles (16 files each)")
    ap.add_argument("--fs-gbps", type=float, default=1.0, help="shared filesystem bandwidth for the model (GB/s)")
    ap.add_argument("--preset", default="pdi-triplediff", help="processing preset (quicklook: no PDI on the client)")
    ap.add_argument("--no-diff", action="store_true", help="no diagnostic difference images (client-side work)")
    ap.add_argument("--keep", default=None, help="work directory to keep")
    args = ap.parse_args()
    from vampd.simulate.night import SimConfig, simulate_night

    work = Path(args.keep or tempfile.mkdtemp(prefix="vampd-cluster-bench-"))
    raw = work / "night" / "raw"
    if not raw.is_dir():
        sim = SimConfig(size=args.size, nframes=args.nframes, ncycles=args.cycles, calib=False)
        simulate_night(work / "night", sim)
    cfg = _config(args.size, diff=not args.no_diff, preset=args.preset)
    print(f"machine: {os.cpu_count()} cores (shared and loaded: wall figures are noisy; CPU figures are per unit)")
    print(
        f"night: {args.size}² px, {args.nframes} frames/file, {16 * args.cycles} files, preset {args.preset}, "
        f"difference images {'off' if args.no_diff else 'on'}"
    )
    runs = [run_night(raw, work / f"out{w}", cfg, w) for w in (1, 2)]
    over = runs[0]["overhead"]
    print(
        f"scheduler: round trip {over['rtt_ms']:.1f} ms/task, {over['tasks_per_s']:.0f} tasks/s with many in "
        f"flight, client CPU {over['client_cpu_ms_per_task']:.2f} ms/task (config {over['cfg_bytes']} B pickled)"
    )
    for r in runs:
        print(
            f"{r['workers']} worker(s): {r['files']} files in {r['wall_s']:.1f} s = {r['files_per_s']:.2f} files/s; "
            f"worker CPU {r['worker_cpu_s_per_file']:.3f} s/file median, {r['worker_cpu_mean']:.3f} mean "
            f"(task wall {r['task_wall_s_per_file']:.3f} s median); "
            f"client CPU {r['client_cpu_s_per_file']:.3f} s/file + finalize {r['finalize_cpu_s']:.1f} s CPU "
            f"({r['finalize_wall_s']:.1f} s wall) per night; "
            f"I/O {r['read_mb_per_file']:.2f} MB read + {r['write_mb_per_file']:.2f} MB written per file"
        )
        split = ", ".join(f"{k} {1e3 * v:.1f} ms" for k, v in r["client_split"].items())
        print(f"    client CPU per file: {split}; the rest is the Dask client, the in-process scheduler and the loop")
    r = runs[1]
    ratio = over["client_cpu_ms_per_task"] / 1e3 / r["worker_cpu_s_per_file"]
    print(f"per-task scheduler overhead / per-file CPU = {ratio:.3f}")
    for w in (32, 256):
        rate, lim = model(r, over, args.fs_gbps, w)
        print(f"predicted at {w} workers: {rate:.1f} files/s, limited by {lim}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

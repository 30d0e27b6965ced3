"""``vampd demo``: a simulated night streamed into a temp dir while the daemon reduces it.

Everything is real: the simulator writes raw cubes the way the instrument's logger does
(``NAME.fits.<pid>.<tid>.tmp`` → rename → ``.txt`` sidecar), ``vampd watch`` runs as a
separate process on that directory, the live view (or plain status lines when there is no
terminal) reads the ledger, and ``vampd finalize`` writes the night's products at the end.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

__all__ = ["cmd_demo", "demo_summary", "prepare_demo"]


def prepare_demo(workdir: Path, nfiles: int, size: int = 128, nframes: int = 10) -> tuple[Path, object]:
    """Write the demo's masters and config; return (config path, SimConfig of the stream)."""
    import glob

    from vampd.config.io import save_config
    from vampd.config.presets import preset_config
    from vampd.simulate.night import SimConfig, simulate_night
    from vampd.simulate.scene import Scene
    from vampd.stages.calibfiles import build_masters

    ncycles = max(1, -(-nfiles // 16))
    # a bright, strongly polarised ring so that the Q_phi preview shows it after a few sets
    sim = SimConfig(
        size=size,
        nframes=nframes,
        ncycles=ncycles,
        seed=7,
        exptime=0.05,
        max_files=nfiles,
        scene=Scene(ring_flux=6e5, pol_fraction=0.5),
    )
    # calibration frames come first at the telescope too: simulate them (no science) and build masters
    simulate_night(workdir / "calsim", sim.replace(max_files=0))
    masters = build_masters(sorted(glob.glob(str(workdir / "calsim" / "calib" / "*.fits"))), workdir / "masters")
    cfg = preset_config("pdi-triplediff", "demo")
    cfg.calibrate.calib_directory = workdir / "masters"
    cfg.calibrate.flat_correct = True
    cfg.align.crop_width = size
    cfg.watch.inputs = [workdir / "night" / "raw"]
    cfg.watch.outdir = workdir / "out"
    cfg.watch.expect_sidecar = True
    cfg.watch.workers = 2
    cfg.watch.settle_time = 0.2
    cfg.watch.reconcile_interval = 5.0
    path = workdir / "demo.toml"
    save_config(cfg, path)
    return path, sim.replace(calib=False) if masters else sim


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def demo_summary(st: dict) -> str:
    """The demo's last line, from the ledger's status (:func:`collect_status`), e.g.
    ``vampd demo: 16 of 16 files reduced; 1 HWP set complete``.

    Parked, to-retry and broken counts are added only when not zero.
    """
    f, s = st.get("files", {}), st.get("sets", {})
    total, parked = f.get("total", 0), f.get("parked", 0)
    files = f"{f.get('done', 0)} of {_plural(total, 'file')} reduced"
    retry = f.get("failed", 0) - parked  # ``failed`` counts parked files too (kept for scripts)
    files += "".join(f", {n} {w}" for n, w in ((parked, "parked"), (retry, "to retry")) if n)
    sets = f"{_plural(s.get('complete', 0), 'HWP set')} complete"
    sets += f", {s['broken']} broken" if s.get("broken") else ""
    return f"vampd demo: {files}; {sets}"


def _status(outdir: Path) -> dict:
    from vampd.live.status import collect_status

    try:
        return collect_status(outdir)
    except FileNotFoundError:
        return {}


def _wait_done(outdir: Path, expected: int, timeout: float, tick, stop: threading.Event) -> dict:
    t0 = time.monotonic()
    st: dict = {}
    while time.monotonic() - t0 < timeout and not stop.is_set():
        st = _status(outdir)
        files = st.get("files", {})
        tick(st)
        if files.get("total", 0) >= expected and files.get("pending", 1) == 0 and files.get("running", 0) == 0:
            break
        time.sleep(1.0)
    return st


def _status_printer(use_live: bool):
    """The ``tick`` of :func:`_wait_done`: a status line whenever it changes (none with the live view)."""
    last = [""]

    def tick(st: dict) -> None:
        if use_live:
            return
        f = st.get("files", {})
        s = st.get("sets", {})
        line = (
            f"  files {f.get('done', 0)}/{f.get('total', 0)} done, {f.get('failed', 0)} failed, "
            f"{f.get('pending', 0)} pending; sets {s.get('complete', 0)} complete, {s.get('open', 0)} open"
        )
        if line != last[0]:
            print(line, flush=True)
            last[0] = line

    return tick


def _stop_processes(live, daemon) -> int:
    """Interrupt the live view (if any) and terminate the daemon; returns the daemon's exit code (-9: killed)."""
    if live is not None:
        live.send_signal(signal.SIGINT)
        try:
            live.wait(5)
        except subprocess.TimeoutExpired:
            live.kill()
    daemon.send_signal(signal.SIGTERM)
    try:
        return daemon.wait(60)
    except subprocess.TimeoutExpired:
        daemon.kill()
        return -9


def cmd_demo(args: argparse.Namespace) -> int:
    """Stream a simulated night into a work dir while ``vampd watch`` reduces it; then finalize."""
    from vampd.finalize.commands import cmd_finalize
    from vampd.simulate.stream import stream_night

    keep = args.workdir is not None
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="vampd-demo-")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    nfiles = int(args.files)
    print(f"vampd demo: work directory {workdir}")
    print("  preparing calibration masters and the configuration ...", flush=True)
    config, sim = prepare_demo(workdir, nfiles)
    out = workdir / "out"
    raw = workdir / "night" / "raw"
    raw.mkdir(parents=True, exist_ok=True)

    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    log = open(workdir / "daemon.log", "w")
    daemon = subprocess.Popen(
        [sys.executable, "-m", "vampd", "watch", str(config)], stdout=log, stderr=subprocess.STDOUT, env=env
    )
    print(f"  daemon started (pid {daemon.pid}; log {workdir / 'daemon.log'})")
    stop = threading.Event()
    streamer = threading.Thread(
        target=stream_night,
        args=(workdir / "night", sim),
        kwargs={"cadence": float(args.cadence), "stop_event": stop},
        daemon=True,
    )
    live = None
    use_live = not args.no_live and sys.stdout.isatty()
    rc = 0
    try:
        time.sleep(1.0)  # let the observer start before the first file lands
        streamer.start()
        print(f"  streaming {nfiles} raw files at one every {args.cadence:g} s into {raw}", flush=True)
        if use_live:
            live = subprocess.Popen([sys.executable, "-m", "vampd", "live", str(out)], env=env)
        streamer.join()
        st = _wait_done(out, nfiles, timeout=120 + 3 * nfiles, tick=_status_printer(use_live), stop=stop)
    except KeyboardInterrupt:
        stop.set()
        rc = 130
    finally:
        drc = _stop_processes(live, daemon)
        log.close()
    print(f"  daemon stopped (exit {drc})")
    if rc:
        return rc
    print("  finalizing the night ...", flush=True)
    frc = cmd_finalize(argparse.Namespace(config=str(config), outdir=str(out), mean=False))
    st = _status(out)
    f = st.get("files", {})
    report = out / "report" / "report.md"
    if report.exists():
        print(f"  night report: {report}")
    coll = sorted((out / "pdi").glob("*_stokes_coll.fits"))
    if coll:
        print(f"  polarimetric product: {coll[0]}")
    if not keep:
        print(f"  (the work directory stays at {workdir}; remove it when done)")
    print(demo_summary(st))  # last: what a script or a glance at the terminal reads
    return 0 if (frc == 0 and drc == 0 and f.get("done", 0) == nfiles) else 1

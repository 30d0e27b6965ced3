"""``vampd simulate OUTDIR``: arguments and entry point."""

from __future__ import annotations

import argparse
import sys
import time

__all__ = ["add_arguments", "cmd_simulate", "config_from_args"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``vampd simulate`` (called by :mod:`vampd.cli`)."""
    p.add_argument("outdir", help="output directory (raw/, calib/, truth.json are written below it)")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed → identical files)")
    p.add_argument("--nframes", type=int, default=20, help="frames per file (default 20)")
    p.add_argument("--size", type=int, default=256, help="frame side in px (MBI: per field; default 256)")
    p.add_argument("--cycles", type=int, default=1, help="HWP cycles per target (default 1)")
    p.add_argument("--exptime", type=float, default=0.02, help="exposure per frame [s] (default 0.02)")
    p.add_argument("--filter", default="750-50", help="FILTER01 (default 750-50)")
    p.add_argument("--mbi", action="store_true", help="multiband imaging: 4 fields F610/F670/F720/F760")
    p.add_argument("--doublediff", action="store_true", help="FLC out of the beam (double-difference mode)")
    p.add_argument("--coronagraphic", action="store_true", help="suppressed star core plus 4 satellite spots")
    p.add_argument("--targets", default="ABAUR", help="comma-separated target names (ABAUR, MWC480, HD34282, HD169142)")
    p.add_argument("--ip", type=float, default=0.0, help="instrumental polarisation (M3 diattenuation), e.g. 0.01")
    p.add_argument("--pol-fraction", type=float, default=None, help="ring polarisation fraction (default 0.3)")
    p.add_argument("--noise-free", action="store_true", help="no noise, dark, bad pixels or flat; constant bias")
    p.add_argument("--float", dest="write_float", action="store_true", help="write float32 adu cubes (exact tests)")
    p.add_argument("--no-rotation", action="store_true", help="freeze PA/alt/az per target (test mode)")
    p.add_argument("--pre-nbs", action="store_true", help="simulate a pre-NBS night (2024-11-25, camera 1 flipped)")
    p.add_argument("--no-calib", action="store_true", help="do not write raw darks/flats to OUTDIR/calib")
    p.add_argument("--max-files", type=int, default=None, help="write only the first N science files")
    p.add_argument("--frames-chunk", type=int, default=32, help="frames generated and written per chunk")
    p.add_argument("--stream", action="store_true", help="write files at a cadence, like the instrument's logger")
    p.add_argument("--cadence", type=float, default=1.0, help="seconds between files with --stream (default 1)")
    p.add_argument(
        "--cubes-per-hwp",
        type=int,
        default=1,
        help="consecutive cubes per camera and FLC state at each HWP position (default 1)",
    )
    p.add_argument("--faults", default="", help="comma-separated: truncated,corrupt,nonfits,missing_keyword,zero_byte")
    p.add_argument("--data-dir", default=None, help="data directory with filter curves (default: $VAMPD_DATA_DIR)")


def config_from_args(args: argparse.Namespace):
    """Build a :class:`~vampd.simulate.night.SimConfig` from parsed arguments."""
    from vampd.simulate.night import SimConfig

    scene = {}
    if args.pol_fraction is not None:
        scene["pol_fraction"] = float(args.pol_fraction)
    cfg = SimConfig().replace(
        seed=args.seed,
        nframes=args.nframes,
        size=args.size,
        ncycles=args.cycles,
        exptime=args.exptime,
        filter=args.filter,
        mbi=args.mbi,
        doublediff=args.doublediff,
        coronagraphic=args.coronagraphic,
        targets=tuple(t.strip() for t in args.targets.split(",") if t.strip()),
        ip=args.ip,
        noise_free=args.noise_free,
        write_float=args.write_float,
        rotation=not args.no_rotation,
        pre_nbs=args.pre_nbs,
        calib=not args.no_calib,
        frames_chunk=args.frames_chunk,
        max_files=args.max_files,
        cubes_per_hwp=args.cubes_per_hwp,
        faults=tuple(f.strip() for f in args.faults.split(",") if f.strip()),
        data_dir=args.data_dir,
    )
    if scene:
        cfg = cfg.replace(scene=scene)
    return cfg


def cmd_simulate(args: argparse.Namespace) -> int:
    """Entry point of ``vampd simulate``; prints a summary. Returns the exit code."""
    from pathlib import Path

    from vampd.simulate.night import simulate_night

    try:
        cfg = config_from_args(args)
        t0 = time.perf_counter()
        truth = simulate_night(args.outdir, cfg, stream=args.stream, cadence=args.cadence if args.stream else 0.0)
    except ValueError as exc:
        print(f"vampd simulate: {exc}", file=sys.stderr)
        return 2
    dt = time.perf_counter() - t0
    out = Path(args.outdir)
    nraw = len(truth["files"])
    ncal = len(truth["calib_files"])
    print(f"vampd simulate: {nraw} raw files in {out / 'raw'}, {ncal} calibration files in {out / 'calib'}")
    print(
        f"  frames {cfg.nframes} × {cfg.frame_shape[0]}×{cfg.frame_shape[1]}, targets {', '.join(cfg.targets)}, "
        f"{cfg.ncycles} HWP cycle(s), {'double' if cfg.doublediff else 'triple'}-diff{', MBI' if cfg.mbi else ''}"
        f"{', coronagraphic' if cfg.coronagraphic else ''}"
    )
    if truth["faults"]:
        print("  faults: " + ", ".join(f"{f['name']} ({f['fault']})" for f in truth["faults"]))
    print(f"  truth: {out / 'truth.json'}   ({dt:.1f} s)")
    return 0

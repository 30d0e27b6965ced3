"""Accuracy of the per-file chain against the simulator's truth (prints figures; asserts nothing).

Simulates a night (noise on, masters built from the simulated darks/flats), reduces every file
with ``process_file`` and compares with ``truth.json``: DFT centroid rms, aperture photometry,
Strehl, the coadd's centring on (N-1)/2, and frame selection counts.

    OPENBLAS_NUM_THREADS=1 python benchmarks/accuracy.py [--size 128 --nframes 20 --files 16]
"""

from __future__ import annotations

import argparse
import glob
import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--nframes", type=int, default=20)
    p.add_argument("--files", type=int, default=16)
    p.add_argument("--exptime", type=float, default=0.08)
    p.add_argument("--cutoff", type=float, default=0.25)
    args = p.parse_args(argv)

    from astropy.io import fits

    from vampd.config.presets import preset_config
    from vampd.engine.pipeline import process_file
    from vampd.instrument.pupil import synthetic_psf
    from vampd.simulate.night import SimConfig, simulate_night
    from vampd.stages.analyze import load_metrics
    from vampd.stages.calibfiles import build_masters
    from vampd.stages.dft import dft_centroid

    work = Path(tempfile.mkdtemp(prefix="vampd-acc-"))
    try:
        ncycles = max(1, -(-args.files // 16))
        truth = simulate_night(
            work / "night",
            SimConfig(size=args.size, nframes=args.nframes, ncycles=ncycles, seed=11, exptime=args.exptime),
        )
        build_masters(sorted(glob.glob(str(work / "night" / "calib" / "*.fits"))), work / "masters")
        cfg = preset_config("quicklook", "acc")
        cfg.calibrate.calib_directory = work / "masters"
        cfg.calibrate.flat_correct = True
        cfg.calibrate.fix_bad_pixels = True
        cfg.align.crop_width = min(args.size, 96)
        cfg.frame_select.frame_select = True
        cfg.frame_select.metric = "strehl"
        cfg.frame_select.cutoff = args.cutoff
        cfg.coadd.recenter = False  # judge the alignment itself, not the recentring that follows it
        dpos, dflux, dstrehl, dcen, kept = [], [], [], [], []
        for f in truth["files"][: args.files]:
            r = process_file(work / "night" / f["path"], cfg, work / "out")
            m, fields = load_metrics(dict(r.products)["metrics"])
            tr = f["frames"]["fields"][fields[0]]
            dpos.append(np.hypot(m["dfty"][0, 0] - tr["star_y_cal"], m["dftx"][0, 0] - tr["star_x_cal"]))
            dflux.append(m["photf"][0, 0] / np.asarray(tr["aper_flux"]) - 1)
            dstrehl.append(m["strehl"][0, 0] - np.asarray(tr["strehl_metric"]))
            kept.append((r.metrics["nkept"], r.metrics["nframes"]))
            with fits.open(dict(r.products)["coadded"]) as hdul:
                img, h = hdul[0].data[0].astype(float), hdul[0].header
            c = (img.shape[-1] - 1) / 2
            w = cfg.analysis.window_size
            o = int(round(c)) - w // 2
            y, x = dft_centroid(
                img[o : o + w, o : o + w][None], synthetic_psf(fields[0], h["PXSCALE"], h["INST-PA"], w)
            )
            dcen.append(math.hypot(y[0] + o - c, x[0] + o - c))
        dpos, dflux, dstrehl = map(np.concatenate, (dpos, dflux, dstrehl))
        n = sum(k[1] for k in kept)
        print(
            f"vampd chain accuracy vs truth: {len(kept)} files x {args.nframes} frames, {args.size}^2, "
            f"exptime {args.exptime} s"
        )
        print(
            f"  DFT centroid error: rms {math.sqrt(np.mean(dpos**2)):.4f} px (target <= 0.05), max {dpos.max():.4f} px"
        )
        print(
            f"  aperture photometry: mean {100 * dflux.mean():+.3f} %, "
            f"rms {100 * dflux.std():.3f} % per frame (target 1 %)"
        )
        print(f"  Strehl: mean error {dstrehl.mean():+.4f}, rms {math.sqrt(np.mean(dstrehl**2)):.4f} (target 0.03)")
        print(
            f"  coadd PSF centre offset from (N-1)/2 (alignment only, no recenter): max {max(dcen):.4f} px, "
            f"mean {np.mean(dcen):.4f} px (target 0.02)"
        )
        exp = all(k == math.ceil((1 - args.cutoff) * m) for k, m in kept)
        print(f"  frame selection: kept {sum(k[0] for k in kept)}/{n}; ceil((1-q) n) per file: {exp}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

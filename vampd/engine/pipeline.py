"""The one-file pipeline: raw cube → calibrate → analyse → select → align → coadd → products.

This is the only place that strings the science stages together. ``vampd run`` and
``vampd watch`` both call :func:`process_file` (in worker processes); it returns what the
ledger records and never touches the ledger itself.

Memory: the cube is read in frame chunks. Calibrated chunks are kept in RAM only while the
whole calibrated cube fits in ``HOLD_BYTES``; a larger cube is calibrated twice (once for
the metrics, once for alignment) rather than held, and its aligned frames go through a
disk-backed coadder when they exceed ``COADD_RAM_BYTES``, so a 25 GB cube needs
chunk-sized memory.

Speed (coadd without aligned intermediates, any method but ``varmean``): only the part of
the aligned frame that can hold data (:func:`~vampd.stages.align.align_region`) is
resampled, straight into the coadder's frame store; the coadd error uses the per-frame
variances shifted by the nearest whole pixel (:func:`~vampd.stages.align.variance_sum_nearest`)
instead of a Lanczos-shifted error cube. The data path is identical to ``align_cube``.
"""

from __future__ import annotations

import logging
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from astropy.io import fits

from vampd import __version__
from vampd.fitsio import InputError, output_stem, read_frames, read_header, write_hdus_atomic
from vampd.instrument.angles import update_angles
from vampd.instrument.detectors import detector_from_header
from vampd.instrument.fields import field_names
from vampd.instrument.headers import HeaderError, fix_header, header_summary, missing_keywords
from vampd.instrument.pupil import synthetic_psf
from vampd.instrument.wcs import apply_wcs
from vampd.stages.align import (
    align_cube,
    align_header,
    align_into,
    align_region,
    aligned_size,
    frame_centers_from_metrics,
    reproject_cam2,
    variance_sum_nearest,
)
from vampd.stages.analyze import analyze_cube, save_metrics
from vampd.stages.calibrate import calibrate_cube
from vampd.stages.calibfiles import CalibLibrary, load_master
from vampd.stages.centroids import resolve_centers
from vampd.stages.coadd import Coadder, coadd_header, recenter, recenter_header
from vampd.stages.select import METRIC_KEYS, frame_cutoffs, select_frames

log = logging.getLogger("vampd.pipeline")

#: calibrated (data + err) bytes that may be held in RAM between the two passes
HOLD_BYTES = int(os.environ.get("VAMPD_HOLD_BYTES", 1_500_000_000))
#: target bytes of one raw chunk
CHUNK_BYTES = int(os.environ.get("VAMPD_CHUNK_BYTES", 64_000_000))
#: fsync the product directories too (2 fsyncs per product instead of 1). Off: a product is
#: fsynced before its atomic rename (never torn), but a power cut right after may lose the
#: rename; the file is then simply missing and gets redone.
SYNC_DIRS = os.environ.get("VAMPD_SYNC_DIRS", "0") not in ("", "0", "false", "no")
#: aligned frames of a median/biweight coadd kept in RAM up to this size, else a disk store
COADD_RAM_BYTES = int(os.environ.get("VAMPD_COADD_RAM_BYTES", 512_000_000))


@dataclass
class FileResult:
    """What one processed file gives the ledger."""

    path: str
    products: list[tuple[str, str]] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    skipped: bool = False


# --------------------------------------------------------------------------------------------
# per-process caches (a worker handles many files of the same night)
# --------------------------------------------------------------------------------------------
_LIBRARIES: dict[tuple[str, float], CalibLibrary] = {}
_PSFS: dict[tuple, np.ndarray] = {}


def _library(directory: Path | None) -> CalibLibrary | None:
    if directory is None:
        return None
    directory = Path(directory)
    if not directory.is_dir():
        raise InputError(directory, "calibrate.calib_directory does not exist")
    # re-index when the directory changes (new masters written during the night)
    stamp = max((p.stat().st_mtime for p in [directory, *directory.glob("*")] if p.exists()), default=0.0)
    key = (str(directory), stamp)
    lib = _LIBRARIES.get(key)
    if lib is None:
        _LIBRARIES.clear()
        lib = _LIBRARIES[key] = CalibLibrary.index(directory)
    return lib


def _psf(filter_name: str, header: fits.Header, npix: int, data_dir) -> np.ndarray:
    key = (filter_name, float(header["PXSCALE"]), float(header["INST-PA"]), npix, str(data_dir))
    psf = _PSFS.get(key)
    if psf is None:
        psf = _PSFS[key] = synthetic_psf(filter_name, float(header["PXSCALE"]), float(header["INST-PA"]), npix, data_dir=data_dir)
    return psf


def product_paths(cfg, outdir: Path, path: str | Path) -> dict[str, Path]:
    """Where each per-file product of ``path`` goes (§11.1, stable key = file stem)."""
    name = cfg.name or "vampd"
    stem = output_stem(path)
    outdir = Path(outdir)
    return {
        "metrics": outdir / "metrics" / f"{name}_{stem}_metrics.npz",
        "coadded": outdir / "coadded" / f"{name}_{stem}_coll.fits",
        "calibrated": outdir / "calibrated" / f"{stem}_calib.fits",
        "selected": outdir / "selected" / f"{name}_{stem}_fs.fits",
        "aligned": outdir / "aligned" / f"{name}_{stem}_reg.fits",
    }


def expected_products(cfg) -> list[str]:
    """The product kinds a successful run of this config writes for one file."""
    kinds = ["metrics"]
    kinds.append("coadded" if cfg.coadd.coadd else "aligned")
    if cfg.calibrate.save_intermediate:
        kinds.append("calibrated")
    if cfg.frame_select.frame_select and cfg.frame_select.save_intermediate:
        kinds.append("selected")
    if (cfg.align.save_intermediate or _pdi_blocks(cfg)) and cfg.coadd.coadd:
        kinds.append("aligned")
    return kinds


def _pdi_blocks(cfg) -> bool:
    """``combine.method = "pdi"``: the aligned frames are kept for the HWP-block coadd."""
    return getattr(cfg.combine, "method", "cube") == "pdi" and getattr(cfg, "polarimetry", None) is not None


def prepare_header(path: str | Path, cfg) -> fits.Header:
    """Read and normalise a raw header; raise a specific error for anything unusable."""
    raw = read_header(path)
    missing = missing_keywords(raw)
    if missing:
        raise HeaderError(missing[0], "missing (required for a raw science file)", path)
    header = fix_header(raw, path)
    return update_angles(header, cfg.target, path=path, copy=False)  # fix_header made a copy


def _chunks(nframes: int, frame_bytes: int) -> list[slice]:
    step = max(1, min(nframes, CHUNK_BYTES // max(frame_bytes, 1)))
    return [slice(i, min(i + step, nframes)) for i in range(0, nframes, step)]


def _window_centers(cfg, header, image: np.ndarray, outdir: Path, psfs) -> dict[str, list]:
    """Window centres (calibrated coords): the night's centroid file if present, else found on the data."""
    cam = int(header["U_CAMERA"])
    cfile = Path(outdir) / "aux" / f"{cfg.name or 'vampd'}_centroids_cam{cam}.toml"
    return resolve_centers(header, image.shape, cfile, image=image, coronagraphic=cfg.coronagraphic, psf=psfs)


def _reprojection(cfg, header, outdir: Path, shape, fields: list[str]) -> tuple[np.ndarray, np.ndarray] | str:
    """cam2 → cam1 similarity per field (§5.6) from the night's two centroid files.

    Returns ``(angles_deg, scales)`` of shape (nfields,), or the reason why there is none
    (recorded in the product header, so ``reproject = true`` is never silently ignored).
    """
    from vampd.stages.align import similarity_from_spots
    from vampd.stages.centroids import centers_to_calibrated, load_centroid_file

    aux = Path(outdir) / "aux"
    files = {cam: aux / f"{cfg.name or 'vampd'}_centroids_cam{cam}.toml" for cam in (1, 2)}
    missing = [str(p.name) for p in files.values() if not p.is_file()]
    if missing:
        return f"no centroid file(s) {', '.join(missing)} in aux/"
    spots = {}
    for cam, path in files.items():
        h = header.copy()
        h["U_CAMERA"] = cam  # each camera's raw positions flip by its own rule (§1.4)
        spots[cam] = centers_to_calibrated(load_centroid_file(path), h, shape)
    angles, scales = [], []
    for f in fields:
        if f not in spots[1] or f not in spots[2] or len(spots[1][f]) < 2:
            return f"field {f}: the centroid files need >= 2 PSFs per camera (satellite spots)"
        a, k = similarity_from_spots(spots[1][f], spots[2][f])
        angles.append(a)
        scales.append(k)
    return np.asarray(angles), np.asarray(scales)


def _calibrate_chunk(path, header, sl, back, flat, cfg, with_header=True):
    raw = read_frames(path, sl)
    return calibrate_cube(raw, header, back, flat, cfg.calibrate.fix_bad_pixels, path=path, with_header=with_header)


def _field_headers(header: fits.Header, fields: list[str]) -> list[fits.Header]:
    """One header per field (EXTNAME = field name) carrying the keys that differ per field."""
    hdrs = []
    for name in fields:
        h = fits.Header()
        h["FIELD"] = (name, "MBI field / filter")
        for key in ("FILTER01", "FILTER02", "U_CAMERA", "U_FLC", "RET-ANG1", "BUNIT"):
            if key in header:
                h[key] = header[key]
        h["EXTNAME"] = (name, "extension name")
        hdrs.append(h)
    return hdrs


def _provenance(header: fits.Header, cfg) -> None:
    header["HIERARCH DPP VERSION"] = (__version__, "vampd version")
    header["HIERARCH DPP CONFIG HASH"] = (cfg.config_hash(), "processing config hash")


def _summary_metrics(metrics: dict[str, np.ndarray], keep: np.ndarray, ctr) -> dict[str, Any]:
    """Medians over kept frames of the first field's first PSF, for the ledger and live view."""

    def med(key):
        if key not in metrics:
            return None
        v = np.asarray(metrics[key])[0, 0][keep]
        v = v[np.isfinite(v)]
        return float(np.median(v)) if v.size else None

    def first(*keys):
        return next((v for v in map(med, keys) if v is not None), None)

    cy, cx = first("dfty", "comy"), first("dftx", "comx")
    out = {
        "nframes": int(keep.size),
        "nkept": int(keep.sum()),
        "strehl": med("strehl"),
        "fwhm": first("modelfwhm", "fwhm"),
        "flux": med("photf") if "photf" in metrics else med("sum"),
        "peak": med("max"),
        "cy": cy,
        "cx": cx,
    }
    if cy is not None and cx is not None:
        out["offset"] = float(math.hypot(cy - ctr[0], cx - ctr[1]))
    return out


def process_file(path: str | Path, cfg, outdir: str | Path, force: bool = False) -> FileResult:
    """Reduce one raw file to its per-file products (§2–§6) and return what to record.

    Parameters
    ----------
    path : str or Path
        Raw FITS cube (archive format).
    cfg : PipelineConfig
    outdir : str or Path
        Night output directory (products go under ``metrics/``, ``coadded/``, ...).
    force : bool
        Redo even if all products exist and are newer than the input.

    Raises
    ------
    vampd.fitsio.InputError, vampd.instrument.headers.HeaderError
        For a file that cannot be reduced; the message names the file and the problem.
    """
    t0 = time.perf_counter()
    path = str(path)
    outdir = Path(outdir)
    header = prepare_header(path, cfg)
    summary = header_summary(header)
    paths = product_paths(cfg, outdir, path)
    kinds = expected_products(cfg)
    if not force and all(paths[k].exists() and paths[k].stat().st_mtime >= os.stat(path).st_mtime for k in kinds):
        return FileResult(path, [(k, str(paths[k])) for k in kinds], summary, {}, skipped=True)

    datatype = str(header.get("DATA-TYP", "OBJECT")).upper()
    if datatype not in ("OBJECT", "ACQUISITION", "TEST"):
        raise InputError(path, f"DATA-TYP = {datatype!r} is a calibration frame, not science; build masters with `vampd calib`")
    detector_from_header(header, path)  # fail early on an unknown detector
    nframes = int(header["NAXIS3"]) if int(header.get("NAXIS", 0)) == 3 else 1
    ny, nx = int(header["NAXIS2"]), int(header["NAXIS1"])
    fields = field_names(header, path)

    # calibration masters
    lib = _library(cfg.calibrate.calib_directory) if cfg.calibrate.calib_directory else None
    back = flat = None
    if lib is not None:
        if cfg.calibrate.back_subtract:
            entry = lib.match_background(header)
            back = load_master(entry) if entry is not None else None
        if cfg.calibrate.flat_correct:
            entry = lib.match_flat(header)
            flat = load_master(entry) if entry is not None else None

    from vampd.config import resolve_data_dir

    data_dir = resolve_data_dir(cfg)  # exact filter curves for the PSF model, else top-hats
    npix = int(cfg.analysis.window_size)
    psfs = None
    if not cfg.planetary:
        psfs = {f: _psf(f, header, npix, data_dir) for f in fields}

    # ---- pass 1: calibrate + analyse chunk by chunk ----------------------------------------
    chunks = _chunks(nframes, ny * nx * 2)
    hold = nframes * ny * nx * 8 <= HOLD_BYTES
    held: list[tuple[np.ndarray, np.ndarray]] = []
    metric_parts: list[dict[str, np.ndarray]] = []
    centers = None
    cal_header = None
    t_cal = t_ana = 0.0
    for sl in chunks:
        t = time.perf_counter()
        data, err, hdr_i = _calibrate_chunk(path, header, sl, back, flat, cfg, with_header=cal_header is None)
        cal_header = cal_header if hdr_i is None else hdr_i
        t_cal += time.perf_counter() - t
        if centers is None:
            first = data[: min(len(data), 16)]
            with np.errstate(all="ignore"), warnings.catch_warnings():
                # saturated pixels are NaN in every frame: their mean is NaN, not a warning
                warnings.simplefilter("ignore", RuntimeWarning)
                ref = first.mean(axis=0)  # a plain mean is 3x cheaper; NaN columns redone
                if not np.isfinite(ref).all():
                    ref = np.nanmean(first, axis=0)
            centers = _window_centers(cfg, header, ref, outdir, psfs)
            missing = [f for f in fields if f not in centers]
            if missing:
                raise InputError(path, f"no PSF found for field(s) {missing}")
            centers = {f: centers[f] for f in fields}
        t = time.perf_counter()
        metric_parts.append(analyze_cube(data, err, centers, cfg.analysis, psf=psfs, planetary=cfg.planetary))
        t_ana += time.perf_counter() - t
        if hold:
            held.append((data, err))
    metrics = {k: np.concatenate([m[k] for m in metric_parts], axis=-1) for k in metric_parts[0]}
    products: list[tuple[str, str]] = []
    save_metrics(paths["metrics"], metrics, fields, sync_dir=SYNC_DIRS)
    products.append(("metrics", str(paths["metrics"])))

    # ---- frame selection --------------------------------------------------------------------
    keep = np.ones(nframes, bool)
    fs = cfg.frame_select
    selection = None
    if fs.frame_select and fs.cutoff > 0:
        key = METRIC_KEYS[fs.metric]
        if key not in metrics:
            raise InputError(path, f"frame_select.metric = {fs.metric!r} needs metric {key!r}, which was not measured")
        keep = select_frames(metrics, fs.metric, fs.cutoff)
        cuts = frame_cutoffs(metrics, fs.metric, fs.cutoff)
        cuts = cuts[np.isfinite(cuts)]
        selection = {"metric": fs.metric, "quantile": fs.cutoff, "cutoff": float(np.median(cuts)) if cuts.size else None}

    # ---- pass 2: align + coadd ---------------------------------------------------------------
    if cfg.align.align:
        all_centers = frame_centers_from_metrics(metrics, cfg.align.method)
    else:
        fixed = np.array([np.mean(np.asarray(centers[f], float), axis=0) for f in fields])
        all_centers = np.broadcast_to(fixed[None], (nframes, len(fields), 2))
    t_align = t_coadd = 0.0
    coadder = None
    need_aligned = (not cfg.coadd.coadd or cfg.align.save_intermediate or (fs.frame_select and fs.save_intermediate)
                    or _pdi_blocks(cfg))
    # fast path (coadd only): align just the region that can hold data straight into the
    # coadder's store, and sum nearest-pixel variances instead of aligning the error cube
    fast = cfg.coadd.coadd and not need_aligned and cfg.coadd.method != "varmean"
    crop, pad = int(cfg.align.crop_width), bool(cfg.align.pad)
    region = None
    if fast:
        region = align_region(all_centers[keep], crop, pad, (ny, nx))
        h, w = region[0].stop - region[0].start, region[1].stop - region[1].start
        nkept = int(keep.sum())
        in_ram = nkept * len(fields) * h * w * 4 <= COADD_RAM_BYTES
        scratch = None
        if not in_ram:
            scratch = outdir / ".scratch"
            scratch.mkdir(parents=True, exist_ok=True)
        coadder = Coadder(cfg.coadd.method, tmpdir=scratch, capacity=nkept if in_ram else None)
    elif cfg.coadd.coadd:
        (outdir / ".scratch").mkdir(parents=True, exist_ok=True)
        coadder = Coadder(cfg.coadd.method, tmpdir=outdir / ".scratch")
    aligned_frames: list[tuple[np.ndarray, np.ndarray]] = []
    calibrated_frames: list[tuple[np.ndarray, np.ndarray]] = []
    for i, sl in enumerate(chunks):
        if hold:
            data, err = held[i]
            held[i] = None  # free as we go
        else:
            data, err, _ = _calibrate_chunk(path, header, sl, back, flat, cfg, with_header=False)
        if cfg.calibrate.save_intermediate:
            calibrated_frames.append((data, err))
        k = keep[sl]
        if not k.any():
            continue
        if fast:
            t = time.perf_counter()
            idx = np.flatnonzero(k)
            ctr_k = all_centers[sl][k]
            view = coadder.slot(len(idx), (len(fields), h, w))
            align_into(data, ctr_k, crop, pad, region, view, frames=idx)
            var_sum = variance_sum_nearest(err, ctr_k, crop, pad, region, frames=idx)
            t_align += time.perf_counter() - t
            t = time.perf_counter()
            coadder.add(view, var_sum=var_sum)
            t_coadd += time.perf_counter() - t
            continue
        t = time.perf_counter()
        d4, e4 = align_cube(data[k], err[k], all_centers[sl][k], crop, pad)
        t_align += time.perf_counter() - t
        t = time.perf_counter()
        if coadder is not None:
            coadder.add(d4, e4)
        t_coadd += time.perf_counter() - t
        if need_aligned:
            aligned_frames.append((d4, e4))

    out_header = apply_wcs(cal_header, float(cal_header.get("DEROTANG", 0.0)))
    _provenance(out_header, cfg)
    out_header, _ = align_header(out_header, cfg.align.method if cfg.align.align else None, [], copy=False)
    exptime = float(header["EXPTIME"])

    if cfg.calibrate.save_intermediate:
        d = np.concatenate([c[0] for c in calibrated_frames])
        e = np.concatenate([c[1] for c in calibrated_frames])
        _write_product(paths["calibrated"], d, e, cal_header, [])
        products.append(("calibrated", str(paths["calibrated"])))

    reproj = skipped_reproject = None
    if cfg.align.reproject and int(header["U_CAMERA"]) == 2:
        reproj = _reprojection(cfg, header, outdir, (ny, nx), fields)
        if isinstance(reproj, str):
            log.warning("%s: align.reproject skipped: %s", Path(path).name, reproj)
            out_header["HIERARCH DPP ALIGN REPROJ"] = ("skipped", "no usable centroid files")
            skipped_reproject = reproj
            reproj = None
        else:
            out_header["HIERARCH DPP ALIGN REPROJ"] = ("cam2->cam1", "similarity from centroid files")
            out_header["HIERARCH DPP ALIGN REPROJ ANG"] = (float(reproj[0][0]), "[deg] rotation (field 1)")
            out_header["HIERARCH DPP ALIGN REPROJ SCALE"] = (float(reproj[1][0]), "scale (field 1)")

    if aligned_frames:
        d4 = np.concatenate([a[0] for a in aligned_frames])
        e4 = np.concatenate([a[1] for a in aligned_frames])
        if reproj is not None:
            d4, e4 = reproject_cam2(d4, e4, reproj[0], reproj[1])
        kind = "aligned" if (cfg.align.save_intermediate or not cfg.coadd.coadd or _pdi_blocks(cfg)) else None
        if kind:
            _write_product(paths["aligned"], d4, e4, out_header, fields)
            products.append(("aligned", str(paths["aligned"])))
        if fs.frame_select and fs.save_intermediate:
            _write_product(paths["selected"], d4, e4, out_header, fields)
            products.append(("selected", str(paths["selected"])))

    coadd_info: dict[str, Any] = {}
    if skipped_reproject:
        coadd_info["reproject_skipped"] = skipped_reproject
    if coadder is not None:
        t = time.perf_counter()
        image, err, ncoadd = coadder.result()
        if fast:  # back to the full aligned frame: NaN outside the data region
            size = aligned_size(crop, pad)
            full = np.full((2, len(fields), size, size), np.nan, np.float32)
            full[0][:, region[0], region[1]] = image
            full[1][:, region[0], region[1]] = err
            image, err = full[0], full[1]
        hdr = coadd_header(
            out_header,
            cfg.coadd.method,
            ncoadd,
            exptime,
            selection=selection,
            recenter_method=cfg.coadd.recenter_method if cfg.coadd.recenter else None,
            calib_files={"BACKFILE": back.name if back else None, "FLATFILE": flat.name if flat else None},
            config_hash=cfg.config_hash(),
            copy=False,  # out_header is not used after this
        )
        if cfg.coadd.recenter:
            ws = int(cfg.analysis.window_size)
            shifts = []
            for j, f in enumerate(fields):
                image[j], err[j], (dy, dx) = recenter(
                    image[j], err[j], cfg.coadd.recenter_method, ws, psf=psfs[f] if psfs else None
                )
                shifts.append((float(dy[0]), float(dx[0])))
            hdr = recenter_header(hdr, cfg.coadd.recenter_method, shifts[0][0], shifts[0][1], copy=False)
            coadd_info["recenter_shift"] = shifts
        if reproj is not None:
            # the warp is linear and about the frame centre, where the PSF now sits: applied
            # once to the coadd instead of to every frame (exact for mean-type coadds)
            image, err = (a[0] for a in reproject_cam2(image[None], err[None], reproj[0], reproj[1]))
            coadd_info["reproject"] = [float(reproj[0][0]), float(reproj[1][0])]
        _write_product(paths["coadded"], image, err, hdr, fields)
        products.append(("coadded", str(paths["coadded"])))
        t_coadd += time.perf_counter() - t
        coadder.close()

    ctr = centers[fields[0]][0]
    qm = _summary_metrics(metrics, keep, ctr)
    qm.update(coadd_info)
    qm["timing"] = {
        "calibrate": t_cal,
        "analyze": t_ana,
        "align": t_align,
        "coadd": t_coadd,
        "total": time.perf_counter() - t0,
    }
    return FileResult(path, products, summary, qm)


def _write_product(path: Path, data: np.ndarray, err: np.ndarray, header: fits.Header, fields: list[str]) -> None:
    """PRIMARY (data) + ERR + one header HDU per field, written atomically.

    Our own headers are valid by construction: they are written card by card by
    :func:`vampd.fitsio.write_hdus_atomic` (layout keys derived from the arrays), without
    astropy's HDU construction, header copies and per-card verification.
    """
    err_hdr = fits.Header()
    err_hdr["BUNIT"] = header.get("BUNIT", "")
    err_hdr["EXTNAME"] = ("ERR", "extension name")
    hdus = [(header, np.asarray(data, np.float32)), (err_hdr, np.asarray(err, np.float32))]
    hdus += [(h, None) for h in _field_headers(header, fields)]
    write_hdus_atomic(path, hdus, sync_dir=SYNC_DIRS)

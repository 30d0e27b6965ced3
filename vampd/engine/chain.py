"""The per-file chain as data: stage objects over one small context, run and timed by :func:`run_chain`.

Each stage has a ``name`` and one entry point ``run(ctx)`` over a :class:`FileContext`; the science
lives in :mod:`vampd.stages`. :func:`build_chain` builds the list from the configuration (a stage
the config turns off is not in it); :func:`run_chain` runs it and times each stage by name.

The cube is read in frame chunks: a :class:`ChunkPass` runs its sub-stages once per chunk (pass 1
calibrates and measures, pass 2 aligns and coadds). Calibrated chunks stay in RAM between the
passes only while the cube fits ``limits.hold_bytes``, else they are calibrated twice; beyond
``limits.coadd_ram_bytes`` the coadder's store is on disk. The coadd-only fast path and the
deferred errors are described in docs/design.md ("The per-file chain is data").
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from astropy.io import fits

from vampd.engine.products import centroid_file, pdi_blocks, provenance, reprojection, write_product
from vampd.engine.scratch import SCRATCH as _SCRATCH
from vampd.fitsio import InputError, read_frames, read_raw
from vampd.imaging import _kernels
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
from vampd.stages.calerror import CalibModel, FrameVariance, band_error, band_rows, calibrate_data, calibration_model
from vampd.stages.calibrate import calibrate_cube, calibration_header
from vampd.stages.centroids import resolve_centers
from vampd.stages.coadd import Coadder, coadd_header, recenter, recenter_header
from vampd.stages.select import METRIC_KEYS, frame_cutoffs, select_frames

log = logging.getLogger("vampd.pipeline")

__all__ = ["Limits", "FileContext", "Stage", "ChunkPass", "build_chain", "run_chain"]


@dataclass(frozen=True)
class Limits:
    """Memory and durability knobs of one run (see :mod:`vampd.engine.pipeline`)."""

    hold_bytes: int
    chunk_bytes: int
    coadd_ram_bytes: int
    sync_dirs: bool


@dataclass
class FileContext:
    """Everything the stages of one file read and write."""

    path: str
    cfg: Any
    outdir: Path
    header: fits.Header  # normalised raw header
    paths: dict[str, Path]  # product kind -> path
    fields: list[str]
    shape: tuple[int, int, int]  # (nframes, ny, nx)
    limits: Limits
    back: Any = None  # calibration masters (CalibFrame) or None
    flat: Any = None
    psfs: dict[str, np.ndarray] | None = None  # synthetic PSF per field (None: planetary)
    chunks: list[slice] = field(default_factory=list)
    hold: bool = False
    # deferred errors (see can_defer_err); deferred: None until the first chunk decides
    deferred: bool | None = None
    calib: CalibModel | None = None
    band: slice | None = None  # rows of the error computed in pass 1 (around the PSFs)
    bad_err: np.ndarray | None = None  # (nframes, nbad) errors of the repaired pixels
    # current chunk (set by ChunkPass)
    index: int = 0
    chunk: slice | None = None
    data: np.ndarray | None = None
    err: np.ndarray | None = None
    held: list = field(default_factory=list)
    # measurements
    cal_header: fits.Header | None = None
    centers: dict[str, list] | None = None
    metric_parts: list[dict[str, np.ndarray]] = field(default_factory=list)
    metrics: dict[str, np.ndarray] = field(default_factory=dict)
    keep: np.ndarray | None = None
    selection: dict | None = None
    all_centers: np.ndarray | None = None
    # alignment / coadd
    coadder: Any = None
    fast: bool = False
    region: tuple[slice, slice] | None = None
    aligned: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)
    calibrated: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)
    pending: tuple | None = None  # the chunk's aligned (data, err, var_sum) for the coadder
    out_header: fits.Header | None = None
    reproj: tuple[np.ndarray, np.ndarray] | None = None
    # results
    products: list[tuple[str, str]] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    timing: dict[str, float] = field(default_factory=dict)  # wall seconds per stage name
    cpu: dict[str, float] = field(default_factory=dict)  # CPU seconds (this thread) per stage name

    @property
    def nframes(self) -> int:
        return self.shape[0]

    @property
    def can_defer_err(self) -> bool:
        """Coadd only, calibrated cube held: no error cube (docs/instrument.md §2.1 error model
        applied later, :mod:`vampd.stages.calerror`): pass 1 computes the error in a row band
        around the PSFs for the metrics, pass 2 the variances of the kept frames for the coadd.
        """
        c = self.cfg
        return (
            self.hold
            and bool(c.coadd.coadd)
            and c.coadd.method != "varmean"
            and not self.need_aligned
            and not c.calibrate.save_intermediate
            and not c.planetary
        )

    @property
    def need_aligned(self) -> bool:
        """Aligned frames are written (no coadd, or an aligned/selected intermediate)."""
        c = self.cfg
        fs = c.frame_select
        return (
            not c.coadd.coadd
            or c.align.save_intermediate
            or (fs.frame_select and fs.save_intermediate)
            or pdi_blocks(c)
        )


class Stage:
    """One step of the chain: ``run(ctx)`` reads and updates the context."""

    name = "stage"
    timed = True  # False for containers whose sub-stages are timed instead

    def run(self, ctx: FileContext) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _run_stage(stage: Stage, ctx: FileContext) -> None:
    if not stage.timed:
        stage.run(ctx)
        return
    t, c = time.perf_counter(), time.thread_time()
    stage.run(ctx)
    ctx.timing[stage.name] = ctx.timing.get(stage.name, 0.0) + time.perf_counter() - t
    ctx.cpu[stage.name] = ctx.cpu.get(stage.name, 0.0) + time.thread_time() - c


def run_chain(stages: list[Stage], ctx: FileContext) -> FileContext:
    """Run the stages in order, timing each (wall ``ctx.timing``, CPU ``ctx.cpu``); log the split once."""
    t0 = time.perf_counter()
    for stage in stages:
        _run_stage(stage, ctx)
    ctx.timing["chain"] = time.perf_counter() - t0
    if log.isEnabledFor(logging.DEBUG):
        split = ", ".join(f"{k} {v:.3f}" for k, v in ctx.timing.items())
        log.debug("%s: %s s", Path(ctx.path).name, split)
    return ctx


class ChunkPass(Stage):
    """Run sub-stages on every frame chunk of the cube (one pass over the file)."""

    timed = False

    def __init__(self, name: str, stages: list[Stage]):
        self.name = name
        self.stages = stages

    def run(self, ctx: FileContext) -> None:
        for i, sl in enumerate(ctx.chunks):
            ctx.index, ctx.chunk = i, sl
            for stage in self.stages:
                _run_stage(stage, ctx)
        ctx.chunk = ctx.data = ctx.err = None

    def __repr__(self) -> str:
        return f"ChunkPass({self.name!r}, {self.stages!r})"


# ----------------------------------------------------------------------------------------------
# pass 1: calibrate and measure


class Calibrate(Stage):
    """Raw chunk → calibrated ``(data, err)`` (docs/instrument.md §2); in pass 2, the held chunk or a re-calibration."""

    name = "calibrate"

    def __init__(self, recall: bool = False):
        self.recall = recall

    def run(self, ctx: FileContext) -> None:
        if self.recall and ctx.hold:
            ctx.data, ctx.err = ctx.held[ctx.index]
            ctx.held[ctx.index] = None  # free as we go
            return
        nframes, ny, nx = ctx.shape
        n = len(range(*ctx.chunk.indices(nframes)))
        defer = ctx.can_defer_err and ctx.deferred is not False
        out = _SCRATCH.get("raw", (n, ny, nx), ctx.limits.chunk_bytes, np.uint16)
        if defer:  # with the compiled kernels, calibrated straight from the mapped file
            raw, xor = (
                read_raw(ctx.path, ctx.chunk, out)
                if _kernels is not None
                else (read_frames(ctx.path, ctx.chunk, out), None)
            )
            _calibrate_deferred(ctx, raw, xor)
            return
        raw = read_frames(ctx.path, ctx.chunk, out)
        first = ctx.cal_header is None
        ctx.data, ctx.err, hdr = calibrate_cube(
            raw,
            ctx.header,
            ctx.back,
            ctx.flat,
            ctx.cfg.calibrate.fix_bad_pixels,
            out=self._out(ctx, (n, ny, nx)),
            path=ctx.path,
            with_header=first,
        )
        if hdr is not None:
            ctx.cal_header = hdr

    @staticmethod
    def _out(ctx: FileContext, shape) -> tuple[np.ndarray, np.ndarray] | None:
        """Output arrays on reused memory: the whole cube's when held, else one chunk's."""
        if ctx.cfg.calibrate.save_intermediate:
            return None  # the chunks are collected for the calibrated product: fresh arrays
        nframes, ny, nx = ctx.shape
        limit = ctx.limits.hold_bytes // 2
        if ctx.hold:  # every chunk keeps its own frames of one cube-sized buffer until pass 2
            full = (nframes, ny, nx)
            sl = ctx.chunk
            return _SCRATCH.get("data", full, limit)[sl], _SCRATCH.get("err", full, limit)[sl]
        return _SCRATCH.get("data", tuple(shape), limit), _SCRATCH.get("err", tuple(shape), limit)


def _calibrate_deferred(ctx: FileContext, raw: np.ndarray, xor: int | None = None) -> None:
    """Pass 1 without the error cube: the data (held), the error of the PSF row band, the repaired pixels' errors."""
    nframes, ny, nx = ctx.shape
    if ctx.calib is None:
        fix = ctx.cfg.calibrate.fix_bad_pixels
        ctx.calib = calibration_model(ctx.header, ctx.back, ctx.flat, fix, (ny, nx), path=ctx.path)
        ctx.cal_header = calibration_header(ctx.header, ctx.back, ctx.flat, fix, nbad=ctx.calib.nbad, path=ctx.path)
        ctx.bad_err = np.empty((nframes, ctx.calib.nbad), np.float32) if ctx.calib.nbad else None
    ctx.data = _SCRATCH.get("data", (nframes, ny, nx), ctx.limits.hold_bytes // 2)[ctx.chunk]
    bad_err = calibrate_data(raw, ctx.calib, ctx.data, xor)
    if bad_err is not None:
        ctx.bad_err[ctx.chunk] = bad_err
    if ctx.centers is None:
        ctx.centers = _find_centers(ctx)
    if ctx.deferred is None:
        band = band_rows(ctx.centers, ctx.cfg.analysis, ny)
        # PSFs spread over the frame (e.g. MBI): a band of most rows saves little and pass 2 would
        # pay for the variances; the first chunk gets its full error, the rest is calibrated as usual
        ctx.deferred = band.stop - band.start <= ny // 2
        if not ctx.deferred:
            err = _SCRATCH.get("err", (nframes, ny, nx), ctx.limits.hold_bytes // 2)[ctx.chunk]
            ctx.err = band_error(ctx.data, ctx.calib, slice(0, ny), bad_err, out=err)
            return
        ctx.band = band
    ctx.err = band_error(ctx.data, ctx.calib, ctx.band, bad_err)


#: metrics in frame rows: shifted back from the row band of a deferred-error pass 1
_Y_METRICS = ("comy", "peaky", "dfty", "modely")


class Analyze(Stage):
    """PSF windows (first chunk) and per-frame metrics (docs/instrument.md §3) of the current chunk."""

    name = "analyze"

    def run(self, ctx: FileContext) -> None:
        if ctx.centers is None:
            ctx.centers = _find_centers(ctx)
        cfg = ctx.cfg
        data, centers, r0 = ctx.data, ctx.centers, 0
        if ctx.band is not None:  # the error is known in the band only: measure in band coordinates
            r0 = ctx.band.start
            data = data[:, ctx.band]
            centers = {f: [(c[0] - r0, c[1]) for c in cs] for f, cs in centers.items()}
        m = analyze_cube(data, ctx.err, centers, cfg.analysis, psf=ctx.psfs, planetary=cfg.planetary)
        for k in _Y_METRICS if r0 else ():
            if k in m:
                m[k] += r0
        ctx.metric_parts.append(m)
        if ctx.hold:
            ctx.held.append((ctx.data, ctx.err))


def _find_centers(ctx: FileContext) -> dict[str, list]:
    """Window centres (calibrated coords): the night's centroid file if present, else found on the data."""

    first = ctx.data[: min(len(ctx.data), 16)]
    with np.errstate(all="ignore"), warnings.catch_warnings():
        # saturated pixels are NaN in every frame: their mean is NaN, not a warning
        warnings.simplefilter("ignore", RuntimeWarning)
        ref = first.mean(axis=0)  # a plain mean is 3x cheaper; NaN columns redone
        if not np.isfinite(ref).all():
            ref = np.nanmean(first, axis=0)
    cfile = centroid_file(ctx.cfg, ctx.outdir, int(ctx.header["U_CAMERA"]))
    centers = resolve_centers(
        ctx.header, ref.shape, cfile, image=ref, coronagraphic=ctx.cfg.coronagraphic, psf=ctx.psfs
    )
    missing = [f for f in ctx.fields if f not in centers]
    if missing:
        raise InputError(ctx.path, f"no PSF found for field(s) {missing}")
    return {f: centers[f] for f in ctx.fields}


class SaveMetrics(Stage):
    """Join the chunks' metrics and write the metrics product (docs/instrument.md §3.8)."""

    name = "metrics"

    def run(self, ctx: FileContext) -> None:
        parts = ctx.metric_parts
        ctx.metrics = {k: np.concatenate([m[k] for m in parts], axis=-1) for k in parts[0]}
        ctx.metric_parts = []
        save_metrics(ctx.paths["metrics"], ctx.metrics, ctx.fields, sync_dir=ctx.limits.sync_dirs)
        ctx.products.append(("metrics", str(ctx.paths["metrics"])))


class Select(Stage):
    """Frame selection on a metric quantile (docs/instrument.md §4)."""

    name = "select"

    def run(self, ctx: FileContext) -> None:
        fs = ctx.cfg.frame_select
        key = METRIC_KEYS[fs.metric]
        if key not in ctx.metrics:
            raise InputError(
                ctx.path, f"frame_select.metric = {fs.metric!r} needs metric {key!r}, which was not measured"
            )
        ctx.keep = select_frames(ctx.metrics, fs.metric, fs.cutoff)
        cuts = frame_cutoffs(ctx.metrics, fs.metric, fs.cutoff)
        cuts = cuts[np.isfinite(cuts)]
        ctx.selection = {
            "metric": fs.metric,
            "quantile": fs.cutoff,
            "cutoff": float(np.median(cuts)) if cuts.size else None,
        }


# ----------------------------------------------------------------------------------------------
# pass 2: align and coadd


class PlanAlignment(Stage):
    """Per-frame centres (docs/instrument.md §5) and the coadder: the fast region path when nothing aligned is written."""

    name = "align"

    def run(self, ctx: FileContext) -> None:
        cfg = ctx.cfg
        nframes, ny, nx = ctx.shape
        if ctx.keep is None:
            ctx.keep = np.ones(nframes, bool)
        if cfg.align.align:
            ctx.all_centers = frame_centers_from_metrics(ctx.metrics, cfg.align.method)
        else:
            fixed = np.array([np.mean(np.asarray(ctx.centers[f], float), axis=0) for f in ctx.fields])
            ctx.all_centers = np.broadcast_to(fixed[None], (nframes, len(ctx.fields), 2))
        if not cfg.coadd.coadd:
            return
        ctx.fast = not ctx.need_aligned and cfg.coadd.method != "varmean"
        scratch = ctx.outdir / ".scratch"
        if not ctx.fast:
            scratch.mkdir(parents=True, exist_ok=True)
            ctx.coadder = Coadder(cfg.coadd.method, tmpdir=scratch)
            return
        ctx.region = align_region(ctx.all_centers[ctx.keep], int(cfg.align.crop_width), bool(cfg.align.pad), (ny, nx))
        h, w = (s.stop - s.start for s in ctx.region)
        nkept = int(ctx.keep.sum())
        in_ram = nkept * len(ctx.fields) * h * w * 4 <= ctx.limits.coadd_ram_bytes
        if not in_ram:
            scratch.mkdir(parents=True, exist_ok=True)
        limit = ctx.limits.coadd_ram_bytes
        ctx.coadder = Coadder(
            cfg.coadd.method,
            tmpdir=None if in_ram else scratch,
            capacity=nkept if in_ram else None,
            alloc=lambda shape, dtype: _SCRATCH.get("coadd", shape, limit),
        )


class KeepCalibrated(Stage):
    """Collect the calibrated chunks for the ``calibrated`` intermediate product."""

    name = "write"

    def run(self, ctx: FileContext) -> None:
        ctx.calibrated.append((ctx.data, ctx.err))


class Align(Stage):
    """Shift the kept frames of the chunk onto the frame centre (docs/instrument.md §5); fast path: into the coadder."""

    name = "align"

    def run(self, ctx: FileContext) -> None:
        k = ctx.keep[ctx.chunk]
        ctx.pending = None
        if not k.any():
            return
        crop, pad = int(ctx.cfg.align.crop_width), bool(ctx.cfg.align.pad)
        ctr_k = ctx.all_centers[ctx.chunk][k]
        if ctx.fast:
            idx = np.flatnonzero(k)
            h, w = (s.stop - s.start for s in ctx.region)
            view = ctx.coadder.slot(len(idx), (len(ctx.fields), h, w))
            align_into(ctx.data, ctr_k, crop, pad, ctx.region, view, frames=idx)
            err = ctx.err
            if ctx.deferred:
                err = FrameVariance(ctx.data, ctx.calib, None if ctx.bad_err is None else ctx.bad_err[ctx.chunk])
            var_sum = variance_sum_nearest(err, ctr_k, crop, pad, ctx.region, frames=idx)
            ctx.pending = (view, None, var_sum)
            return
        d4, e4 = align_cube(ctx.data[k], ctx.err[k], ctr_k, crop, pad)
        ctx.pending = (d4, e4, None)
        if ctx.need_aligned:
            ctx.aligned.append((d4, e4))


class Coadd(Stage):
    """Accumulate the chunk's aligned frames (docs/instrument.md §6)."""

    name = "coadd"

    def run(self, ctx: FileContext) -> None:
        if ctx.pending is None:
            return
        d4, e4, var_sum = ctx.pending
        ctx.pending = None
        if var_sum is not None:
            ctx.coadder.add(d4, var_sum=var_sum)
        else:
            ctx.coadder.add(d4, e4)


# ----------------------------------------------------------------------------------------------
# products


class OutputHeader(Stage):
    """WCS, provenance and alignment cards of the products; the cam2 → cam1 reprojection (docs/instrument.md §5.6)."""

    name = "write"

    def run(self, ctx: FileContext) -> None:

        cfg = ctx.cfg
        hdr = apply_wcs(ctx.cal_header, float(ctx.cal_header.get("DEROTANG", 0.0)))
        provenance(hdr, cfg)
        hdr, _ = align_header(hdr, cfg.align.method if cfg.align.align else None, [], copy=False)
        if cfg.align.reproject and int(ctx.header["U_CAMERA"]) == 2:
            reproj = reprojection(cfg, ctx.header, ctx.outdir, ctx.shape[1:], ctx.fields)
            if isinstance(reproj, str):
                log.warning("%s: align.reproject skipped: %s", Path(ctx.path).name, reproj)
                hdr["HIERARCH DPP ALIGN REPROJ"] = ("skipped", "no usable centroid files")
                ctx.info["reproject_skipped"] = reproj
            else:
                ctx.reproj = reproj
                hdr["HIERARCH DPP ALIGN REPROJ"] = ("cam2->cam1", "similarity from centroid files")
                hdr["HIERARCH DPP ALIGN REPROJ ANG"] = (float(reproj[0][0]), "[deg] rotation (field 1)")
                hdr["HIERARCH DPP ALIGN REPROJ SCALE"] = (float(reproj[1][0]), "scale (field 1)")
        ctx.out_header = hdr


class WriteCalibrated(Stage):
    """The ``calibrated`` intermediate product (docs/instrument.md §2.7)."""

    name = "write"

    def run(self, ctx: FileContext) -> None:
        d = np.concatenate([c[0] for c in ctx.calibrated])
        e = np.concatenate([c[1] for c in ctx.calibrated])
        ctx.calibrated = []
        write_product(ctx.paths["calibrated"], d, e, ctx.cal_header, [], sync_dir=ctx.limits.sync_dirs)
        ctx.products.append(("calibrated", str(ctx.paths["calibrated"])))


class WriteAligned(Stage):
    """The ``aligned`` and ``selected`` products (reprojected for camera 2 when asked)."""

    name = "write"

    def run(self, ctx: FileContext) -> None:
        if not ctx.aligned:
            return
        cfg, fs = ctx.cfg, ctx.cfg.frame_select
        d4 = np.concatenate([a[0] for a in ctx.aligned])
        e4 = np.concatenate([a[1] for a in ctx.aligned])
        ctx.aligned = []
        if ctx.reproj is not None:
            d4, e4 = reproject_cam2(d4, e4, ctx.reproj[0], ctx.reproj[1])
        kinds = []
        if cfg.align.save_intermediate or not cfg.coadd.coadd or pdi_blocks(cfg):
            kinds.append("aligned")
        if fs.frame_select and fs.save_intermediate:
            kinds.append("selected")
        for kind in kinds:
            write_product(ctx.paths[kind], d4, e4, ctx.out_header, ctx.fields, sync_dir=ctx.limits.sync_dirs)
            ctx.products.append((kind, str(ctx.paths[kind])))


class FinishCoadd(Stage):
    """Collapse, recentre (docs/instrument.md §6.3), reproject and write the ``coadded`` product."""

    name = "coadd"

    def run(self, ctx: FileContext) -> None:
        cfg = ctx.cfg
        image, err, ncoadd = ctx.coadder.result()
        if ctx.fast:  # back to the full aligned frame: NaN outside the data region
            size = aligned_size(int(cfg.align.crop_width), bool(cfg.align.pad))
            full = np.full((2, len(ctx.fields), size, size), np.nan, np.float32)
            full[0][:, ctx.region[0], ctx.region[1]] = image
            full[1][:, ctx.region[0], ctx.region[1]] = err
            image, err = full[0], full[1]
        hdr = coadd_header(
            ctx.out_header,
            cfg.coadd.method,
            ncoadd,
            float(ctx.header["EXPTIME"]),
            selection=ctx.selection,
            recenter_method=cfg.coadd.recenter_method if cfg.coadd.recenter else None,
            calib_files={
                "BACKFILE": ctx.back.name if ctx.back else None,
                "FLATFILE": ctx.flat.name if ctx.flat else None,
            },
            config_hash=cfg.config_hash(),
            copy=False,  # out_header is not used after this
        )
        if cfg.coadd.recenter:
            ws = int(cfg.analysis.window_size)
            shifts = []
            for j, f in enumerate(ctx.fields):
                psf = ctx.psfs[f] if ctx.psfs else None
                image[j], err[j], (dy, dx) = recenter(image[j], err[j], cfg.coadd.recenter_method, ws, psf=psf)
                shifts.append((float(dy[0]), float(dx[0])))
            hdr = recenter_header(hdr, cfg.coadd.recenter_method, shifts[0][0], shifts[0][1], copy=False)
            ctx.info["recenter_shift"] = shifts
        if ctx.reproj is not None:
            # the warp is linear and about the frame centre, where the PSF now sits: applied
            # once to the coadd instead of to every frame (exact for mean-type coadds)
            image, err = (a[0] for a in reproject_cam2(image[None], err[None], ctx.reproj[0], ctx.reproj[1]))
            ctx.info["reproject"] = [float(ctx.reproj[0][0]), float(ctx.reproj[1][0])]
        write_product(ctx.paths["coadded"], image, err, hdr, ctx.fields, sync_dir=ctx.limits.sync_dirs)
        ctx.products.append(("coadded", str(ctx.paths["coadded"])))
        ctx.coadder.close()


def build_chain(cfg) -> list[Stage]:
    """The stage list for one file under ``cfg`` (stages the config turns off are left out)."""
    fs = cfg.frame_select
    pass2: list[Stage] = [Calibrate(recall=True)]
    if cfg.calibrate.save_intermediate:
        pass2.append(KeepCalibrated())
    pass2.append(Align())
    if cfg.coadd.coadd:
        pass2.append(Coadd())
    chain: list[Stage] = [ChunkPass("measure", [Calibrate(), Analyze()]), SaveMetrics()]
    if fs.frame_select and fs.cutoff > 0:
        chain.append(Select())
    chain += [PlanAlignment(), ChunkPass("combine", pass2), OutputHeader()]
    if cfg.calibrate.save_intermediate:
        chain.append(WriteCalibrated())
    chain.append(WriteAligned())
    if cfg.coadd.coadd:
        chain.append(FinishCoadd())
    return chain

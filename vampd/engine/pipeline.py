"""The one-file pipeline: raw cube → calibrate → analyse → select → align → coadd → products.

``vampd run`` and ``vampd watch`` both call :func:`process_file` (in worker processes); it
returns what the ledger records and never touches the ledger itself. The chain itself is data:
:func:`vampd.engine.chain.build_chain` turns the configuration into a list of stage objects,
:func:`vampd.engine.chain.run_chain` runs and times them. This module is the driver: header
checks, the skip test, calibration masters and PSF models (cached per process, the PSFs also
on disk, :func:`vampd.instrument.pupil.cached_synthetic_psf`), and the result for the ledger.

Memory knobs (read at call time; ``None`` means the environment variable, else the default):
``HOLD_BYTES`` (``VAMPD_HOLD_BYTES``, calibrated bytes held in RAM between the two passes),
``CHUNK_BYTES`` (``VAMPD_CHUNK_BYTES``, target bytes of one raw chunk), ``COADD_RAM_BYTES``
(``VAMPD_COADD_RAM_BYTES``, aligned frames of a median coadd kept in RAM, else a disk store) and
``SYNC_DIRS`` (``VAMPD_SYNC_DIRS``: fsync the product directories too; off, a product is fsynced
before its atomic rename but a power cut right after may lose the rename, and the file is redone).
"""

from __future__ import annotations

import functools
import gc
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from astropy.io import fits

from vampd.config import resolve_data_dir
from vampd.engine.chain import FileContext, Limits, build_chain, run_chain
from vampd.engine.products import expected_products, product_paths
from vampd.fitsio import InputError, read_header
from vampd.instrument.angles import update_angles
from vampd.instrument.detectors import detector_from_header
from vampd.instrument.fields import field_names
from vampd.instrument.headers import HeaderError, fix_header, header_summary, missing_keywords
from vampd.instrument.pupil import cached_synthetic_psf, psf_cache_dir
from vampd.stages.calibfiles import CalibLibrary, load_master

log = logging.getLogger(__name__)

__all__ = ["FileResult", "process_file", "prepare_header", "product_paths", "expected_products"]

HOLD_BYTES: int | None = None
CHUNK_BYTES: int | None = None
COADD_RAM_BYTES: int | None = None
SYNC_DIRS: bool | None = None


def limits() -> Limits:
    """The memory/durability knobs now: module attribute if set, else environment, else default."""

    def knob(value, env, default):
        return int(value) if value is not None else int(os.environ.get(env, default))

    sync = SYNC_DIRS
    if sync is None:
        sync = os.environ.get("VAMPD_SYNC_DIRS", "0") not in ("", "0", "false", "no")
    return Limits(
        hold_bytes=knob(HOLD_BYTES, "VAMPD_HOLD_BYTES", 1_500_000_000),
        chunk_bytes=knob(CHUNK_BYTES, "VAMPD_CHUNK_BYTES", 64_000_000),
        coadd_ram_bytes=knob(COADD_RAM_BYTES, "VAMPD_COADD_RAM_BYTES", 512_000_000),
        sync_dirs=bool(sync),
    )


@dataclass
class FileResult:
    """What one processed file gives the ledger."""

    path: str
    products: list[tuple[str, str]] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    skipped: bool = False


@functools.lru_cache(maxsize=2)
def _library_index(directory: str, stamp: float) -> CalibLibrary:
    return CalibLibrary.index(Path(directory))


def _library(directory: Path | None) -> CalibLibrary | None:
    """The calibration library, re-indexed when the directory changes (masters written at night)."""
    if directory is None:
        return None
    directory = Path(directory)
    if not directory.is_dir():
        raise InputError(directory, "calibrate.calib_directory does not exist")
    stamp = max((p.stat().st_mtime for p in [directory, *directory.glob("*")] if p.exists()), default=0.0)
    return _library_index(str(directory), stamp)


def _psfs(cfg, header: fits.Header, fields: list[str], outdir: Path) -> dict[str, np.ndarray] | None:
    """Synthetic PSF per field (docs/instrument.md §3.6), from the per-user disk cache when there (None: planetary)."""
    if cfg.planetary:
        return None
    data_dir = resolve_data_dir(cfg)  # exact filter curves for the PSF model, else top-hats
    cache = psf_cache_dir(fallback=Path(outdir) / "aux" / "cache")
    npix = int(cfg.analysis.window_size)
    args = (float(header["PXSCALE"]), float(header["INST-PA"]), npix, None if data_dir is None else str(data_dir))
    return {f: cached_synthetic_psf(f, *args, None if cache is None else str(cache)) for f in fields}


def prepare_header(path: str | Path, cfg) -> fits.Header:
    """Read and normalise a raw header; raise a specific error for anything unusable."""
    raw = read_header(path)
    missing = missing_keywords(raw)
    if missing:
        raise HeaderError(missing[0], "missing (required for a raw science file)", path)
    header = fix_header(raw, path)
    return update_angles(header, cfg.target, path=path, copy=False)  # fix_header made a copy


def _chunks(nframes: int, frame_bytes: int, chunk_bytes: int) -> list[slice]:
    step = max(1, min(nframes, chunk_bytes // max(frame_bytes, 1)))
    return [slice(i, min(i + step, nframes)) for i in range(0, nframes, step)]


def _context(path: str, cfg, outdir: Path, header: fits.Header, paths: dict) -> FileContext:
    """Check a science header and gather what the stages need (shape, fields, masters, PSFs)."""
    datatype = str(header.get("DATA-TYP", "OBJECT")).upper()
    if datatype not in ("OBJECT", "ACQUISITION", "TEST"):
        raise InputError(
            path, f"DATA-TYP = {datatype!r} is a calibration frame, not science; build masters with `vampd calib`"
        )
    detector_from_header(header, path)  # fail early on an unknown detector
    nframes = int(header["NAXIS3"]) if int(header.get("NAXIS", 0)) == 3 else 1
    ny, nx = int(header["NAXIS2"]), int(header["NAXIS1"])
    fields = field_names(header, path)
    lim = limits()
    ctx = FileContext(path, cfg, outdir, header, paths, fields, (nframes, ny, nx), lim)
    lib = _library(cfg.calibrate.calib_directory) if cfg.calibrate.calib_directory else None
    if lib is not None:
        if cfg.calibrate.back_subtract:
            entry = lib.match_background(header)
            ctx.back = load_master(entry) if entry is not None else None
        if cfg.calibrate.flat_correct:
            entry = lib.match_flat(header)
            ctx.flat = load_master(entry) if entry is not None else None
    ctx.psfs = _psfs(cfg, header, fields, outdir)
    ctx.chunks = _chunks(nframes, ny * nx * 2, lim.chunk_bytes)
    ctx.hold = nframes * ny * nx * 8 <= lim.hold_bytes
    return ctx


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
    if "nsat" in metrics:  # frames with a saturated PSF core (any field or PSF)
        out["nsat"] = int(np.count_nonzero(np.asarray(metrics["nsat"]).max(axis=(0, 1)) > 0))
    return out


def warm_up() -> None:
    """Per-process start-up work that every first file would otherwise pay (worker initializer).

    Loads the IERS table (from the per-user cache, :mod:`vampd._offline`) and reads astropy's
    configuration once, then freezes the objects made so far out of the garbage collector's
    reach; nothing file- or config-specific.
    """
    from vampd._offline import configure_offline
    from vampd.instrument.angles import local_sidereal_hours

    configure_offline()
    local_sidereal_hours(np.array([60000.0]))  # astropy Time machinery and erfa, once
    _warm_coordinates()
    fits.Card("DUMMY", 1.0).value  # noqa: B018 -- astropy.io.fits reads its configuration
    # first calls of the numeric kernels (BLAS buffers, FFT plans, sort): not on the first file
    a = np.ones((4, 16, 23), np.float32)
    np.matmul(a, np.ones((4, 23, 16), np.float32))
    np.fft.irfft2(np.fft.rfft2(a))
    np.sort(a, axis=-1)
    # the imports left ~10^6 long-lived objects: frozen, the collector's first full pass (~35 ms,
    # on the first file otherwise) and every later one skip them
    gc.freeze()


def _warm_coordinates() -> None:
    """First use of what ``update_angles`` needs per file: a SkyCoord, a proper-motion
    propagation (frame transforms, erfa) and formatting."""
    import warnings

    import astropy.units as u
    from astropy.coordinates import SkyCoord
    from astropy.time import Time

    from vampd.instrument.headers import sexagesimal_deg

    c = SkyCoord(
        sexagesimal_deg("05:30:00.000", hours=True),
        sexagesimal_deg("+25:00:00.00", hours=False),
        unit=u.deg,
        frame="icrs",
        pm_ra_cosdec=1.0 * u.mas / u.yr,
        pm_dec=1.0 * u.mas / u.yr,
        obstime=Time("J2016"),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        c = c.apply_space_motion(new_obstime=Time(60000.0, format="mjd", scale="utc"))
    c.ra.to_string(unit=u.hourangle, sep=":", precision=3, pad=True)
    c.dec.to_string(unit=u.deg, sep=":", precision=2, alwayssign=True, pad=True)


def process_file(path: str | Path, cfg, outdir: str | Path, force: bool = False) -> FileResult:
    """Reduce one raw file to its per-file products (docs/instrument.md §2–§6) and return what to record.

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
    t0, c0 = time.perf_counter(), time.thread_time()
    path = str(path)
    outdir = Path(outdir)
    header = prepare_header(path, cfg)
    summary = header_summary(header)
    paths = product_paths(cfg, outdir, path)
    kinds = expected_products(cfg)
    if not force and all(paths[k].exists() and paths[k].stat().st_mtime >= os.stat(path).st_mtime for k in kinds):
        return FileResult(path, [(k, str(paths[k])) for k in kinds], summary, {}, skipped=True)
    ctx = _context(path, cfg, outdir, header, paths)
    ctx.timing["setup"] = time.perf_counter() - t0
    ctx.cpu["setup"] = time.thread_time() - c0
    run_chain(build_chain(cfg), ctx)
    qm = _summary_metrics(ctx.metrics, ctx.keep, ctx.centers[ctx.fields[0]][0])
    if qm.get("nsat"):
        log.warning("%s: saturated PSF core in %d of %d frames", Path(path).name, qm["nsat"], qm["nframes"])
    qm.update(ctx.info)
    qm["timing"] = dict(ctx.timing, total=time.perf_counter() - t0)
    qm["cpu"] = ctx.cpu
    return FileResult(path, ctx.products, summary, qm)

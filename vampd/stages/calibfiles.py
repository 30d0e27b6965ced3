"""Calibration library: index of master backgrounds/flats, matching (docs/instrument.md §2.2),
loading, and building masters from raw darks and flats (docs/instrument.md §2.3, §2.4).

vampd decisions on top of the reference (docs/instrument.md §13.16):

* ``*.fits`` **and** ``*.fits.fz`` are indexed (dot-files and dot-directories skipped).
* Hard requirements: same crop (``PRD-MIN1/2``, ``PRD-RNG1/2``), same camera and same
  readout (CMOS ``U_DETMOD``; EMCCD EM gain ``U_EMGAIN``). The reference treated readout
  as a preference; its docs say it must match, and a background of the wrong mode is wrong.
* Background preferences: ``|ΔEXPTIME| < 0.1 s``, then nearest MJD.
* Flat preferences: ``FILTER01``, then ``FILTER02``, then ``|ΔEXPTIME| < 0.1 s`` (each
  applied only if it leaves a candidate), then nearest MJD.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from astropy.io import fits
from scipy import ndimage

from vampd.fitsio import InputError, output_stem, read_cube, read_header, write_fits_atomic
from vampd.instrument.headers import fix_header
from vampd.stages.badpix import bad_pixel_mask
from vampd.stages.calibrate import (
    FLAT_MIN,
    CalibFrame,
    CalibrationError,
    _key,
    read_noise_adu,
    saturation_level,
)

__all__ = [
    "CalibEntry",
    "CalibLibrary",
    "readout_key",
    "crop_key",
    "load_master",
    "collapse_frames",
    "make_background",
    "make_flat",
    "find_fields",
    "master_hdulist",
    "build_masters",
    "EXPTIME_TOL",
    "BACKGROUND_TYPES",
    "FLAT_TYPES",
]

log = logging.getLogger(__name__)

#: Exposure times closer than this [s] count as "the same".
EXPTIME_TOL = 0.1
#: DATA-TYP values turned into master backgrounds / flats by :func:`build_masters`.
BACKGROUND_TYPES = ("DARK", "SKYFLAT")
FLAT_TYPES = ("FLAT", "DOMEFLAT")
COLLAPSE_METHODS = ("median", "mean", "varmean", "biweight")

_STRUCTURAL = (
    "SIMPLE", "XTENSION", "BITPIX", "NAXIS", "NAXIS1", "NAXIS2", "NAXIS3", "EXTEND", "PCOUNT",
    "GCOUNT", "BZERO", "BSCALE", "BLANK", "EXTNAME", "CHECKSUM", "DATASUM",
)  # fmt: skip


# ---------------------------------------------------------------------------------------
# keys


def readout_key(header: fits.Header) -> str:
    """Readout configuration that must match: ``"emgain=300"`` (EMCCD) or ``"fast"``/``"slow"``."""
    if "U_EMGAIN" in header:
        return f"emgain={float(header['U_EMGAIN']):g}"
    if "U_DETMOD" in header:
        return str(header["U_DETMOD"]).strip().lower()
    return "unknown"


def crop_key(header: fits.Header) -> tuple:
    """Detector crop ``(PRD-MIN1, PRD-MIN2, PRD-RNG1, PRD-RNG2)``; ``("shape", NAXIS1, NAXIS2)``
    when the header has no ``PRD-*`` keys."""
    keys = ("PRD-MIN1", "PRD-MIN2", "PRD-RNG1", "PRD-RNG2")
    if all(k in header for k in keys):
        return tuple(int(round(float(header[k]))) for k in keys)
    return ("shape", int(header.get("NAXIS1", -1)), int(header.get("NAXIS2", -1)))


def _float(header, key, default=math.nan) -> float:
    try:
        return float(header[key])
    except (KeyError, TypeError, ValueError):
        return default


@dataclass(frozen=True)
class CalibEntry:
    """One master calibration file in the library (header facts only)."""

    path: Path
    caltype: str
    crop: tuple
    camera: int
    readout: str
    exptime: float
    filter01: str
    filter02: str
    mjd: float
    mtime_ns: int
    header: fits.Header = field(compare=False, repr=False)

    @classmethod
    def from_header(cls, path: Path, header: fits.Header, mtime_ns: int = 0) -> CalibEntry:
        return cls(
            path=Path(path),
            caltype=str(header.get("CALTYPE", "")).strip().upper(),
            crop=crop_key(header),
            camera=int(_float(header, "U_CAMERA", 0)),
            readout=readout_key(header),
            exptime=_float(header, "EXPTIME"),
            filter01=str(header.get("FILTER01", "")).strip(),
            filter02=str(header.get("FILTER02", "")).strip(),
            mjd=_float(header, "MJD"),
            mtime_ns=mtime_ns,
            header=header,
        )


def _scan(directory: Path) -> list[Path]:
    """``*.fits`` and ``*.fits.fz`` under ``directory`` (recursive), skipping dot-names."""
    found = []
    for root, dirs, files in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith("."):
                continue
            if name.endswith(".fits") or name.endswith(".fits.fz"):
                found.append(Path(root) / name)
    return found


def _prefer(cands: list[CalibEntry], keep) -> list[CalibEntry]:
    """Soft preference: apply the filter only if something survives it."""
    kept = [c for c in cands if keep(c)]
    return kept if kept else cands


def _nearest(cands: list[CalibEntry], mjd: float) -> CalibEntry | None:
    if not cands:
        return None

    def dist(c):
        d = abs(c.mjd - mjd)
        return (d if math.isfinite(d) else math.inf, str(c.path))

    return min(cands, key=dist)


class CalibLibrary:
    """Index of the master calibration files under a directory (headers only).

    Build with :meth:`index`; re-scan cheaply (only new or modified files are read) with
    :meth:`refresh`. Files that cannot be read or normalised are listed in ``skipped``
    as ``(path, reason)``; files without ``CALTYPE`` (raw darks/flats) are ignored.
    """

    def __init__(self, directory: os.PathLike | str | None = None, entries: list[CalibEntry] | None = None):
        self.directory = None if directory is None else Path(directory)
        self.entries: list[CalibEntry] = list(entries or [])
        self.skipped: list[tuple[Path, str]] = []
        self._seen: dict[Path, int] = {e.path: e.mtime_ns for e in self.entries}

    def __len__(self) -> int:
        return len(self.entries)

    def __repr__(self) -> str:
        return f"CalibLibrary({str(self.directory)!r}, {len(self.entries)} entries)"

    @classmethod
    def index(cls, directory: os.PathLike | str) -> CalibLibrary:
        """Scan ``directory`` recursively once and read the headers of its masters.

        Raises
        ------
        CalibrationError
            If the directory does not exist (``calibrate.calib_directory``).
        """
        directory = Path(directory)
        if not directory.is_dir():
            raise CalibrationError("calibrate.calib_directory", f"{str(directory)!r} is not an existing directory")
        lib = cls(directory)
        lib.refresh()
        return lib

    def refresh(self) -> int:
        """Re-scan the directory; read only files that are new or changed. Returns how many."""
        if self.directory is None:
            return 0
        present = _scan(self.directory)
        present_set = set(present)
        self.entries = [e for e in self.entries if e.path in present_set]
        self._seen = {p: m for p, m in self._seen.items() if p in present_set}
        self.skipped = [(p, r) for p, r in self.skipped if p in present_set]
        nread = 0
        for path in present:
            try:
                mtime = path.stat().st_mtime_ns
            except FileNotFoundError:
                continue
            if self._seen.get(path) == mtime:
                continue
            self._seen[path] = mtime
            self.entries = [e for e in self.entries if e.path != path]
            self.skipped = [(p, r) for p, r in self.skipped if p != path]
            nread += 1
            try:
                header = fix_header(read_header(path), path)
            except ValueError as exc:  # InputError, HeaderError
                self.skipped.append((path, str(exc)))
                log.warning("calibration library: skipping %s (%s)", path, exc)
                continue
            entry = CalibEntry.from_header(path, header, mtime)
            if entry.caltype in ("BACKGROUND", "FLAT"):
                self.entries.append(entry)
        self.entries.sort(key=lambda e: str(e.path))
        return nread

    def _hard(self, header: fits.Header, caltype: str) -> list[CalibEntry]:
        crop = crop_key(header)
        cam = int(_float(header, "U_CAMERA", 0))
        readout = readout_key(header)
        return [
            e
            for e in self.entries
            if e.caltype == caltype and e.crop == crop and e.camera == cam and e.readout == readout
        ]

    def match_background(self, header: fits.Header) -> CalibEntry | None:
        """Best master background for a normalised science header, or None (docs/instrument.md §2.2)."""
        cands = self._hard(header, "BACKGROUND")
        exptime = _float(header, "EXPTIME")
        cands = _prefer(cands, lambda c: abs(c.exptime - exptime) < EXPTIME_TOL)
        return _nearest(cands, _float(header, "MJD"))

    def match_flat(self, header: fits.Header) -> CalibEntry | None:
        """Best flat for a normalised science header, or None (docs/instrument.md §2.2)."""
        cands = self._hard(header, "FLAT")
        f1 = str(header.get("FILTER01", "")).strip()
        f2 = str(header.get("FILTER02", "")).strip()
        exptime = _float(header, "EXPTIME")
        cands = _prefer(cands, lambda c: c.filter01 == f1)
        cands = _prefer(cands, lambda c: c.filter02 == f2)
        cands = _prefer(cands, lambda c: abs(c.exptime - exptime) < EXPTIME_TOL)
        return _nearest(cands, _float(header, "MJD"))


# ---------------------------------------------------------------------------------------
# loading


@functools.lru_cache(maxsize=32)
def _read_master(path: Path, mtime_ns: int = 0) -> CalibFrame:
    """One master, cached by (path, modification time): a rewritten master is read again."""
    from vampd.fitsio import data_hdu_index

    try:
        with fits.open(path, memmap=False) as hdul:
            idx = data_hdu_index(path)
            header = hdul[idx].header.copy()
            data = np.array(hdul[idx].data, dtype=np.float32)
            names = [h.name.upper() for h in hdul]
            if "ERR" not in names:
                raise InputError(path, "master has no ERR extension")
            err = np.array(hdul["ERR"].data, dtype=np.float32)
            badpix = np.array(hdul["BADPIX"].data, dtype=bool) if "BADPIX" in names else None
    except InputError:
        raise
    except (OSError, IndexError, KeyError, TypeError, ValueError) as exc:
        raise InputError(path, f"cannot read calibration master ({exc})") from exc
    return CalibFrame(data, err, header, path, badpix)


def load_master(entry: CalibEntry | os.PathLike | str) -> CalibFrame:
    """Load a master (PRIMARY data, ``ERR``, optional ``BADPIX``) as a :class:`CalibFrame`.

    Cached by (path, modification time): masters are small and reused for every file.
    """
    path = entry.path if isinstance(entry, CalibEntry) else Path(entry)
    return _read_master(path, path.stat().st_mtime_ns)


# ---------------------------------------------------------------------------------------
# building masters


def collapse_frames(cube: np.ndarray, method: str = "median") -> np.ndarray:
    """Collapse a cube along axis 0, NaN-ignoring (docs/instrument.md §6 methods).

    ``median``, ``mean``, ``varmean`` (weights 1 / variance of each frame) or ``biweight``
    (biweight location, c = 6). Returns float32.
    """
    cube = np.asarray(cube, dtype=np.float32)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN pixels stay NaN
        if method == "median":
            out = np.nanmedian(cube, axis=0)
        elif method == "mean":
            out = np.nanmean(cube, axis=0)
        elif method == "varmean":
            var = np.nanvar(cube, axis=(-2, -1), keepdims=True, dtype=np.float64)
            w = np.where(var > 0, 1.0 / var, 0.0) * np.isfinite(cube)
            out = np.nansum(cube * w, axis=0) / np.sum(w, axis=0)
        elif method == "biweight":
            from astropy.stats import biweight_location

            out = biweight_location(cube, c=6.0, axis=0, ignore_nan=True)
        else:
            raise CalibrationError(
                "method", f"collapse method {method!r}, expected one of {', '.join(COLLAPSE_METHODS)}"
            )
    return np.asarray(out, dtype=np.float32)


def _master_header(header: fits.Header, caltype: str, method: str, nframes: int) -> fits.Header:
    hdr = header.copy()
    for key in _STRUCTURAL:
        hdr.remove(key, ignore_missing=True, remove_all=True)
    hdr["CALTYPE"] = (caltype, "calibration file type")
    hdr["HIERARCH DPP COL METH"] = (method, "collapse method")
    hdr["HIERARCH DPP NCOADD"] = (int(nframes), "number of frames collapsed")
    return hdr


def _to_float_masked(raw: np.ndarray, header: fits.Header, path=None) -> np.ndarray:
    raw = np.asarray(raw)
    if raw.ndim == 2:
        raw = raw[None]
    cube = raw.astype(np.float32)
    with np.errstate(invalid="ignore"):
        cube[raw >= saturation_level(header, path)] = np.nan
    return cube


def _fallback_background_sigma(header: fits.Header, path=None) -> float:
    """Single-frame background error [adu]: dark-current shot noise + read noise (docs/instrument.md §2.3, §13.24)."""
    effgain = _key(header, "EFFGAIN", path)
    dark_e = _key(header, "DC", path) * _key(header, "EXPTIME", path) * _key(header, "ENF", path) ** 2
    return math.sqrt(dark_e / effgain**2 + read_noise_adu(header, path) ** 2)


def make_background(
    raw_cube: np.ndarray, header: fits.Header, method: str = "median", path=None
) -> tuple[np.ndarray, np.ndarray, fits.Header]:
    """Master background from one raw dark (or sky) cube (docs/instrument.md §2.3).

    Parameters
    ----------
    raw_cube : ndarray (nframes, ny, nx)
        Raw frames (saturated pixels are ignored).
    header : astropy.io.fits.Header
        Normalised header of the input.
    method : str
        Collapse method (:func:`collapse_frames`).

    Returns
    -------
    master, err : ndarray float32 (ny, nx)
        Background [adu] and its error ``hypot(std, std / sqrt(N))`` — the spread of one
        frame (its read noise) plus the master's own uncertainty; for a single frame
        ``sqrt(DC t ENF^2 / EFFGAIN^2 + (RN / GAIN)^2)`` everywhere.
    header : astropy.io.fits.Header
        ``CALTYPE = "BACKGROUND"``, ``NOISEADU`` = sqrt(mean std^2) [adu], ``NOISE`` [e-],
        ``NBADPIX`` (pixels flagged by the adaptive clip; they are *not* NaN-ed — the mask
        goes into the ``BADPIX`` extension written by :func:`master_hdulist`), ``BUNIT``.
    """
    cube = _to_float_masked(raw_cube, header, path)
    n = cube.shape[0]
    master = collapse_frames(cube, method)
    if n > 1:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            std = np.nanstd(cube, axis=0, dtype=np.float64).astype(np.float32)
            noise_adu = float(np.sqrt(np.nanmean(np.square(std, dtype=np.float64))))
        err = np.hypot(std, std / np.float32(math.sqrt(n))).astype(np.float32)
    else:
        sigma = _fallback_background_sigma(header, path)
        err = np.full(master.shape, sigma, np.float32)
        noise_adu = sigma
    hdr = _master_header(header, "BACKGROUND", method, n)
    hdr["NOISEADU"] = (noise_adu, "[adu] background noise per frame")
    hdr["NOISE"] = (noise_adu * float(header["EFFGAIN"]), "[e-] background noise per frame")
    hdr["NBADPIX"] = (int(bad_pixel_mask(master).sum()), "bad pixels flagged (BADPIX ext.)")
    hdr["BUNIT"] = ("adu", "data unit")
    return master, err, hdr


def find_fields(image: np.ndarray, nfields: int, min_area: int = 100) -> list[tuple[slice, slice]]:
    """Bounding boxes of the ``nfields`` largest illuminated regions of an MBI flat.

    Simplified field finder (the reference fits rotated rectangles): threshold at half the
    99th percentile, binary closing (5x5 without corners), connected components, keep the
    ``nfields`` largest (at least ``min_area`` px). Boxes are returned in label (raster) order.
    """
    img = np.nan_to_num(np.asarray(image, dtype=np.float32), nan=0.0)
    thresh = 0.5 * float(np.percentile(img, 99))
    struct = np.ones((5, 5), bool)
    struct[0, 0] = struct[0, -1] = struct[-1, 0] = struct[-1, -1] = False
    binary = ndimage.binary_closing(img > thresh, structure=struct)
    labels, nlab = ndimage.label(binary)
    if nlab == 0:
        return []
    areas = ndimage.sum_labels(np.ones_like(img), labels, index=np.arange(1, nlab + 1))
    order = [i + 1 for i in np.argsort(areas)[::-1] if areas[i] >= min_area][:nfields]
    boxes = ndimage.find_objects(labels)
    return [boxes[i - 1] for i in sorted(order)]


def _normalise_fields(flat, err, hdr, nfields: int, path):
    """MBI flat: each field (:func:`find_fields`) divided by the median of its central part.

    Writes ``NORMVAL{i}``, ``FIELDX/Y/W/H/TH{i}`` into ``hdr``; zero outside the (padded)
    fields. Returns ``(flat, err, normval)`` with ``normval`` the median of the fields' values.
    """
    boxes = find_fields(flat, nfields)
    if len(boxes) != nfields:
        log.warning("%s: found %d MBI fields, expected %d", path or "flat", len(boxes), nfields)
    normed = np.zeros_like(flat)
    normed_err = np.zeros_like(err)
    normvals = []
    for i, (sy, sx) in enumerate(boxes):
        h, w = sy.stop - sy.start, sx.stop - sx.start
        my, mx = min(25, h // 4), min(25, w // 4)
        centre = flat[sy.start + my : sy.stop - my, sx.start + mx : sx.stop - mx]
        normval = float(np.nanmedian(centre))
        normvals.append(normval)
        # the field's box, padded, divided by its own normalisation
        py = slice(max(sy.start - my, 0), sy.stop + my)
        px = slice(max(sx.start - mx, 0), sx.stop + mx)
        normed[py, px] = flat[py, px] / normval
        normed_err[py, px] = err[py, px] / normval
        hdr[f"NORMVAL{i}"] = (normval, f"[adu] normalisation of field {i}")
        hdr[f"FIELDX{i}"] = (0.5 * (sx.start + sx.stop - 1), f"[px] centre x of field {i}")
        hdr[f"FIELDY{i}"] = (0.5 * (sy.start + sy.stop - 1), f"[px] centre y of field {i}")
        hdr[f"FIELDW{i}"] = (w, f"[px] width of field {i}")
        hdr[f"FIELDH{i}"] = (h, f"[px] height of field {i}")
        hdr[f"FIELDTH{i}"] = (0.0, f"[deg] rotation of field {i}")
    return normed, normed_err, float(np.median(normvals)) if normvals else math.nan


def make_flat(
    raw_cube: np.ndarray,
    header: fits.Header,
    background: CalibFrame | None = None,
    method: str = "median",
    path=None,
) -> tuple[np.ndarray, np.ndarray, fits.Header]:
    """Normalised flat from one raw flat cube (docs/instrument.md §2.4).

    Background: ``background`` (its ERR as sigma_b, ``BACKFILE``) or ``BIAS`` with
    sigma_b = sqrt(DC t ENF^2 / EFFGAIN^2 + (RN / GAIN)^2) (no ``DETGAIN`` needed).
    Per-frame error sqrt(max(D / EFFGAIN, 0) ENF^2 + sigma_b^2), collapsed as the error of
    the mean. Normalisation: non-MBI by the median (``NORMVAL``); MBI (``"MBI" in OBS-MOD``)
    per field (:func:`find_fields`) by the median of its central part (``NORMVAL{i}``,
    ``FIELDX/Y/W/H{i}``; ``NORMVAL`` = median of those), zero outside the fields. Finally
    flat < 0.2 or non-finite → NaN in the flat *and* its error.
    """
    cube = _to_float_masked(raw_cube, header, path)
    n = cube.shape[0]
    if background is not None:
        if background.data.shape != cube.shape[1:]:
            raise CalibrationError(
                "BACKFILE", f"background shape {background.data.shape} does not match {cube.shape[1:]}", path
            )
        cube -= background.data
        var_b = np.square(background.err)
    else:
        cube -= np.float32(_key(header, "BIAS", path))
        var_b = np.float32(_fallback_background_sigma(header, path) ** 2)
    effgain = _key(header, "EFFGAIN", path)
    k = _key(header, "ENF", path) ** 2 / effgain
    finite = np.isfinite(cube)
    nvalid = finite.sum(axis=0)
    # sum over frames of the per-frame variance, without an error cube in memory
    var_sum = k * np.nansum(np.maximum(cube, 0), axis=0) + nvalid * var_b
    flat = collapse_frames(cube, method)
    with np.errstate(invalid="ignore", divide="ignore"):
        err = (np.sqrt(var_sum) / nvalid).astype(np.float32)
    hdr = _master_header(header, "FLAT", method, n)
    if background is not None:
        hdr["BACKFILE"] = (background.name, "master background file")

    obsmod = str(header.get("OBS-MOD", ""))
    if "MBI" in obsmod:
        flat, err, normval = _normalise_fields(flat, err, hdr, 3 if obsmod.endswith("MBIR") else 4, path)
    else:
        normval = float(np.nanmedian(flat))
        flat = flat / np.float32(normval)
        err = err / np.float32(normval)
    hdr["NORMVAL"] = (normval, "[adu] flat normalisation value")
    with np.errstate(invalid="ignore"):
        bad = ~(np.isfinite(flat) & (flat >= FLAT_MIN))
    flat = flat.astype(np.float32)
    err = err.astype(np.float32)
    flat[bad] = np.nan
    err[bad] = np.nan  # the reference left these finite (docs/instrument.md §2.4)
    hdr["BUNIT"] = ("", "data unit")
    return flat, err, hdr


def master_hdulist(
    data: np.ndarray, err: np.ndarray, header: fits.Header, badpix: np.ndarray | None = None
) -> fits.HDUList:
    """PRIMARY (float32 master) + ``ERR`` (+ ``BADPIX`` uint8 when given)."""
    hdus = [
        fits.PrimaryHDU(np.asarray(data, np.float32), header=header),
        fits.ImageHDU(np.asarray(err, np.float32), header=header, name="ERR"),
    ]
    if badpix is not None:
        hdus.append(fits.ImageHDU(np.asarray(badpix, np.uint8), name="BADPIX"))
    return fits.HDUList(hdus)


def _up_to_date(output: Path, inputs: list[Path]) -> bool:
    if not output.exists():
        return False
    out_mtime = output.stat().st_mtime_ns
    return all(p.stat().st_mtime_ns <= out_mtime for p in inputs)


def build_masters(
    files: list[os.PathLike | str],
    outdir: os.PathLike | str,
    method: str = "median",
    force: bool = False,
) -> list[Path]:
    """Build master backgrounds and flats from raw calibration files (docs/instrument.md §2.3, §2.4).

    Inputs are classified by ``DATA-TYP``: ``DARK``/``SKYFLAT`` → ``outdir/background/
    {stem}_coll.fits`` (PRIMARY + ERR + BADPIX); ``FLAT``/``DOMEFLAT`` → ``outdir/flat/
    {stem}_coll.fits`` (PRIMARY + ERR), each flat using the best master background
    (docs/instrument.md §2.2 matching against ``outdir/background``). Backgrounds are built first. Outputs
    newer than their inputs are kept unless ``force``. Other ``DATA-TYP`` values are
    skipped with a log message.

    Returns
    -------
    list of Path
        Every master output (built or already up to date), backgrounds first.
    """
    outdir = Path(outdir)
    backs, flats = [], []
    for f in files:
        path = Path(f)
        header = fix_header(read_header(path), path)
        dtype = str(header.get("DATA-TYP", "")).strip().upper()
        if dtype in BACKGROUND_TYPES:
            backs.append((path, header))
        elif dtype in FLAT_TYPES:
            flats.append((path, header))
        else:
            log.info("build_masters: %s has DATA-TYP %r, not a calibration file; skipped", path, dtype)

    outputs: list[Path] = []
    for path, header in backs:
        out = outdir / "background" / f"{output_stem(path)}_coll.fits"
        outputs.append(out)
        if not force and _up_to_date(out, [path]):
            continue
        raw, _ = read_cube(path)
        master, err, hdr = make_background(raw, header, method, path)
        write_fits_atomic(out, master_hdulist(master, err, hdr, bad_pixel_mask(master)))
        log.info("wrote master background %s", out)

    if flats:
        backdir = outdir / "background"
        library = CalibLibrary.index(backdir) if backdir.is_dir() else CalibLibrary()
        for path, header in flats:
            out = outdir / "flat" / f"{output_stem(path)}_coll.fits"
            outputs.append(out)
            entry = library.match_background(header)
            deps = [path] + ([entry.path] if entry is not None else [])
            if not force and _up_to_date(out, deps):
                continue
            raw, _ = read_cube(path)
            background = load_master(entry) if entry is not None else None
            flat, err, hdr = make_flat(raw, header, background, method, path)
            write_fits_atomic(out, master_hdulist(flat, err, hdr))
            log.info("wrote master flat %s", out)
    return outputs

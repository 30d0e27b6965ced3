"""Calibration of raw cubes (docs/instrument.md §2.1): saturation, background or bias, error,
flat, bad pixels, camera flip, conversion to e-/s.

Everything is done in a few float32 passes over cache-sized blocks of the cube; the
per-pixel constants (background, flat, gain, exposure, flip) are folded into a handful
of 2-D arrays first, so each output pixel costs about ten vectorised operations.

Error model [adu], before the flat (docs/instrument.md §2.1 step 6, with the read-noise fix of §13.24)::

    var = max(D, 0) * ENF**2 / EFFGAIN + sigma_b**2

where ``D`` is the background-subtracted frame and ``sigma_b`` the error of the master
background (its ERR extension, which includes the frame read noise) or, without a master,
the read noise ``RN / GAIN`` [adu]. The flat adds ``(D / F)**2 (sigma_F / F)**2``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from astropy.io import fits

from vampd.imaging import _kernels
from vampd.instrument.detectors import FULLWELL_HALVED_MJD
from vampd.instrument.fields import is_flipped
from vampd.stages.badpix import bad_pixel_mask, isolated_invalid, repair_bad_pixels

__all__ = [
    "CalibrationError",
    "CalibFrame",
    "FLAT_MIN",
    "REQUIRED_KEYS",
    "saturation_level",
    "read_noise_adu",
    "calibration_header",
    "static_bad_pixels",
    "calibrate_cube",
]

#: Flat values below this (or non-finite) are unusable pixels (docs/instrument.md §2.4).
FLAT_MIN = 0.2

#: Keys a normalised header must carry for calibration.
REQUIRED_KEYS = ("BIAS", "GAIN", "EFFGAIN", "ENF", "RN", "FULLWELL", "EXPTIME")

_UINT16_MAX = 65535.0

#: Target number of pixels per processing block: three float32 blocks stay in L2.
_BLOCK_PIXELS = 1 << 16

#: Structural keys that must not travel from a raw (uint16, BZERO) header to float output.
_STRUCTURAL = ("BZERO", "BSCALE", "BLANK", "CHECKSUM", "DATASUM")


class CalibrationError(ValueError):
    """Calibration cannot proceed; names the file (if known), the keyword, value and expectation."""

    def __init__(self, keyword: str, problem: str, path: str | Path | None = None):
        self.keyword = keyword
        self.problem = problem
        self.path = None if path is None else str(path)
        where = f"{self.path}: " if self.path else ""
        super().__init__(f"{where}{keyword}: {problem}")


def _as_image(a, what: str, path) -> np.ndarray:
    a = np.asarray(a, dtype=np.float32)
    if a.ndim == 3 and a.shape[0] == 1:
        a = a[0]
    if a.ndim != 2:
        raise CalibrationError(what, f"expected a 2-D image (or one-frame cube), got shape {a.shape}", path)
    return np.ascontiguousarray(a)


@dataclass
class CalibFrame:
    """A master calibration frame (background or flat) in raw orientation.

    Attributes
    ----------
    data : ndarray float32 (ny, nx)
        Background [adu] or normalised flat. A ``(1, ny, nx)`` cube is accepted and squeezed.
    err : ndarray float32 (ny, nx)
        1-sigma error of ``data`` (same units).
    header : astropy.io.fits.Header
        The master's header (``CALTYPE``, ``NOISEADU``, ``NORMVAL``, ...).
    path : Path, optional
        Where it was read from; its basename goes into ``BACKFILE`` / ``FLATFILE``.
    badpix : ndarray of bool (ny, nx), optional
        Static bad pixels (the master's ``BADPIX`` extension). Computed on first use by
        :func:`static_bad_pixels` when absent and cached here.
    """

    data: np.ndarray
    err: np.ndarray
    header: fits.Header = field(default_factory=fits.Header)
    path: Path | None = None
    badpix: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.data = _as_image(self.data, "data", self.path)
        self.err = _as_image(self.err, "ERR", self.path)
        if self.err.shape != self.data.shape:
            raise CalibrationError(
                "ERR", f"shape {self.err.shape} differs from the data shape {self.data.shape}", self.path
            )
        if self.path is not None:
            self.path = Path(self.path)
        if self.badpix is not None:
            self.badpix = np.asarray(self.badpix, dtype=bool)
            if self.badpix.ndim == 3 and self.badpix.shape[0] == 1:
                self.badpix = self.badpix[0]
            if self.badpix.shape != self.data.shape:
                raise CalibrationError(
                    "BADPIX", f"shape {self.badpix.shape} differs from the data shape {self.data.shape}", self.path
                )

    @property
    def name(self) -> str:
        """Basename of the file, or ``""`` for an in-memory master."""
        return self.path.name if self.path is not None else ""


def _key(header: fits.Header, key: str, path=None) -> float:
    if key not in header:
        raise CalibrationError(key, "missing from the header; was it normalised with fix_header?", path)
    try:
        value = float(header[key])
    except (TypeError, ValueError):
        raise CalibrationError(key, f"value {header[key]!r}, expected a number", path) from None
    if not np.isfinite(value):
        raise CalibrationError(key, f"value {value!r}, expected a finite number", path)
    return value


def saturation_level(header: fits.Header, path=None) -> float:
    """Raw level [adu] at or above which a pixel is saturated: ``min(BIAS + FULLWELL / GAIN, 65535)``.

    The full well holds the signal above the bias, so a pixel is full at ``BIAS + FULLWELL /
    GAIN`` raw adu; the 16-bit converter clips at 65535 first on the CMOS (7000 e- at
    0.103 e-/adu is above its range), so every clipped pixel is caught. The reference's
    ``FULLWELL / GAIN`` = 65536 adu can never be reached (docs/instrument.md §13.4). In the June–July 2023
    window (``FULLWELL`` halved) the files were written with a 2¹⁵ limit: the level is then
    ``FULLWELL / GAIN`` = 32768 adu, the written limit.
    """
    fullwell_adu = _key(header, "FULLWELL", path) / _key(header, "GAIN", path)
    mjd = header.get("MJD")
    lo, hi = FULLWELL_HALVED_MJD
    if isinstance(mjd, (int, float)) and lo < float(mjd) < hi and "U_EMGAIN" not in header:
        return min(fullwell_adu, _UINT16_MAX)
    return min(_key(header, "BIAS", path) + fullwell_adu, _UINT16_MAX)


def read_noise_adu(header: fits.Header, path=None) -> float:
    """Read noise of one frame [adu]: ``RN / GAIN``.

    ``RN`` is the amplifier read noise in electrons at the output, so it converts with the
    conversion gain ``GAIN``. For CMOS and conventional-mode EMCCD this equals
    ``RN / EFFGAIN``; for EM-mode EMCCD (89 e-, 4.5 e-/adu) it is 19.8 adu, equal to the
    input-referred ``(RN / EMGAIN) / EFFGAIN`` of the reference's flat fallback.
    """
    return _key(header, "RN", path) / _key(header, "GAIN", path)


def _flipped(header: fits.Header, path=None) -> bool:
    """Whether this camera's frames are flipped along y (docs/instrument.md §1.4), as ``instrument.fields``."""
    try:
        return bool(is_flipped(header, path))
    except ValueError as exc:  # HeaderError: missing/invalid U_CAMERA or MJD
        raise CalibrationError(
            getattr(exc, "keyword", "U_CAMERA/MJD"), getattr(exc, "problem", str(exc)), path
        ) from None


def calibration_header(
    header: fits.Header,
    background: CalibFrame | None = None,
    flat: CalibFrame | None = None,
    fix_bad_pixels: bool = False,
    nbad: int = 0,
    path=None,
    copy: bool = True,
) -> fits.Header:
    """Header of calibrated data (docs/instrument.md §1.3 "keys written later"), independent of the pixel data.

    Returns a new header; applying it twice gives the same result, so every chunk of a
    file gets the same header. Writes ``BACKFILE``/``NOISEADU``/``NOISE`` (from the master,
    or the read noise when only ``BIAS`` was subtracted), ``FLATFILE``/``NORMVAL`` when a
    flat was used, ``BUNIT = "e-/s"`` and ``DPP CAL BADPIX`` (number of static bad pixels
    repaired per frame) when bad-pixel correction is on. ``copy=False`` updates ``header``
    in place instead.
    """
    hdr = header.copy() if copy else header
    for key in _STRUCTURAL:
        hdr.remove(key, ignore_missing=True, remove_all=True)
    effgain = _key(hdr, "EFFGAIN", path)
    if background is not None:
        hdr["BACKFILE"] = (background.name, "master background file")
        noise_adu = background.header.get("NOISEADU")
        if noise_adu is None:
            noise_adu = float(np.sqrt(np.nanmean(background.err.astype(np.float64) ** 2)))
        noise_adu = float(noise_adu)
    else:
        hdr.remove("BACKFILE", ignore_missing=True)
        noise_adu = read_noise_adu(hdr, path)
    hdr["NOISEADU"] = (noise_adu, "[adu] background noise per frame")
    hdr["NOISE"] = (noise_adu * effgain, "[e-] background noise per frame")
    if flat is not None:
        hdr["FLATFILE"] = (flat.name, "flat-field file")
        if "NORMVAL" in flat.header:
            hdr["NORMVAL"] = (flat.header["NORMVAL"], "flat normalisation value")
    else:
        hdr.remove("FLATFILE", ignore_missing=True)
    if fix_bad_pixels:
        hdr["HIERARCH DPP CAL BADPIX"] = (int(nbad), "static bad pixels repaired per frame")
    hdr["BUNIT"] = ("e-/s", "physical unit of the array values")
    return hdr


def static_bad_pixels(background: CalibFrame | None = None, flat: CalibFrame | None = None) -> np.ndarray | None:
    """Static bad-pixel mask (raw orientation) from the masters, cached on them.

    Hot/dead pixels come from the adaptive sigma clip of the master background (or its
    ``BADPIX`` extension); dead pixels of the flat are its isolated invalid pixels
    (``< FLAT_MIN`` or non-finite but surrounded by valid ones — pixels outside MBI fields
    are not bad pixels). Returns None when there is no master.
    """
    masks = []
    if background is not None:
        if background.badpix is None:
            background.badpix = bad_pixel_mask(background.data)
        masks.append(background.badpix)
    if flat is not None:
        if flat.badpix is None:
            with np.errstate(invalid="ignore"):
                valid = flat.data >= FLAT_MIN
            flat.badpix = isolated_invalid(valid)
        masks.append(flat.badpix)
    if not masks:
        return None
    return np.logical_or.reduce(masks) if len(masks) > 1 else masks[0].copy()


def _check_master(frame: CalibFrame, shape: tuple[int, int], what: str, path) -> None:
    if frame.data.shape != shape:
        where = frame.path if frame.path is not None else path
        raise CalibrationError(what, f"master shape {frame.data.shape} does not match the frame shape {shape}", where)


# ---------------------------------------------------------------------------------------
# calibrate_cube, step by step: per-pixel constants first, then one fused pass per block


@dataclass
class _PixelModel:
    """Per-pixel constants of the calibration: 2-D float32 arrays, or float32 scalars when uniform.

    ``Df = (raw - back) * gain_map`` [e-/s] does background (or bias) subtraction, flat and
    ×EFFGAIN/EXPTIME in one product; ``err**2 = h (c1 + c2 h) + var_c`` with ``h = |Df| + Df``
    (``c2`` is None without a flat: ``c1 h + var_c``). ``badpix``: static bad pixels to repair.
    """

    back: np.ndarray
    gain_map: np.ndarray | np.float32
    c1: np.ndarray | np.float32
    c2: np.ndarray | None
    var_c: np.ndarray
    badpix: np.ndarray | None = None

    def flipped(self) -> _PixelModel:
        """The same constants in flipped (output) orientation; 2-D arrays become contiguous copies."""
        consts = (_flip_rows(a) for a in (self.back, self.gain_map, self.c1, self.c2, self.var_c))
        return _PixelModel(*consts, badpix=None if self.badpix is None else self.badpix[::-1])


def _flip_rows(a):
    return np.ascontiguousarray(a[::-1]) if isinstance(a, np.ndarray) and a.ndim == 2 else a


def _rows(a, rs: slice):
    """Rows ``rs`` of a 2-D constant (scalars pass through)."""
    return a[rs] if isinstance(a, np.ndarray) and a.ndim == 2 else a


def _as_cube(raw, path) -> np.ndarray:
    raw = np.asarray(raw)
    if raw.ndim == 2:
        raw = raw[None]
    if raw.ndim != 3:
        raise CalibrationError("NAXIS", f"expected a (nframes, ny, nx) cube, got shape {raw.shape}", path)
    return raw


def _header_constants(header: fits.Header, path) -> tuple[float, float, float, bool]:
    """``(scale, poisson, satlevel, flip)`` of a normalised header, every required key checked.

    ``scale = EFFGAIN / EXPTIME`` converts adu per frame to e-/s; ``poisson = ENF**2 / EFFGAIN``
    is the Poisson variance [adu²] per adu of signal.
    """
    for key in REQUIRED_KEYS:
        _key(header, key, path)
    effgain = _key(header, "EFFGAIN", path)
    exptime = _key(header, "EXPTIME", path)
    if exptime <= 0:
        raise CalibrationError("EXPTIME", f"value {exptime!r}, expected > 0 s", path)
    enf = _key(header, "ENF", path)
    return effgain / exptime, enf * enf / effgain, saturation_level(header, path), _flipped(header, path)


def _background_terms(header: fits.Header, background: CalibFrame | None, shape, path):
    """Background [adu] to subtract and its variance [adu²]: the master's, else ``BIAS`` and the read noise."""
    if background is not None:
        _check_master(background, shape, "BACKFILE", path)
        return background.data, np.square(background.err)
    return np.float32(_key(header, "BIAS", path)), np.float32(read_noise_adu(header, path) ** 2)


def _flat_terms(flat: CalibFrame, scale: float, poisson: float, var_b, shape, path):
    """``gain_map = scale / F`` (NaN where the flat is unusable) and the error constants ``c1, c2, var_c``."""
    _check_master(flat, shape, "FLATFILE", path)
    f = flat.data
    with np.errstate(invalid="ignore", divide="ignore"):
        good = np.isfinite(f) & (f >= FLAT_MIN)
        gain_map = np.where(good, scale / f, np.nan).astype(np.float32)  # A = s / F
        rel_f2 = np.where(good, np.square(flat.err / f), np.nan).astype(np.float32)  # (sigma_F/F)^2
    c1 = (0.5 * poisson) * gain_map  # variance per unit of (|Df| + Df)
    c2 = (0.25 * rel_f2).astype(np.float32)
    var_c = (var_b * np.square(gain_map)).astype(np.float32)
    return gain_map, c1, c2, var_c


def _pixel_model(header, scale: float, poisson: float, background, flat, shape, path) -> _PixelModel:
    """Fold background (or bias), flat, error model and unit conversion into per-pixel constants."""
    back, var_b = _background_terms(header, background, shape, path)
    if flat is not None:
        gain_map, c1, c2, var_c = _flat_terms(flat, scale, poisson, var_b, shape, path)
    else:
        gain_map = np.float32(scale)
        c1 = np.float32(0.5 * poisson * scale)
        c2 = None
        var_c = (var_b * np.float32(scale * scale)).astype(np.float32)
    return _PixelModel(np.asarray(back, np.float32), gain_map, c1, c2, np.asarray(var_c, np.float32))


def _repair_mask(background, flat, badpix, shape, path) -> np.ndarray | None:
    """Static bad pixels to repair: ``badpix`` if given, else the masters' (:func:`static_bad_pixels`)."""
    mask = static_bad_pixels(background, flat) if badpix is None else np.asarray(badpix, bool)
    if mask is not None and mask.shape != shape:
        raise CalibrationError("BADPIX", f"mask shape {mask.shape} does not match the frame shape {shape}", path)
    return mask


def _output_buffers(raw: np.ndarray, out, path) -> tuple[np.ndarray, np.ndarray]:
    if out is None:
        return np.empty(raw.shape, np.float32), np.empty(raw.shape, np.float32)
    data, err = out
    for name, a in (("data", data), ("err", err)):
        if a.shape != raw.shape or a.dtype != np.float32:
            raise CalibrationError("out", f"{name} buffer {a.shape} {a.dtype}, expected {raw.shape} float32", path)
    return data, err


def _block_steps(ny: int, nx: int) -> tuple[int, int]:
    """Frames and rows per block: about ``_BLOCK_PIXELS``, so three float32 blocks stay in L2."""
    npix = ny * nx
    if npix >= _BLOCK_PIXELS:
        return 1, max(1, _BLOCK_PIXELS // nx)
    return max(1, _BLOCK_PIXELS // npix), ny


def _calibrate_block(r: np.ndarray, d: np.ndarray, e: np.ndarray | None, m: _PixelModel, rs: slice, tmp) -> None:
    """Raw block ``r`` → ``d`` [e-/s] and its error ``e`` (None: data only), in place (``rs``: output rows of the constants).

    A plain casting copy then float32 arithmetic is ~2x faster than mixed-dtype ufuncs;
    ``tmp`` is float32 scratch space at least the block's size (None without a flat).
    """
    np.copyto(d, r, casting="unsafe")
    np.subtract(d, _rows(m.back, rs), out=d)  # D [adu]
    np.multiply(d, _rows(m.gain_map, rs), out=d)  # Df [e-/s], NaN on bad flat
    if e is not None:
        t = None if tmp is None else tmp[: e.shape[0], : e.shape[1]]
        error_from_values(d, _rows(m.c1, rs), None if m.c2 is None else m.c2[rs], _rows(m.var_c, rs), e, t)


def error_from_values(d, c1, c2, var_c, out: np.ndarray, tmp: np.ndarray | None = None, variance: bool = False):
    """The error model of :func:`calibrate_cube` applied to calibrated values ``d`` (before any repair).

    ``err**2 = h (c1 + c2 h) + var_c`` with ``h = |d| + d`` (``c2`` None: ``c1 h + var_c``);
    the constants are the (broadcastable) per-pixel terms of the calibration model at the
    pixels of ``d``. Exactly the float32 operations of the calibration, so the result is
    bit-identical to the error it writes; ``variance=True`` stops before the square root.
    ``tmp``: scratch of ``d``'s shape when ``c2`` is given (allocated if None).
    """
    e = out
    if _kernels is not None and _unit_rows(d, c1, c2, var_c, e):
        # one compiled pass, the same float32 operations (vampd/_kernels.c error_model)
        _kernels.error_model(d, c1, c2, var_c, e, variance)
        return e
    np.abs(d, out=e)
    np.add(e, d, out=e)  # h = |Df| + Df = 2 max(Df, 0)
    if c2 is not None:
        t = np.empty_like(e) if tmp is None else tmp
        np.multiply(e, c2, out=t)
        np.add(t, c1, out=t)
        np.multiply(e, t, out=e)  # h (c1 + c2 h)
    else:
        np.multiply(e, c1, out=e)
    np.add(e, var_c, out=e)
    if not variance:
        np.sqrt(e, out=e)
    return e


def _unit_rows(d, *arrays) -> bool:
    """True if ``d`` and every non-None array are float32 (rows, nx) of ``d``'s shape with unit column stride."""
    return d.ndim == 2 and all(
        a is None or (isinstance(a, np.ndarray) and a.dtype == np.float32 and a.shape == d.shape and a.strides[1] == 4)
        for a in (d, *arrays)
    )


def _flag_saturated(r_raw, r, d, e, satlevel: float, is_int: bool, nsat: np.ndarray | None) -> None:
    """NaN in ``d`` and ``e`` where the raw block is ``>= satlevel``; add the counts per frame to ``nsat``.

    ``r_raw`` holds the same pixels as ``r`` (contiguous, for a cheap max first: the full
    mask is only built when something saturates).
    """
    if is_int:
        hit = r_raw.max() >= satlevel
    else:
        with np.errstate(invalid="ignore"):
            hit = bool(np.any(r_raw >= satlevel))
    if hit:
        sat = r >= satlevel
        if nsat is not None:
            nsat += sat.sum(axis=(1, 2))
        np.copyto(d, np.float32(np.nan), where=sat)
        if e is not None:
            np.copyto(e, np.float32(np.nan), where=sat)


def _calibrate_blocks(
    raw, data, err, model: _PixelModel, satlevel: float, flip: bool, nsat, xor: int | None = None
) -> None:
    """Fill ``data``/``err`` block by block: frames, or row bands of big frames, sized to stay in L2.

    With ``flip`` the constants are already flipped and each output row band reads its raw
    rows in reverse, so the flip costs no extra pass.
    """
    nframes, ny, nx = raw.shape
    u16 = raw.dtype.kind == "u" and raw.dtype.itemsize == 2
    if err is None and _kernels is not None and u16 and (nsat is None or nsat.dtype == np.int64):
        # data only (the chain's deferred-error pass): one compiled pass, the same float32
        # operations (vampd/_kernels.c calibrate_u16), reading the mapped file as it is
        back = np.broadcast_to(np.asarray(model.back, np.float32), (ny, nx))
        gain = np.broadcast_to(np.asarray(model.gain_map, np.float32), (ny, nx))
        _kernels.calibrate_u16(raw[:, ::-1] if flip else raw, xor or 0, back, gain, float(satlevel), data, nsat)
        return
    if xor is not None:  # a raw view of the file (fitsio.read_raw): its values first
        raw = raw.astype(np.uint16) ^ np.uint16(xor)
    fstep, rstep = _block_steps(ny, nx)
    tmp = np.empty((fstep, rstep, nx), np.float32) if model.c2 is not None and err is not None else None
    is_int = np.issubdtype(raw.dtype, np.integer)
    for f0 in range(0, nframes, fstep):
        fs = slice(f0, min(f0 + fstep, nframes))
        for r0 in range(0, ny, rstep):
            r1 = min(r0 + rstep, ny)
            rs = slice(r0, r1)
            # the same raw pixels, contiguous (for the saturation test) and as output rows
            r_raw = raw[fs, ny - r1 : ny - r0] if flip else raw[fs, rs]
            r = r_raw[:, ::-1] if flip else r_raw
            d, e = data[fs, rs], None if err is None else err[fs, rs]
            _calibrate_block(r, d, e, model, rs, tmp)
            _flag_saturated(r_raw, r, d, e, satlevel, is_int, None if nsat is None else nsat[fs])


def calibrate_cube(
    raw: np.ndarray,
    header: fits.Header,
    background: CalibFrame | None = None,
    flat: CalibFrame | None = None,
    fix_bad_pixels: bool = False,
    out: tuple[np.ndarray, np.ndarray] | None = None,
    badpix: np.ndarray | None = None,
    path=None,
    with_header: bool = True,
    nsat: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, fits.Header]:
    """Calibrate a raw cube (or a chunk of its frames) to e-/s with an error cube (docs/instrument.md §2.1).

    Parameters
    ----------
    raw : ndarray (nframes, ny, nx) or (ny, nx)
        Raw frames, uint16 (or float), raw orientation.
    header : astropy.io.fits.Header
        Normalised header (``fix_header``): needs ``BIAS GAIN EFFGAIN ENF RN FULLWELL
        EXPTIME U_CAMERA MJD``.
    background : CalibFrame, optional
        Master background [adu]; without it ``BIAS`` is subtracted and the read noise
        ``RN / GAIN`` goes into the error.
    flat : CalibFrame, optional
        Normalised flat; pixels with flat ``< 0.2`` or non-finite become NaN.
    fix_bad_pixels : bool
        Repair static bad pixels by the median of their valid 5x5 neighbours (and inflate
        their error). The mask is ``badpix`` if given, else :func:`static_bad_pixels`
        of the masters (cached on them). Without any master nothing is repaired.
    out : (data, err), optional
        Preallocated float32 C-contiguous arrays of the cube's shape to fill.
    badpix : ndarray of bool (ny, nx), optional
        Static bad-pixel mask in raw orientation.
    path : str or Path, optional
        Input file, for error messages.
    with_header : bool
        False: skip building the output header (returned as None), e.g. for the second and
        later chunks of a file, whose header is the same.
    nsat : ndarray of int (nframes,), optional
        Filled with the number of saturated pixels of each frame (:func:`saturation_level`).

    Returns
    -------
    data, err : ndarray float32 (nframes, ny, nx)
        Calibrated frames and 1-sigma errors [e-/s], flipped along y for the flipped camera
        (docs/instrument.md §1.4). Saturated raw pixels (``>=`` :func:`saturation_level`) are NaN in both.
    header : astropy.io.fits.Header
        :func:`calibration_header` of ``header`` (the same for every chunk of a file).

    Notes
    -----
    Equivalent to subtract → error → flat → bad pixels → flip → ×EFFGAIN/EXPTIME, computed
    in flipped coordinates directly (the flip is folded into reading the raw rows and the
    2-D constants). The flat's error term is dropped for negative background-subtracted
    pixels, where it is below ``(sigma_F / F)**2`` of the read-noise variance.
    """
    raw = _as_cube(raw, path)
    shape = raw.shape[1:]
    scale, poisson, satlevel, flip = _header_constants(header, path)
    model = _pixel_model(header, scale, poisson, background, flat, shape, path)
    if fix_bad_pixels:
        model.badpix = _repair_mask(background, flat, badpix, shape, path)
    if flip:  # work directly in output orientation (docs/instrument.md §1.4)
        model = model.flipped()
    if nsat is not None:
        nsat[:] = 0
    data, err = _output_buffers(raw, out, path)
    _calibrate_blocks(raw, data, err, model, satlevel, flip, nsat)
    nbad = 0 if model.badpix is None else repair_bad_pixels(data, model.badpix, err)
    if not with_header:
        return data, err, None
    hdr = calibration_header(header, background, flat, fix_bad_pixels=fix_bad_pixels, nbad=nbad, path=path)
    return data, err, hdr

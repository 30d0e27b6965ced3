"""Header normalisation for raw VAMPIRES files (docs/instrument.md §1.3, §1.7, §1.8).

:func:`fix_header` turns any raw header (EMCCD archive, CMOS pre/post NBS) into the
normalised form every stage relies on: exposure-midpoint times, detector constants,
``U_CAMERA`` as int, ``U_FLC`` in {"A", "B", "NA"} and ``RET-ANG1`` as float.
"""

from __future__ import annotations

import math
import re
from datetime import datetime, timedelta

from astropy.io import fits

__all__ = [
    "HeaderError",
    "fix_header",
    "required_keywords",
    "missing_keywords",
    "header_summary",
    "camera_number",
    "header_mjd",
    "normalize_flc",
    "sexagesimal_deg",
]

_EMCCD_FULL_SIZE = 512
_HST_OFFSET = timedelta(hours=-10)
_MJD_EPOCH = datetime(1858, 11, 17)


class HeaderError(ValueError):
    """A header keyword is missing or has an unusable value.

    Parameters
    ----------
    keyword : str
        The header keyword at fault.
    problem : str
        What is wrong: the value found and what was expected.
    path : str or Path, optional
        The file the header came from, when known.
    """

    def __init__(self, keyword: str, problem: str, path=None):
        self.keyword = keyword
        self.problem = problem
        self.path = None if path is None else str(path)
        prefix = "" if self.path is None else f"{self.path}: "
        super().__init__(f"{prefix}header keyword {keyword}: {problem}")

    def __reduce__(self):
        # keep the attributes across process boundaries (worker pool)
        return (type(self), (self.keyword, self.problem, self.path))


# ---------------------------------------------------------------------------------------
# small readers shared by the instrument modules


def camera_number(header, path=None) -> int:
    """``U_CAMERA`` as an int (raw files may store 1.0); HeaderError unless 1 or 2."""
    if "U_CAMERA" not in header:
        raise HeaderError("U_CAMERA", "missing (expected camera number 1 or 2)", path)
    value = header["U_CAMERA"]
    try:
        fvalue = float(value)
    except (TypeError, ValueError):
        fvalue = math.nan
    if fvalue not in (1.0, 2.0):
        raise HeaderError("U_CAMERA", f"value {value!r}, expected 1 or 2", path)
    return int(fvalue)


def header_mjd(header, path=None, required: bool = True) -> float | None:
    """Exposure MJD: ``MJD``, else the midpoint of ``MJD-STR``/``MJD-END``."""
    if "MJD" in header:
        return _float(header, "MJD", path)
    if "MJD-STR" in header and "MJD-END" in header:
        return 0.5 * (_float(header, "MJD-STR", path) + _float(header, "MJD-END", path))
    if required:
        raise HeaderError("MJD", "missing (and no MJD-STR/MJD-END to derive it)", path)
    return None


def normalize_flc(value) -> str:
    """FLC state as "A", "B" or "NA" (missing, NaN or anything else)."""
    if value is None:
        return "NA"
    if isinstance(value, float) and math.isnan(value):
        return "NA"
    text = str(value).strip().upper()
    return text if text in ("A", "B") else "NA"


def _float(header, key: str, path=None) -> float:
    value = header[key]
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise HeaderError(key, f"value {value!r}, expected a number", path) from None
    return out


def header_float(header, key: str, path=None, purpose: str = "") -> float:
    """A required, finite numeric keyword; :class:`HeaderError` names what is wrong.

    ``purpose`` completes the "missing" message, e.g. "needed for the Mueller matrix".
    """
    if key not in header:
        raise HeaderError(key, "missing" + (f" ({purpose})" if purpose else ""), path)
    out = _float(header, key, path)
    if not math.isfinite(out):
        raise HeaderError(key, f"value {header[key]!r} is not finite", path)
    return out


_SEXAGESIMAL = re.compile(r"^\s*([+-]?)(\d+)[:\s](\d+)[:\s](\d+(?:\.\d*)?)\s*$")


def sexagesimal_deg(value: str, hours: bool) -> float:
    """Degrees of the headers' ``"HH:MM:SS.sss"`` (``hours``) or ``"±DD:MM:SS.ss"`` (colons or
    spaces; the sign applies to the whole angle, also when the degrees are 0).

    Any other form goes to astropy's ``Angle``. The headers' form is parsed here because
    astropy's angle parser builds its lexer on first use (~50 ms of every worker's start).
    """
    m = _SEXAGESIMAL.match(value)
    if m is None:
        import astropy.units as u
        from astropy.coordinates import Angle

        return float(Angle(value, unit=u.hourangle if hours else u.deg).deg)
    mag = float(m.group(2)) + float(m.group(3)) / 60.0 + float(m.group(4)) / 3600.0
    return (-mag if m.group(1) == "-" else mag) * (15.0 if hours else 1.0)


# ---------------------------------------------------------------------------------------
# times


def _fix_ms_colon(value: str) -> str:
    """``07:22:34:880`` → ``07:22:34.880`` (only when there are exactly 3 colons)."""
    if value.count(":") == 3:
        head, _, ms = value.rpartition(":")
        return f"{head}.{ms}"
    return value


def _parse_time_of_day(date: str, value: str, key: str, path) -> datetime:
    try:
        day = datetime.strptime(date.strip()[:10], "%Y-%m-%d")
    except ValueError:
        raise HeaderError("DATE-OBS", f"value {date!r}, expected YYYY-MM-DD", path) from None
    try:
        hh, mm, ss = value.strip().split(":")
        return day + timedelta(hours=int(hh), minutes=int(mm), seconds=float(ss))
    except ValueError:
        raise HeaderError(key, f"value {value!r}, expected hh:mm:ss.sss", path) from None


def _round_ms(t: datetime) -> datetime:
    us = round(t.microsecond / 1000.0) * 1000
    return t.replace(microsecond=0) + timedelta(microseconds=us)


def _hms(t: datetime) -> str:
    t = _round_ms(t)
    return f"{t:%H:%M:%S}.{t.microsecond // 1000:03d}"


def _mjd(t: datetime) -> float:
    return (t - _MJD_EPOCH) / timedelta(days=1)


def _fix_times(h: fits.Header, path) -> None:
    for key in ("UT-STR", "UT-END", "HST-STR", "HST-END"):
        if key in h and isinstance(h[key], str):
            h[key] = _fix_ms_colon(h[key])

    mid = None
    if "UT-STR" in h and "UT-END" in h:
        if "DATE-OBS" not in h:
            raise HeaderError("DATE-OBS", "missing (needed with UT-STR/UT-END)", path)
        date = str(h["DATE-OBS"])
        t_str = _parse_time_of_day(date, str(h["UT-STR"]), "UT-STR", path)
        t_end = _parse_time_of_day(date, str(h["UT-END"]), "UT-END", path)
        if t_end < t_str:
            # exposure crossed 0h UT: DATE-OBS is the start date
            t_end += timedelta(days=1)
        mid = t_str + (t_end - t_str) / 2
        h["UT-STR"] = (_hms(t_str), "[UT] exposure start")
        h["UT-END"] = (_hms(t_end), "[UT] exposure end")
        h["UT"] = (_hms(mid), "[UT] exposure midpoint")
        h["DATE-OBS"] = (f"{_round_ms(mid):%Y-%m-%d}", "UT date of exposure midpoint")
        h["HST-STR"] = (_hms(t_str + _HST_OFFSET), "[HST] exposure start")
        h["HST-END"] = (_hms(t_end + _HST_OFFSET), "[HST] exposure end")
        h["HST"] = (_hms(mid + _HST_OFFSET), "[HST] exposure midpoint")
        for key, t in (("MJD-STR", t_str), ("MJD-END", t_end)):
            if key not in h:
                h[key] = (_mjd(t), "[d] MJD (UTC) derived from UT")

    # MJD := exposure midpoint. Archive EMCCD files store the file-creation time in MJD
    # (docs/instrument.md §13.3), which would put the parallactic angle at write time.
    if "MJD-STR" in h and "MJD-END" in h:
        mjd = 0.5 * (_float(h, "MJD-STR", path) + _float(h, "MJD-END", path))
    elif mid is not None:
        mjd = _mjd(mid)
    elif "MJD" in h:
        mjd = _float(h, "MJD", path)
    else:
        raise HeaderError("MJD", "missing, and neither MJD-STR/MJD-END nor UT-STR/UT-END to derive it", path)
    h["MJD"] = (mjd, "[d] MJD (UTC) of exposure midpoint")


# ---------------------------------------------------------------------------------------
# fix_header


def _nframes(h) -> int | None:
    naxis = h.get("NAXIS")
    if naxis is None:
        return None
    return int(h["NAXIS3"]) if int(naxis) >= 3 and "NAXIS3" in h else 1


def fix_header(header, path=None) -> fits.Header:
    """Return a normalised copy of a raw VAMPIRES header (the input is not modified).

    Applies docs/instrument.md §1.7 (times: millisecond-colon fix, UT/HST/DATE-OBS of the exposure midpoint,
    ``MJD`` = midpoint of ``MJD-STR``/``MJD-END``), writes the detector constants of docs/instrument.md §1.2
    (``BIAS GAIN DC ENF EFFGAIN RN PXSCALE PXAREA PAOFFSET INST-PA FULLWELL INSTRUME``),
    fills conditional keys (``DETECTOR``, ``OBS-MOD``, ``EXPTIME``, ``FILTER01/02``,
    ``PRD-*``, ``TINT``, ``NDIT``, ``BUNIT``) and EMCCD translations (``DETGAIN``,
    ``RET-ANG1``/``RETPLAT1``, ``U_FLC``).

    Parameters
    ----------
    header : astropy.io.fits.Header or mapping
        Raw header.
    path : str or Path, optional
        File name used in error messages.

    Returns
    -------
    astropy.io.fits.Header
        New header with ``U_CAMERA`` int, ``U_FLC`` in {"A", "B", "NA"}, ``RET-ANG1``
        float (when present) and ``MJD`` at the exposure midpoint.

    Raises
    ------
    HeaderError
        ``ACQNCYCS`` present (unsupported pre-open-use data), or a required keyword is
        missing or malformed (``U_CAMERA``, ``EXPTIME``/``U_AQTINT``, ``MJD``/times,
        ``U_EMGAIN``/``U_DETMOD``).
    """
    from vampd.instrument.detectors import detector_from_header

    h = header.copy() if isinstance(header, fits.Header) else fits.Header(dict(header))
    if "ACQNCYCS" in h:
        raise HeaderError("ACQNCYCS", "present: pre-open-use VAMPIRES data are not supported", path)

    h["U_CAMERA"] = camera_number(h, path)
    _fix_times(h, path)
    _translate_emccd(h, path)
    exptime = _exposure_time(h, path)

    if "FILTER01" not in h and "U_FILTER" in h:
        h["FILTER01"] = (str(h["U_FILTER"]), "primary filter")
        if "FILTER02" not in h:
            h["FILTER02"] = ("Unknown", "secondary filter")
    if "OBS-MOD" not in h:
        h["OBS-MOD"] = ("IPOL", "observation mode")

    det = detector_from_header(h, path)
    if "DETECTOR" not in h:
        h["DETECTOR"] = (det.name, "detector")
    _fill_frame_keys(h, exptime)
    if "BUNIT" not in h:
        h["BUNIT"] = ("ADU", "data unit")
    _write_detector_constants(h, det, path)
    return h


def _translate_emccd(h: fits.Header, path) -> None:
    """EMCCD archive keys to the normalised ones (unconditional when the source key exists).

    Also normalises ``U_FLC`` to {"A", "B", "NA"} and ``RET-ANG1`` to float for every camera.
    """
    if "U_EMGAIN" in h:
        h["DETGAIN"] = (_float(h, "U_EMGAIN", path), "detector EM gain")
    if "U_HWPANG" in h:
        h["RET-ANG1"] = (_float(h, "U_HWPANG", path), "[deg] HWP position angle")
        h["RETPLAT1"] = ("HWP(NIR)", "first retarder")
    if "U_FLCSTT" in h:
        h["U_FLC"] = ("A" if _float(h, "U_FLCSTT", path) == 1 else "B", "FLC state")
    h["U_FLC"] = normalize_flc(h.get("U_FLC"))
    if "RET-ANG1" in h:
        h["RET-ANG1"] = _float(h, "RET-ANG1", path)


def _exposure_time(h: fits.Header, path) -> float:
    """``EXPTIME`` [s], written from ``U_AQTINT`` [µs] when missing (EMCCD archive)."""
    if "EXPTIME" not in h:
        if "U_AQTINT" not in h:
            raise HeaderError("EXPTIME", "missing (and no U_AQTINT to derive it)", path)
        h["EXPTIME"] = (_float(h, "U_AQTINT", path) / 1e6, "[s] exposure time per frame")
    return _float(h, "EXPTIME", path)


def _fill_frame_keys(h: fits.Header, exptime: float) -> None:
    """``PRD-*`` (crop centred on the 512² EMCCD frame), ``TINT``, ``NDIT`` when missing.

    Only for headers with ``NAXIS`` (data headers).
    """
    nframes = _nframes(h)
    if nframes is None:
        return
    if "PRD-MIN1" not in h and "NAXIS1" in h and "NAXIS2" in h:
        nx, ny = int(h["NAXIS1"]), int(h["NAXIS2"])
        h["PRD-MIN1"] = (round((_EMCCD_FULL_SIZE - nx) / 2), "[px] crop origin x")
        h["PRD-MIN2"] = (round((_EMCCD_FULL_SIZE - ny) / 2), "[px] crop origin y")
        h["PRD-RNG1"] = (nx, "[px] crop size x")
        h["PRD-RNG2"] = (ny, "[px] crop size y")
    if "TINT" not in h:
        h["TINT"] = (exptime * nframes, "[s] total integration time")
    if "NDIT" not in h:
        h["NDIT"] = (nframes, "number of frames")


def _write_detector_constants(h: fits.Header, det, path) -> None:
    """The detector constants of docs/instrument.md §1.2, always (over)written from ``det``."""
    from vampd.instrument.angles import pa_offset

    pap = _float(h, "D_IMRPAP", path) if "D_IMRPAP" in h else None
    h["BIAS"] = (det.bias, "[adu] detector bias")
    h["GAIN"] = (det.gain, "[e-/adu] detector gain")
    h["DC"] = (det.dark_current, "[e-/s/px] dark current")
    h["ENF"] = (det.enf, "excess noise factor")
    h["EFFGAIN"] = (det.effgain, "[e-/adu] effective gain")
    h["RN"] = (det.readnoise, "[e-] read noise")
    h["PXSCALE"] = (det.pixel_scale, "[mas/px] pixel scale")
    h["PXAREA"] = (det.pixel_area, "[arcsec^2/px] pixel area")
    h["PAOFFSET"] = (pa_offset(det, pap), "[deg] parallactic angle offset")
    h["INST-PA"] = (det.pupil_offset, "[deg] instrument angle offset")
    h["FULLWELL"] = (det.fullwell, "[e-] full well")
    h["INSTRUME"] = ("VAMPIRES", "instrument")


# ---------------------------------------------------------------------------------------
# completeness and summaries

_REQUIRED = (
    ("U_CAMERA",),
    ("U_EMGAIN", "U_DETMOD"),
    ("EXPTIME", "U_AQTINT"),
    ("MJD", "MJD-STR", "UT-STR"),
    ("DATA-TYP",),
    ("OBJECT",),
    ("RA",),
    ("DEC",),
    ("FILTER01", "U_FILTER"),
)


def required_keywords() -> list[tuple[str, ...]]:
    """Keywords a raw science file must carry.

    Each entry is a tuple of alternatives; at least one of them must be present
    (``("EXPTIME", "U_AQTINT")`` means either will do).
    """
    return list(_REQUIRED)


def missing_keywords(header) -> list[str]:
    """The entries of :func:`required_keywords` absent from ``header``, as text.

    Alternatives are joined with ``" or "``, e.g. ``["EXPTIME or U_AQTINT"]``.
    """
    return [" or ".join(alts) for alts in _REQUIRED if not any(k in header for k in alts)]


def header_summary(header) -> dict:
    """Ledger summary of a header (fixed, or raw: EMCCD keys are used as fallbacks).

    Keys: ``target`` (OBJECT), ``filter`` (field name(s), comma-separated), ``camera``,
    ``flc``, ``hwp`` (RET-ANG1 or None), ``exptime``, ``mjd``, ``nframes``, ``obs_mod``,
    ``data_typ``. Missing values are None.
    """
    from vampd.instrument.fields import field_names

    def get_float(key):
        try:
            return float(header[key])
        except (KeyError, TypeError, ValueError):
            return None

    try:
        filt = ",".join(field_names(header))
    except HeaderError:
        filt = None
    try:
        cam = camera_number(header)
    except HeaderError:
        cam = None
    exptime = get_float("EXPTIME")
    if exptime is None and "U_AQTINT" in header:
        exptime = get_float("U_AQTINT") / 1e6
    try:
        mjd = header_mjd(header, required=False)
    except HeaderError:
        mjd = None
    obj = header.get("OBJECT")
    flc = normalize_flc(header.get("U_FLC"))
    if flc == "NA" and "U_FLCSTT" in header:  # raw EMCCD header
        flc = "A" if get_float("U_FLCSTT") == 1 else "B"
    hwp = get_float("RET-ANG1")
    if hwp is None:
        hwp = get_float("U_HWPANG")
    return {
        "target": None if obj is None else str(obj).strip(),
        "filter": filt,
        "camera": cam,
        "flc": flc,
        "hwp": hwp,
        "exptime": exptime,
        "mjd": mjd,
        "nframes": _nframes(header),
        "obs_mod": header.get("OBS-MOD"),
        "data_typ": header.get("DATA-TYP"),
    }

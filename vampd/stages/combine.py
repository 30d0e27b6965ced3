"""Grouping keys and header combination (docs/instrument.md §7).

vampd streams: every file is reduced on its own as soon as it is complete, so ``combine =
"cube"`` groups are single files keyed by the file stem (stable when later files arrive —
the reference's global MJD rank is not, docs/instrument.md §13.20). For ``combine = "pdi"`` the per-file
products are still produced per file; HWP sets are formed later by the PDI stage from
those products. The ``pdi`` key here names the HWP-angle *run* a file belongs to, built
from the stem of the run's first file, so it never changes when files are added after it.
"""

from __future__ import annotations

import math
import re
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
from astropy import units as u
from astropy.coordinates import Angle
from astropy.io import fits

from vampd.instrument.angles import wrap

__all__ = [
    "GROUP_METHODS",
    "HWP_TOLERANCE_DEG",
    "file_stem",
    "group_key",
    "pdi_group_keys",
    "circular_mean",
    "combine_headers",
    "average_cameras",
]

GROUP_METHODS = ("cube", "pdi")
HWP_TOLERANCE_DEG = 0.1  # RET-ANG1 values closer than this are the same HWP position (docs/instrument.md §13.19)
_MJD_EPOCH = datetime(1858, 11, 17)
_RESERVED = re.compile(
    r"^(NAXIS\d*|BSCALE|BZERO|BITPIX|SIMPLE|EXTEND|PCOUNT|GCOUNT|XTENSION|EXTNAME|"
    r"WAVEMIN|WAVEMAX|WAVEFWHM|DLAMLAM|WCSAXES|CTYPE\d|CUNIT\d|CRPIX\d|CRVAL\d|CDELT\d|"
    r"PC\d_\d|CD\d_\d[A-D]?|LONPOLE|LATPOLE|MJDREF)$"
)
_WCS = re.compile(r"^(WCSAXES|CTYPE\d|CUNIT\d|CRPIX\d|CRVAL\d|CDELT\d|PC\d_\d|CD\d_\d[A-D]?|LONPOLE|LATPOLE)$")
_SUMMED = ("TINT", "NCOADD", "DPP COADD TINT", "DPP COADD NCOADD")
_SPECIAL = {
    "PA-STR",
    "PA-END",
    "PA-ROT",
    "PA",
    "DEROTANG",
    "RA",
    "DEC",
    "MJD",
    "MJD-STR",
    "MJD-END",
    "UT",
    "UT-STR",
    "UT-END",
    "HST",
    "HST-STR",
    "HST-END",
    "DATE-OBS",
}
_COMMENTARY = ("COMMENT", "HISTORY", "")


def file_stem(path) -> str:
    """File name without directories and FITS suffixes: ``a/VMPA0001.fits.fz`` → ``VMPA0001``."""
    name = Path(str(path)).name
    for suffix in (".fits.fz", ".fits.gz", ".fits", ".fit", ".fz"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def _camera(header) -> int:
    return int(float(header.get("U_CAMERA", 1)))


def _flc(header) -> str:
    v = header.get("U_FLC", "NA")
    if v is None or (isinstance(v, float) and math.isnan(v)) or str(v).strip() == "":
        return "NA"
    return str(v).strip()


def _hwp(header) -> float:
    v = header.get("RET-ANG1", np.nan)
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def _same_hwp(a: float, b: float) -> bool:
    if math.isnan(a) and math.isnan(b):
        return True
    return abs(a - b) < HWP_TOLERANCE_DEG


def group_key(header, path, method: str = "cube", previous: tuple[str, fits.Header] | None = None) -> str:
    """Stable group key of one file (docs/instrument.md §7.1, §13.20 fixed).

    Parameters
    ----------
    header : fits.Header
        Normalised header (``U_CAMERA``, ``U_FLC``, ``RET-ANG1``).
    path : path-like
        The input file.
    method : {"cube", "pdi"}
    previous : (key, header), optional
        ``pdi`` only: key and header of the previous file (MJD order) of the same
        (camera, FLC) stream. If its ``RET-ANG1`` equals this one (within
        ``HWP_TOLERANCE_DEG``) the file continues that run and inherits its key.

    Returns
    -------
    str
        ``cube``: the file stem. ``pdi``: ``{stem of the run's first file}_cam{c}_FLC{f}``.
    """
    stem = file_stem(path)
    if method == "cube":
        return stem
    if method != "pdi":
        raise ValueError(f"combine.method: {method!r} not one of {GROUP_METHODS}")
    cam, flc = _camera(header), _flc(header)
    if previous is not None:
        prev_key, prev_header = previous
        if _camera(prev_header) == cam and _flc(prev_header) == flc and _same_hwp(_hwp(prev_header), _hwp(header)):
            return prev_key
    return f"{stem}_cam{cam}_FLC{flc}"


def pdi_group_keys(items) -> list[str]:
    """``pdi`` keys for a batch of ``(path, header)`` items (returned in input order).

    Items are ordered by ``MJD`` inside each (camera, FLC) stream; a new run starts whenever
    ``RET-ANG1`` changes. Keys of earlier files never change when later files are appended.
    """
    items = list(items)
    order = sorted(range(len(items)), key=lambda i: (float(items[i][1].get("MJD", np.inf)), file_stem(items[i][0])))
    last: dict[tuple[int, str], tuple[str, fits.Header]] = {}
    keys = [""] * len(items)
    for i in order:
        path, header = items[i]
        stream = (_camera(header), _flc(header))
        key = group_key(header, path, "pdi", previous=last.get(stream))
        last[stream] = (key, header)
        keys[i] = key
    return keys


def circular_mean(angles_deg) -> float:
    """``atan2(mean sin, mean cos)`` in degrees (NaNs ignored); NaN for no finite input."""
    a = np.radians(np.asarray(angles_deg, dtype=np.float64))
    a = a[np.isfinite(a)]
    if a.size == 0:
        return float("nan")
    return float(np.degrees(np.arctan2(np.mean(np.sin(a)), np.mean(np.cos(a)))))


def _is_number(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))


def _mjd_to_datetime(mjd: float) -> datetime:
    return _MJD_EPOCH + timedelta(days=float(mjd))


def _hms(t: datetime) -> str:
    t = t + timedelta(microseconds=500)  # round to ms
    return f"{t:%H:%M:%S}.{t.microsecond // 1000:03d}"


def _set_times(h: fits.Header, mjd_str: float, mjd_end: float) -> None:
    """docs/instrument.md §1.7 item 5: times of a combination from its first start and last end."""
    mid = mjd_str + (mjd_end - mjd_str) / 2
    t0, t1, tm = (_mjd_to_datetime(m) for m in (mjd_str, mjd_end, mid))
    hst = timedelta(hours=10)
    h["MJD-STR"] = (float(mjd_str), "[d] MJD at exposure start")
    h["MJD-END"] = (float(mjd_end), "[d] MJD at exposure end")
    h["MJD"] = (float(mid), "[d] MJD at exposure midpoint")
    h["DATE-OBS"] = (f"{tm:%Y-%m-%d}", "UT date of the midpoint")
    h["UT-STR"] = (_hms(t0), "UT at exposure start")
    h["UT-END"] = (_hms(t1), "UT at exposure end")
    h["UT"] = (_hms(tm), "UT at exposure midpoint")
    h["HST-STR"] = (_hms(t0 - hst), "HST at exposure start")
    h["HST-END"] = (_hms(t1 - hst), "HST at exposure end")
    h["HST"] = (_hms(tm - hst), "HST at exposure midpoint")


def _ra_deg(v) -> float:
    return Angle(v, unit=u.hourangle).deg if isinstance(v, str) else float(v)


def _dec_deg(v) -> float:
    return Angle(v, unit=u.deg).deg if isinstance(v, str) else float(v)


def combine_headers(headers) -> fits.Header:
    """Combine the headers of files stacked together (docs/instrument.md §7.2).

    * Keys with one value are copied (comment of the first header). Varying numeric keys
      → nanmean; when the comment mentions "error" the values are combined as independent
      errors of a mean, sqrt(Σ v²)/n. Other varying keys are dropped; varying reserved keys
      (NAXIS, WCS, WAVE*) keep the first value.
    * ``TINT``, ``NCOADD`` (and ``DPP COADD TINT/NCOADD``) are summed.
    * ``PA-STR`` = first, ``PA-END`` = last (MJD order), ``PA-ROT`` = wrap(PA-END − PA-STR)
      (the reference's wrap(PA-END) − wrap(PA-STR) gives ~±360 for runs crossing ±180),
      ``PA`` and ``DEROTANG`` circular means; ``RA``/``DEC`` circular means, sexagesimal.
    * ``MJD-STR`` = min, ``MJD-END`` = max, ``MJD`` = midpoint; UT/HST/DATE-OBS derived from them.
    * WCS (if the inputs have one): recomputed with :func:`vampd.instrument.wcs.apply_wcs` from the
      mean RA/Dec and the circular mean of the PC rotation angles (averaging PC elements would
      shrink the matrix for a rotating sequence, docs/instrument.md §13.21).
    """
    from vampd.instrument.angles import refresh_angles

    headers = [h for h in headers]
    if not headers:
        raise ValueError("combine_headers: no headers given")
    headers.sort(key=lambda h: float(h.get("MJD", np.inf)) if _is_number(h.get("MJD")) else np.inf)
    out = _merge_cards(headers)
    _combine_angles(out, headers)
    _combine_times(out, headers)
    refresh_angles(out)  # PA/DEROTANG at the combination's own MJD, not a mean of angles
    return _combine_wcs(out, headers)


def _numeric_values(headers, key: str) -> list[float]:
    return [float(h[key]) for h in headers if key in h and _is_number(h[key])]


def _merge_cards(headers) -> fits.Header:
    """The generic rules of :func:`combine_headers`: copy, sum, mean or drop each key (first-seen order)."""
    n = len(headers)
    out = fits.Header()
    seen = []
    for h in headers:
        for card in h.cards:
            if card.keyword not in _COMMENTARY and card.keyword not in seen:
                seen.append(card.keyword)
    for key in seen:
        present = [h for h in headers if key in h]
        values = [h[key] for h in present]
        comment = present[0].comments[key]
        if key in _SPECIAL or _WCS.match(key):
            continue
        if key in _SUMMED and all(_is_number(v) for v in values):
            total = sum(values)
            out[key if " " not in key else f"HIERARCH {key}"] = (total, comment)
            continue
        uniq = []
        for v in values:
            if not any(type(v) is type(w) and v == w for w in uniq):
                uniq.append(v)
        name = key if len(key) <= 8 and " " not in key else f"HIERARCH {key}"
        if len(uniq) == 1 and len(present) == n:
            out[name] = (values[0], comment)
        elif _RESERVED.match(key):
            out[name] = (values[0], comment)
        elif all(_is_number(v) for v in values):
            arr = np.array(values, dtype=np.float64)
            if "error" in comment.lower():
                val = float(np.sqrt(np.nansum(arr**2)) / np.sum(np.isfinite(arr)))
            else:
                val = float(np.nanmean(arr))
            out[name] = (val, comment)
        # non-numeric varying keys are dropped
    return out


def _combine_angles(out: fits.Header, headers) -> None:
    """``PA-STR/PA-END/PA-ROT``, circular means of ``PA``, ``DEROTANG``, ``RA``/``DEC`` (MJD-sorted headers)."""
    if any("PA-STR" in h for h in headers):
        pa_str = next(float(h["PA-STR"]) for h in headers if "PA-STR" in h)
        pa_end = next(float(h["PA-END"]) for h in reversed(headers) if "PA-END" in h)
        out["PA-STR"] = (pa_str, "[deg] parallactic angle at start")
        out["PA-END"] = (pa_end, "[deg] parallactic angle at end")
        # wrap the difference (not each end): a run crossing ±180 rotates by a few degrees, not ~360
        out["PA-ROT"] = (float(wrap(pa_end - pa_str)), "[deg] parallactic angle rotation")
    if _numeric_values(headers, "PA"):
        out["PA"] = (circular_mean(_numeric_values(headers, "PA")), "[deg] parallactic angle (circular mean)")
    if _numeric_values(headers, "DEROTANG"):
        out["DEROTANG"] = (circular_mean(_numeric_values(headers, "DEROTANG")), "[deg] derotation angle for North up")
    if all("RA" in h and "DEC" in h for h in headers):
        ra = circular_mean([_ra_deg(h["RA"]) for h in headers]) % 360
        dec = circular_mean([_dec_deg(h["DEC"]) for h in headers])
        out["RA"] = (Angle(ra, u.deg).to_string(unit=u.hourangle, sep=":", precision=3, pad=True), "RA (circular mean)")
        out["DEC"] = (
            Angle(dec, u.deg).to_string(unit=u.deg, sep=":", precision=2, alwayssign=True, pad=True),
            "DEC (circular mean)",
        )


def _combine_times(out: fits.Header, headers) -> None:
    """Times from the first start and last end; without them, common values or the mean MJD."""
    starts, ends = _numeric_values(headers, "MJD-STR"), _numeric_values(headers, "MJD-END")
    if starts and ends:
        _set_times(out, min(starts), max(ends))
        return
    for key in ("MJD", "DATE-OBS", "UT", "HST"):
        vals = [h[key] for h in headers if key in h]
        if vals and all(v == vals[0] for v in vals):
            out[key] = vals[0]
    if _numeric_values(headers, "MJD") and "MJD" not in out:
        out["MJD"] = (float(np.mean(_numeric_values(headers, "MJD"))), "[d] mean MJD")


def _combine_wcs(out: fits.Header, headers) -> fits.Header:
    """``out`` with a WCS from its RA/Dec and the circular mean PC rotation, if the inputs have one."""
    has_wcs = [h for h in headers if "CTYPE1" in h and "PC1_1" in h and "PC2_1" in h]
    if not has_wcs:
        return out
    from vampd.instrument.wcs import apply_wcs

    angle = circular_mean([math.degrees(math.atan2(float(h["PC2_1"]), float(h["PC1_1"]))) for h in has_wcs])
    ref = has_wcs[0]
    shape = (int(ref.get("NAXIS2", 0)), int(ref.get("NAXIS1", 0))) if "NAXIS1" in ref else None
    try:
        if "PXSCALE" not in out and "PXSCALE" in ref:
            out["PXSCALE"] = ref["PXSCALE"]
        out = apply_wcs(out, angle, shape=shape)
    except ValueError:  # missing RA/DEC/PXSCALE/NAXIS: keep no WCS rather than a wrong one
        pass
    return out


def average_cameras(data1, err1, data2, err2) -> tuple[np.ndarray, np.ndarray]:
    """Average the two cameras: ``½(d1 + d2)`` with ``σ = ½·sqrt(σ1² + σ2²)``.

    The error is that of the mean of two independent measurements (the reference's
    ``sqrt(½(σ1² + σ2²))`` is √2 too large).
    """
    d = 0.5 * (np.asarray(data1) + np.asarray(data2))
    e = 0.5 * np.sqrt(np.asarray(err1) ** 2 + np.asarray(err2) ** 2)
    return d, e

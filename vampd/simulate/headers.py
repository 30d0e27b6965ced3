"""Raw VAMPIRES (STARS/Gen2 archive, CMOS) header construction for simulated files.

Only raw keys are written (docs/instrument.md §1.3): the keys ``fix_header`` derives (BIAS, GAIN,
PAOFFSET, ...) and the calibration step writes (PA, DEROTANG, WCS) are left to the
pipeline, as in real archive files.
"""

from __future__ import annotations

import math
from datetime import datetime, timedelta

import astropy.units as u
import numpy as np
from astropy.coordinates import AltAz, Angle, SkyCoord
from astropy.io import fits
from astropy.time import Time

__all__ = [
    "format_ra",
    "format_dec",
    "parse_radec",
    "mjd_to_datetime",
    "altaz",
    "imr_angle",
    "raw_header",
]

_MJD_EPOCH = datetime(1858, 11, 17)
_HST = timedelta(hours=-10)


def format_ra(ra_deg: float) -> str:
    """RA [deg] as the archive's ``hh:mm:ss.sss``."""
    return Angle(ra_deg, u.deg).to_string(unit=u.hourangle, sep=":", precision=3, pad=True)


def format_dec(dec_deg: float) -> str:
    """Dec [deg] as the archive's ``±dd:mm:ss.ss``."""
    return Angle(dec_deg, u.deg).to_string(unit=u.deg, sep=":", precision=2, alwayssign=True, pad=True)


def parse_radec(ra: str, dec: str) -> tuple[float, float]:
    """Sexagesimal ``RA``/``DEC`` header strings → degrees (what the pipeline reads back)."""
    c = SkyCoord(ra, dec, unit=(u.hourangle, u.deg), frame="fk5", equinox="J2000")
    return float(c.ra.deg), float(c.dec.deg)


def mjd_to_datetime(mjd: float) -> datetime:
    """MJD (UTC) → naive datetime, rounded to the millisecond."""
    t = _MJD_EPOCH + timedelta(days=float(mjd))
    us = round(t.microsecond / 1000.0) * 1000
    return t.replace(microsecond=0) + timedelta(microseconds=us)


def _hms(t: datetime) -> str:
    return f"{t:%H:%M:%S}.{t.microsecond // 1000:03d}"


def altaz(ra_deg: float, dec_deg: float, mjd) -> tuple[np.ndarray, np.ndarray]:
    """Altitude and azimuth [deg] at Subaru for each MJD (offline, vectorised).

    Azimuth is astropy's (East of North). No refraction.
    """
    from vampd._offline import configure_offline
    from vampd.instrument.angles import SUBARU

    configure_offline()  # no IERS download (applied once per process)
    t = Time(np.atleast_1d(np.asarray(mjd, dtype=float)), format="mjd", scale="utc", location=SUBARU)
    c = SkyCoord(ra_deg, dec_deg, unit=u.deg, frame="fk5", equinox="J2000")
    aa = c.transform_to(AltAz(obstime=t, location=SUBARU))
    return np.asarray(aa.alt.deg), np.asarray(aa.az.deg)


def imr_angle(altitude_deg):
    """Plausible image-rotator angle ``D_IMRANG`` [deg] in pupil tracking.

    The rotator follows the elevation at half rate; the constant reproduces the archive
    sample (ALTITUDE 56.689 → D_IMRANG 92.856). It enters the Mueller model only, and the
    same header value is used by the forward model and the pipeline.
    """
    return 64.5115 + 0.5 * np.asarray(altitude_deg, dtype=float)


def raw_header(
    *,
    shape: tuple[int, int, int],
    camera: int,
    frameid: int,
    data_typ: str,
    obj: str,
    ra_deg: float,
    dec_deg: float,
    mjd_str: float,
    mjd_end: float,
    exptime: float,
    filter01: str,
    filter02: str = "Open",
    obs_mod: str = "IPOL",
    hwp: float | None = 0.0,
    flc: str | None = "A",
    altitude: float = 90.0,
    azimuth: float = 0.0,
    imrang: float = 0.0,
    imrpap: float = -37.0,
    crop_origin: tuple[int, int] = (0, 0),
    detmode: str = "FAST",
    coronagraphic: bool = False,
    grid_amp_um: float = 0.0,
    grid_sep_lamd: float = 0.0,
    mbi: bool = False,
    as_float: bool = False,
) -> fits.Header:
    """Primary header of one simulated raw cube.

    Parameters
    ----------
    shape : (nframes, ny, nx)
    camera : 1 or 2
    frameid : int
        Archive frame number; the file is ``VMPA{frameid:08d}`` (cam 1) or ``VMPB...``.
    data_typ : str
        ``OBJECT``, ``DARK`` or ``FLAT``.
    mjd_str, mjd_end : float
        Start of the first frame and end of the last frame (UTC MJD).
    hwp : float or None
        ``RET-ANG1`` [deg]; None for calibration frames taken without the HWP sequence.
    flc : "A", "B" or None
        None → FLC out of the beam (double-diff mode): ``U_FLCST = OUT``, no ``U_FLC``.
    as_float : bool
        Header for a float32 cube (BITPIX −32, no BZERO) instead of uint16.

    Returns
    -------
    astropy.io.fits.Header
        A complete primary header in archive key order.
    """
    nframes, ny, nx = shape
    h = fits.Header()
    h["SIMPLE"] = (True, "conforms to FITS standard")
    h["BITPIX"] = (-32 if as_float else 16, "array data type")
    h["NAXIS"] = (3, "number of array dimensions")
    h["NAXIS1"] = nx
    h["NAXIS2"] = ny
    h["NAXIS3"] = nframes
    h["EXTEND"] = True
    if not as_float:
        h["BZERO"] = (32768, "offset data range to that of unsigned short")
        h["BSCALE"] = 1
    t_str, t_end = mjd_to_datetime(mjd_str), mjd_to_datetime(mjd_end)
    mjd_mid = 0.5 * (mjd_str + mjd_end)
    t_mid = mjd_to_datetime(mjd_mid)
    prefix = "VMPA" if camera == 1 else "VMPB"
    cards = [
        ("TELESCOP", "Subaru", "telescope name"),
        ("OBSERVAT", "NAOJ", "observatory"),
        ("INSTRUME", "VAMPIRES", "instrument name"),
        ("DETECTOR", f"VCAM{camera} - ORCA-Quest", "detector"),
        ("FRAMEID", f"{prefix}{frameid:08d}", "image sequential number"),
        ("EXP-ID", f"{prefix}{frameid:08d}", "exposure id"),
        ("PROP-ID", "o26000", "proposal id (simulated)"),
        ("OBSERVER", "vampd simulate", "observer"),
        ("DATA-TYP", data_typ, "type of data"),
        ("OBJECT", obj, "target name"),
        ("OBS-MOD", obs_mod, "observation mode"),
        ("RA", format_ra(ra_deg), "[hh:mm:ss] right ascension"),
        ("DEC", format_dec(dec_deg), "[dd:mm:ss] declination"),
        ("RADESYS", "FK5", "coordinate frame"),
        ("EQUINOX", 2000.0, "[yr] equinox"),
        ("DATE-OBS", f"{t_mid:%Y-%m-%d}", "UT date of observation"),
        ("UT-STR", _hms(t_str), "[UT] exposure start"),
        ("UT-END", _hms(t_end), "[UT] exposure end"),
        ("UT", _hms(t_mid), "[UT] exposure midpoint"),
        ("HST-STR", _hms(t_str + _HST), "[HST] exposure start"),
        ("HST-END", _hms(t_end + _HST), "[HST] exposure end"),
        ("HST", _hms(t_mid + _HST), "[HST] exposure midpoint"),
        ("MJD-STR", float(mjd_str), "[d] MJD (UTC) at exposure start"),
        ("MJD-END", float(mjd_end), "[d] MJD (UTC) at exposure end"),
        ("MJD", float(mjd_mid), "[d] MJD (UTC) at exposure midpoint"),
        ("EXPTIME", float(exptime), "[s] exposure time per frame"),
        ("ALTITUDE", round(float(altitude), 5), "[deg] telescope altitude"),
        ("AZIMUTH", round(float(azimuth), 5), "[deg] telescope azimuth"),
        ("AIRMASS", round(1.0 / math.sin(math.radians(max(float(altitude), 1.0))), 3), "airmass"),
        ("D_IMRANG", round(float(imrang), 5), "[deg] image rotator angle"),
        ("D_IMRPAP", float(imrpap), "[deg] image rotator pupil angle position"),
        ("D_IMRMOD", "ADI", "image rotator mode"),
        ("U_CAMERA", int(camera), "camera number"),
        ("U_DETMOD", detmode, "CMOS readout mode"),
        ("U_MBI", "IN" if mbi else "OUT", "MBI dichroics"),
        ("FILTER01", filter01, "primary filter"),
        ("FILTER02", filter02, "secondary filter"),
        ("U_FLDSTP", "Fieldstop", "field stop"),
        ("U_MASK", "Open", "pupil mask"),
        ("PRD-MIN1", int(crop_origin[1]), "[px] crop origin x"),
        ("PRD-MIN2", int(crop_origin[0]), "[px] crop origin y"),
        ("PRD-RNG1", int(nx), "[px] crop size x"),
        ("PRD-RNG2", int(ny), "[px] crop size y"),
    ]
    if hwp is not None:
        cards += [
            ("RET-ANG1", float(hwp), "[deg] HWP position angle"),
            ("RET-MOD1", "SYNCHRO_ADI", "HWP mode"),
            ("RETPLAT1", "HWP(NIR)", "first retarder"),
        ]
    if flc is None:
        cards.append(("U_FLCST", "OUT", "FLC stage"))
    else:
        cards += [("U_FLCST", "IN", "FLC stage"), ("U_FLC", flc, "FLC state")]
    cards += [
        ("X_GRDAMP", float(grid_amp_um) if coronagraphic else 0.0, "[um] astrogrid amplitude"),
        ("X_GRDSEP", float(grid_sep_lamd) if coronagraphic else 0.0, "[lam/D] astrogrid separation"),
        ("X_GRDST", "ON" if coronagraphic else "OFF", "astrogrid status"),
        ("BUNIT", "ADU", "data unit"),
    ]
    for key, value, comment in cards:
        h[key] = (value, comment)
    return h

"""Parallactic angle, PA offset and derotation angle (domain doc §1.10).

Everything here runs offline: Subaru's location is hard-coded (never
``EarthLocation.of_site``) and IERS downloads are disabled before the first sidereal time
(:func:`vampd._offline.configure_offline`), so sidereal time past
the bundled IERS table degrades to predicted UT1−UTC instead of raising.
"""

from __future__ import annotations

import functools
import math
import warnings

import astropy.units as u
import numpy as np
from astropy.coordinates import Distance, EarthLocation, SkyCoord
from astropy.io import fits
from astropy.time import Time

from vampd.instrument.headers import HeaderError, header_mjd

__all__ = [
    "wrap",
    "SUBARU_LAT_DEG",
    "SUBARU_LON_DEG",
    "SUBARU",
    "parallactic_angle",
    "pa_offset",
    "derotation_angle",
    "target_coord",
    "local_sidereal_hours",
    "update_angles",
]

SUBARU_LAT_DEG = 19.825504
SUBARU_LON_DEG = -155.4760187  # east-positive, i.e. 155.476 deg W
SUBARU = EarthLocation.from_geodetic(lon=SUBARU_LON_DEG, lat=SUBARU_LAT_DEG, height=0.0)


def wrap(angle):
    """Fold an angle once by ±360 deg into [−180, 180].

    Adds 360 below −180 and subtracts 360 above 180 (a single fold, as the reference).
    Scalars give a float, arrays an array.
    """
    a = np.asarray(angle, dtype=float)
    out = np.where(a < -180.0, a + 360.0, np.where(a > 180.0, a - 360.0, a))
    return float(out) if out.ndim == 0 else out


#: sidereal time is interpolated between exact values on this UT1 grid [days]
_LST_STEP = 0.25


@functools.lru_cache(maxsize=256)
def _last_anchor(mjd_anchor: float) -> float:
    """Exact local apparent sidereal time [h] at Subaru at a grid time (astropy, cached)."""
    from vampd._offline import configure_offline

    configure_offline()  # no IERS download on the summit (applied once per process)
    t = Time(mjd_anchor, format="mjd", scale="ut1", location=SUBARU)
    return float(t.sidereal_time("apparent").hour)


def local_sidereal_hours(mjd) -> np.ndarray:
    """Local apparent sidereal time [h] at Subaru for UT1 MJDs.

    Linear interpolation between exact astropy values (``Time.sidereal_time("apparent")``)
    on a 6-hour grid, cached: ~100x cheaper per file than a new ``Time``. The sidereal
    rate is constant to 1e-9 over a grid step and the nutation terms vary over ≥ 5 days,
    so the interpolation error is below 1e-7 h (5e-6 deg of hour angle).
    """
    mjd = np.asarray(mjd, dtype=float)
    flat = mjd.reshape(-1)
    out = np.empty(flat.shape)
    for i, m in enumerate(flat):
        t0 = math.floor(m / _LST_STEP) * _LST_STEP
        l0, l1 = _last_anchor(t0), _last_anchor(t0 + _LST_STEP)
        span = (l1 - l0) % 24.0  # ~6.016 h per 0.25 d
        out[i] = (l0 + span * (m - t0) / _LST_STEP) % 24.0
    return out.reshape(mjd.shape)


def parallactic_angle(ra_deg, dec_deg, mjd) -> np.ndarray:
    """Parallactic angle [deg East of North, positive west of the meridian] at Subaru.

    ``PA = atan2(sin H, tan(phi) cos(dec) - sin(dec) cos(H))`` with ``H`` the hour angle
    from the local apparent sidereal time, then :func:`wrap` (§1.10).

    Parameters
    ----------
    ra_deg, dec_deg : float or array
        Coordinates [deg] (broadcast against ``mjd``). No precession is applied.
    mjd : float or array
        Times, interpreted as UT1 MJD.

    Returns
    -------
    ndarray
        Same shape as the broadcast inputs (0-d for scalars).
    """
    mjd = np.asarray(mjd, dtype=float)
    last_h = local_sidereal_hours(mjd)
    ha = np.deg2rad(15.0 * last_h - np.asarray(ra_deg, dtype=float))
    dec = np.deg2rad(np.asarray(dec_deg, dtype=float))
    lat = np.deg2rad(SUBARU_LAT_DEG)
    pa = np.arctan2(np.sin(ha), np.tan(lat) * np.cos(dec) - np.sin(dec) * np.cos(ha))
    return np.asarray(wrap(np.rad2deg(pa)))


def pa_offset(detector, pap: float | None = None) -> float:
    """PA offset [deg] = wrap(pupil_offset − 180 + PAP).

    ``pap`` is the image-rotator pupil position ``D_IMRPAP``; ``None`` uses the detector's
    default (−39 deg, or −37 deg post-NBS).
    """
    if pap is None:
        pap = detector.default_pap
    return wrap(detector.pupil_offset - 180.0 + float(pap))


def derotation_angle(pa, paoffset):
    """DEROTANG = wrap(PA + PAOFFSET): CCW rotation [deg] that puts North up."""
    return wrap(np.asarray(pa, dtype=float) + paoffset)


def _obstime(value) -> Time:
    if isinstance(value, Time):
        return value
    if isinstance(value, (int, float)):
        return Time(value, format="mjd", scale="utc")
    return Time(str(value))


def target_coord(header, target=None, path=None) -> SkyCoord:
    """Target coordinate at the header's ``MJD``.

    Parameters
    ----------
    header : astropy.io.fits.Header
        Needs ``MJD`` (or ``MJD-STR``/``MJD-END``); ``RA``/``DEC`` (sexagesimal hours /
        degrees) with optional ``RADESYS`` and ``EQUINOX`` when no ``target`` is given.
    target : object or SkyCoord, optional
        Duck-typed like the config's TargetConfig: ``ra`` (sexagesimal hours), ``dec``
        (sexagesimal degrees), ``pm_ra``, ``pm_dec`` [mas/yr], ``parallax`` [mas],
        ``frame`` and ``obstime``. It is propagated with its proper motion to ``MJD``
        (``SkyCoord.apply_space_motion``). A SkyCoord is used as is.

    Returns
    -------
    SkyCoord
    """
    if isinstance(target, SkyCoord):
        return target
    if target is None:
        for key in ("RA", "DEC"):
            if key not in header:
                raise HeaderError(key, "missing (needed for the target coordinate)", path)
        frame = str(header.get("RADESYS", "ICRS")).strip().lower()
        equinox = float(header.get("EQUINOX", 2000.0)) if frame in ("fk5", "fk4") else None
        ra, dec = header["RA"], header["DEC"]
        try:
            return _header_coord(ra if isinstance(ra, str) else float(ra), dec if isinstance(ra, str) else float(dec),
                                 frame, equinox)
        except ValueError as err:
            raise HeaderError("RA/DEC", f"values {ra!r}/{dec!r} not parsed: {err}", path) from None

    mjd = header_mjd(header, path)
    attrs = ("ra", "dec", "pm_ra", "pm_dec", "parallax", "frame", "obstime")
    key = tuple(str(getattr(target, a, None)) for a in attrs)
    if isinstance(getattr(target, "obstime", None), Time):
        key = key + (float(target.obstime.jd1), float(target.obstime.jd2))
    # epoch of the space motion on a 1e-4 d (8.6 s) grid: < 1e-5 mas for any star
    return _moved_target(key, target, round(float(mjd), 4))


@functools.lru_cache(maxsize=64)
def _header_coord(ra, dec, frame: str, equinox: float | None) -> SkyCoord:
    """SkyCoord of header RA/DEC (parsing sexagesimal strings costs ~3 ms: cached)."""
    kwargs = {"equinox": f"J{equinox}"} if equinox is not None else {}
    if isinstance(ra, str):
        return SkyCoord(ra, dec, unit=(u.hourangle, u.deg), frame=frame, **kwargs)
    return SkyCoord(ra, dec, unit=u.deg, frame=frame, **kwargs)


_MOVED: dict = {}


def _moved_target(key: tuple, target, mjd: float) -> SkyCoord:
    """Target propagated with its proper motion to ``mjd`` (cached per target and epoch)."""
    hit = _MOVED.get((key, mjd))
    if hit is not None:
        return hit
    pm_ra = float(getattr(target, "pm_ra", 0.0) or 0.0)
    pm_dec = float(getattr(target, "pm_dec", 0.0) or 0.0)
    parallax = getattr(target, "parallax", None)
    frame = str(getattr(target, "frame", "icrs") or "icrs").lower()
    obstime = _obstime(getattr(target, "obstime", "J2016") or "J2016")
    kwargs = {}
    if parallax is not None and float(parallax) > 0:
        kwargs["distance"] = Distance(parallax=float(parallax) * u.mas)
    coord = SkyCoord(
        str(target.ra),
        str(target.dec),
        unit=(u.hourangle, u.deg),
        pm_ra_cosdec=pm_ra * u.mas / u.yr,
        pm_dec=pm_dec * u.mas / u.yr,
        frame=frame,
        obstime=obstime,
        **kwargs,
    )
    with warnings.catch_warnings():
        # no parallax: ERFA substitutes a large distance and warns ("distance overridden")
        warnings.simplefilter("ignore")
        moved = coord.apply_space_motion(new_obstime=Time(mjd, format="mjd", scale="utc"))
    if len(_MOVED) > 256:
        _MOVED.clear()
    _MOVED[(key, mjd)] = moved
    return moved


def update_angles(header, target=None, path=None, copy: bool = True) -> fits.Header:
    """Return a copy of a fixed header with the parallactic and derotation angles.

    Writes ``PA-STR``, ``PA``, ``PA-END`` (at ``MJD-STR``, ``MJD``, ``MJD-END``; the missing
    ends fall back to ``MJD``), ``PAOFFSET`` (from the header ``D_IMRPAP`` when present)
    and ``DEROTANG`` = wrap(PA + PAOFFSET). When ``target`` is given, ``RA``/``DEC`` (and
    ``RADESYS``) are overwritten with its proper-motion-corrected position at ``MJD``.

    Parameters
    ----------
    header : astropy.io.fits.Header
        Output of :func:`~vampd.instrument.headers.fix_header`.
    target : object or SkyCoord, optional
        See :func:`target_coord`.
    copy : bool
        False: update ``header`` in place (and return it).
    """
    from vampd.instrument.detectors import detector_from_header

    h = header.copy() if copy else header
    coord = target_coord(h, target, path)
    mjd = header_mjd(h, path)
    times = np.array(
        [float(h.get("MJD-STR", mjd)), mjd, float(h.get("MJD-END", mjd))], dtype=float
    )
    pa_str, pa, pa_end = parallactic_angle(coord.ra.deg, coord.dec.deg, times)

    det = detector_from_header(h, path)
    pap = float(h["D_IMRPAP"]) if "D_IMRPAP" in h else None
    offset = pa_offset(det, pap)

    if target is not None:
        h["RA"] = (coord.ra.to_string(unit=u.hourangle, sep=":", precision=3, pad=True), "RA")
        h["DEC"] = (
            coord.dec.to_string(unit=u.deg, sep=":", precision=2, alwayssign=True, pad=True),
            "DEC",
        )
        h["RADESYS"] = (coord.frame.name.upper(), "coordinate frame")
    h["PA-STR"] = (float(pa_str), "[deg] parallactic angle at exposure start")
    h["PA"] = (float(pa), "[deg] parallactic angle at exposure midpoint")
    h["PA-END"] = (float(pa_end), "[deg] parallactic angle at exposure end")
    h["PAOFFSET"] = (offset, "[deg] parallactic angle offset")
    h["DEROTANG"] = (derotation_angle(pa, offset), "[deg] derotation angle for North up")
    return h

"""Parallactic angle, PA offset and derotation angle (docs/instrument.md §1.10).

The parallactic angle is rigorous (unlike the reference, which subtracts the J2000 RA from
the apparent sidereal time): the position angle in ICRS of the zenith as seen from the
target, with the zenith's ICRS place from astropy (see ``docs/angles-and-mueller.md``).

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
from astropy.coordinates import ICRS, AltAz, Distance, EarthLocation, SkyCoord
from astropy.io import fits
from astropy.time import Time

from vampd.instrument.headers import HeaderError, header_mjd, sexagesimal_deg

__all__ = [
    "wrap",
    "SUBARU_LAT_DEG",
    "SUBARU_LON_DEG",
    "SUBARU",
    "parallactic_angle",
    "sky_angles",
    "pa_offset",
    "derotation_angle",
    "target_coord",
    "local_sidereal_hours",
    "update_angles",
    "refresh_angles",
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


#: the zenith's ICRS place is computed exactly on this UTC grid [days] and interpolated between
_ZEN_STEP = 300.0 / 86400.0
#: grid steps per cached block (one astropy transform call per block: 2 hours)
_ZEN_BLOCK = 24


@functools.lru_cache(maxsize=64)
def _zenith_block(block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ICRS places of the zenith and of the north point of the horizon on one grid block.

    Returns the grid times [MJD, UTC] and two ``(n, 2)`` arrays of (RA unwrapped, Dec) [deg]:
    the zenith (``AltAz`` alt 90°) and the north point (alt 0°, az 0°) at Subaru, from one
    astropy ``AltAz → ICRS`` transform (precession, nutation, aberration, polar motion;
    no refraction, which moves nothing along the vertical through the zenith).
    """
    n = _ZEN_BLOCK + 1
    t = (block * _ZEN_BLOCK + np.arange(n)) * _ZEN_STEP
    times = Time(np.concatenate([t, t]), format="mjd", scale="utc")
    alt = np.concatenate([np.full(n, 90.0), np.zeros(n)])
    frame = AltAz(obstime=times, location=SUBARU)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # past the IERS table: predicted values (offline)
        icrs = SkyCoord(alt=alt * u.deg, az=np.zeros(2 * n) * u.deg, frame=frame).transform_to(ICRS())
    ra = np.unwrap(np.deg2rad(icrs.ra.deg.reshape(2, n)), axis=1)
    radec = np.stack([np.rad2deg(ra), icrs.dec.deg.reshape(2, n)], axis=-1)
    return t, radec[0], radec[1]


def _interp_places(mjd: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """ICRS (RA, Dec) [deg] of the zenith and of the north point at UTC MJDs.

    Linear in time between exact values every 5 min: the places move at the sidereal rate
    plus terms with a period of ≥ 1 sidereal day and amplitudes ≤ 0.2°, so the interpolation
    error is below 1e-5° (< 0.001° of PA even 1° from the zenith).
    """
    flat = np.asarray(mjd, dtype=float).reshape(-1)
    out = np.empty((4, flat.size))
    blocks = np.floor(flat / (_ZEN_STEP * _ZEN_BLOCK)).astype(np.int64)
    for b in np.unique(blocks):
        sel = blocks == b
        t, zen, north = _zenith_block(int(b))
        m = flat[sel]
        for j, (arr, col) in enumerate(((zen, 0), (zen, 1), (north, 0), (north, 1))):
            out[j, sel] = np.interp(m, t, arr[:, col])
    shape = np.shape(mjd)
    return tuple(o.reshape(shape) for o in out)  # type: ignore[return-value]


def _position_angle(ra1, dec1, ra2, dec2) -> np.ndarray:
    """Position angle [deg, East of North] of point 2 as seen from point 1 (radians in)."""
    dra = ra2 - ra1
    return np.rad2deg(
        np.arctan2(np.sin(dra) * np.cos(dec2), np.cos(dec1) * np.sin(dec2) - np.sin(dec1) * np.cos(dec2) * np.cos(dra))
    )


def sky_angles(ra_deg, dec_deg, mjd) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Parallactic angle, altitude and azimuth [deg] of an ICRS position at Subaru.

    The parallactic angle is the position angle, from ICRS North through East, of the zenith
    as seen from the target: ``PA = atan2(sin Δα cos δz, cos δ sin δz − sin δ cos δz cos Δα)``
    with (αz, δz) the ICRS place of the zenith at that instant (astropy ``AltAz → ICRS``) and
    Δα = αz − α; then :func:`wrap`. Positive west of the meridian. Altitude = 90° minus the
    separation from the zenith (no refraction); azimuth (North through East) = the position
    angle at the zenith of the target minus that of the north point of the horizon.

    Parameters
    ----------
    ra_deg, dec_deg : float or array
        ICRS coordinates [deg] (broadcast against ``mjd``).
    mjd : float or array
        Times, UTC MJD.
    """
    zra, zdec, nra, ndec = (np.deg2rad(a) for a in _interp_places(np.asarray(mjd, dtype=float)))
    ra = np.deg2rad(np.asarray(ra_deg, dtype=float))
    dec = np.deg2rad(np.asarray(dec_deg, dtype=float))
    pa = _position_angle(ra, dec, zra, zdec)
    cos_z = np.sin(dec) * np.sin(zdec) + np.cos(dec) * np.cos(zdec) * np.cos(ra - zra)
    alt = 90.0 - np.rad2deg(np.arccos(np.clip(cos_z, -1.0, 1.0)))
    az = (_position_angle(zra, zdec, ra, dec) - _position_angle(zra, zdec, nra, ndec)) % 360.0
    return np.asarray(wrap(pa)), np.asarray(alt), np.asarray(az)


def parallactic_angle(ra_deg, dec_deg, mjd) -> np.ndarray:
    """Parallactic angle [deg East of North, positive west of the meridian] at Subaru.

    The position angle, from ICRS North through East, of the zenith as seen from the target
    at ``mjd`` (see :func:`sky_angles`; apparent place: precession, nutation, aberration
    included), then :func:`wrap`.

    Parameters
    ----------
    ra_deg, dec_deg : float or array
        ICRS coordinates [deg] (broadcast against ``mjd``).
    mjd : float or array
        Times, UTC MJD.

    Returns
    -------
    ndarray
        Same shape as the broadcast inputs (0-d for scalars).
    """
    return sky_angles(ra_deg, dec_deg, mjd)[0]


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
            return _header_coord(
                ra if isinstance(ra, str) else float(ra), dec if isinstance(ra, str) else float(dec), frame, equinox
            )
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
    """SkyCoord of header RA/DEC (degrees, or sexagesimal strings: :func:`~vampd.instrument.headers.sexagesimal_deg`; cached)."""
    kwargs = {"equinox": f"J{equinox}"} if equinox is not None else {}
    if isinstance(ra, str):
        ra = sexagesimal_deg(ra, hours=True)
    if isinstance(dec, str):
        dec = sexagesimal_deg(dec, hours=False)
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


_ICRS: dict = {}


def _icrs_radec(coord: SkyCoord) -> tuple[float, float]:
    """ICRS RA/Dec [deg] of a scalar coordinate (the frame transform is cached)."""
    frame = coord.frame.name
    if frame == "icrs":
        return float(coord.ra.deg), float(coord.dec.deg)
    key = (frame, float(coord.ra.deg), float(coord.dec.deg), str(getattr(coord, "equinox", None)))
    hit = _ICRS.get(key)
    if hit is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            c = coord.icrs
        hit = (float(c.ra.deg), float(c.dec.deg))
        if len(_ICRS) > 256:
            _ICRS.clear()
        _ICRS[key] = hit
    return hit


def update_angles(header, target=None, path=None, copy: bool = True) -> fits.Header:
    """Return a copy of a fixed header with the parallactic and derotation angles.

    Writes ``PA-STR``, ``PA``, ``PA-END`` (at ``MJD-STR``, ``MJD``, ``MJD-END``; the missing
    ends fall back to ``MJD``; :func:`sky_angles`), ``ALTITUDE``/``AZIMUTH`` at ``MJD`` computed
    from the coordinates (what the Mueller model uses, consistent with ``PA``), ``PAOFFSET`` (from the header ``D_IMRPAP`` when present)
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
    ra_icrs, dec_icrs = _icrs_radec(coord)
    mjd = header_mjd(h, path)
    times = np.array([float(h.get("MJD-STR", mjd)), mjd, float(h.get("MJD-END", mjd))], dtype=float)
    (pa_str, pa, pa_end), alt, az = sky_angles(ra_icrs, dec_icrs, times)

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
    h["ALTITUDE"] = (round(float(alt[1]), 6), "[deg] mid-exposure altitude (computed)")
    h["AZIMUTH"] = (round(float(az[1]), 6), "[deg] azimuth N->E at mid-exposure (computed)")
    h["PAOFFSET"] = (offset, "[deg] parallactic angle offset")
    h["DEROTANG"] = (derotation_angle(pa, offset), "[deg] derotation angle for North up")
    return h


def refresh_angles(header, path=None) -> fits.Header:
    """Recompute the angles of a combined header at its own times (in place).

    ``PA-STR``/``PA``/``PA-END`` at ``MJD-STR``/``MJD``/``MJD-END`` from the header ``RA``/
    ``DEC`` (:func:`sky_angles`), ``PA-ROT`` = wrap(PA-END − PA-STR) and ``DEROTANG`` =
    wrap(PA + PAOFFSET). A mean of the members' angles is not the angle at the mean time when
    the field rotates fast (near the zenith), so every product states the angle at its ``MJD``.
    Headers without ``PA``, ``RA``/``DEC`` or times are returned unchanged.
    """
    if "PA" not in header or "RA" not in header or "DEC" not in header:
        return header
    mjd = header_mjd(header, path, required=False)
    if mjd is None:
        return header
    try:
        ra, dec = _icrs_radec(target_coord(header, None, path))
    except ValueError:
        return header
    times = np.array([float(header.get("MJD-STR", mjd)), mjd, float(header.get("MJD-END", mjd))])
    (pa_str, pa, pa_end), _, _ = sky_angles(ra, dec, times)
    if "PA-STR" in header:
        header["PA-STR"] = (float(pa_str), "[deg] parallactic angle at start")
    header["PA"] = (float(pa), "[deg] parallactic angle at MJD")
    if "PA-END" in header:
        header["PA-END"] = (float(pa_end), "[deg] parallactic angle at end")
    if "PA-ROT" in header:
        header["PA-ROT"] = (float(wrap(pa_end - pa_str)), "[deg] parallactic angle rotation")
    if "DEROTANG" in header and "PAOFFSET" in header:
        header["DEROTANG"] = (
            float(derotation_angle(pa, float(header["PAOFFSET"]))),
            "[deg] derotation angle for North up",
        )
    return header

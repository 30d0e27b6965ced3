"""Tests of the instrument model: detectors, fix_header, angles, WCS, fields and flip."""

from __future__ import annotations

import math
import pickle
from types import SimpleNamespace

import astropy.units as u
import numpy as np
import pytest
from astropy.coordinates import AltAz, SkyCoord
from astropy.io import fits
from astropy.time import Time
from astropy.wcs import WCS

import vampd  # noqa: F401  (offline astropy)
from vampd.instrument import (
    NBS_INSTALL_MJD,
    HeaderError,
    apply_wcs,
    cmos_detector,
    default_field_centers,
    derotation_angle,
    detector_from_header,
    emccd_detector,
    field_names,
    fix_header,
    flip_cube,
    flipped_camera,
    header_summary,
    is_flipped,
    is_post_nbs,
    missing_keywords,
    normalize_flc,
    pa_offset,
    parallactic_angle,
    raw_to_calibrated_yx,
    required_keywords,
    update_angles,
    wrap,
)
from vampd.instrument.angles import SUBARU, SUBARU_LAT_DEG, SUBARU_LON_DEG, sky_angles

# ---------------------------------------------------------------------------------------
# fixtures

# The EMCCD archive sample VMPA00021059.fits (docs/instrument.md §1.3 / §12 test_organization);
# UT-END/HST-END chosen consistent with MJD-END. MJD is the file-creation time (> MJD-END).
EMCCD_SAMPLE = {
    "SIMPLE": True,
    "BITPIX": 16,
    "NAXIS": 3,
    "NAXIS1": 256,
    "NAXIS2": 256,
    "NAXIS3": 139,
    "BZERO": 32768,
    "BSCALE": 1,
    "U_CAMERA": 1.0,
    "U_EMGAIN": 300,
    "U_AQTINT": 250000,
    "EXPTIME": 0.25,
    "U_FILTER": "750-50",
    "U_HWPANG": 45.0,
    "U_FLCSTT": 1,
    "U_MASK": "LyotStop",
    "D_IMRPAP": -39.0,
    "D_IMRANG": 92.85608,
    "D_IMRMOD": "ADI",
    "D_IMRPAD": -118.507,
    "ALTITUDE": 56.68925,
    "AZIMUTH": 295.86528,
    "AIRMASS": 1.196,
    "RA": "04:55:45.674",
    "DEC": "+30:33:07.39",
    "RADESYS": "FK5",
    "EQUINOX": 2000.0,
    "OBJECT": "ABAUR",
    "OBS-MOD": "IMAG_POL",
    "DATA-TYP": "ACQUISITION",
    "DATE-OBS": "2022-02-24",
    "UT-STR": "07:21:24:254",
    "UT-END": "07:22:33:984",
    "HST-STR": "21:21:24:262",
    "HST-END": "21:22:33:992",
    "MJD-STR": 59634.306528,
    "MJD-END": 59634.307338,
    "MJD": 59634.30736254,
}

# A post-NBS CMOS MBI file, camera 2, FAST readout, MJD ~ 61000 (2025-11-21).
CMOS_POST = {
    "SIMPLE": True,
    "BITPIX": 16,
    "NAXIS": 3,
    "NAXIS1": 1100,
    "NAXIS2": 540,
    "NAXIS3": 50,
    "U_CAMERA": 2,
    "U_DETMOD": "FAST",
    "EXPTIME": 0.01,
    "FILTER01": "Open",
    "FILTER02": "Open",
    "OBS-MOD": "IPOL_MBI",
    "U_FLC": "B",
    "U_FLCST": "IN",
    "RET-ANG1": "22.5",
    "RET-MOD1": "SYNCHRO_ADI",
    "D_IMRPAP": -37.0,
    "PRD-MIN1": 1000,
    "PRD-MIN2": 800,
    "PRD-RNG1": 1100,
    "PRD-RNG2": 540,
    "RA": "18:20:00.000",
    "DEC": "-10:00:00.00",
    "RADESYS": "ICRS",
    "OBJECT": "TEST",
    "DATA-TYP": "OBJECT",
    "DATE-OBS": "2025-11-21",
    "UT-STR": "05:00:00.000",
    "UT-END": "05:00:00.500",
    "MJD-STR": 61000.208333333,
    "MJD-END": 61000.208339120,
    "MJD": 61000.21,
}


def make_header(values: dict, **changes) -> fits.Header:
    h = fits.Header()
    for key, value in {**values, **changes}.items():
        if value is not None:
            h[key] = value
    return h


@pytest.fixture
def emccd_raw():
    return make_header(EMCCD_SAMPLE)


@pytest.fixture
def cmos_raw():
    return make_header(CMOS_POST)


# ---------------------------------------------------------------------------------------
# independent sidereal time (USNO approximate GAST, ~0.1 s) for the hand-computed PA


def gast_hours_usno(mjd_ut1: float) -> float:
    jd = mjd_ut1 + 2400000.5
    d = jd - 2451545.0
    jd0 = math.floor(jd - 0.5) + 0.5
    d0 = jd0 - 2451545.0
    hours = (jd - jd0) * 24.0
    t = d / 36525.0
    gmst = 6.697374558 + 0.06570982441908 * d0 + 1.00273790935 * hours + 0.000026 * t**2
    omega = math.radians(125.04 - 0.052954 * d)
    lsun = math.radians(280.47 + 0.98565 * d)
    eps = math.radians(23.4393 - 0.0000004 * d)
    dpsi = -0.000319 * math.sin(omega) - 0.000024 * math.sin(2 * lsun)
    return (gmst + dpsi * math.cos(eps)) % 24.0


def pa_by_hand(ra_deg: float, dec_deg: float, mjd: float) -> float:
    last = gast_hours_usno(mjd) + SUBARU_LON_DEG / 15.0
    h = math.radians(15.0 * last - ra_deg)
    d, p = math.radians(dec_deg), math.radians(SUBARU_LAT_DEG)
    pa = math.degrees(math.atan2(math.sin(h), math.tan(p) * math.cos(d) - math.sin(d) * math.cos(h)))
    return wrap(pa)


# ---------------------------------------------------------------------------------------
# detectors


def test_nbs_predicate_and_flipped_camera():
    assert NBS_INSTALL_MJD == 60949.0
    assert not is_post_nbs(60948.99)
    assert is_post_nbs(60949.0)
    assert flipped_camera(60948.99) == 1
    assert flipped_camera(60949.0) == 2


@pytest.mark.parametrize(
    ("mjd", "cam", "flipped"),
    [(60948.99, 1, True), (60948.99, 2, False), (60949.0, 1, False), (60949.0, 2, True)],
)
def test_flip_rule_either_side_of_nbs(mjd, cam, flipped):
    h = make_header({"U_CAMERA": cam, "MJD": mjd})
    assert is_flipped(h) is flipped
    cube = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    out = flip_cube(cube, h)
    expected = cube[:, ::-1, :] if flipped else cube
    np.testing.assert_array_equal(out, expected)
    # raw (0, 1) in a 3-row frame: row 0 becomes row 2 on the flipped camera
    y, x = raw_to_calibrated_yx(0.0, 1.0, 3, h)
    assert (y, x) == ((2.0, 1.0) if flipped else (0.0, 1.0))


def test_raw_to_calibrated_vectorised():
    h = make_header({"U_CAMERA": 2, "MJD": 61000.0})
    y, x = raw_to_calibrated_yx(np.array([0.0, 10.5, 99.0]), np.array([1.0, 2.0, 3.0]), 100, h)
    np.testing.assert_allclose(y, [99.0, 88.5, 0.0])
    np.testing.assert_allclose(x, [1.0, 2.0, 3.0])


# (label, detector, gain, effgain, rn, enf, dc, bias, fullwell, pxscale, pupil, pap)
DETECTOR_TABLE = [
    (
        "emccd cam1 em",
        emccd_detector(1, 300, 59634.3),
        4.5,
        0.015,
        89.0,
        math.sqrt(2),
        1.5e-4,
        150,
        294912.0,
        6.24,
        140.4,
        -39,
    ),
    ("emccd cam2 conv", emccd_detector(2, 0, 59634.3), 4.5, 4.5, 9.6, 1.0, 1.5e-4, 150, 180000.0, 6.24, 140.4, -39),
    (
        "cmos pre fast cam1",
        cmos_detector(1, "FAST", 60500.0),
        0.103,
        0.103,
        0.403,
        1.0,
        3.6e-3,
        200,
        6750.208,
        5.91,
        -38.40,
        -39,
    ),
    (
        "cmos pre fast cam2",
        cmos_detector(2, "fast", 60500.0),
        0.103,
        0.103,
        0.399,
        1.0,
        3.6e-3,
        200,
        6750.208,
        5.895,
        -38.58,
        -39,
    ),
    (
        "cmos pre slow cam1",
        cmos_detector(1, "SLOW", 60500.0),
        0.105,
        0.105,
        0.245,
        1.0,
        3.6e-3,
        200,
        6881.28,
        5.91,
        -38.40,
        -39,
    ),
    (
        "cmos pre slow cam2",
        cmos_detector(2, "slow", 60500.0),
        0.105,
        0.105,
        0.220,
        1.0,
        3.6e-3,
        200,
        6881.28,
        5.895,
        -38.58,
        -39,
    ),
    (
        "cmos post fast cam1",
        cmos_detector(1, "FAST", 61000.0),
        0.103,
        0.103,
        0.403,
        1.0,
        3.6e-3,
        200,
        6750.208,
        5.952,
        129.44,
        -37,
    ),
    (
        "cmos post slow cam2",
        cmos_detector(2, "SLOW", 61000.0),
        0.105,
        0.105,
        0.220,
        1.0,
        3.6e-3,
        200,
        6881.28,
        5.938,
        129.99,
        -37,
    ),
]


@pytest.mark.parametrize("row", DETECTOR_TABLE, ids=[r[0] for r in DETECTOR_TABLE])
def test_detector_constants(row):
    _, det, gain, effgain, rn, enf, dc, bias, fullwell, pxscale, pupil, pap = row
    assert det.gain == pytest.approx(gain)
    assert det.effgain == pytest.approx(effgain)
    assert det.readnoise == pytest.approx(rn)
    assert det.enf == pytest.approx(enf)
    assert det.dark_current == pytest.approx(dc)
    assert det.bias == pytest.approx(bias)
    assert det.fullwell == pytest.approx(fullwell)
    assert det.pixel_scale == pytest.approx(pxscale)
    assert det.pupil_offset == pytest.approx(pupil)
    assert det.default_pap == pap
    # uint16 saturation is reachable: never above 65535
    assert det.saturation_adu <= 65535
    assert det.saturation_adu == pytest.approx(min(bias + fullwell / gain, 65535))


def test_saturation_level_reachable():
    # 2**16 * gain / gain = 65536 adu in the reference: a clipped 65535 pixel never matched
    det = cmos_detector(1, "fast", 61000.0)
    assert det.satlevel == pytest.approx(65536.0)
    assert det.saturation_adu == 65535.0
    assert np.uint16(65535) >= det.saturation_adu
    # conventional-mode EMCCD: the 180 000 e- full well above the 150 adu bias
    assert emccd_detector(1, 0).saturation_adu == pytest.approx(40150.0)


def test_fullwell_halved_june_july_2023():
    det = cmos_detector(1, "fast", 60120.0)  # 2023-06-25
    assert det.fullwell == pytest.approx(6750.208 / 2)
    assert det.saturation_adu == pytest.approx(32768.0)
    assert cmos_detector(1, "fast", 60096.0).fullwell == pytest.approx(6750.208)  # 06-01
    assert cmos_detector(1, "fast", 60149.0).fullwell == pytest.approx(6750.208)  # 07-24


@pytest.mark.parametrize(
    ("det", "pap", "expected"),
    [
        (emccd_detector(1, 300), -39.0, -78.6),
        (cmos_detector(1, "fast", 60500.0), -39.0, 102.60),
        (cmos_detector(2, "fast", 60500.0), -39.0, 102.42),
        (cmos_detector(1, "fast", 61000.0), -37.0, -87.56),
        (cmos_detector(2, "slow", 61000.0), -37.0, -87.01),
    ],
)
def test_pa_offset_values(det, pap, expected):
    assert pa_offset(det, pap) == pytest.approx(expected, abs=1e-9)
    assert pa_offset(det) == pytest.approx(expected, abs=1e-9)  # default PAP


def test_detector_from_header_selection(emccd_raw, cmos_raw):
    det = detector_from_header(emccd_raw)
    assert (det.kind, det.cam_num, det.emgain, det.readmode) == ("emccd", 1, 300.0, "em")
    det = detector_from_header(cmos_raw)
    assert (det.kind, det.cam_num, det.readmode, det.post_nbs) == ("cmos", 2, "fast", True)
    assert det.pixel_scale == 5.938
    pre = detector_from_header(make_header(CMOS_POST, MJD=60948.99))
    assert (pre.post_nbs, pre.pixel_scale, pre.pupil_offset) == (False, 5.895, -38.58)


def test_detector_from_header_errors(cmos_raw):
    h = cmos_raw.copy()
    del h["U_DETMOD"]
    with pytest.raises(HeaderError, match="neither U_EMGAIN nor U_DETMOD") as info:
        detector_from_header(h, path="VMPB00000001.fits")
    assert str(info.value).startswith("VMPB00000001.fits: header keyword ")
    h = make_header(CMOS_POST, U_DETMOD="MEDIUM")
    with pytest.raises(HeaderError, match="U_DETMOD: value 'MEDIUM'"):
        detector_from_header(h)
    with pytest.raises(HeaderError, match="U_CAMERA: value 3"):
        detector_from_header(make_header(CMOS_POST, U_CAMERA=3))


# ---------------------------------------------------------------------------------------
# fix_header


def test_fix_header_does_not_mutate(emccd_raw):
    before = emccd_raw.tostring()
    fixed = fix_header(emccd_raw)
    assert emccd_raw.tostring() == before
    assert fixed is not emccd_raw


def test_fix_header_idempotent(emccd_raw, cmos_raw):
    for raw in (emccd_raw, cmos_raw):
        once = fix_header(raw)
        assert fix_header(once).tostring() == once.tostring()


def test_fix_header_times(emccd_raw):
    h = fix_header(emccd_raw)
    for key in ("UT-STR", "UT-END", "HST-STR", "HST-END"):
        assert h[key].count(":") == 2 and h[key].count(".") == 1, key
    assert h["UT-STR"] == "07:21:24.254"
    assert h["UT-END"] == "07:22:33.984"
    # midpoint of 26484.254 s and 26553.984 s = 26519.119 s
    assert h["UT"] == "07:21:59.119"
    assert h["HST"] == "21:21:59.119"
    assert h["HST-STR"] < h["HST"] < h["HST-END"]
    assert h["UT-STR"] < h["UT"] < h["UT-END"]
    assert h["DATE-OBS"] == "2022-02-24"
    # MJD is the exposure midpoint, not the file-creation time of the raw header
    assert h["MJD-STR"] < h["MJD"] < h["MJD-END"]
    assert h["MJD"] == pytest.approx((59634.306528 + 59634.307338) / 2, abs=1e-9)


def test_fix_header_mjd_from_ut_only():
    h = fix_header(make_header(EMCCD_SAMPLE, **{"MJD-STR": None, "MJD-END": None, "MJD": None}))
    # 07:21:59.119 on 2022-02-24 (MJD 59634) = 59634 + 26519.119/86400
    assert h["MJD"] == pytest.approx(59634 + 26519.119 / 86400, abs=1e-8)
    assert h["MJD-STR"] == pytest.approx(59634 + 26484.254 / 86400, abs=1e-8)
    assert h["MJD-STR"] < h["MJD"] < h["MJD-END"]


def test_fix_header_hst_previous_day_and_midnight_crossing():
    h = fix_header(
        make_header(CMOS_POST, **{"UT-STR": "23:59:59.000", "UT-END": "00:00:01.000", "MJD-STR": None, "MJD-END": None})
    )
    assert h["UT"] == "00:00:00.000"
    assert h["DATE-OBS"] == "2025-11-22"
    assert h["HST"] == "14:00:00.000"
    assert h["MJD"] == pytest.approx(61001.0, abs=1e-9)


def test_fix_header_emccd_translations(emccd_raw):
    h = fix_header(emccd_raw)
    assert h["DETGAIN"] == 300
    assert h["RET-ANG1"] == 45.0 and isinstance(h["RET-ANG1"], float)
    assert h["RETPLAT1"] == "HWP(NIR)"
    assert h["U_FLC"] == "A"
    assert h["U_CAMERA"] == 1 and isinstance(h["U_CAMERA"], int)
    assert (h["FILTER01"], h["FILTER02"]) == ("750-50", "Unknown")
    assert h["DETECTOR"] == "VCAM1 - Ultra 897"
    assert h["OBS-MOD"] == "IMAG_POL"
    assert (h["PRD-MIN1"], h["PRD-MIN2"], h["PRD-RNG1"], h["PRD-RNG2"]) == (128, 128, 256, 256)
    assert h["TINT"] == pytest.approx(0.25 * 139)
    assert h["NDIT"] == 139
    assert h["BUNIT"] == "ADU"
    assert h["INSTRUME"] == "VAMPIRES"
    assert h["BIAS"] == 150 and h["GAIN"] == 4.5 and h["EFFGAIN"] == pytest.approx(0.015)
    assert h["RN"] == 89.0 and h["ENF"] == pytest.approx(math.sqrt(2)) and h["DC"] == 1.5e-4
    assert h["PXSCALE"] == 6.24 and h["PXAREA"] == pytest.approx(0.00624**2)
    assert h["PAOFFSET"] == pytest.approx(-78.6) and h["INST-PA"] == 140.4
    assert h["FULLWELL"] == pytest.approx(294912.0)
    # FLC state 2 -> B; EXPTIME from U_AQTINT when missing
    h2 = fix_header(make_header(EMCCD_SAMPLE, U_FLCSTT=2, EXPTIME=None, U_AQTINT=100000))
    assert h2["U_FLC"] == "B"
    assert h2["EXPTIME"] == pytest.approx(0.1)


def test_fix_header_cmos_post_nbs(cmos_raw):
    h = fix_header(cmos_raw)
    assert h["U_CAMERA"] == 2
    assert h["U_FLC"] == "B"
    assert h["RET-ANG1"] == 22.5 and isinstance(h["RET-ANG1"], float)
    assert h["PXSCALE"] == 5.938 and h["INST-PA"] == 129.99
    assert h["PAOFFSET"] == pytest.approx(-87.01)
    assert h["GAIN"] == 0.103 and h["EFFGAIN"] == 0.103 and h["RN"] == 0.399
    assert h["FULLWELL"] == pytest.approx(6750.208)
    assert h["PRD-MIN1"] == 1000  # kept, not replaced by the EMCCD default
    assert h["MJD"] == pytest.approx((61000.208333333 + 61000.208339120) / 2, abs=1e-10)
    assert "DETGAIN" not in h and "RETPLAT1" not in h


@pytest.mark.parametrize(("value", "expected"), [("A", "A"), ("b", "B"), (None, "NA"), ("", "NA"), (True, "NA")])
def test_fix_header_flc_normalised(value, expected):
    raw = make_header(CMOS_POST, U_FLC=None)
    if value is not None:
        raw["U_FLC"] = value
    assert fix_header(raw)["U_FLC"] == expected
    assert normalize_flc(float("nan")) == "NA"  # what a table/ledger NaN becomes


def test_fix_header_missing_ret_ang_left_absent():
    h = fix_header(make_header(CMOS_POST, **{"RET-ANG1": None}))
    assert "RET-ANG1" not in h


@pytest.mark.parametrize(
    ("changes", "keyword", "text"),
    [
        ({"U_CAMERA": None}, "U_CAMERA", "missing"),
        ({"U_CAMERA": "left"}, "U_CAMERA", "value 'left', expected 1 or 2"),
        ({"EXPTIME": None}, "EXPTIME", "missing (and no U_AQTINT"),
        ({"MJD": None, "MJD-STR": None, "MJD-END": None, "UT-STR": None}, "MJD", "missing"),
        ({"UT-STR": "7h21m"}, "UT-STR", "value '7h21m', expected hh:mm:ss.sss"),
        ({"U_DETMOD": None}, "U_EMGAIN/U_DETMOD", "neither U_EMGAIN nor U_DETMOD"),
        ({"ACQNCYCS": 4}, "ACQNCYCS", "not supported"),
        ({"RET-ANG1": "forty"}, "RET-ANG1", "value 'forty', expected a number"),
    ],
)
def test_fix_header_errors(changes, keyword, text):
    with pytest.raises(HeaderError) as info:
        fix_header(make_header(CMOS_POST, **changes), path="/night/VMPB00000042.fits")
    err = info.value
    assert isinstance(err, ValueError)
    assert err.keyword == keyword
    assert err.path == "/night/VMPB00000042.fits"
    assert text in err.problem
    assert str(err) == f"/night/VMPB00000042.fits: header keyword {keyword}: {err.problem}"


def test_header_error_pickles():
    err = HeaderError("EXPTIME", "missing", "a.fits")
    back = pickle.loads(pickle.dumps(err))
    assert (back.keyword, back.problem, back.path, str(back)) == (
        "EXPTIME",
        "missing",
        "a.fits",
        "a.fits: header keyword EXPTIME: missing",
    )


def test_required_and_missing_keywords(emccd_raw, cmos_raw):
    req = required_keywords()
    assert ("U_CAMERA",) in req and ("EXPTIME", "U_AQTINT") in req
    assert missing_keywords(emccd_raw) == []
    assert missing_keywords(cmos_raw) == []
    h = make_header(CMOS_POST, EXPTIME=None, U_CAMERA=None)
    assert missing_keywords(h) == ["U_CAMERA", "EXPTIME or U_AQTINT"]


def test_header_summary(emccd_raw, cmos_raw):
    s = header_summary(fix_header(emccd_raw))
    assert s == {
        "target": "ABAUR",
        "filter": "750-50",
        "camera": 1,
        "flc": "A",
        "hwp": 45.0,
        "exptime": 0.25,
        "mjd": pytest.approx(59634.306933),
        "nframes": 139,
        "obs_mod": "IMAG_POL",
        "data_typ": "ACQUISITION",
    }
    assert header_summary(emccd_raw) == {**s, "mjd": pytest.approx(59634.30736254)}
    s = header_summary(fix_header(cmos_raw))
    assert s["filter"] == "F610,F670,F720,F760"
    assert (s["camera"], s["flc"], s["hwp"], s["nframes"]) == (2, "B", 22.5, 50)


# ---------------------------------------------------------------------------------------
# angles


def test_wrap():
    assert wrap(190.0) == -170.0
    assert wrap(-190.0) == 170.0
    assert wrap(180.0) == 180.0 and wrap(-180.0) == -180.0
    assert wrap(540.0) == 180.0  # a single fold only
    np.testing.assert_allclose(wrap(np.array([-257.4, 10.0, 200.0])), [102.6, 10.0, -160.0])


def pa_astropy(ra_deg, dec_deg, mjd, frame="icrs"):
    """Truth: position angle (ICRS, N through E) of the zenith seen from the target (astropy)."""
    t = Time(np.atleast_1d(mjd), format="mjd", scale="utc")
    zen = SkyCoord(alt=90 * u.deg, az=0 * u.deg, frame=AltAz(obstime=t, location=SUBARU)).icrs
    target = SkyCoord(ra_deg * u.deg, dec_deg * u.deg, frame=frame).icrs
    return np.asarray(wrap(target.position_angle(zen).deg))


def test_parallactic_angle_is_the_zenith_position_angle(emccd_raw):
    h = update_angles(fix_header(emccd_raw))
    coord = SkyCoord("04:55:45.674", "+30:33:07.39", unit=("hourangle", "deg"), frame="fk5", equinox="J2000")
    for key in ("PA-STR", "PA", "PA-END"):
        mjd = h[{"PA-STR": "MJD-STR", "PA": "MJD", "PA-END": "MJD-END"}[key]]
        truth = pa_astropy(coord.ra.deg, coord.dec.deg, mjd, frame=coord.frame)
        assert h[key] == pytest.approx(float(truth[0]), abs=1e-3)
    # the J2000 hour-angle formula of the reference (no precession) is 0.18 deg off in 2022
    assert abs(h["PA"] - pa_by_hand(coord.ra.deg, coord.dec.deg, h["MJD"])) > 0.1
    assert h["PAOFFSET"] == pytest.approx(-78.6)
    assert h["DEROTANG"] == pytest.approx(wrap(h["PA"] - 78.6), abs=1e-9)


def test_parallactic_angle_from_apparent_place_by_hand():
    # independent of astropy's frames: precess J2000 -> date (IAU 1976, Lieske), then the
    # hour-angle formula with the apparent sidereal time; differs from the ICRS-north PA only
    # by the small rotation between mean-of-date and ICRS north at the target (< 0.01 deg
    # for this target) plus nutation/aberration (few arcsec in position)
    mjd = 61000.3
    ra, dec = 275.0, 25.0
    tc = (mjd - 51544.5) / 36525.0
    zeta = math.radians((2306.2181 * tc + 0.30188 * tc**2) / 3600)
    z = math.radians((2306.2181 * tc + 1.09468 * tc**2) / 3600)
    theta = math.radians((2004.3109 * tc - 0.42665 * tc**2) / 3600)
    a0, d0 = math.radians(ra), math.radians(dec)
    aa = math.cos(d0) * math.sin(a0 + zeta)
    bb = math.cos(theta) * math.cos(d0) * math.cos(a0 + zeta) - math.sin(theta) * math.sin(d0)
    cc = math.sin(theta) * math.cos(d0) * math.cos(a0 + zeta) + math.cos(theta) * math.sin(d0)
    ra_date, dec_date = math.degrees(math.atan2(aa, bb) + z), math.degrees(math.asin(cc))
    # angle at the target from the J2000 north to the north of date (IAU 1976 precession)
    rot = math.degrees(
        math.atan2(
            math.sin(theta) * math.sin(a0 + zeta),
            math.cos(d0) * math.cos(theta) - math.sin(d0) * math.sin(theta) * math.cos(a0 + zeta),
        )
    )
    pa_date = pa_by_hand(ra_date, dec_date, mjd)
    assert float(parallactic_angle(ra, dec, mjd)) == pytest.approx(pa_date - rot, abs=0.01)
    assert abs(rot) > 0.1  # precession matters at this level
    assert float(parallactic_angle(ra, dec, mjd)) == pytest.approx(float(pa_astropy(ra, dec, mjd)[0]), abs=1e-3)


def test_parallactic_angle_consistent_with_telescope_altaz(emccd_raw):
    # independent check against the telescope's own ALTITUDE/AZIMUTH (Meeus alt/az PA);
    # differences come from refraction and the header time, so 0.5 deg
    alt, az = math.radians(56.68925), math.radians(295.86528) - math.pi
    lat = math.radians(SUBARU_LAT_DEG)
    dec = math.asin(math.sin(alt) * math.sin(lat) - math.cos(alt) * math.cos(lat) * math.cos(az))
    ha = math.atan2(math.sin(az), math.cos(az) * math.sin(lat) + math.tan(alt) * math.cos(lat))
    pa_altaz = math.degrees(math.atan2(math.sin(ha), math.tan(lat) * math.cos(dec) - math.sin(dec) * math.cos(ha)))
    h = update_angles(fix_header(emccd_raw))
    assert h["PA"] == pytest.approx(pa_altaz, abs=0.5)
    # the computed mid-exposure alt/az agree with the telescope's to the same level
    assert h["ALTITUDE"] == pytest.approx(56.68925, abs=0.5)
    assert h["AZIMUTH"] == pytest.approx(295.86528, abs=0.5)


def test_parallactic_angle_post_nbs_offline(cmos_raw):
    # a late-2026-ish date beyond the bundled IERS table must work without network
    mjds = np.array([61000.2, 61000.25, 61300.3])
    pa = parallactic_angle(275.0, -10.0, mjds)
    assert pa.shape == (3,)
    np.testing.assert_allclose(pa, pa_astropy(275.0, -10.0, mjds), atol=1e-3)
    h = update_angles(fix_header(cmos_raw))
    assert h["PA"] == pytest.approx(float(pa_astropy(275.0, -10.0, h["MJD"], frame="fk5")[0]), abs=1e-3)
    assert h["PAOFFSET"] == pytest.approx(-87.01)
    assert h["DEROTANG"] == pytest.approx(wrap(h["PA"] - 87.01), abs=1e-9)


def test_parallactic_angle_transit_and_sign():
    mjd = 61000.3
    zen = SkyCoord(
        alt=90 * u.deg, az=0 * u.deg, frame=AltAz(obstime=Time(mjd, format="mjd", scale="utc"), location=SUBARU)
    ).icrs
    ra0, dec = zen.ra.deg, -20.0  # on the meridian, south of the zenith: PA = 0 at transit
    assert float(parallactic_angle(ra0, dec, mjd)) == pytest.approx(0.0, abs=0.01)
    # one hour west of the meridian (HA = +1 h): PA positive; east: negative
    assert float(parallactic_angle(ra0 - 15.0, dec, mjd)) > 5.0
    assert float(parallactic_angle(ra0 + 15.0, dec, mjd)) < -5.0
    # scalar input gives a 0-d array, arrays keep their shape
    assert np.ndim(parallactic_angle(10.0, 10.0, mjd)) == 0
    assert parallactic_angle(10.0, 10.0, np.full((2, 3), mjd)).shape == (2, 3)


@pytest.mark.parametrize("offset_deg", [0.3, -0.3, 0.8])
def test_parallactic_angle_near_zenith_transit_is_continuous_and_exact(offset_deg):
    # a target transiting offset_deg north (+) or south (-) of the zenith: PA swings by
    # 180 deg within minutes; every sample agrees with astropy and the sweep is monotonic
    mjd0 = 61000.3
    zen = SkyCoord(
        alt=90 * u.deg, az=0 * u.deg, frame=AltAz(obstime=Time(mjd0, format="mjd", scale="utc"), location=SUBARU)
    ).icrs
    ra, dec = zen.ra.deg, zen.dec.deg + offset_deg
    t = mjd0 + np.linspace(-900, 900, 361) / 86400.0
    pa = parallactic_angle(ra, dec, t)
    np.testing.assert_allclose(((pa - pa_astropy(ra, dec, t)) + 180) % 360 - 180, 0, atol=2e-3)
    # continuous (mod 360) and monotonic: increasing south of the zenith, decreasing north of it
    steps = -np.sign(offset_deg) * (((np.diff(pa) + 180) % 360) - 180)
    assert np.all(steps > 0) and np.all(steps < 10)
    total = np.sum(steps)
    assert 150 < total < 180
    mid = float(parallactic_angle(ra, dec, mjd0))
    assert abs(wrap(mid - (180.0 if offset_deg > 0 else 0.0))) < 1.0
    _, alt, _ = sky_angles(ra, dec, mjd0)
    assert float(alt) == pytest.approx(90 - abs(offset_deg), abs=0.01)


def test_derotation_angle_wraps():
    assert derotation_angle(170.0, 102.6) == pytest.approx(-87.4)
    np.testing.assert_allclose(derotation_angle(np.array([0.0, -100.0]), -87.01), [-87.01, 172.99])


def test_update_angles_with_target_proper_motion(cmos_raw):
    fixed = fix_header(cmos_raw)
    target = SimpleNamespace(
        name="fast mover",
        ra="18:20:00.000",
        dec="-10:00:00.00",
        pm_ra=0.0,
        pm_dec=10000.0,
        parallax=100.0,
        frame="icrs",
        obstime="J2016",
    )
    h = update_angles(fixed, target)
    assert h is not fixed and "PA" not in fixed
    dec = SkyCoord(h["RA"], h["DEC"], unit=("hourangle", "deg")).dec.deg
    years = (h["MJD"] - 57388.5) / 365.25  # J2016.0 = MJD 57388.5
    expected = -10.0 + 10.0 * years / 3600.0
    assert dec == pytest.approx(expected, abs=0.05 / 3600)
    assert h["RA"].startswith("18:20:00.0")
    assert h["RADESYS"] == "ICRS"
    # no proper motion, no parallax: position unchanged
    still = SimpleNamespace(
        ra="18:20:00.000", dec="-10:00:00.00", pm_ra=0.0, pm_dec=0.0, parallax=None, frame="icrs", obstime="J2016"
    )
    h2 = update_angles(fixed, still)
    assert (h2["RA"], h2["DEC"]) == ("18:20:00.000", "-10:00:00.00")


# ---------------------------------------------------------------------------------------
# WCS


def _wcs_header(angle, **changes):
    h = fix_header(make_header(CMOS_POST, NAXIS1=100, NAXIS2=80, **changes))
    h["CD1_1"] = 5.0
    h["CD2_2B"] = 5.0
    return apply_wcs(h, angle)


def test_apply_wcs_keys():
    h = _wcs_header(30.0)
    assert "CD1_1" not in h and "CD2_2B" not in h
    assert (h["CRPIX1"], h["CRPIX2"]) == (50.5, 40.5)
    assert h["CRVAL1"] == pytest.approx(275.0) and h["CRVAL2"] == pytest.approx(-10.0)
    assert h["CDELT1"] == pytest.approx(-5.938 / 3.6e6) and h["CDELT2"] == pytest.approx(5.938 / 3.6e6)
    c, s = math.cos(math.radians(30)), math.sin(math.radians(30))
    assert (h["PC1_1"], h["PC1_2"], h["PC2_1"], h["PC2_2"]) == pytest.approx((c, -s, s, c))
    assert (h["CTYPE1"], h["CTYPE2"]) == ("RA---TAN", "DEC--TAN")
    # shape argument overrides NAXIS
    assert apply_wcs(h, 0.0, shape=(3, 11, 21))["CRPIX1"] == 11.0


def test_wcs_pixel_to_sky_directions():
    w = WCS(_wcs_header(0.0), naxis=2)
    cx, cy = 49.5, 39.5  # 0-based frame centre
    centre = w.pixel_to_world(cx, cy)
    assert centre.ra.deg == pytest.approx(275.0) and centre.dec.deg == pytest.approx(-10.0)
    left = w.pixel_to_world(cx - 10, cy)
    assert left.ra.deg > centre.ra.deg  # East is left
    assert left.dec.deg == pytest.approx(-10.0, abs=1e-7)
    up = w.pixel_to_world(cx, cy + 10)
    assert up.dec.deg - centre.dec.deg == pytest.approx(10 * 5.938 / 3.6e6, rel=1e-6)  # North up
    # rotated by DEROTANG = 90: North points along -x in the raw image
    w90 = WCS(_wcs_header(90.0), naxis=2)
    north = w90.pixel_to_world(cx + 10, cy)
    assert north.dec.deg - centre.dec.deg == pytest.approx(10 * 5.938 / 3.6e6, rel=1e-5)


# ---------------------------------------------------------------------------------------
# fields


def test_field_names():
    assert field_names(make_header(CMOS_POST)) == ["F610", "F670", "F720", "F760"]
    assert field_names(make_header(CMOS_POST, **{"OBS-MOD": "IPOL_MBIR"})) == ["F670", "F720", "F760"]
    assert field_names(make_header(CMOS_POST, **{"OBS-MOD": "IMAG_SDI", "FILTER02": "Halpha"})) == ["Halpha"]
    assert field_names(make_header(CMOS_POST, **{"OBS-MOD": "IPOL", "FILTER01": "625-50"})) == ["625-50"]
    assert field_names(make_header(EMCCD_SAMPLE)) == ["750-50"]  # raw U_FILTER fallback
    with pytest.raises(HeaderError, match="FILTER02"):
        field_names(make_header(CMOS_POST, **{"OBS-MOD": "IMAG_SDI", "FILTER02": None}))


def test_default_field_centers():
    shape = (540, 1100)  # (hy, hx) = (269.5, 549.5)
    mbi = default_field_centers(make_header(CMOS_POST), shape)
    assert list(mbi) == ["F610", "F670", "F720", "F760"]
    assert mbi["F610"] == pytest.approx((404.25, 137.375))
    assert mbi["F670"] == pytest.approx((134.75, 137.375))
    assert mbi["F720"] == pytest.approx((134.75, 412.125))
    assert mbi["F760"] == pytest.approx((134.75, 961.625))
    mbir = default_field_centers(make_header(CMOS_POST, **{"OBS-MOD": "IPOL_MBIR"}), (270, 1100))
    # MBIR doubles hy = 134.5 -> 269, drops F610
    assert mbir == {
        "F670": pytest.approx((134.5, 137.375)),
        "F720": pytest.approx((134.5, 412.125)),
        "F760": pytest.approx((134.5, 961.625)),
    }
    single = default_field_centers(make_header(EMCCD_SAMPLE), (256, 256))
    assert single == {"750-50": (127.5, 127.5)}


@pytest.mark.parametrize(
    "text, hours",
    [
        ("17:56:21.288", True),
        ("00:00:00.0", True),
        ("23 59 59.999", True),
        ("-21:57:21.87", False),
        ("-00:30:00", False),  # the sign of a zero degree field
        ("+89:59:59.9", False),
        ("05:04:03", False),
        ("12h30m00s", True),  # not the headers' form: astropy parses it
    ],
)
def test_sexagesimal_equals_astropy_angle(text, hours):
    from astropy.coordinates import Angle

    from vampd.instrument.headers import sexagesimal_deg

    expect = Angle(text, unit=u.hourangle if hours else u.deg).deg
    assert sexagesimal_deg(text, hours) == pytest.approx(expect, abs=1e-12)

"""Calibration stage: error model, saturation, background/flat recovery, bad pixels, flip,
chunking, calibration-file matching and master building (docs/instrument.md §2)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from astropy.io import fits

from vampd.instrument.headers import fix_header
from vampd.stages.badpix import bad_pixel_mask, repair_bad_pixels
from vampd.stages.calibfiles import (
    CalibLibrary,
    build_masters,
    load_master,
    make_background,
    make_flat,
    master_hdulist,
)
from vampd.stages.calibrate import (
    CalibFrame,
    CalibrationError,
    calibrate_cube,
    calibration_header,
    saturation_level,
)

PRE_NBS = 60500.3  # 2024-07
POST_NBS = 60960.3


def raw_header(cam=2, mjd=PRE_NBS, mode="FAST", exptime=0.01, shape=(3, 48, 64), datatyp="OBJECT", **extra):
    nf, ny, nx = shape
    h = fits.Header()
    h["NAXIS"] = 3
    h["NAXIS1"], h["NAXIS2"], h["NAXIS3"] = nx, ny, nf
    h["U_CAMERA"] = float(cam)
    if mode == "EM":
        h["U_EMGAIN"] = 300
        h["U_FLCSTT"] = 1
    else:
        h["U_DETMOD"] = mode
    h["EXPTIME"] = exptime
    half = exptime * nf / 86400 / 2
    h["MJD-STR"], h["MJD-END"] = mjd - half, mjd + half
    h["DATA-TYP"] = datatyp
    h["OBJECT"] = "TEST"
    h["FILTER01"], h["FILTER02"] = extra.pop("FILTER01", "Open"), extra.pop("FILTER02", "Open")
    for k, v in {"PRD-MIN1": 100, "PRD-MIN2": 200, "PRD-RNG1": nx, "PRD-RNG2": ny}.items():
        h[k] = v
    for k, v in extra.items():
        h[k] = v
    return h


def header(**kw):
    return fix_header(raw_header(**kw))


# ---------------------------------------------------------------------------------------
# error model and saturation


def test_bias_only_error_includes_read_noise():
    h = header(cam=2, exptime=0.01, shape=(2, 8, 8))
    raw = np.full((2, 8, 8), 200, np.uint16)  # BIAS exactly: zero signal
    raw[:, 3, 3] = 300  # 100 adu of signal
    data, err, hdr = calibrate_cube(raw, h)
    assert data.dtype == np.float32 and err.dtype == np.float32
    gain, rn, t = 0.103, 0.399, 0.01  # CMOS fast, camera 2
    scale = gain / t
    np.testing.assert_allclose(data[0, 0, 0], 0.0, atol=1e-6)
    # sigma = RN/EFFGAIN adu -> x EFFGAIN/EXPTIME = RN/EXPTIME e-/s
    np.testing.assert_allclose(err[:, 0, 0], rn / t, rtol=1e-5)
    np.testing.assert_allclose(data[:, 3, 3], 100 * scale, rtol=1e-6)
    expected = math.sqrt(100 / gain + (rn / gain) ** 2) * scale
    np.testing.assert_allclose(err[:, 3, 3], expected, rtol=1e-5)
    assert hdr["BUNIT"] == "e-/s"
    np.testing.assert_allclose(hdr["NOISEADU"], rn / gain)
    np.testing.assert_allclose(hdr["NOISE"], rn)
    assert "BACKFILE" not in hdr and "BZERO" not in hdr


def test_emccd_read_noise_uses_conversion_gain():
    # EM gain 300: EFFGAIN = 4.5/300, ENF = sqrt(2); read noise 89 e- at the amplifier = 89/4.5 adu
    h = header(mode="EM", cam=2, exptime=0.1, shape=(1, 8, 8))
    raw = np.full((1, 8, 8), 150, np.uint16)
    raw[0, 2, 2] = 250
    data, err, _ = calibrate_cube(raw, h)
    effgain = 4.5 / 300
    scale = effgain / 0.1
    np.testing.assert_allclose(err[0, 0, 0], 89 / 4.5 * scale, rtol=1e-5)
    np.testing.assert_allclose(err[0, 2, 2], math.sqrt(100 / effgain * 2 + (89 / 4.5) ** 2) * scale, rtol=1e-5)


def test_saturated_uint16_pixels_are_nan():
    h = header(cam=2, shape=(2, 8, 8))
    assert saturation_level(h) == 65535.0
    raw = np.full((2, 8, 8), 1000, np.uint16)
    raw[0, 1, 1] = 65535
    raw[1, 5, 6] = 65535
    raw[1, 2, 2] = 65534
    data, err, _ = calibrate_cube(raw, h)
    assert np.isnan(data[0, 1, 1]) and np.isnan(err[0, 1, 1])
    assert np.isnan(data[1, 5, 6]) and np.isnan(err[1, 5, 6])
    assert np.isfinite(data[1, 2, 2]) and np.isfinite(data[0, 5, 6])
    assert np.isnan(data).sum() == 2


def test_saturation_halved_fullwell_window():
    # June-July 2023 CMOS files: FULLWELL halved -> 6750.208 / 2 / 0.103 = 32768 adu
    h = header(cam=2, mjd=60120.3, shape=(1, 4, 4))
    assert saturation_level(h) == pytest.approx(32768.0)
    raw = np.full((1, 4, 4), 32767, np.uint16)
    raw[0, 0, 0] = 32768
    data, _, _ = calibrate_cube(raw, h)
    assert np.isnan(data[0, 0, 0]) and np.isfinite(data[0, 0, 1])


def test_missing_keyword_is_named():
    h = header(shape=(1, 4, 4))
    del h["EFFGAIN"]
    with pytest.raises(CalibrationError, match="EFFGAIN"):
        calibrate_cube(np.zeros((1, 4, 4), np.uint16), h)


# ---------------------------------------------------------------------------------------
# synthetic calibration scene


def _scene(rng, ny=48, nx=64, nframes=24, sky_e=60.0, cam=2, mjd=PRE_NBS):
    """Bias pattern + dark cube + flat + sky (Poisson) in CMOS fast mode."""
    gain, rn = 0.103, 0.399 if cam == 2 else 0.403
    bias = (200 + rng.normal(0, 2, (ny, nx))).astype(np.float32)
    yy, xx = np.mgrid[:ny, :nx]
    flat = (1 + 0.08 * np.sin(xx / 9.0) * np.cos(yy / 13.0)).astype(np.float32)

    def frames(n, signal_e):
        e = rng.poisson(np.broadcast_to(signal_e, (n, ny, nx))).astype(np.float64)
        adu = bias + e / gain + rng.normal(0, rn / gain, (n, ny, nx))
        return np.clip(np.round(adu), 0, 65535).astype(np.uint16)

    darks = frames(32, 0.0)
    flats = frames(32, 3000.0 * flat)
    sci = frames(nframes, sky_e * flat)
    h = header(cam=cam, mjd=mjd, shape=(nframes, ny, nx))
    hd = header(cam=cam, mjd=mjd, shape=(32, ny, nx), datatyp="DARK")
    hf = header(cam=cam, mjd=mjd, shape=(32, ny, nx), datatyp="FLAT")
    return dict(bias=bias, flat=flat, darks=darks, flats=flats, sci=sci, h=h, hd=hd, hf=hf, gain=gain, rn=rn)


def _masters(s):
    mb, eb, hb = make_background(s["darks"], s["hd"])
    back = CalibFrame(mb, eb, hb, "dark_coll.fits")
    mf, ef, hf = make_flat(s["flats"], s["hf"], back)
    flat = CalibFrame(mf, ef, hf, "flat_coll.fits")
    return back, flat


def test_master_background_from_dark_cube():
    rng = np.random.default_rng(1)
    s = _scene(rng)
    master, err, hdr = make_background(s["darks"], s["hd"])
    assert master.dtype == np.float32 and err.dtype == np.float32
    assert np.median(master) == pytest.approx(200.0, rel=0.01)
    np.testing.assert_allclose(master, s["bias"], atol=5 * s["rn"] / s["gain"] / math.sqrt(32) * 1.3 + 0.5)
    rn_adu = s["rn"] / s["gain"]
    assert hdr["NOISEADU"] == pytest.approx(math.sqrt(rn_adu**2 + 1 / 12), rel=0.05)
    assert hdr["NOISE"] == pytest.approx(hdr["NOISEADU"] * 0.103)
    assert hdr["CALTYPE"] == "BACKGROUND"
    std = np.std(s["darks"].astype(np.float64), axis=0)
    np.testing.assert_allclose(err, np.hypot(std, std / math.sqrt(32)), rtol=1e-4)
    # single-frame fallback: sqrt(DC t ENF^2 / EFFGAIN^2 + (RN/GAIN)^2)
    m1, e1, h1 = make_background(s["darks"][:1], s["hd"])
    expected = math.sqrt(3.6e-3 * 0.01 / 0.103**2 + rn_adu**2)
    np.testing.assert_allclose(e1, expected, rtol=1e-5)


def test_background_and_flat_recover_injected_sky():
    rng = np.random.default_rng(2)
    sky = 1000.0  # e- per frame; the data-based error biases pulls by ~ -1/(2 sqrt(sky)) = -0.016
    s = _scene(rng, sky_e=sky)
    back, flat = _masters(s)
    assert flat.header["CALTYPE"] == "FLAT" and flat.header["BACKFILE"] == "dark_coll.fits"
    np.testing.assert_allclose(np.nanmedian(flat.data), 1.0, atol=1e-6)
    # within 5 sigma of the truth (x1.25: a median's error exceeds the mean's the ERR assumes)
    assert np.all(np.abs(flat.data - s["flat"] / np.median(s["flat"])) < 5 * 1.25 * flat.err)
    assert np.median(flat.err) == pytest.approx(math.sqrt(3000 / 32) / 3000, rel=0.05)
    data, err, hdr = calibrate_cube(s["sci"], s["h"], background=back, flat=flat)
    # e-/s after division by the flat normalised by NORMVAL [adu] (for 3000 e- flat frames)
    truth = sky / 0.01 * flat.header["NORMVAL"] * 0.103 / 3000
    assert truth == pytest.approx(sky / 0.01 * np.median(s["flat"]), rel=3e-3)
    resid = data - truth
    assert abs(np.mean(resid)) < 3 * np.std(resid) / math.sqrt(resid.size) + 1e-3 * truth
    pull = resid / err
    assert abs(np.mean(pull)) < 0.03
    assert np.std(pull) == pytest.approx(1.0, abs=0.05)
    # the same scene without the flat term in the truth would be off by the flat pattern
    assert np.std(resid) < 1.1 * np.mean(err)
    assert hdr["BACKFILE"] == "dark_coll.fits" and hdr["FLATFILE"] == "flat_coll.fits"
    assert hdr["NORMVAL"] == pytest.approx(flat.header["NORMVAL"])
    assert hdr["NOISEADU"] == pytest.approx(back.header["NOISEADU"])


def test_bias_only_recovers_sky_without_flat():
    rng = np.random.default_rng(8)
    s = _scene(rng, sky_e=200.0)
    s["bias"][:] = 200.0
    sci = np.round(200 + rng.poisson(200.0, (16, 48, 64)) / 0.103 + rng.normal(0, 0.399 / 0.103, (16, 48, 64)))
    data, err, _ = calibrate_cube(sci.astype(np.uint16), s["h"])
    pull = (data - 200.0 / 0.01) / err
    assert abs(np.mean(pull)) < 0.06
    assert np.std(pull) == pytest.approx(1.0, abs=0.05)


def test_flat_division_and_error_propagation():
    h = header(cam=2, shape=(1, 4, 4))
    f = np.full((4, 4), 0.5, np.float32)
    f[0, 0] = 0.1  # below 0.2 -> NaN
    f[0, 1] = np.nan
    sf = np.full((4, 4), 0.01, np.float32)
    flat = CalibFrame(f, sf, fits.Header({"NORMVAL": 123.0}), "f.fits")
    back = CalibFrame(np.full((4, 4), 200, np.float32), np.full((4, 4), 3.0, np.float32), fits.Header(), "b.fits")
    raw = np.full((1, 4, 4), 600, np.uint16)
    data, err, hdr = calibrate_cube(raw, h, background=back, flat=flat)
    scale = 0.103 / 0.01
    d, F = 400.0, 0.5
    np.testing.assert_allclose(data[0, 2, 2], d / F * scale, rtol=1e-6)
    var_d = d / 0.103 + 3.0**2
    expected = math.sqrt(var_d / F**2 + (d / F) ** 2 * (0.01 / F) ** 2) * scale
    np.testing.assert_allclose(err[0, 2, 2], expected, rtol=1e-5)
    assert np.isnan(data[0, 0, 0]) and np.isnan(err[0, 0, 0])
    assert np.isnan(data[0, 0, 1]) and np.isnan(err[0, 0, 1])
    assert hdr["NORMVAL"] == 123.0


# ---------------------------------------------------------------------------------------
# bad pixels


def test_bad_pixel_mask_per_axis_grid_non_square():
    rng = np.random.default_rng(3)
    img = rng.normal(100, 2, (40, 76)).astype(np.float32)
    bad = [(0, 0), (39, 75), (5, 70), (33, 3), (20, 41)]
    for y, x in bad:
        img[y, x] += 60  # 30 sigma
    img[12, 12] = 0.0  # dead
    mask = bad_pixel_mask(img)
    assert mask.shape == img.shape
    assert set(zip(*np.nonzero(mask))) == set(bad) | {(12, 12)}


def test_repair_uses_median_of_valid_neighbours():
    cube = np.arange(2 * 7 * 7, dtype=np.float32).reshape(2, 7, 7)
    err = np.ones_like(cube)
    mask = np.zeros((7, 7), bool)
    mask[3, 3] = mask[3, 4] = True
    cube[:, 3, 3] = 1e6
    cube[0, 2, 2] = np.nan  # a NaN neighbour is ignored
    n = repair_bad_pixels(cube, mask, err)
    assert n == 2
    base = np.arange(49, dtype=np.float32).reshape(7, 7)
    nb = [base[y, x] for y in range(1, 6) for x in range(1, 6) if (y, x) not in ((3, 3), (3, 4))]
    np.testing.assert_allclose(cube[1, 3, 3], 49 + np.median(nb))
    nb0 = [v for v in nb if v != base[2, 2]]
    np.testing.assert_allclose(cube[0, 3, 3], np.median(nb0))
    assert err[1, 3, 3] > 1.0  # inflated


def test_injected_bad_pixels_detected_and_repaired():
    rng = np.random.default_rng(4)
    s = _scene(rng, sky_e=60.0)
    hot = [(5, 7), (30, 50), (47, 0)]
    dead = [(20, 20), (10, 60)]
    for y, x in hot:
        s["darks"][:, y, x] += 400
        s["sci"][:, y, x] += 400
    for y, x in dead:
        s["darks"][:, y, x] = 0
        s["sci"][:, y, x] = 0
    back, flat = _masters(s)
    truth = 60.0 * np.median(s["flat"]) / 0.01
    data0, _, _ = calibrate_cube(s["sci"], s["h"], background=back, flat=flat)
    data, err, hdr = calibrate_cube(s["sci"], s["h"], background=back, flat=flat, fix_bad_pixels=True)
    assert set(zip(*np.nonzero(back.badpix))) == set(hot) | set(dead)
    assert hdr["DPP CAL BADPIX"] == 5
    for y, x in hot + dead:
        vals, errs = data[:, y, x], err[:, y, x]
        assert np.all(np.isfinite(vals))
        # each repaired value is close to the truth within its (inflated) error
        assert np.all(np.abs(vals - truth) < 4 * errs)
        assert abs(np.mean(vals) - truth) < 3 * np.mean(errs) / math.sqrt(len(vals))
    # without correction, dead pixels are far off (hot ones are subtracted by the master, noisily)
    for y, x in dead:
        assert np.mean(np.abs(data0[:, y, x] - truth)) > 5 * np.mean(err[:, y, x])
    # good pixels are untouched by the repair
    good = ~back.badpix
    np.testing.assert_array_equal(data[:, good], data0[:, good])


# ---------------------------------------------------------------------------------------
# flip and chunking


@pytest.mark.parametrize(
    "mjd, flipped_cam, plain_cam",
    [(PRE_NBS, 1, 2), (POST_NBS, 2, 1)],
)
def test_flip_parity_pre_post_nbs(mjd, flipped_cam, plain_cam):
    rng = np.random.default_rng(5)
    ny, nx = 12, 10
    raw = (300 + rng.integers(0, 500, (2, ny, nx))).astype(np.uint16)
    back = CalibFrame(200 + rng.normal(0, 1, (ny, nx)), np.full((ny, nx), 3.0), fits.Header(), "b.fits")
    flat = CalibFrame(rng.uniform(0.8, 1.2, (ny, nx)), np.full((ny, nx), 0.01), fits.Header(), "f.fits")
    bp = np.zeros((ny, nx), bool)
    bp[2, 3] = True
    kw = dict(background=back, flat=flat, fix_bad_pixels=True, badpix=bp)
    d_plain, e_plain, _ = calibrate_cube(raw, header(cam=plain_cam, mjd=mjd, shape=(2, ny, nx)), **kw)
    d_flip, e_flip, _ = calibrate_cube(raw, header(cam=flipped_cam, mjd=mjd, shape=(2, ny, nx)), **kw)
    # out[y] = in[ny - 1 - y]
    np.testing.assert_array_equal(d_flip, d_plain[:, ::-1, :])
    np.testing.assert_array_equal(e_flip, e_plain[:, ::-1, :])
    assert not np.array_equal(d_flip, d_plain)


def test_chunked_equals_whole_cube():
    rng = np.random.default_rng(6)
    s = _scene(rng, nframes=10, cam=1)  # camera 1 pre-NBS: flipped
    s["sci"][3, 4, 5] = 65535
    back, flat = _masters(s)
    kw = dict(background=back, flat=flat, fix_bad_pixels=True)
    d_all, e_all, h_all = calibrate_cube(s["sci"], s["h"], **kw)
    d = np.empty(s["sci"].shape, np.float32)
    e = np.empty_like(d)
    headers = []
    for i in range(0, 10, 3):
        sl = slice(i, i + 3)
        _, _, hh = calibrate_cube(s["sci"][sl], s["h"], out=(d[sl], e[sl]), **kw)
        headers.append(hh)
    np.testing.assert_array_equal(d, d_all)
    np.testing.assert_array_equal(e, e_all)
    assert np.isnan(d_all[3, s["sci"].shape[1] - 1 - 4, 5])  # saturated, in flipped coordinates
    assert all(hh == h_all for hh in headers)
    again = calibration_header(h_all, back, flat, fix_bad_pixels=True, nbad=h_all["DPP CAL BADPIX"])
    assert again == h_all


# ---------------------------------------------------------------------------------------
# library: matching and masters on disk


def _write_master(path, caltype, shape=(8, 8), fz=False, **kw):
    h = header(shape=(1,) + shape, **kw)
    h["CALTYPE"] = caltype
    for k in ("NAXIS", "NAXIS1", "NAXIS2", "NAXIS3"):
        del h[k]
    data = np.ones(shape, np.float32)
    if fz:
        hdul = fits.HDUList(
            [fits.PrimaryHDU(), fits.CompImageHDU(data, header=h), fits.ImageHDU(data, header=h, name="ERR")]
        )
    else:
        hdul = master_hdulist(data, data, h)
    path.parent.mkdir(parents=True, exist_ok=True)
    hdul.writeto(path)
    return path


def test_library_matching_rules(tmp_path):
    d = tmp_path / "calib"
    _write_master(d / "bg_t01_near.fits", "BACKGROUND", exptime=0.01, mjd=PRE_NBS - 0.1)
    _write_master(d / "sub" / "bg_t01_far.fits.fz", "BACKGROUND", exptime=0.01, mjd=PRE_NBS - 5, fz=True)
    _write_master(d / "bg_t05_nearest.fits", "BACKGROUND", exptime=0.5, mjd=PRE_NBS)
    _write_master(d / ".hidden_bg.fits", "BACKGROUND", exptime=0.01, mjd=PRE_NBS)
    _write_master(d / "bg_slow.fits", "BACKGROUND", mode="SLOW", exptime=0.01, mjd=PRE_NBS)
    _write_master(d / "flat_f670.fits", "FLAT", exptime=1.0, mjd=PRE_NBS - 3, FILTER01="F670")
    _write_master(d / "flat_open_t1.fits", "FLAT", exptime=1.0, mjd=PRE_NBS - 1)
    _write_master(d / "flat_open_t001.fits", "FLAT", exptime=0.01, mjd=PRE_NBS - 2)
    (d / "notes.txt").write_text("not fits")
    lib = CalibLibrary.index(d)
    names = sorted(e.path.name for e in lib.entries)
    assert ".hidden_bg.fits" not in names and "bg_t01_far.fits.fz" in names and len(names) == 7

    sci = header(exptime=0.01, shape=(5, 8, 8))
    assert lib.match_background(sci).path.name == "bg_t01_near.fits"  # exposure beats time
    assert lib.match_background(header(exptime=0.5, shape=(5, 8, 8))).path.name == "bg_t05_nearest.fits"
    # no exposure match -> nearest in time among same crop/camera/readout
    assert lib.match_background(header(exptime=3.0, shape=(5, 8, 8))).path.name == "bg_t05_nearest.fits"
    assert lib.match_background(header(mode="SLOW", exptime=3.0, shape=(5, 8, 8))).path.name == "bg_slow.fits"
    # hard requirements
    assert lib.match_background(header(exptime=0.01, shape=(5, 8, 10))) is None  # crop
    assert lib.match_background(header(exptime=0.01, shape=(5, 8, 8), **{"PRD-MIN1": 0})) is None
    assert lib.match_background(header(cam=1, exptime=0.01, shape=(5, 8, 8))) is None  # camera
    assert lib.match_background(header(mode="EM", exptime=0.01, shape=(5, 8, 8))) is None  # readout
    assert lib.match_flat(header(mode="SLOW", shape=(5, 8, 8))) is None
    # flats: filter first, then exposure, then time
    assert lib.match_flat(header(exptime=0.01, shape=(5, 8, 8), FILTER01="F670")).path.name == "flat_f670.fits"
    assert lib.match_flat(sci).path.name == "flat_open_t001.fits"
    assert lib.match_flat(header(exptime=2.0, shape=(5, 8, 8))).path.name == "flat_open_t1.fits"
    # .fz masters load from extension 1 with their ERR
    far = next(e for e in lib.entries if e.path.name.endswith(".fz"))
    m = load_master(far)
    assert m.data.shape == (8, 8) and m.err.shape == (8, 8) and m.badpix is None
    # refresh picks up new files only
    _write_master(d / "bg_new.fits", "BACKGROUND", exptime=0.01, mjd=PRE_NBS + 0.01)
    assert lib.refresh() == 1
    assert lib.match_background(sci).path.name == "bg_new.fits"


def test_build_masters_from_raw_files(tmp_path):
    rng = np.random.default_rng(7)
    s = _scene(rng, ny=24, nx=32)
    raw_dir = tmp_path / "raw"
    raw_dir.mkdir()
    for name, cube, typ in (("VMPB00000001", s["darks"], "DARK"), ("VMPB00000002", s["flats"], "FLAT")):
        h = raw_header(shape=cube.shape, datatyp=typ)
        fits.PrimaryHDU(cube, header=h).writeto(raw_dir / f"{name}.fits")
    sci_h = raw_header(shape=(1, 24, 32))
    fits.PrimaryHDU(s["sci"][:1, :24, :32], header=sci_h).writeto(raw_dir / "VMPB00000003.fits")
    files = sorted(raw_dir.glob("*.fits"))
    outs = build_masters(files, tmp_path / "out")
    assert [p.relative_to(tmp_path / "out").as_posix() for p in outs] == [
        "background/VMPB00000001_coll.fits",
        "flat/VMPB00000002_coll.fits",
    ]
    with fits.open(outs[0]) as hdul:
        assert [h.name for h in hdul] == ["PRIMARY", "ERR", "BADPIX"]
        assert hdul[0].data.dtype == np.dtype(">f4") and hdul[0].header["CALTYPE"] == "BACKGROUND"
    with fits.open(outs[1]) as hdul:
        assert hdul[0].header["BACKFILE"] == "VMPB00000001_coll.fits"
        assert np.nanmedian(hdul[0].data) == pytest.approx(1.0)
        assert hdul[0].header["NORMVAL"] == pytest.approx(3000 * np.median(s["flat"][:24, :32]) / 0.103, rel=0.01)
    mtimes = [p.stat().st_mtime_ns for p in outs]
    build_masters(files, tmp_path / "out")  # up to date: nothing rewritten
    assert [p.stat().st_mtime_ns for p in outs] == mtimes
    lib = CalibLibrary.index(tmp_path / "out")
    sci = fix_header(sci_h)
    assert lib.match_background(sci).path == outs[0]
    assert lib.match_flat(sci).path == outs[1]
    back = load_master(lib.match_background(sci))
    assert back.badpix is not None and back.badpix.shape == (24, 32)


def test_end_to_end_with_simulated_night(tmp_path):
    """Masters built from the simulator's raw darks/flats find its injected hot and dead
    pixels, and calibrated science frames repair them (finite, near their neighbours)."""
    night = pytest.importorskip("vampd.simulate.night")
    from vampd.fitsio import read_cube
    from vampd.stages.calibrate import static_bad_pixels

    truth = night.simulate_night(tmp_path / "sim", night.SimConfig(size=64, nframes=4, ncycles=1, calib_nframes=8))
    outs = build_masters(sorted((tmp_path / "sim" / "calib").glob("*.fits")), tmp_path / "masters")
    assert len(outs) == 4
    lib = CalibLibrary.index(tmp_path / "masters")
    for raw_path in sorted((tmp_path / "sim" / "raw").glob("VMP[AB]*.fits"))[:2]:
        cube, h = read_cube(raw_path)
        h = fix_header(h, raw_path)
        back = load_master(lib.match_background(h))
        flat = load_master(lib.match_flat(h))
        det = truth["detectors"][str(h["U_CAMERA"])]
        injected = {tuple(p) for p in det["hot_pixels_raw_yx"] + det["dead_pixels_raw_yx"]}
        found = set(zip(*np.nonzero(static_bad_pixels(back, flat))))
        assert injected <= found and len(found - injected) <= 2
        data, err, hdr = calibrate_cube(cube, h, background=back, flat=flat, fix_bad_pixels=True)
        assert hdr["BUNIT"] == "e-/s" and hdr["DPP CAL BADPIX"] == len(found)
        ny = cube.shape[1]
        for y, x in injected:
            yo = ny - 1 - y if det["flipped"] else y
            assert np.all(np.isfinite(data[:, yo, x])) and np.all(np.isfinite(err[:, yo, x]))
            win = data[:, max(yo - 2, 0) : yo + 3, max(x - 2, 0) : x + 3]
            assert np.all(np.nanmin(win, axis=(1, 2)) <= data[:, yo, x])
            assert np.all(data[:, yo, x] <= np.nanmax(win, axis=(1, 2)))


def test_saturated_pixels_counted_per_frame_and_level_includes_bias():
    # the full well holds the signal above the bias: conventional EMCCD saturates at
    # 150 + 180000 / 4.5 = 40150 adu; CMOS clips at the 16-bit limit first
    h = header(cam=1, shape=(3, 6, 6))
    assert saturation_level(h) == 65535.0
    raw = np.full((3, 6, 6), 500, np.uint16)
    raw[0, :2, :2] = 65535
    raw[2, 3, 3] = 65535
    nsat = np.zeros(3, np.int64)
    data, _, _ = calibrate_cube(raw, h, nsat=nsat)
    np.testing.assert_array_equal(nsat, [4, 0, 1])
    assert np.isnan(data).sum() == 5
    e = h.copy()
    e.update(BIAS=150.0, GAIN=4.5, FULLWELL=180000.0, U_EMGAIN=0)
    assert saturation_level(e) == pytest.approx(40150.0)

"""Tests of the instrument optics: filter curves, pupil and synthetic PSF, Mueller model."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from vampd.instrument.filters import (
    FilterError,
    band_edges,
    data_dir,
    filter_info,
    load_filter_curve,
)
from vampd.instrument.headers import HeaderError
from vampd.instrument.mueller import (
    MuellerParams,
    MuellerTableError,
    diattenuating_retarder,
    hwp_sync_angle,
    instrument_mueller,
    linear_retarder,
    mm_table_key,
    mueller_from_header,
    rotator,
    wollaston,
)
from vampd.instrument.pupil import (
    PUPIL_DIAMETER,
    psf_model,
    psf_wavelengths,
    pupil_area_fraction,
    pupil_mask,
    synthetic_psf,
)

from conftest import DATA_DIR as DATA
from conftest import needs_data

PIX = 5.952  # mas/px, CMOS cam 1 post-NBS
OFFSET = 129.44


# ---------------------------------------------------------------------------------- filters


def test_data_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.delenv("VAMPD_DATA_DIR", raising=False)
    assert data_dir() is None
    monkeypatch.setenv("VAMPD_DATA_DIR", str(tmp_path))
    assert data_dir() == tmp_path
    assert data_dir("/x/y") == Path("/x/y")  # explicit wins over the environment


@needs_data
def test_filter_curve_from_data_dir():
    wave, thr = load_filter_curve("750-50", DATA)
    assert wave[0] == 555.0 and wave[-1] == 800.0 and len(wave) == 2451
    wmin, wmax = band_edges(wave, thr)
    assert (wmin, wmax) == (724.1, 772.2)  # 50 % of the 0.988 peak
    info = filter_info("750-50", DATA)
    assert info.wavefwhm == pytest.approx(48.1)
    assert info.waveave == pytest.approx(748.1, abs=0.2)  # README pivot 747.95 nm
    assert info.dlamlam == pytest.approx(48.1 / info.waveave)
    # case-insensitive names, cached arrays are read-only
    w2, t2 = load_filter_curve("halpha", DATA)
    assert band_edges(w2, t2) == pytest.approx((655.9, 656.7))
    assert not thr.flags.writeable
    with pytest.raises(FilterError, match="625-50.*SII-Cont"):
        load_filter_curve("750-40", DATA)


def test_filter_curve_top_hat_fallback(no_data_dir, caplog):
    wave, thr = load_filter_curve("750-50")
    assert band_edges(wave, thr) == pytest.approx((724.1, 772.2))
    assert set(np.unique(thr)) == {0.0, 1.0}
    info = filter_info("Halpha")
    assert info.waveave == pytest.approx(656.3, abs=0.01)
    with pytest.raises(FileNotFoundError):
        load_filter_curve("750-50", require=True)
    with pytest.raises(FilterError):
        load_filter_curve("nonsense")


def test_filter_curve_missing_table(tmp_path):
    with pytest.raises(FileNotFoundError, match="vampires_filters.csv"):
        load_filter_curve("750-50", tmp_path)


def test_band_edges_hand_values():
    assert band_edges([600, 610, 620, 630, 640], [0.1, 0.6, 1.0, 0.5, 0.49]) == (610.0, 630.0)


# ------------------------------------------------------------------------------------ pupil


def test_pupil_area_matches_analytic():
    analytic = pupil_area_fraction()
    # annulus alone is 1 - (2.403/7.92)^2 = 0.9079; spiders and masks take ~5.5 % more
    assert 0.84 < analytic < 0.86
    for offset in (0.0, OFFSET):
        mask = pupil_mask(256, offset)
        assert mask.shape == (256, 256) and mask.min() >= 0 and mask.max() <= 1
        assert mask.mean() / (math.pi / 4) == pytest.approx(analytic, rel=0.002)


def test_pupil_rotation_direction():
    # the dead actuator at (x, y) = (1.765, 1.431) m rotates counter-clockwise by -offset
    n = 256
    step = PUPIL_DIAMETER / n

    def value(mask, x, y):
        return mask[round(y / step + (n - 1) / 2), round(x / step + (n - 1) / 2)]

    assert value(pupil_mask(n, 0.0, 4), 1.765, 1.431) == 0.0  # inside the 0.632 m disc
    mask = pupil_mask(n, -30.0, 4)  # rotated counter-clockwise by 30 deg
    for sense, expect in ((1, 0.0), (-1, 1.0)):  # the opposite sense puts the disc elsewhere
        a = math.radians(30.0 * sense)
        x = 1.765 * math.cos(a) - 1.431 * math.sin(a)
        y = 1.765 * math.sin(a) + 1.431 * math.cos(a)
        assert value(mask, x, y) == expect


def _profile_fwhm(axis: int, filt: str, n: int = 41) -> float:
    """FWHM (px) of the pixel-integrated PSF, sampled finely by moving the centre in 0.1 px steps."""
    shape = (n, 1) if axis == 0 else (1, n)
    c = (n - 1) / 2
    pos, val = [], []
    for d in np.arange(-0.5, 0.5, 0.1):
        center = (c + d, 0.0) if axis == 0 else (0.0, c + d)
        img = psf_model(filt, PIX, OFFSET, shape, center=center, data_dir=DATA).ravel()
        pos.append(np.arange(n) - c - d)
        val.append(img)
    pos, val = np.concatenate(pos), np.concatenate(val)
    order = np.argsort(pos)
    pos, val = pos[order], val[order]
    half = val.max() / 2
    above = np.flatnonzero(val >= half)
    i0, i1 = above[0], above[-1]
    left = np.interp(half, val[i0 - 1 : i0 + 1], pos[i0 - 1 : i0 + 1])
    right = np.interp(half, val[i1 : i1 + 2][::-1], pos[i1 : i1 + 2][::-1])
    return right - left


@needs_data
def test_synthetic_psf_normalised_centred_and_fwhm():
    n = 41
    psf = synthetic_psf("750-50", PIX, OFFSET, n, data_dir=DATA)
    assert psf.dtype == np.float32 and psf.shape == (n, n)
    assert psf.sum() == pytest.approx(1.0, abs=1e-5)
    yy, xx = np.indices(psf.shape)
    core = np.hypot(yy - 20, xx - 20) <= 6
    w = psf * core
    assert (w * yy).sum() / w.sum() == pytest.approx(20.0, abs=0.01)
    assert (w * xx).sum() / w.sum() == pytest.approx(20.0, abs=0.01)
    assert np.unravel_index(np.argmax(psf), psf.shape) == (20, 20)

    waves, weights = psf_wavelengths("750-50", DATA)
    assert waves[0] == 724.1 and waves[-1] == 772.2 and weights.sum() == pytest.approx(1)
    lamd_px = (np.sum(waves * weights) * 1e-9 / PUPIL_DIAMETER) / (PIX * math.pi / 180 / 3.6e6)
    assert lamd_px == pytest.approx(3.27, abs=0.02)
    fwhm = 0.5 * (_profile_fwhm(0, "750-50") + _profile_fwhm(1, "750-50"))
    assert fwhm == pytest.approx(1.03 * lamd_px, rel=0.10)


@needs_data
def test_psf_flip_along_y():
    """synthetic_psf is the y-flip of the unflipped model (the pupil is not symmetric)."""
    psf = synthetic_psf("750-50", PIX, OFFSET, 33, data_dir=DATA)
    assert not np.allclose(psf, psf[::-1], rtol=0, atol=1e-4 * psf.max())  # test can fail
    # centrosymmetry of a real-pupil PSF: flipping y equals flipping x
    assert np.allclose(psf[::-1], psf[:, ::-1], rtol=0, atol=1e-7)
    from vampd.instrument.pupil import _psf_cached

    raw = _psf_cached("750-50", PIX, OFFSET, 33, 33, 16.0, 16.0, str(DATA), 7, None, False, 8)
    np.testing.assert_allclose(psf, raw[::-1] / raw.sum(dtype=float), rtol=0, atol=1e-7)


@needs_data
def test_psf_model_sub_pixel_centre():
    shape = (64, 80)
    base = psf_model("750-50", PIX, OFFSET, shape, center=(30.0, 41.0), data_dir=DATA)
    # an integer shift of the centre is an exact translation
    moved = psf_model("750-50", PIX, OFFSET, shape, center=(33.0, 39.0), data_dir=DATA)
    np.testing.assert_allclose(moved[13:, :-10], base[10:-3, 2:-8], rtol=0, atol=1e-6 * base.max())
    # a sub-pixel centre: the phase of the first Fourier mode gives the position
    cy, cx = 30.37, 40.71
    img = psf_model("750-50", PIX, OFFSET, shape, center=(cy, cx), data_dir=DATA).astype(float)
    for axis, c in ((0, cy), (1, cx)):
        prof = img.sum(axis=1 - axis)
        n = prof.size
        ph = np.angle(np.sum(prof * np.exp(-2j * np.pi * np.arange(n) / n)))
        assert (-ph * n / (2 * np.pi)) % n == pytest.approx(c, abs=0.01)
    # total flux normalisation: nearly all the light of a central PSF falls on a 256² frame
    big = psf_model("750-50", PIX, OFFSET, 256, data_dir=DATA)
    assert 0.99 < big.sum() < 1.0


def test_psf_without_data_dir(no_data_dir):
    psf = synthetic_psf("F670", PIX, OFFSET, 21)
    assert psf.sum() == pytest.approx(1.0, abs=1e-5)
    assert np.unravel_index(np.argmax(psf), psf.shape) == (10, 10)


# ---------------------------------------------------------------------------------- Mueller

S_UNPOL = np.array([1.0, 0.0, 0.0, 0.0])


def test_elementary_matrices_hand_values():
    np.testing.assert_allclose(rotator(0.0), np.eye(4), atol=1e-15)
    r = rotator(math.radians(22.5))
    np.testing.assert_allclose(r @ [1, 1, 0, 0], [1, math.sqrt(0.5), -math.sqrt(0.5), 0], atol=1e-12)
    hwp = linear_retarder(math.radians(22.5), math.pi)
    np.testing.assert_allclose(hwp @ [1, 1, 0, 0], [1, 0, 1, 0], atol=1e-12)  # Q -> U
    np.testing.assert_allclose(linear_retarder(0.0, math.pi), np.diag([1, 1, -1, -1]), atol=1e-12)
    qwp = linear_retarder(math.radians(45), math.pi / 2)
    np.testing.assert_allclose(qwp @ [1, 1, 0, 0], [1, 0, 0, 1], atol=1e-12)  # Q -> V
    # a perfect polariser passes half of unpolarised light, fully polarised
    pol = wollaston(1.0, ordinary=True)
    np.testing.assert_allclose(pol @ S_UNPOL, [0.5, 0.5, 0, 0])
    np.testing.assert_allclose(wollaston(1.0, True) + wollaston(1.0, False), np.diag([1, 1, 0, 0]))
    np.testing.assert_allclose(wollaston(0.0, True) + wollaston(0.0, False), np.eye(4))
    # diattenuator without diattenuation is the retarder; epsilon appears in row/column 0
    np.testing.assert_allclose(diattenuating_retarder(0.3, 0.0, 1.1), linear_retarder(0.3, 1.1))
    g = diattenuating_retarder(0.0, 0.02, math.pi)
    assert g[0, 1] == pytest.approx(0.02) and g[1, 0] == pytest.approx(0.02)
    assert g[3, 3] == pytest.approx(-math.sqrt(1 - 0.02**2))


def test_elementary_matrices_vectorised():
    th = np.array([0.0, 0.1, 0.7])
    m = linear_retarder(th, math.pi)
    assert m.shape == (3, 4, 4)
    np.testing.assert_allclose(m[1], linear_retarder(0.1, math.pi))
    assert rotator(th[:, None] * np.ones(2)).shape == (3, 2, 4, 4)


def _diff_rows(params, kind="cmos", pa=30.0, alt=60.0, az=100.0, imr=47.0):
    m = {}
    for h in (0.0, 45.0, 22.5, 67.5):
        for f in "AB":
            for cam in (1, 2):
                m[h, f, cam] = instrument_mueller(pa, alt, az, h, imr, f, cam, params, kind)[0]

    def comb(h0, h1):
        sd = {(h, f): m[h, f, 1] - m[h, f, 2] for h in (h0, h1) for f in "AB"}
        return ((sd[h0, "A"] - sd[h0, "B"]) - (sd[h1, "A"] - sd[h1, "B"])) / 8

    return 2 * comb(0.0, 45.0), 2 * comb(22.5, 67.5)  # m_Q, m_U of docs/instrument.md §9.4


@pytest.mark.parametrize("kind", ["cmos", "emccd"])
def test_ideal_triple_difference_is_pure_rotation(kind):
    assert MuellerParams.ideal(kind).flc_theta_b == {"cmos": 43.0, "emccd": 45.0}[kind]  # docs/instrument.md §1.5
    m_q, m_u = _diff_rows(MuellerParams.ideal("emccd"), kind)
    assert m_q[0] == pytest.approx(0, abs=1e-12) and m_u[0] == pytest.approx(0, abs=1e-12)
    block = np.array([m_q[1:3], m_u[1:3]])
    np.testing.assert_allclose(block @ block.T, np.eye(2), atol=1e-12)
    assert abs(np.linalg.det(block)) == pytest.approx(1.0)
    assert abs(np.linalg.det(block / 2)) == pytest.approx(0.25)  # the raw combination


def test_m3_diattenuation_gives_instrumental_polarisation():
    m_q, m_u = _diff_rows(MuellerParams(m3_diat=0.01))
    assert math.hypot(m_q[0], m_u[0]) == pytest.approx(0.01, rel=1e-6)
    # the reference's CMOS FLC at 43 deg lowers the efficiency slightly (cos 8 deg terms)
    m_q, m_u = _diff_rows(MuellerParams(flc_theta_b=43.0))
    eff = math.hypot(*m_q[1:3])
    assert 0.99 < eff < 0.999


def test_chain_single_beam_and_flc_out():
    p = MuellerParams.ideal()
    m1 = instrument_mueller(0, 90, 180, 0, 0, "A", 1, p, hwp_adi_sync=False)
    m2 = instrument_mueller(0, 90, 180, 0, 0, "A", 2, p, hwp_adi_sync=False)
    np.testing.assert_allclose((m1 + m2)[0], [1, 0, 0, 0], atol=1e-12)  # flux conserved
    assert abs(m1[0, 1]) + abs(m1[0, 2]) == pytest.approx(0.5)  # a full-modulation analyser
    nf = instrument_mueller(0, 90, 180, 0, 0, "NA", 1, p, flc_in=False, hwp_adi_sync=False)
    assert nf.shape == (4, 4)
    with pytest.raises(ValueError):
        instrument_mueller(0, 90, 180, 0, 0, "NA", 1, p, detector_kind="emccd")
    # vectorised over angles
    pa = np.array([0.0, 10.0, 20.0])
    vec = instrument_mueller(pa, 60.0, 100.0, 22.5, 47.0, "B", 2, p)
    assert vec.shape == (3, 4, 4)
    np.testing.assert_allclose(vec[1], instrument_mueller(10.0, 60.0, 100.0, 22.5, 47.0, "B", 2, p))


def test_chain_composition_and_dichroic_phase_in_waves():
    pa, alt, hwp, imr = 30.0, 60.0, 22.5, 47.0
    r = np.deg2rad
    common = (
        linear_retarder(r(imr), math.pi)
        @ linear_retarder(r(hwp), math.pi)
        @ rotator(-r(alt))
        @ diattenuating_retarder(0.0, 0.0, math.pi)
        @ rotator(r(pa))
    )
    p = MuellerParams(dichroic_theta=22.5, dichroic_phi=0.25)  # quarter wave at 22.5 deg
    got = instrument_mueller(pa, alt, 0.0, hwp, imr, "NA", 1, p, flc_in=False, hwp_adi_sync=False)
    expect = wollaston(1.0, True) @ linear_retarder(r(22.5), math.pi / 2) @ common
    np.testing.assert_allclose(got, expect, atol=1e-12)
    # with the FLC in (state B at 45 deg, half wave) it sits between the optics and the dichroic
    got_b = instrument_mueller(pa, alt, 0.0, hwp, imr, "B", 1, p, hwp_adi_sync=False)
    flc = linear_retarder(r(45.0), math.pi)
    np.testing.assert_allclose(
        got_b, wollaston(1.0, True) @ linear_retarder(r(22.5), math.pi / 2) @ flc @ common, atol=1e-12
    )


def test_hwp_sync_angle_hand_value():
    # due south (AZIMUTH = 180 -> A = 0) on the meridian: q = atan2(0, positive) = 0 -> theta = h
    assert hwp_sync_angle(180.0, 60.0) == pytest.approx(math.radians(60.0))
    a, h, phi = math.radians(30.0), math.radians(45.0), math.radians(19.825504)
    expect = 0.5 * math.atan2(math.sin(a), math.sin(h) * math.cos(a) + math.cos(h) * math.tan(phi)) + h
    assert hwp_sync_angle(210.0, 45.0) == pytest.approx(expect)


def test_mm_table_key():
    assert mm_table_key("750-50") == "750"
    assert mm_table_key("Open") == "675"
    assert mm_table_key("F720") == "F720"
    assert mm_table_key("Halpha") == "Halpha"


def test_params_from_table(tmp_path):
    path = tmp_path / "mm.csv"
    cols = "filter,m3_diat,m3_theta,hwp_delta,hwp_phi,imr_delta,imr_phi,optics_diat,optics_theta,"
    cols += "optics_phi,flc_theta,flc_phi,dichroic_diat,dichroic_theta,dichroic_phi\n"
    path.write_text(
        cols
        + "675,0.01,1.0,2.0,0.49,3.0,0.48,0.02,4.0,0.1,1.5,0.47,0.03,5.0,0.2\n"
        + "F720,0,0,0,0.5,0,0.5,0,0,0,0,0.5,0,0,0\n"
    )
    p = MuellerParams.from_table(path, mm_table_key("Open"), "emccd")
    assert (p.m3_diat, p.m3_offset, p.hwp_offset, p.imr_offset) == (0.01, 1.0, 2.0, 3.0)
    assert (p.flc_theta_a, p.flc_theta_b, p.flc_phi) == (1.5, 46.5, 0.47)
    assert p.dichroic_phi == 0.2
    c = MuellerParams.from_table(path, "675", "cmos")
    assert (c.flc_theta_a, c.flc_theta_b, c.flc_phi) == (0.0, 43.0, 0.5)
    with pytest.raises(MuellerTableError, match="675, F720"):
        MuellerParams.from_table(path, "750", "cmos")
    bad = tmp_path / "bad.csv"
    bad.write_text("filter,m3_diat\n675,0.1\n")
    with pytest.raises(MuellerTableError, match="m3_theta"):
        MuellerParams.from_table(bad, "675")


def test_mueller_from_header():
    hdr = fits.Header(
        {
            "PA": 30.0,
            "ALTITUDE": 60.0,
            "AZIMUTH": 100.0,
            "RET-ANG1": 22.5,
            "D_IMRANG": 47.0,
            "U_FLC": "B",
            "U_CAMERA": 2,
            "U_FLCST": "IN",
        }
    )
    p = MuellerParams(m3_diat=0.01, dichroic_diat=0.02)
    expect = instrument_mueller(30.0, 60.0, 100.0, 22.5, 47.0, "B", 2, p, "cmos")
    np.testing.assert_allclose(mueller_from_header(hdr, p), expect)
    hdr["U_EMGAIN"] = 0
    emccd = instrument_mueller(30.0, 60.0, 100.0, 22.5, 47.0, "B", 2, p, "emccd")
    np.testing.assert_allclose(mueller_from_header(hdr, p), emccd)
    assert not np.allclose(emccd, expect)  # the dichroic only exists in the CMOS model
    del hdr["U_EMGAIN"]
    hdr["U_FLCST"] = "OUT"
    hdr["U_FLC"] = "NA"
    nf = instrument_mueller(30.0, 60.0, 100.0, 22.5, 47.0, "NA", 2, p, "cmos", flc_in=False)
    np.testing.assert_allclose(mueller_from_header(hdr, p), nf)
    del hdr["D_IMRANG"]
    with pytest.raises(HeaderError, match="D_IMRANG"):
        mueller_from_header(hdr, p)


def test_psf_disk_cache_is_exact_keyed_and_repairs(tmp_path):
    """The on-disk PSF cache returns exactly the computed PSF, keys on the pupil offset and
    recomputes a damaged entry."""
    from vampd.instrument.pupil import cached_synthetic_psf, synthetic_psf

    cache = str(tmp_path)
    ref = synthetic_psf("750-50", 6.0, 39.0, 21)
    cached_synthetic_psf.cache_clear()
    a = cached_synthetic_psf("750-50", 6.0, 39.0, 21, None, cache)
    files = sorted(tmp_path.glob("psf_750-50_21_*.npy"))
    assert len(files) == 1 and not list(tmp_path.glob(".tmp-*"))
    np.testing.assert_array_equal(a, ref)
    cached_synthetic_psf.cache_clear()
    np.testing.assert_array_equal(cached_synthetic_psf("750-50", 6.0, 39.0, 21, None, cache), ref)  # from disk
    cached_synthetic_psf("750-50", 6.0, 40.0, 21, None, cache)
    assert len(list(tmp_path.glob("psf_750-50_21_*.npy"))) == 2  # another pupil offset, another entry
    files[0].write_bytes(b"not an npy file")
    cached_synthetic_psf.cache_clear()
    np.testing.assert_array_equal(cached_synthetic_psf("750-50", 6.0, 39.0, 21, None, cache), ref)
    assert np.load(files[0]).shape == (21, 21)  # rewritten

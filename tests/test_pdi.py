"""PDI physics and products: differences, Mueller/IP correction, errors, running products,
and the real chain on a simulated night (process_file → ledger → pdi_trigger)."""

import math

import numpy as np
import pytest
from astropy.io import fits

from vampd.config.presets import preset_config
from vampd.instrument.mueller import MuellerParams, instrument_mueller
from vampd.pdi.differences import apply_weights, difference_weights
from vampd.pdi.process import Member, SetInvalid, make_set_stokes
from vampd.pdi.running import RunningStokes
from vampd.pdi.sets import all_slots
from vampd.pdi.stokes import star_polarization, stokes_products

from conftest import simulate_pdi_night

N = 64
C = (N - 1) / 2
P_RING = 0.3


def sky(y, x):
    """Star (unpolarised) + azimuthally polarised ring (p = 0.3), North-up sky offsets [px]."""
    r = np.hypot(x, y)
    ring = 1000.0 * np.exp(-0.5 * ((r - 24) / 2.5) ** 2)
    star = 5e4 * np.exp(-0.5 * (r / 2.5) ** 2)
    th = np.arctan2(-x, y)
    return ring + star, -P_RING * ring * np.cos(2 * th), -P_RING * ring * np.sin(2 * th), ring


def forward_members(mode="triplediff", params=None, sigma=1.0, rng=None, rotate=True):
    """The 16 (8) member images of a known sky through :func:`instrument_mueller`.

    Camera pairs (same HWP, FLC) share their geometry, as simultaneous exposures do. Each
    calibrated pixel at offset d sees the sky at R(DEROTANG)·d (docs/instrument.md §5.5)."""
    yy, xx = np.mgrid[0:N, 0:N] - C
    out = []
    for i, slot in enumerate(all_slots(mode)):
        hwp, cam = slot[0], slot[-1]
        flc = slot[1] if len(slot) == 3 else "A"
        j = i // 2
        pa, alt, az, imr = -40 + 3 * j, 55 + 0.5 * j, 120 + 2 * j, 30 + 1.5 * j
        der = (pa + 25) if rotate else 0.0
        a = math.radians(der)
        xs, ys = xx * math.cos(a) - yy * math.sin(a), xx * math.sin(a) + yy * math.cos(a)
        i_, q, u, _ = sky(ys, xs)
        m = instrument_mueller(pa, alt, az, hwp, imr, flc, cam, params, "cmos", flc_in=len(slot) == 3)
        img = m[0, 0] * i_ + m[0, 1] * q + m[0, 2] * u
        if rng is not None:
            img = img + rng.normal(0, sigma, img.shape)
        h = fits.Header()
        h.update(
            {
                "PA": pa,
                "ALTITUDE": alt,
                "AZIMUTH": az,
                "RET-ANG1": hwp,
                "D_IMRANG": imr,
                "U_CAMERA": cam,
                "DEROTANG": der,
                "MJD": 60000 + j * 1e-4,
                "TINT": 1.0,
                "U_FLCST": "IN" if len(slot) == 3 else "OUT",
            }
        )
        if len(slot) == 3:
            h["U_FLC"] = flc
        out.append(Member(f"m{i}.fits", img[None].astype(np.float32), np.full((1, N, N), sigma, np.float32), h, ["F"]))
    return out


def pcfg(preset="pdi-triplediff", **kw):
    cfg = preset_config(preset)
    cfg.polarimetry.use_ideal_mm = True
    cfg.polarimetry.ip_radius = 8.0  # the star's core, clear of the ring
    for k, v in kw.items():
        setattr(cfg.polarimetry, k, v)
    return cfg


def ring_mask():
    yy, xx = np.mgrid[0:N, 0:N] - C
    return np.abs(np.hypot(xx, yy) - 24) < 1.5


def truth_qphi():
    yy, xx = np.mgrid[0:N, 0:N] - C
    return P_RING * 0.5 * sky(yy, xx)[3]  # per-camera scale: I_Q = ½ I


def test_difference_weights_by_hand():
    w = difference_weights("triplediff")
    # Q = 1/8[(c0A1 - c0A2) - (c0B1 - c0B2) - (c45A1 - c45A2) + (c45B1 - c45B2)]
    assert w[2, :8].tolist() == [0.125, -0.125, -0.125, 0.125, -0.125, 0.125, 0.125, -0.125]
    assert w[2, 8:].tolist() == [0.0] * 8 and w[0, :8].tolist() == [0.125] * 8
    wd = difference_weights("doublediff")
    assert wd[3].tolist() == [0, 0, 0, 0, 0.25, -0.25, -0.25, 0.25]
    # errors: sqrt(sum w^2 sigma^2) = sqrt(8)/8 for sigma = 1 (the reference's /16 is half as large)
    imgs = np.ones((16, 1, 2, 2))
    data, err = apply_weights(w, imgs, np.ones((16, 1, 2, 2)))
    assert np.allclose(err, math.sqrt(8) / 8)
    assert np.allclose(data[0, 0], 1.0) and np.allclose(data[0, 2], 0.0)


@pytest.mark.parametrize("mode,tol", [("triplediff", 0.01), ("doublediff", 0.02)])
def test_ring_qphi_recovered_ideal_model(mode, tol):
    cfg = pcfg("pdi-" + mode)
    res = make_set_stokes(forward_members(mode), cfg.polarimetry, mode, cfg.analysis)
    data, _ = stokes_products(res.stokes, res.err)
    qphi, uphi = data[0, 4], data[0, 5]
    m = ring_mask()
    amp = qphi[m].sum() / truth_qphi()[m].sum()
    assert abs(amp - 1) < tol
    assert np.abs(uphi[m]).max() < 0.01 * qphi[m].mean()
    assert (qphi[m] > 0).all()  # azimuthal ring → Q_phi > 0 in the North-up frame
    assert res.star["F"]["DOLP"] < 5e-4


def test_injected_ip_removed_by_ip_correction():
    cfg = pcfg()
    members = forward_members(params=MuellerParams(m3_diat=0.01))
    no_ip = make_set_stokes(members, pcfg(ip_correct=False).polarimetry, "triplediff", cfg.analysis)
    assert no_ip.star["F"]["DOLP"] > 5e-3  # ~1 % injected, seen by the ideal-model correction
    res = make_set_stokes(members, cfg.polarimetry, "triplediff", cfg.analysis)
    assert res.star["F"]["DOLP"] < 5e-4
    assert 0.005 < res.header["HIERARCH DPP PDI IP_POL F"] < 0.02  # ~1 % (M3 diattenuation, rotated by PA)
    data, _ = stokes_products(res.stokes, res.err)
    m = ring_mask()
    assert abs(data[0, 4][m].sum() / truth_qphi()[m].sum() - 1) < 0.01


def test_errors_match_monte_carlo_through_mm_inversion():
    cfg = pcfg(ip_correct=False)
    rng = np.random.default_rng(3)
    qs, us = [], []
    for _ in range(60):
        res = make_set_stokes(forward_members(rng=rng, rotate=False), cfg.polarimetry, "triplediff", cfg.analysis)
        qs.append(res.stokes[0, 2])
        us.append(res.stokes[0, 3])
    # per-pixel scatter over realisations, pooled over the frame
    sq, su = np.std(qs, axis=0).mean(), np.std(us, axis=0).mean()
    assert abs(sq / res.err[0, 2].mean() - 1) < 0.05
    assert abs(su / res.err[0, 3].mean() - 1) < 0.05
    assert res.err[0, 0].mean() == pytest.approx(math.sqrt(8) / 8, rel=1e-5)


def test_inconsistent_members_rejected():
    cfg = pcfg()
    members = forward_members()
    members[3] = Member(
        "odd.fits",
        np.zeros((1, N - 2, N - 2), np.float32),
        np.ones((1, N - 2, N - 2), np.float32),
        members[3].header,
        ["F"],
    )
    with pytest.raises(SetInvalid, match="inconsistent shape: odd.fits"):
        make_set_stokes(members, cfg.polarimetry, "triplediff", cfg.analysis)


def test_star_polarization_aolp_half_angle():
    st = np.zeros((4, 21, 21))
    st[0, 10, 10] = st[1, 10, 10] = 100.0
    st[2, 10, 10], st[3, 10, 10] = 0.0, 2.0  # pure +U: AoLP = 45 deg
    sp = star_polarization(st, np.full_like(st, 0.1), aper_rad=3)
    assert sp["DOLP"] == pytest.approx(0.02)
    assert sp["AOLP"] == pytest.approx(45.0)


def test_running_accumulator(tmp_path):
    acc = RunningStokes.load(tmp_path / "acc.npz")
    a = np.ones((1, 4, 3, 3))
    b = 3 * np.ones((1, 4, 3, 3))
    b[0, 2, 0, 0] = np.nan
    assert acc.add("k1", a, np.ones_like(a)) and acc.add("k2", b, np.ones_like(b))
    assert not acc.add("k1", a, np.ones_like(a))
    acc.save()
    acc2 = RunningStokes.load(tmp_path / "acc.npz")
    d, e, f = acc2.mean()
    assert d[0, 0, 1, 1] == 2 and e[0, 0, 1, 1] == pytest.approx(math.sqrt(2) / 2)
    assert d[0, 2, 0, 0] == 1 and f[0, 2, 0, 0] == 0.5 and acc2.keys == ["k1", "k2"]
    di, ei, _ = acc2.mean("ivar")
    assert di[0, 0, 1, 1] == pytest.approx(2) and ei[0, 0, 1, 1] == pytest.approx(1 / math.sqrt(2))


# ------------------------------------------------------------------------------------------------
# the real chain on a simulated night


def _run_night(tmp_path, ip=0.0, shuffle=False):
    from vampd.engine import pdi_trigger
    from vampd.engine.ledger import Ledger
    from vampd.engine.pipeline import process_file
    from vampd.simulate.scene import Scene

    raw = tmp_path / "sim"
    ring = Scene(ring_radius_mas=120.0, ring_width_mas=30.0)
    _sim, truth, cfg = simulate_pdi_night(
        raw, "t", 64, size=96, nframes=4, ncycles=1, ip=ip, steady_strehl=0.9, scene=ring
    )
    out = tmp_path / "red"
    led = Ledger(out)
    files = sorted((raw / "raw").glob("*.fits"))
    if shuffle:
        files = files[::-1]
    results = []
    for f in files:
        led.register(f, "h")
        r = process_file(f, cfg, out)
        led.record_done(str(f), r.products, r.summary, r.metrics)
        results.append(pdi_trigger.on_file_done(led, cfg, out, str(f)))
    return truth, cfg, out, led, results


def test_simulated_night_end_to_end(tmp_path):
    truth, cfg, out, led, results = _run_night(tmp_path, ip=0.01, shuffle=True)
    rows = led.conn.execute("SELECT state, reason FROM sets").fetchall()
    assert [r["state"] for r in rows] == ["complete"]
    assert sum(len(r["sets"]["processed"]) for r in results) == 1
    stokes = out / "pdi" / "stokes" / "t_stokes_000.fits"
    with fits.open(stokes) as h:
        n = h[0].data.shape[-1]
        assert h[0].data.shape == (1, 4, n, n) == h["ERR"].data.shape and n >= 64
        dolp = h[0].header["HIERARCH DPP PDI DOLP 750-50"]
        ip_pol = h[0].header["HIERARCH DPP PDI IP_POL 750-50"]
    assert dolp < 5e-4  # the unpolarised star after IP correction
    assert 0.005 < ip_pol < 0.02  # the injected ~1 % IP was measured
    with fits.open(out / "pdi" / "t_stokes_coll.fits") as h:
        assert h[0].header["STOKES"] == "I_Q,I_U,Q,U,Q_PHI,U_PHI,LP_I,AOLP"
        coll = h[0].data
        assert h["ERR"].data.shape == coll.shape == (8, n, n)
    # Q_phi > 0 on the ring (North-up East-left after derotation), |U_phi| small
    px = truth["detectors"]["1"]["pixel_scale"] if "pixel_scale" in truth["detectors"]["1"] else 5.9
    r_px = 120.0 / px
    yy, xx = np.mgrid[0:n, 0:n] - (n - 1) / 2
    ring = np.abs(np.hypot(xx, yy) - r_px) < 2
    assert coll[4][ring].mean() > 0
    assert abs(coll[5][ring].mean()) < 0.05 * coll[4][ring].mean()
    assert len(list((out / "pdi" / "mm").glob("*_mm.fits"))) == 16
    assert len(list((out / "diff" / "single").glob("*.fits"))) == 8
    assert len(list((out / "diff" / "double").glob("*.fits"))) == 4
    assert (out / "pdi" / "t_footprint.fits").exists() and (out / "pdi" / "t_stokes_table.csv").exists()

"""Streaming least-squares polarimetry (issue 13) against the simulator's truth and the triple
difference, through the real chain (``process_file``), the real ledger and, for the kill test,
the real ``vampd watch`` daemon killed with SIGKILL."""

import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from astropy.io import fits
from test_pdi_night import NIGHT, centred, pdi_config, reduce_night, ring_numbers

from vampd.engine import leastsq_trigger, pdi_trigger
from vampd.engine.ledger import Ledger
from vampd.instrument.mueller import instrument_mueller
from vampd.pdi.leastsq import LeastSqAccumulator, contribution, half_scale_stokes, solve_normal
from vampd.simulate.night import SimConfig, simulate_night
from vampd.simulate.scene import Scene
from vampd.simulate.truthmaps import annulus_sum, read_truth_stokes

HWPS = (0.0, 45.0, 22.5, 67.5)


def lsq_config(name="lsq", crop=96, **pol):
    cfg = pdi_config("triplediff", crop=crop, **pol)
    cfg.polarimetry.method = "leastsq"
    cfg.name = name
    cfg.diff_images.make_diff = False
    return cfg


def lsq_coll(out, name="lsq"):
    with fits.open(out / "pdi" / f"{name}_stokes_coll.fits") as h:
        return h[0].data.astype(float), h["ERR"].data.astype(float), h[0].header


def ring_truth(truth, sim_dir, data8, field=0):
    """(Q_φ/truth, U_φ/Q_φ) over the truth annulus of an (8, N, N) product."""
    tm = truth["truth_maps"]
    maps, _ = read_truth_stokes(sim_dir / tm["file"])
    n = min(data8.shape[-1], maps.shape[-1])
    d = centred(data8, n)
    q = annulus_sum(d[4], *tm["annulus_px"])
    u = annulus_sum(d[5], *tm["annulus_px"])
    return q / tm["qphi_sum"][tm["fields"][field]], u / q


def ring_sigma(err8, truth):
    """Error of the Q_φ annulus sum (independent pixels)."""
    tm = truth["truth_maps"]
    n = err8.shape[-1]
    r = np.hypot(*(np.mgrid[0:n, 0:n] - (n - 1) / 2))
    m = (r >= tm["annulus_px"][0]) & (r < tm["annulus_px"][1])
    return float(np.sqrt(np.nansum(err8[4][m] ** 2)))


# ------------------------------------------------------------------------------------------------
# array level: estimator, errors, degenerate coverage


def _cubes(s_true, sigma, hwps, rng, n_rep=1, sync=True):
    """Synthetic cubes through the real Mueller model: (rows, image) per cube, both cameras and FLC."""
    out = []
    j = 0
    for _ in range(n_rep):
        for h in hwps:
            for flc in "AB":
                for cam in (1, 2):
                    m = instrument_mueller(
                        -40 + 3 * j, 55 + 0.5 * j, 120 + 2 * j, h, 30 + j, flc, cam, None, "cmos", hwp_adi_sync=sync
                    )[0, :3]
                    out.append((m, np.einsum("i,iyx->yx", m, s_true)))
            j += 1
    return out


@pytest.mark.parametrize("weights", ["ivar", "equal"])
def test_errors_match_monte_carlo(weights):
    """σ from A⁻¹ (ivar) or A⁻¹CA⁻¹ (equal weights) equals the scatter of the solution over 300
    noise realisations within 10 % (per-pixel σ varying over the image and between cubes; 5 of 16
    cubes missing)."""
    rng = np.random.default_rng(4)
    n = 12
    s_true = np.stack([np.full((n, n), 1000.0), np.full((n, n), 40.0), np.full((n, n), -25.0)])
    cubes = _cubes(s_true, None, HWPS, rng)
    keep = [c for i, c in enumerate(cubes) if i not in (1, 4, 9, 10, 15)]
    sig = [rng.uniform(3, 9, (n, n)) for _ in keep]
    sols, errs = [], None
    for _ in range(300):
        acc = LeastSqAccumulator()
        for (m, img), s in zip(keep, sig, strict=True):
            acc.add(contribution((img + rng.normal(0, 1, (n, n)) * s)[None], (s * s)[None], m[None], weights=weights))
        sol = solve_normal(acc.a, acc.b, acc.n, c=acc.c)
        st, er, _ = half_scale_stokes(sol)
        sols.append(st[0, [0, 2, 3]])
        errs = er[0, [0, 2, 3]]
    sols = np.array(sols)
    mc = sols.std(axis=0, ddof=1)
    ratio = errs / mc
    assert np.all(np.abs(ratio.mean(axis=(-2, -1)) - 1) < 0.10), ratio.mean(axis=(-2, -1))
    assert np.all(np.abs(sols.mean(axis=0) - 0.5 * s_true) < 4 * mc / math.sqrt(300))  # unbiased


def test_degenerate_coverage_is_nan_and_counted():
    """Only HWP 0/45: U is not modulated → every pixel degenerate (NaN, counted); adding 22.5/67.5
    makes them solvable; subtracting a cube restores the sums exactly."""
    rng = np.random.default_rng(0)
    n = 8
    s_true = np.stack([np.full((n, n), 100.0), np.full((n, n), 5.0), np.full((n, n), 3.0)])
    acc = LeastSqAccumulator()
    for m, img in _cubes(s_true, None, (0.0, 45.0), rng):
        acc.add(contribution(img[None], np.ones((1, n, n)), m[None]))
    sol = solve_normal(acc.a, acc.b, acc.n, 100.0)
    assert sol.ndegenerate == [n * n] and np.isnan(sol.s).all()
    extra = [contribution(img[None], np.ones((1, n, n)), m[None]) for m, img in _cubes(s_true, None, (22.5, 67.5), rng)]
    a0 = acc.a.copy()
    for c in extra:
        acc.add(c)
    sol = solve_normal(acc.a, acc.b, acc.n, 100.0)
    assert sol.ndegenerate == [0]
    np.testing.assert_allclose(sol.s[0, :, 3, 3], [100.0, 5.0, 3.0], rtol=1e-6)  # float32 w·d
    for c in extra:
        acc.add(c, sign=-1)
    np.testing.assert_allclose(acc.a, a0, atol=1e-9 * np.abs(a0).max())
    assert acc.ncubes == 8


@pytest.mark.parametrize("nf", [1, 2])
def test_live_snr_equals_the_products_snr(nf):
    """The per-file S/N (Q_φ only) is the S/N of the written products (all planes, mean over fields)."""
    from vampd.pdi.leastsq import solve_products, solve_snr

    rng = np.random.default_rng(2)
    n = 40
    yy, xx = np.mgrid[0:n, 0:n] - (n - 1) / 2
    th = np.arctan2(-xx, yy)
    ring = 50 * np.exp(-((np.hypot(yy, xx) - 12) ** 2) / 8)
    s_true = np.stack([1000 * np.exp(-np.hypot(yy, xx) / 5) + 4 * ring, -ring * np.cos(2 * th), -ring * np.sin(2 * th)])
    for weights in ("equal", "ivar"):
        acc = LeastSqAccumulator()
        for m, img in _cubes(s_true, None, HWPS, rng):
            sig = np.sqrt(np.abs(img) + 25)
            d = np.stack([img + rng.normal(0, 1, img.shape) * sig] * nf)
            acc.add(contribution(d, np.stack([sig**2] * nf), np.stack([m] * nf), weights=weights))
        pc = lsq_config(leastsq_weights=weights, leastsq_snr_annulus=(6.0, 18.0)).polarimetry
        full = solve_products(acc, pc).snr
        assert full > 10 and solve_snr(acc, pc) == pytest.approx(full, rel=1e-5)


# ------------------------------------------------------------------------------------------------
# a complete simulated night: least squares vs triple difference vs truth


@pytest.fixture(scope="module")
def complete_night(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lsq_complete")
    truth = simulate_night(tmp / "sim", NIGHT)
    paths = sorted((tmp / "sim" / "raw").glob("*.fits"))
    led, _ = reduce_night(paths, pdi_config(), tmp / "red")  # triple difference, as the engine does
    cfg = lsq_config()
    res = leastsq_trigger.sync(led, cfg, tmp / "red", final=True)
    return tmp, truth, led, cfg, res


def test_complete_night_agrees_with_triple_difference_and_truth(complete_night):
    tmp, truth, led, cfg, res = complete_night
    out = tmp / "red"
    assert res["changed"][0]["added"] == 16 and not res["changed"][0]["errors"]
    d, e, hdr = lsq_coll(out)
    assert hdr["DPP PDI METHOD"] == "leastsq" and hdr["DPP PDI LSQ NCUBES"] == 16
    assert [hdr[f"DPP PDI LSQ NHWP {h:g}"] for h in HWPS] == [4, 4, 4, 4]
    assert hdr["STOKES"] == "I_Q,I_U,Q,U,Q_PHI,U_PHI,LP_I,AOLP" and d.shape[0] == 8
    ratio, u_q = ring_truth(truth, tmp / "sim", d)
    assert abs(ratio - 1) < 0.01 and abs(u_q) < 0.01
    assert hdr["DPP PDI DOLP 750-50"] < 5e-4  # unpolarised star
    # triple difference of the same reduced cubes: agreement within the combined errors
    t_ratio, *_ = ring_numbers(truth, tmp)
    with fits.open(out / "pdi" / "t_stokes_coll.fits") as h:
        te = h["ERR"].data.astype(float)
    q_sum = truth["truth_maps"]["qphi_sum"]["750-50"]
    comb = math.hypot(ring_sigma(e, truth), ring_sigma(te, truth)) / q_sum
    assert abs(ratio - t_ratio) < comb, (ratio, t_ratio, comb)
    # pixel level (where both are finite): |Δ| < combined σ for 99 % of the ring pixels' Q_φ
    with fits.open(out / "pdi" / "t_stokes_coll.fits") as h:
        td = h[0].data.astype(float)
    ok = np.isfinite(d[4]) & np.isfinite(td[4])
    z = np.abs(d[4] - td[4])[ok] / np.hypot(e[4], te[4])[ok]
    assert np.mean(z < 3) > 0.99
    # ledger: members, coverage and the S/N the live view shows
    (st,) = led.lsq_status()
    assert st["ncubes"] == 16 and st["coverage"] == {"0": 4, "22.5": 4, "45": 4, "67.5": 4}
    assert st["snr"] == pytest.approx(hdr["DPP PDI QPHI SNR"]) and st["snr"] > 5
    # `vampd status` (JSON and text) and the live view's header line show them
    from vampd.live.snapshot import take_snapshot
    from vampd.live.status import collect_status, format_status
    from vampd.live.view import render_text

    js = collect_status(out)
    assert js["leastsq"][0]["ncubes"] == 16 and js["leastsq"][0]["coverage"]["22.5"] == 4
    assert (
        f"lsq     ABAUR 750-50: 16 cubes (0 rejected), Q_phi S/N {st['snr']:.1f}, HWP 0:4 22.5:4 45:4 67.5:4"
        in format_status(js)
    )
    assert f"lsq 16 cubes S/N {st['snr']:.1f} HWP 0:4" in render_text(take_snapshot(out), width=200)


def test_redo_config_change_and_crash_before_commit(complete_night, tmp_path):
    """Exactly once: a redone product is subtracted and re-added; a new Mueller configuration
    re-adds every cube; a crash between the generation file and the ledger commit (the commit
    raises) leaves the ledger's generation in force and the next sync adds the cube once."""
    tmp, truth, led0, cfg, _ = complete_night
    out = tmp_path / "red"
    shutil.copytree(tmp / "red", out)
    led = Ledger(out)
    # the copied ledger names the originals' paths: point them at the copy
    with led.transaction():
        for tab, col in (("products", "path"), ("lsq_acc", "path"), ("lsq_members", "contrib")):
            led.conn.execute(f"UPDATE {tab} SET {col} = REPLACE({col}, ?, ?)", (str(tmp / "red"), str(out)))
    leastsq_trigger._CACHE.clear()
    r = leastsq_trigger.sync(led, cfg, out, final=True)  # new product paths: every cube re-added
    assert r["changed"][0]["removed"] == 16 == r["changed"][0]["added"]
    ref, _, _ = lsq_coll(out)
    gen0 = led.lsq_accumulators()[0]["gen"]
    # 1. redo one cube's product (touch: new mtime, same content) → subtract + add, same image
    prod = led.lsq_inputs()[5]
    newer = time.time_ns()
    os.utime(prod["product"], ns=(newer, newer))
    with led.transaction():
        led.conn.execute("UPDATE products SET mtime_ns=? WHERE path=?", (newer, prod["product"]))
    r = leastsq_trigger.sync(led, cfg, out, final=True)
    assert r["changed"][0]["added"] == 1 and r["changed"][0]["removed"] == 1 and r["changed"][0]["ncubes"] == 16
    d, _, hdr = lsq_coll(out)
    np.testing.assert_allclose(d, ref, rtol=1e-6, atol=1e-6 * np.nanmax(np.abs(ref)), equal_nan=True)
    assert len(list((out / "pdi" / "leastsq").glob("lsq_*_acc_*.npz"))) == 1  # old generations collected
    # 2. crash before the commit: the file of generation g+1 exists, the ledger still names g
    with led.transaction():
        led.conn.execute("UPDATE files SET state='pending' WHERE path=?", (prod["file"],))
    orig = led.lsq_commit

    def die(*a, **k):
        raise KeyboardInterrupt("kill -9 between the generation file and the commit")

    led.lsq_commit = die
    with pytest.raises(KeyboardInterrupt):
        leastsq_trigger.sync(led, cfg, out)
    led.lsq_commit = orig
    leastsq_trigger._CACHE.clear()  # a restarted process has no cache
    assert led.lsq_accumulators()[0]["ncubes"] == 16  # the subtraction never happened
    with led.transaction():
        led.conn.execute("UPDATE files SET state='done' WHERE path=?", (prod["file"],))
    assert leastsq_trigger.sync(led, cfg, out, final=True)["changed"] == []  # nothing to redo
    assert led.lsq_accumulators()[0]["gen"] == gen0 + 1
    # 3. configuration change (Mueller model: HWP not synchronised) → every cube re-added
    cfg2 = lsq_config(hwp_adi_sync=False)
    r = leastsq_trigger.sync(led, cfg2, out, final=True)
    assert r["changed"][0]["removed"] == 16 and r["changed"][0]["added"] == 16
    d2, _, _ = lsq_coll(out)
    assert not np.allclose(np.nan_to_num(d2[2]), np.nan_to_num(ref[2]), rtol=1e-3)
    r = leastsq_trigger.sync(led, cfg, out, final=True)  # and back
    d3, _, _ = lsq_coll(out)
    np.testing.assert_allclose(d3, ref, rtol=1e-6, atol=1e-6 * np.nanmax(np.abs(ref)), equal_nan=True)
    # 4. bounded refresh: a requeued file leaves the accumulator at once, the products follow after
    # leastsq_refresh_files cubes or at the daemon's tick once leastsq_refresh_seconds have passed
    slow = lsq_config(leastsq_refresh_files=100, leastsq_refresh_seconds=3600)
    with led.transaction():
        led.conn.execute("UPDATE files SET state='pending' WHERE path=?", (prod["file"],))
    r = leastsq_trigger.sync(led, slow, out)
    assert r["changed"][0]["ncubes"] == 15 and r["solved"][0]["written"] == {}
    assert lsq_coll(out)[2]["DPP PDI LSQ NCUBES"] == 16 and led.lsq_status()[0]["ncubes"] == 15
    assert leastsq_trigger.tick(led, slow, out) == []  # not yet due
    assert [t["ncubes"] for t in leastsq_trigger.tick(led, slow, out, idle=True)] == [15]
    assert lsq_coll(out)[2]["DPP PDI LSQ NCUBES"] == 15
    led.close()


def test_ivar_weights_within_1pc(complete_night):
    """``leastsq_weights = "ivar"`` (1/σ² per pixel, signal-dependent σ): still within 1 % of the truth
    and of the triple difference's errors, but biased by the beams' unequal weights (see the notes),
    unlike the default equal weights, which reproduce the triple difference."""
    tmp, truth, led, _, _ = complete_night
    leastsq_trigger.sync(led, lsq_config("lsqiv", leastsq_weights="ivar"), tmp / "red", final=True)
    d, e, hdr = lsq_coll(tmp / "red", "lsqiv")
    ratio, u_q = ring_truth(truth, tmp / "sim", d)
    de, _, _ = lsq_coll(tmp / "red")
    eq_ratio, _ = ring_truth(truth, tmp / "sim", de)
    t_ratio, *_ = ring_numbers(truth, tmp)
    print(f"\nQ_phi/truth: ivar {ratio:.5f}, equal {eq_ratio:.5f}, triple {t_ratio:.5f}")
    assert abs(eq_ratio - t_ratio) < 1e-3
    assert abs(ratio - 1) < 0.01 and abs(u_q) < 0.01
    assert hdr["DPP PDI LSQ NCUBES"] == 16 and hdr["DPP PDI DOLP 750-50"] < 5e-4


# ------------------------------------------------------------------------------------------------
# messy nights: missing cubes, several cubes per HWP position


def _split_cubes(paths, parts, dest):
    """Each raw cube written as ``parts`` consecutive cubes (several cubes per HWP position)."""
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for p in paths:
        with fits.open(p) as h:
            data, hdr = h[0].data, h[0].header.copy()
        n = data.shape[0]
        k = n // parts
        t0, t1 = float(hdr["MJD-STR"]), float(hdr["MJD-END"])
        for i in range(parts):
            hh = hdr.copy()
            a, b = t0 + (t1 - t0) * i / parts, t0 + (t1 - t0) * (i + 1) / parts
            hh["MJD-STR"], hh["MJD-END"], hh["MJD"] = a, b, 0.5 * (a + b)
            hh["FRAMEID"] = hh["EXP-ID"] = f"{p.stem}{i}"
            q = dest / f"{p.stem}{i}.fits"
            fits.PrimaryHDU(data[i * k : (i + 1) * k], header=hh).writeto(q)
            out.append(q)
    return out


def _both(tmp, paths, sim_dir, truth):
    led, _ = reduce_night(paths, pdi_config(), tmp / "red")
    pdi_trigger.on_finalize(led, pdi_config(), tmp / "red")
    leastsq_trigger.sync(led, lsq_config(), tmp / "red", final=True)
    return led


@pytest.mark.slow
def test_night_with_three_cubes_missing_per_cycle(tmp_path):
    sim = NIGHT.replace(ncycles=2, nframes=2, size=96, seed=8)
    truth = simulate_night(tmp_path / "sim", sim)
    paths = sorted((tmp_path / "sim" / "raw").glob("*.fits"))
    rng = random.Random(3)
    cycles = [[tmp_path / "sim" / f["path"] for f in truth["files"][16 * c : 16 * (c + 1)]] for c in range(2)]
    removed = [p for c in cycles for p in rng.sample(c, 3)]
    keep = [p for p in paths if p not in removed]
    led = _both(tmp_path, keep, tmp_path / "sim", truth)
    # the triple difference loses both cycles; least squares uses every remaining cube
    states = [r["state"] for r in led.conn.execute("SELECT state FROM sets")]
    assert states and "complete" not in states
    assert not (tmp_path / "red" / "pdi" / "t_stokes_coll.fits").exists()
    d, e, hdr = lsq_coll(tmp_path / "red")
    assert hdr["DPP PDI LSQ NCUBES"] == 26 == len(keep)
    assert sum(hdr[f"DPP PDI LSQ NHWP {h:g}"] for h in HWPS) == 26
    assert hdr["DPP PDI QPHI SNR"] > 5  # reported; the difference method has none
    ratio, u_q = ring_truth(truth, tmp_path / "sim", d)
    print(f"\nQ_phi/truth {ratio:.4f}, U_phi/Q_phi {u_q:.4f}, S/N {hdr['DPP PDI QPHI SNR']:.1f}")
    assert abs(ratio - 1) < 0.02 and abs(u_q) < 0.01


@pytest.mark.slow
def test_night_with_several_cubes_per_hwp_position(tmp_path):
    sim = NIGHT.replace(nframes=4, size=96, seed=9)
    truth = simulate_night(tmp_path / "sim", sim)
    raw = sorted((tmp_path / "sim" / "raw").glob("*.fits"))
    paths = _split_cubes(raw, 2, tmp_path / "split")
    led = _both(tmp_path, paths, tmp_path / "sim", truth)
    d, e, hdr = lsq_coll(tmp_path / "red")
    assert hdr["DPP PDI LSQ NCUBES"] == 32 == len(paths)
    assert [hdr[f"DPP PDI LSQ NHWP {h:g}"] for h in HWPS] == [8, 8, 8, 8]
    rows = led.conn.execute("SELECT members FROM sets WHERE state='complete'").fetchall()
    used = sum(len(json.loads(r["members"])) for r in rows)
    t_snr = 0.0  # no complete set: the difference method has no image at all
    if used:
        with fits.open(tmp_path / "red" / "pdi" / "t_stokes_coll.fits") as h:
            t_snr = leastsq_snr_of(h[0].data.astype(float), h["ERR"].data.astype(float))
    print(
        f"\ntriple difference used {used} of 32 cubes, Q_phi S/N {t_snr:.1f}; least squares 32, "
        f"S/N {hdr['DPP PDI QPHI SNR']:.1f}"
    )
    if used < 32:  # the difference method lost cubes: least squares' S/N is higher
        assert hdr["DPP PDI QPHI SNR"] > t_snr
    else:  # a set former that groups repeated cubes uses them all: same information
        assert hdr["DPP PDI QPHI SNR"] > 0.95 * t_snr
    ratio, u_q = ring_truth(truth, tmp_path / "sim", d)
    print(f"Q_phi/truth {ratio:.4f}, U_phi/Q_phi {u_q:.4f}")
    assert abs(ratio - 1) < 0.02 and abs(u_q) < 0.01


def leastsq_snr_of(data8, err8):
    from vampd.pdi.leastsq import qphi_snr, snr_annulus

    return qphi_snr(data8[4], err8[4], *snr_annulus(data8.shape, lsq_config().polarimetry))


# ------------------------------------------------------------------------------------------------
# kill -9 during a streamed night


@pytest.mark.slow
def test_sigkill_during_streamed_night_equals_uninterrupted_run(tmp_path):
    from test_daemon import counts, env, start_daemon, stop, wait_for, write_config

    sim = SimConfig(size=64, nframes=2, ncycles=2, n_hot=0, n_dead=0, calib=False, scene=Scene(ring_flux=2e5))
    simulate_night(tmp_path / "sim", sim)
    files = sorted((tmp_path / "sim" / "raw").glob("*.fits"))
    cfgp = write_config(
        tmp_path / "lsq.toml",
        preset="pdi-triplediff",
        sections={
            "align.crop_width": 48,
            "polarimetry.method": "leastsq",
            "polarimetry.leastsq_refresh_files": 1,
            "diff_images.make_diff": False,
        },
        complete_timeout=120.0,
    )
    # uninterrupted reference: `vampd run` over the same files
    ref = tmp_path / "ref"
    p = subprocess.run(
        [sys.executable, "-m", "vampd", "run", str(cfgp), *map(str, files), "-o", str(ref), "-j", "2"],
        env=env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    # streamed: files appear one by one (with their sidecars), the daemon is SIGKILLed 4 times
    raw, out = tmp_path / "raw", tmp_path / "out"
    raw.mkdir()
    rng = random.Random(7)
    marks = sorted(rng.sample(range(3, len(files) - 3), 4))
    proc = start_daemon(cfgp, raw, out)
    kills = 0
    try:
        for i, f in enumerate(files):
            shutil.copy(f.with_suffix(".txt"), raw / f.with_suffix(".txt").name)
            shutil.copy(f, raw / (f.name + ".tmp"))
            (raw / (f.name + ".tmp")).rename(raw / f.name)
            if kills < len(marks) and i >= marks[kills]:
                mark = marks[kills]
                wait_for(lambda m=mark: counts(out)["done"] >= m - 1, timeout=120, every=0.05)
                time.sleep(rng.uniform(0.0, 0.5))
                proc.send_signal(signal.SIGKILL)
                proc.wait(10)
                kills += 1
                proc = start_daemon(cfgp, raw, out)
            time.sleep(0.1)
        wait_for(lambda: counts(out)["done"] == len(files), timeout=300, every=0.2)
        time.sleep(1.0)
    finally:
        assert stop(proc) == 0
    assert kills == 4
    for d in (ref, out):
        p = subprocess.run(
            [sys.executable, "-m", "vampd", "finalize", str(cfgp), "-o", str(d)],
            env=env(),
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert p.returncode == 0, p.stdout + p.stderr
    a, ea, ha = lsq_coll(ref, "t")
    b, eb, hb = lsq_coll(out, "t")
    assert ha["DPP PDI LSQ NCUBES"] == hb["DPP PDI LSQ NCUBES"] == len(files)
    scale = np.nanmax(np.abs(a[:4]))
    np.testing.assert_allclose(b[:4], a[:4], rtol=1e-6, atol=1e-6 * scale, equal_nan=True)
    np.testing.assert_allclose(eb[:4], ea[:4], rtol=1e-6, atol=1e-6 * np.nanmax(ea[:4]), equal_nan=True)
    led = Ledger(out, readonly=True)
    try:
        members = led.lsq_members()
        assert len(members) == len(files) and len({m["file"] for m in members}) == len(files)
    finally:
        led.close()


def test_config_leastsq_keys_and_rule():
    from vampd.config import config_from_toml_str

    cfg = config_from_toml_str(
        'name = "n"\n[polarimetry]\nmethod = "leastsq"\nleastsq_refresh_files = 3\n'
        'leastsq_weights = "equal"\nleastsq_snr_annulus = [10, 30]\n'
    )
    pc = cfg.polarimetry
    assert (pc.method, pc.leastsq_refresh_files, pc.leastsq_weights, pc.leastsq_snr_annulus) == (
        "leastsq",
        3,
        "equal",
        (10.0, 30.0),
    )
    with pytest.raises(ValueError, match='method = "leastsq" requires polarimetry.derotate = true'):
        config_from_toml_str('[polarimetry]\nmethod = "leastsq"\nderotate = false\nmm_correct = false\n')
    with pytest.raises(ValueError, match="leastsq_weights"):
        config_from_toml_str('[polarimetry]\nmethod = "leastsq"\nleastsq_weights = "median"\n')


@pytest.mark.slow
@pytest.mark.parametrize("weights", ["ivar", "equal"])
def test_mbi_night_per_field(tmp_path, weights):
    """MBI: one accumulator per target and filter holds the four fields; each field's ring is
    recovered; the cube is (4, 8, N, N) and the collapse is the mean over fields (FIELD = COMB)."""
    scene = Scene(ring_radius_mas=100.0, ring_width_mas=25.0, ring_flux=2e5)
    sim = SimConfig(size=64, nframes=2, ncycles=1, noise_free=True, calib=False, mbi=True, scene=scene)
    truth = simulate_night(tmp_path / "sim", sim)
    paths = sorted((tmp_path / "sim" / "raw").glob("*.fits"))
    cfg = lsq_config(crop=56, leastsq_weights=weights)
    led, _ = reduce_night(paths, cfg, tmp_path / "red")
    leastsq_trigger.on_finalize(led, cfg, tmp_path / "red")
    fields = ["F610", "F670", "F720", "F760"]
    (st,) = led.lsq_status()
    assert st["ncubes"] == 16 and st["rejected"] == 0
    with fits.open(tmp_path / "red" / "pdi" / "lsq_stokes_cube.fits") as h:
        cube, hdr = h[0].data.astype(float), h[0].header
        assert cube.shape[:2] == (4, 8) and [x.name for x in h[2:]] == fields
    with fits.open(tmp_path / "red" / "pdi" / "lsq_stokes_coll.fits") as h:
        assert h[0].header["FIELD"] == "COMB" and h[0].header["DPP PDI LSQ NCUBES"] == 16
    for j, f in enumerate(fields):
        ratio, u_q = ring_truth(truth, tmp_path / "sim", cube[j], field=j)
        print(f"\n{weights} {f}: Q_phi/truth {ratio:.4f}, U_phi/Q_phi {u_q:.4f}")
        assert abs(ratio - 1) < (0.01 if weights == "equal" else 0.025) and abs(u_q) < 0.01, (f, ratio, u_q)
        assert hdr[f"DPP PDI DOLP {f}"] < 5e-4 and hdr[f"DPP PDI LSQ NDEGEN {f}"] >= 0


@pytest.mark.slow
def test_specphot_companion_through_vampd_run_and_finalize(tmp_path, monkeypatch):
    """``[specphot] unit = "Jy"``: the least-squares products get their Jy companions (planes × the
    target's factor, AOLP unchanged) during the run and at finalize, as the difference methods' do."""
    from test_pdi_specphot import NIGHT as SP_NIGHT
    from test_pdi_specphot import _check_scaled, _hand_factors

    from vampd.cli import main
    from vampd.config.io import save_config
    from vampd.config.presets import preset_config

    monkeypatch.delenv("VAMPD_DATA_DIR", raising=False)
    simulate_night(tmp_path / "sim", SimConfig(**SP_NIGHT))
    cfg = preset_config("pdi-triplediff")
    cfg.name = "t"
    cfg.align.crop_width = 56
    cfg.coadd.method = "mean"
    cfg.polarimetry.method = "leastsq"
    cfg.polarimetry.use_ideal_mm = True
    cfg.polarimetry.leastsq_refresh_files = 4
    cfg.diff_images.make_diff = False
    cfg.specphot.unit = "Jy"
    cfg.specphot.source = "zeropoints"
    cfg.specphot.sequence_files = 4
    save_config(cfg, tmp_path / "t.toml")
    out = tmp_path / "out"
    files = sorted(str(p) for p in (tmp_path / "sim" / "raw").glob("*.fits"))
    assert main(["run", str(tmp_path / "t.toml"), *files, "-o", str(out), "-j", "2"]) == 0
    hand, _ = _hand_factors(out, ["750-50"])
    for stage in ("run", "finalize"):  # the end of `vampd run` refreshes lagging products (tick idle)
        eps, eerr, hdr = lsq_coll(out, "t")
        assert hdr["DPP PDI METHOD"] == "leastsq" and hdr["DPP PDI LSQ NCUBES"] == 16
        jy = _check_scaled(out / "pdi" / "t_stokes_coll_jy.fits", eps, eerr, [hand["750-50"]])
        assert jy["BUNIT"] == "Jy" and jy["DPP FLUX FACTOR 750-50"] == pytest.approx(hand["750-50"], rel=1e-12)
        if stage == "run":
            assert main(["finalize", str(tmp_path / "t.toml"), "-o", str(out)]) == 0
    report = next((out / "report").glob("*.md"), None) if (out / "report").exists() else None
    assert report is None or "Polarimetry" in report.read_text()

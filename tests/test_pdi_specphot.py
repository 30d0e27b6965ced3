"""Running Stokes products in the specphot unit (issue 6) through ``vampd run`` and finalize.

Simulated PDI nights (64² px, 2 frames per file, one HWP cycle = 16 files) with
``[specphot] unit = "Jy", source = "zeropoints"`` and no data directory, so the built-in zero-point
table is used: c_fd = C_FD · 10^(0.4·k·AIRMASS) per file, and the factor of a target's Stokes
products is the median over its calibrated files.
"""

import numpy as np
import pytest
from astropy.io import fits

from vampd.cli import main
from vampd.config.io import save_config
from vampd.config.presets import preset_config
from vampd.engine import pdi_trigger, specphot_trigger
from vampd.engine.ledger import Ledger
from vampd.simulate.night import SimConfig, simulate_night
from vampd.simulate.scene import Scene

pytestmark = pytest.mark.slow  # whole PDI nights through `vampd run` and finalize (10-17 s each)

# Built-in table (docs/instrument.md §8.2), copied here on purpose: the test computes c_fd by hand.
C_FD = {
    "750-50": (4.08e-07, 0.033860277),
    "F610": (1.40e-06, 0.09034138),
    "F670": (6.81e-07, 0.056374893),
    "F720": (4.88e-07, 0.039893303),
    "F760": (1.17e-06, 0.031851713),
}
SCENE = Scene(ring_radius_mas=100.0, ring_width_mas=25.0, ring_flux=2e5)
# 3 h before AB Aur's transit, 1 min per HWP position: the airmass (3 decimals) changes from file
# to file, so the median over all files differs from a median over part of them
NIGHT = dict(
    size=64, nframes=2, ncycles=1, noise_free=True, calib=False, scene=SCENE, start_mjd=61004.33, hwp_overhead_s=60.0
)


def _config(root, sequence_files=None, crop=56):
    cfg = preset_config("pdi-triplediff")
    cfg.name = "t"
    cfg.align.crop_width = crop
    cfg.coadd.method = "mean"
    cfg.polarimetry.use_ideal_mm = True
    cfg.diff_images.make_diff = False
    cfg.specphot.unit = "Jy"
    cfg.specphot.source = "zeropoints"
    cfg.specphot.sequence_files = sequence_files
    path = root / f"t{sequence_files}.toml"
    save_config(cfg, path)
    return cfg, path


def _run(cfg_path, raw, out):
    files = sorted(str(p) for p in raw.glob("*.fits"))
    assert main(["run", str(cfg_path), *files, "-o", str(out), "-j", "2"]) == 0
    return files


def _airmass(out):
    """(camera, MJD, AIRMASS) of every reduced file, AIRMASS from its coadded product (what the
    calibration reads)."""
    led = Ledger(out, readonly=True)
    rows = led.conn.execute(
        "SELECT f.camera, f.mjd, p.path FROM files f JOIN products p ON p.file = f.path"
        " WHERE p.kind='coadded' ORDER BY f.camera, f.mjd"
    ).fetchall()
    led.close()
    assert len(rows) == 16
    return [(int(r[0]), float(r[1]), float(fits.getheader(r[2])["AIRMASS"])) for r in rows]


def _c_fd(field, airmass):
    fac, k = C_FD[field]
    return float(np.median([fac * 10 ** (0.4 * k * x) for x in airmass]))


def _hand_factors(out, fields):
    """Per field: median over every reduced file of C_FD · 10^(0.4 k AIRMASS)."""
    am = _airmass(out)
    return {f: _c_fd(f, [a for *_, a in am]) for f in fields}, am


def _scale(shape, factors):
    """Per-plane factors: planes 0–6 × the field's factor, AOLP (plane 7) × 1."""
    f = np.asarray(factors, float)
    s = np.repeat(f[:, None], 8, axis=1) if len(shape) == 4 else np.full(8, f[0])
    s[..., 7] = 1.0
    return s[..., None, None]


def _check_scaled(unit_file, eps_data, eps_err, factors):
    """The companion = e-/s product × factor (per field on axis 0 for a cube), AOLP unchanged."""
    with fits.open(unit_file) as h:
        d, e, hdr = h[0].data.astype(float), h["ERR"].data.astype(float), h[0].header
    scale = _scale(d.shape, factors)
    np.testing.assert_allclose(d, eps_data * scale, rtol=2e-6, equal_nan=True)
    np.testing.assert_allclose(e, eps_err * scale, rtol=2e-6, equal_nan=True)
    return hdr


@pytest.fixture(scope="module")
def raw_night(tmp_path_factory, no_data_dir_module):
    root = tmp_path_factory.mktemp("pdisp")
    sim = SimConfig(**NIGHT)
    simulate_night(root / "sim", sim)
    return root, root / "sim" / "raw"


def test_running_stokes_in_jy_through_vampd_run_and_finalize(raw_night):
    root, raw = raw_night
    cfg, cfg_path = _config(root, sequence_files=4)
    out = root / "seq4"
    _run(cfg_path, raw, out)
    led = Ledger(out, readonly=True)
    rows = led.conn.execute("SELECT state, filter FROM specphot").fetchall()
    assert sorted(r[0] for r in rows) == ["done"] * 4  # 2 cameras × 8 files in chunks of 4
    assert {r[1] for r in rows} == {"750-50"}
    assert led.set_counts()["complete"] == 1
    led.close()
    pdi = out / "pdi"
    with fits.open(pdi / "t_stokes_coll.fits") as h:
        eps, eerr = h[0].data.astype(float), h["ERR"].data.astype(float)
        assert h[0].header["BUNIT"] == "e-/s" and h[0].header["DPP PDI NSETS"] == 1
    hand, airmass = _hand_factors(out, ["750-50"])
    # the night moves: a companion missing the last camera-2 sequence (4 latest files) would differ
    partial = _c_fd("750-50", [a for cam, _, a in airmass if cam == 1] + [a for cam, _, a in airmass if cam == 2][:4])
    assert abs(partial / hand["750-50"] - 1) > 1e-6
    jy = pdi / "t_stokes_coll_jy.fits"
    hdr = _check_scaled(jy, eps, eerr, [hand["750-50"]])
    # the last file completes the set (PDI trigger first) and then the last camera-2 sequence: the
    # companion must hold the factor of all 16 files, i.e. it was updated when that calibration came
    assert hdr["DPP FLUX FACTOR 750-50"] == pytest.approx(hand["750-50"], rel=1e-12)
    assert hdr["BUNIT"] == "Jy" and hdr["DPP FLUX UNIT"] == "Jy"
    with fits.open(jy) as h:
        assert h["750-50"].header["BUNIT"] == "Jy"
    running_jy = fits.getdata(jy).astype(float)
    # Jy of the ring's Q_phi > 0 (a factor ~4e-7 Jy/(e-/s) of a positive e-/s signal)
    assert np.nansum(running_jy[4]) == pytest.approx(hand["750-50"] * np.nansum(eps[4]), rel=1e-5)

    # finalize: its calibrated collapse (median of one set = that set) agrees with the running one
    assert main(["finalize", str(cfg_path), "-o", str(out)]) == 0
    with fits.open(pdi / "t_stokes_coll_jy.fits") as h:
        fin, fhdr = h[0].data.astype(float), h[0].header
    assert fhdr["DPP PDI COLLAPSE"] == "median" and fhdr["BUNIT"] == "Jy"
    assert fhdr["DPP FLUX FACTOR 750-50"] == pytest.approx(hand["750-50"], rel=1e-12)
    np.testing.assert_allclose(fin, running_jy, rtol=1e-5, atol=1e-12 * np.nanmax(np.abs(running_jy)), equal_nan=True)
    summary = (out / "aux" / "t_specphot_summary.csv").read_text().splitlines()
    assert len(summary) == 3 and summary[0].startswith("target,filter,camera,unit")  # one row per camera


def test_late_calibration_reaches_the_running_product(raw_night):
    """No sequence completes during the run (one target, no sequence_files): the end of the batch
    closes the target's sequence, so the calibrated companion exists when ``vampd run`` returns; the
    finalize hook then has nothing left to do; a lost companion is rebuilt."""
    root, raw = raw_night
    cfg, cfg_path = _config(root, sequence_files=None)
    out = root / "late"
    _run(cfg_path, raw, out)
    jy = out / "pdi" / "t_stokes_coll_jy.fits"
    assert (out / "pdi" / "t_stokes_coll.fits").exists() and jy.exists()
    hand, _ = _hand_factors(out, ["750-50"])
    assert fits.getheader(jy)["DPP FLUX FACTOR 750-50"] == pytest.approx(hand["750-50"], rel=1e-12)
    led = Ledger(out)
    try:
        mtime = jy.stat().st_mtime_ns
        assert pdi_trigger.refresh_calibrated(cfg, out) == {}  # nothing changed: nothing written
        assert specphot_trigger.on_finalize(led, cfg, out) == [] and jy.stat().st_mtime_ns == mtime
        jy.unlink()  # e.g. a crash between the e-/s product and its companion
        assert pdi_trigger.refresh_calibrated(cfg, out) == {"coll_unit": str(jy)}
        with fits.open(out / "pdi" / "t_stokes_coll.fits") as h:
            _check_scaled(jy, h[0].data.astype(float), h["ERR"].data.astype(float), [hand["750-50"]])
    finally:
        led.close()


def test_mbi_each_field_its_own_factor(tmp_path, no_data_dir):
    fields = ["F610", "F670", "F720", "F760"]
    sim = SimConfig(mbi=True, **NIGHT)
    simulate_night(tmp_path / "sim", sim)
    cfg, cfg_path = _config(tmp_path, sequence_files=4)
    out = tmp_path / "red"
    _run(cfg_path, tmp_path / "sim" / "raw", out)
    led = Ledger(out, readonly=True)
    assert {r[0] for r in led.conn.execute("SELECT filter FROM specphot WHERE state='done'")} == {",".join(fields)}
    led.close()
    hand, _ = _hand_factors(out, fields)
    assert len({round(v, 12) for v in hand.values()}) == 4  # four different zero points
    pdi = out / "pdi"
    with fits.open(pdi / "t_stokes_cube.fits") as h:
        cube, ecube = h[0].data.astype(float), h["ERR"].data.astype(float)
    n = cube.shape[-1]
    assert cube.shape == (4, 8, n, n)
    fac = [hand[f] for f in fields]
    hdr = _check_scaled(pdi / "t_stokes_cube_jy.fits", cube, ecube, fac)
    for f in fields:
        assert hdr[f"DPP FLUX FACTOR {f}"] == pytest.approx(hand[f], rel=1e-12)
    with fits.open(pdi / "t_stokes_cube_jy.fits") as h:
        assert [x.header["DPP FLUX FACTOR " + x.name] for x in h[2:]] == pytest.approx(fac, rel=1e-12)
    # the collapse over fields is the mean of the calibrated fields (not mean factor × mean field)
    with fits.open(pdi / "t_stokes_coll_jy.fits") as h:
        coll = h[0].data.astype(float)
        assert h[0].header["FIELD"] == "COMB" and coll.shape == (8, n, n)
    f4 = np.asarray(fac)[:, None, None]
    with np.errstate(invalid="ignore"):
        expect_q = np.mean(cube[:, 2] * f4, axis=0)
    ok = np.isfinite(cube[:, 2]).all(axis=0)
    np.testing.assert_allclose(coll[2][ok], expect_q[ok], rtol=1e-5, atol=1e-6 * np.abs(expect_q[ok]).max())
    wrong = np.mean(fac) * np.mean(cube[:, 2], axis=0)
    assert np.abs(coll[2][ok] - wrong[ok]).max() > 1e-3 * np.abs(expect_q[ok]).max()
    # finalize's MBI copies agree (one set: median = mean)
    assert main(["finalize", str(cfg_path), "-o", str(out)]) == 0
    fin = fits.getdata(pdi / "t_stokes_cube_jy.fits").astype(float)
    np.testing.assert_allclose(fin, cube * _scale(cube.shape, fac), rtol=1e-5, equal_nan=True)

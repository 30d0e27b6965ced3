"""End-to-end tests of the per-file chain (``process_file``) against the simulator's truth.

Every test runs the real chain on real FITS files written by ``vampd.simulate`` into a temp
dir: calibration masters built by ``build_masters``, then calibrate → analyse → select →
align → coadd, and compares with the injected quantities in ``truth.json``.
"""

from __future__ import annotations

import glob
import math
import time
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from vampd.config import load_config
from vampd.config.presets import preset_config
from vampd.engine.pipeline import process_file
from vampd.simulate.night import SimConfig, simulate_night
from vampd.stages.analyze import load_metrics
from vampd.stages.calibfiles import build_masters

from conftest import REFERENCE_CONFIG, needs_reference_config


def _night(tmp, **kw):
    # exptime 0.08 s: ~8e4 e- per frame, a peak of a few thousand e- (below the CMOS full well)
    cfg = SimConfig(**{"size": 96, "nframes": 12, "ncycles": 1, "seed": 3, "exptime": 0.08, **kw})
    truth = simulate_night(tmp / "night", cfg)
    masters = build_masters(sorted(glob.glob(str(tmp / "night" / "calib" / "*.fits"))), tmp / "masters")
    return truth, masters


def _cfg(tmp, preset="quicklook", crop=64, **sections):
    cfg = preset_config(preset, "t")
    cfg.calibrate.calib_directory = tmp / "masters"
    cfg.calibrate.flat_correct = True
    cfg.align.crop_width = crop
    for section, values in sections.items():
        for k, v in values.items():
            setattr(getattr(cfg, section), k, v)
    return cfg


def _raw(tmp, truth, i):
    f = truth["files"][i]
    return str(tmp / "night" / f["path"]), f


@pytest.fixture(scope="module")
def reduced(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("chain")
    truth, _ = _night(tmp)
    cfg = _cfg(tmp)
    out = tmp / "out"
    results = [process_file(_raw(tmp, truth, i)[0], cfg, out) for i in range(4)]
    return tmp, truth, cfg, out, results


def test_products_and_headers(reduced):
    tmp, truth, cfg, out, results = reduced
    r = results[0]
    kinds = dict(r.products)
    assert set(kinds) == {"metrics", "coadded"}
    stem = truth["files"][0]["name"]
    assert kinds["coadded"] == str(out / "coadded" / f"t_{stem}_coll.fits")
    with fits.open(kinds["coadded"]) as hdul:
        assert [h.name for h in hdul] == ["PRIMARY", "ERR", "750-50"]
        data, err, h = hdul[0].data, hdul["ERR"].data, hdul[0].header
        npad = 2 * math.floor((64 / 2) * (math.sqrt(2) - 1) / 2)
        assert data.shape == (1, 64 + 2 * npad, 64 + 2 * npad)
        assert err.shape == data.shape
        assert h["BUNIT"] == "e-/s"
        assert h["HIERARCH DPP COADD NCOADD"] == 12
        assert h["HIERARCH DPP COADD TINT"] == pytest.approx(12 * truth["config"]["exptime"])
        assert h["HIERARCH DPP CONFIG HASH"] == cfg.config_hash()
        assert h["BACKFILE"].endswith("_coll.fits") and h["FLATFILE"].endswith("_coll.fits")
        assert h["DEROTANG"] == pytest.approx(truth["files"][0]["derotang"], abs=0.01)
        assert h["CTYPE1"] == "RA---TAN"
    assert r.summary["camera"] == 1 and r.summary["hwp"] == 0.0 and r.summary["flc"] == "A"


def test_centroids_photometry_strehl_against_truth(reduced):
    tmp, truth, cfg, out, results = reduced
    dy, dx, dflux, dstrehl = [], [], [], []
    for i, r in enumerate(results):
        f = truth["files"][i]
        field = next(iter(f["frames"]["fields"].values()))
        m, fields = load_metrics(dict(r.products)["metrics"])
        assert fields == ["750-50"]
        assert m["dftx"].shape == (1, 1, 12)
        dy.append(m["dfty"][0, 0] - np.array(field["star_y_cal"]))
        dx.append(m["dftx"][0, 0] - np.array(field["star_x_cal"]))
        dflux.append(m["photf"][0, 0] / np.array(field["aper_flux"]) - 1)
        dstrehl.append(m["strehl"][0, 0] - np.array(field["strehl_metric"]))
    dy, dx = np.concatenate(dy), np.concatenate(dx)
    rms = math.sqrt(np.mean(dy**2 + dx**2))
    assert rms < 0.05, f"centroid rms {rms:.3f} px"
    dflux = np.concatenate(dflux)
    # photometry: each frame within a few % (photon noise), the mean within 1 %
    assert abs(np.mean(dflux)) < 0.01 and np.max(np.abs(dflux)) < 0.05
    dstrehl = np.concatenate(dstrehl)
    # per-frame errors are photon-noise limited (the pixel-response deconvolution amplifies it)
    assert math.sqrt(np.mean(dstrehl**2)) < 0.03, f"Strehl errors {dstrehl}"
    assert abs(np.mean(dstrehl)) < 0.01


def test_coadd_is_centred(reduced):
    """After alignment + coadd + recenter the PSF sits on (N-1)/2 (the reference is off by 0.5 px)."""
    from vampd.instrument.pupil import synthetic_psf
    from vampd.stages.dft import dft_centroid

    tmp, truth, cfg, out, results = reduced
    for r in results:
        with fits.open(dict(r.products)["coadded"]) as hdul:
            img = hdul[0].data[0].astype(float)
            h = hdul[0].header
        n = img.shape[-1]
        c = (n - 1) / 2
        w = 21
        o = int(round(c)) - w // 2
        win = img[o : o + w, o : o + w]
        psf = synthetic_psf("750-50", h["PXSCALE"], h["INST-PA"], w)
        y, x = dft_centroid(win[None], psf)
        assert abs(y[0] + o - c) < 0.02 and abs(x[0] + o - c) < 0.02


def test_skip_when_up_to_date_and_force(reduced):
    tmp, truth, cfg, out, results = reduced
    path = _raw(tmp, truth, 0)[0]
    coadd = Path(dict(results[0].products)["coadded"])
    mtime = coadd.stat().st_mtime_ns
    r = process_file(path, cfg, out)
    assert r.skipped and coadd.stat().st_mtime_ns == mtime
    time.sleep(0.01)
    r = process_file(path, cfg, out, force=True)
    assert not r.skipped and coadd.stat().st_mtime_ns > mtime


def test_frame_selection_keeps_best(tmp_path):
    truth, _ = _night(tmp_path, nframes=20)
    cfg = _cfg(tmp_path, frame_select={"frame_select": True, "metric": "strehl", "cutoff": 0.3})
    path, f = _raw(tmp_path, truth, 0)
    r = process_file(path, cfg, tmp_path / "out")
    assert r.metrics["nkept"] == math.ceil((1 - 0.3) * 20) == 14
    with fits.open(dict(r.products)["coadded"]) as hdul:
        h = hdul[0].header
        assert h["HIERARCH DPP COADD NCOADD"] == 14
        assert h["HIERARCH DPP SELECT METRIC"] == "strehl"
        assert h["HIERARCH DPP SELECT QUANTILE"] == 0.3
    m, _ = load_metrics(dict(r.products)["metrics"])
    s = m["strehl"][0, 0]
    assert np.all(np.isfinite(s))


@pytest.mark.parametrize("metric", ["max", "peak", "l2norm", "normvar", "strehl"])
def test_every_selection_metric_runs(tmp_path, metric):
    truth, _ = _night(tmp_path, nframes=8, size=64)
    cfg = _cfg(tmp_path, crop=48, frame_select={"frame_select": True, "metric": metric, "cutoff": 0.5})
    r = process_file(_raw(tmp_path, truth, 0)[0], cfg, tmp_path / "out")
    assert r.metrics["nkept"] == 4


def test_intermediates_and_no_coadd(tmp_path):
    truth, _ = _night(tmp_path, nframes=6, size=64)
    cfg = _cfg(
        tmp_path,
        crop=48,
        calibrate={"save_intermediate": True},
        align={"save_intermediate": True},
    )
    r = process_file(_raw(tmp_path, truth, 0)[0], cfg, tmp_path / "out")
    kinds = dict(r.products)
    assert {"metrics", "coadded", "calibrated", "aligned"} <= set(kinds)
    with fits.open(kinds["calibrated"]) as h:
        assert h[0].data.shape == (6, 64, 64) and h["ERR"].data.shape == (6, 64, 64)
    with fits.open(kinds["aligned"]) as h:
        assert h[0].data.shape[:2] == (6, 1)
    cfg2 = _cfg(tmp_path, crop=48, coadd={"coadd": False})
    r2 = process_file(_raw(tmp_path, truth, 1)[0], cfg2, tmp_path / "out2")
    kinds2 = dict(r2.products)
    assert (
        "aligned" in kinds2 and "coadded" not in kinds2
    )  # the reference wrote nothing here (docs/instrument.md §13.11)
    assert Path(kinds2["aligned"]).exists()


@pytest.mark.slow
def test_mbi_fields_each_centred(tmp_path):
    truth, _ = _night(tmp_path, mbi=True, nframes=6, size=256, calib=False)
    cfg = _cfg(tmp_path, crop=48)
    cfg.calibrate.calib_directory = None
    r = process_file(_raw(tmp_path, truth, 0)[0], cfg, tmp_path / "out")
    m, fields = load_metrics(dict(r.products)["metrics"])
    assert fields == ["F610", "F670", "F720", "F760"]
    f = truth["files"][0]
    for k, name in enumerate(fields):
        tr = f["frames"]["fields"][name]
        err = np.hypot(m["dfty"][k, 0] - tr["star_y_cal"], m["dftx"][k, 0] - tr["star_x_cal"])
        assert np.sqrt(np.mean(err**2)) < 0.1, name
    with fits.open(dict(r.products)["coadded"]) as hdul:
        assert [h.name for h in hdul[2:]] == fields
        img = hdul[0].data
        c = (img.shape[-1] - 1) / 2
        for k in range(4):
            peak = np.unravel_index(np.nanargmax(img[k]), img[k].shape)
            assert abs(peak[0] - c) <= 0.5 and abs(peak[1] - c) <= 0.5


@needs_reference_config
def test_reference_config_runs_unchanged(tmp_path):
    """The reference pipeline's example config (with its calib dir pointed at ours) runs as is."""
    truth, _ = _night(tmp_path, nframes=8, size=96)
    cfg = load_config(REFERENCE_CONFIG)
    cfg.calibrate.calib_directory = tmp_path / "masters"
    cfg.align.crop_width = 64
    r = process_file(_raw(tmp_path, truth, 0)[0], cfg, tmp_path / "out")
    assert r.metrics["nkept"] == math.ceil(0.75 * 8)
    assert Path(dict(r.products)["coadded"]).exists()


def test_bad_input_errors_are_specific(tmp_path):
    from vampd.fitsio import InputError
    from vampd.instrument.headers import HeaderError

    truth, _ = _night(tmp_path, nframes=4, size=64, calib=False)
    cfg = _cfg(tmp_path, crop=48)
    cfg.calibrate.calib_directory = None
    path, _ = _raw(tmp_path, truth, 0)
    trunc = tmp_path / "trunc.fits"
    trunc.write_bytes(Path(path).read_bytes()[:-3000])
    with pytest.raises(InputError, match="trunc.fits"):
        process_file(trunc, cfg, tmp_path / "out")
    text = tmp_path / "text.fits"
    text.write_text("not a fits file\n")
    with pytest.raises(InputError, match="text.fits"):
        process_file(text, cfg, tmp_path / "out")
    nokey = tmp_path / "nokey.fits"
    with fits.open(path) as hdul:
        del hdul[0].header["U_CAMERA"]
        hdul.writeto(nokey)
    with pytest.raises(HeaderError, match="U_CAMERA"):
        process_file(nokey, cfg, tmp_path / "out")


def test_bias_only_night_ignores_hot_pixels(tmp_path):
    """Without masters the simulated hot pixels (up to 2e5 e-/s) stay in the data: the window
    finder must still lock on the star (no flat either, so photometry carries the pixel response)."""
    truth, _ = _night(tmp_path, nframes=6)
    cfg = _cfg(tmp_path)
    cfg.calibrate.calib_directory = None
    path, f = _raw(tmp_path, truth, 0)
    r = process_file(path, cfg, tmp_path / "out")
    m, _ = load_metrics(dict(r.products)["metrics"])
    tr = f["frames"]["fields"]["750-50"]
    assert np.sqrt(np.mean((m["dfty"][0, 0] - tr["star_y_cal"]) ** 2)) < 0.1
    assert np.sqrt(np.mean((m["dftx"][0, 0] - tr["star_x_cal"]) ** 2)) < 0.1


def _spot_radius(img, offsets):
    """Mean distance of the 4 satellite spots from the frame centre (COM in 7x7 boxes)."""
    c = (img.shape[-1] - 1) / 2
    r = []
    for dy, dx in offsets:
        y0, x0 = int(round(c + dy)), int(round(c + dx))
        box = img[y0 - 3 : y0 + 4, x0 - 3 : x0 + 4].astype(float)
        box = np.clip(box - np.nanmedian(box), 0, None)
        yy, xx = np.mgrid[-3:4, -3:4]
        r.append(math.hypot(y0 + (box * yy).sum() / box.sum() - c, x0 + (box * xx).sum() / box.sum() - c))
    return float(np.mean(r))


def test_reproject_cam2_onto_cam1(tmp_path):
    """align.reproject: camera 2 (5.938 mas/px) is warped onto camera 1 (5.952 mas/px) using the
    satellite spots of the two centroid files; without the files the header says it was skipped."""
    from vampd.stages.centroids import save_centroid_file

    truth = simulate_night(tmp_path / "night", SimConfig(size=128, nframes=4, coronagraphic=True, calib=False, seed=2))
    cfg = _cfg(tmp_path, crop=128, align={"reproject": True})
    cfg.calibrate.calib_directory = None
    cfg.coronagraphic = True
    f1 = next(f for f in truth["files"] if f["camera"] == 1)
    f2 = next(f for f in truth["files"] if f["camera"] == 2)
    out = tmp_path / "out"
    # without centroid files: skipped, and said so
    r = process_file(tmp_path / "night" / f2["path"], cfg, out)
    with fits.open(dict(r.products)["coadded"]) as hdul:
        assert hdul[0].header["HIERARCH DPP ALIGN REPROJ"] == "skipped"
    assert "centroids_cam1.toml" in r.metrics["reproject_skipped"]
    for cam, f in ((1, f1), (2, f2)):
        spots = np.asarray(f["spots_raw_yx"]["750-50"])
        save_centroid_file(out / "aux" / f"t_centroids_cam{cam}.toml", {"750-50": [(y, x) for y, x in spots]})
    r2 = process_file(tmp_path / "night" / f2["path"], cfg, out, force=True)
    r1 = process_file(tmp_path / "night" / f1["path"], cfg, out, force=True)
    with fits.open(dict(r2.products)["coadded"]) as h2, fits.open(dict(r1.products)["coadded"]) as h1:
        hdr = h2[0].header
        assert hdr["HIERARCH DPP ALIGN REPROJ"] == "cam2->cam1"
        assert hdr["HIERARCH DPP ALIGN REPROJ SCALE"] == pytest.approx(5.938 / 5.952, abs=2e-4)
        assert abs(hdr["HIERARCH DPP ALIGN REPROJ ANG"]) < 0.05
        assert "HIERARCH DPP ALIGN REPROJ" not in h1[0].header  # camera 1 is the reference
        spots1 = np.asarray(f1["spots_cal_yx"]["750-50"])
        offsets = spots1 - spots1.mean(axis=0)
        r_cam1, r_cam2 = _spot_radius(h1[0].data[0], offsets), _spot_radius(h2[0].data[0], offsets)
    # before: cam2's spots sit 0.24 % (0.12 px) further out; after the warp they agree with cam1
    assert abs(r_cam2 - r_cam1) < 0.03


def test_large_cube_path_streams_chunks_and_gives_the_same_products(tmp_path, monkeypatch):
    """The path for cubes too big for RAM (calibrate twice instead of holding the cube, small
    frame chunks, disk-backed coadd store) gives the same products as the in-memory path."""
    import vampd.engine.pipeline as pipeline

    truth, _ = _night(tmp_path, nframes=24, size=64)
    cfg = _cfg(tmp_path, crop=48, frame_select={"frame_select": True, "metric": "strehl", "cutoff": 0.25})
    path = _raw(tmp_path, truth, 0)[0]
    ref = process_file(path, cfg, tmp_path / "ram")
    monkeypatch.setattr(pipeline, "HOLD_BYTES", 0)
    monkeypatch.setattr(pipeline, "CHUNK_BYTES", 5 * 64 * 64 * 2)  # 5-frame chunks
    monkeypatch.setattr(pipeline, "COADD_RAM_BYTES", 0)
    big = process_file(path, cfg, tmp_path / "disk")
    assert big.metrics["nkept"] == ref.metrics["nkept"] == 18
    m1, _ = load_metrics(dict(ref.products)["metrics"])
    m2, _ = load_metrics(dict(big.products)["metrics"])
    for k in m1:
        np.testing.assert_allclose(m2[k], m1[k], rtol=1e-6, atol=1e-9, err_msg=k)
    with fits.open(dict(ref.products)["coadded"]) as a, fits.open(dict(big.products)["coadded"]) as b:
        np.testing.assert_allclose(b[0].data, a[0].data, rtol=1e-5, atol=1e-3)
        np.testing.assert_allclose(b["ERR"].data, a["ERR"].data, rtol=1e-5, atol=1e-3)
    assert not list((tmp_path / "disk" / ".scratch").glob("*"))  # the disk store is removed


def test_reused_scratch_memory_gives_identical_products(reduced, tmp_path):
    """Calibrated cubes reuse per-thread memory across files: a file reduced after others (its
    buffers hold their data) gives byte-identical products to its first reduction."""
    tmp, truth, cfg, out, results = reduced
    first = dict(results[0].products)["coadded"]
    with fits.open(first) as hdul:
        before = (hdul[0].data.copy(), hdul["ERR"].data.copy())
    again = tmp_path / "again"
    for i in (2, 1, 0):  # file 0 last, after two other cubes went through the same buffers
        r = process_file(_raw(tmp, truth, i)[0], cfg, again)
    with fits.open(dict(r.products)["coadded"]) as hdul:
        np.testing.assert_array_equal(hdul[0].data, before[0])
        np.testing.assert_array_equal(hdul["ERR"].data, before[1])


def test_chain_is_built_from_the_config(tmp_path):
    """The stage list follows the config (stages turned off are absent) and each is timed."""
    from vampd.engine.chain import ChunkPass, build_chain

    def names(cfg):
        out = []
        for s in build_chain(cfg):
            out += [f"{s.name}:{t.name}" for t in s.stages] if isinstance(s, ChunkPass) else [s.name]
        return out

    cfg = _cfg(tmp_path, frame_select={"frame_select": True, "cutoff": 0.3}, coadd={"coadd": True})
    full = names(cfg)
    assert full[:3] == ["measure:calibrate", "measure:analyze", "metrics"]
    assert "select" in full and "combine:coadd" in full and full[-1] == "coadd"
    cfg2 = _cfg(tmp_path, frame_select={"frame_select": False}, coadd={"coadd": False})
    lean = names(cfg2)
    assert "select" not in lean and "combine:coadd" not in lean and lean[-1] == "write"


def test_timing_and_cpu_per_stage(reduced):
    tmp, truth, cfg, out, results = reduced
    r = process_file(_raw(tmp, truth, 0)[0], cfg, out, force=True)
    timing, cpu = r.metrics["timing"], r.metrics["cpu"]
    for k in ("calibrate", "analyze", "align", "coadd", "total"):
        assert timing[k] >= 0.0
    assert set(cpu) >= {"calibrate", "analyze", "align", "coadd"}
    assert timing["total"] >= sum(v for k, v in timing.items() if k not in ("total", "chain", "setup")) * 0.99


def test_import_has_no_side_effects():
    """`import vampd` (as `vampd watch` would) installs no handler and leaves astropy online."""
    import subprocess
    import sys

    code = (
        "import sys, signal; sys.argv = ['vampd', 'watch', 'x.toml']; "
        "from astropy.utils import iers; from astropy.utils.data import conf; "
        "before = (iers.conf.auto_download, conf.allow_internet); "
        "import vampd, vampd.engine.pipeline; "
        "print(signal.getsignal(signal.SIGTERM) is signal.SIG_DFL, (iers.conf.auto_download, conf.allow_internet) == before)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["True", "True"]

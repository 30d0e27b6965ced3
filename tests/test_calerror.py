"""Deferred calibration errors (vampd.stages.calerror) equal the error cube of calibrate_cube."""

import numpy as np
import pytest
from astropy.io import fits
from test_calibrate import _masters, _scene  # noqa: E402

from vampd import imaging
from vampd.stages import calerror
from vampd.stages.align import variance_sum_nearest
from vampd.stages.calerror import FrameVariance, band_error, calibrate_data, calibration_model
from vampd.stages.calibrate import calibrate_cube


@pytest.fixture(params=[2, 1], ids=["cam2", "cam1-flipped"])
def scene(request):
    rng = np.random.default_rng(7)
    s = _scene(rng, cam=request.param)
    for y, x in [(5, 7), (30, 50), (47, 0), (21, 33)]:  # hot pixels: repaired
        s["darks"][:, y, x] += 400
        s["sci"][:, y, x] += 400
    s["sci"][3, 10:12, 40] = 65535  # saturated: NaN
    back, flat = _masters(s)
    return s, back, flat


def test_deferred_error_matches_error_cube(scene):
    s, back, flat = scene
    data0, err0, _ = calibrate_cube(s["sci"], s["h"], background=back, flat=flat, fix_bad_pixels=True)
    cm = calibration_model(s["h"], back, flat, True, data0.shape[1:])
    assert cm.nbad == 4
    data = np.empty_like(data0)
    bad_err = calibrate_data(s["sci"], cm, data)
    np.testing.assert_array_equal(data, data0)  # same data, bit for bit (NaN included)
    for band in (slice(0, 48), slice(3, 31), slice(40, 48)):
        np.testing.assert_array_equal(band_error(data, cm, band, bad_err), err0[:, band])
    # variances from the data: the squared error (up to the rounding of its square root)
    fv = FrameVariance(data, cm, bad_err)
    for frames in ([0], [1, 2, 5, 23]):  # rows 0:40 hold repaired pixels, the saturated one is frame 3
        got = fv.group_sum(np.array(frames), slice(0, 40), slice(0, 64))
        np.testing.assert_allclose(got, np.sum(np.square(err0[frames, :40]), axis=0), rtol=2e-6)
    nan = np.isnan(fv.group_sum(np.array([2, 3]), slice(0, 48), slice(0, 64)))
    assert nan.sum() == 2 and np.array_equal(nan, np.isnan(err0[3]))  # the saturated pixels of frame 3
    frames = np.array([1, 3, 5])
    ys, xs = np.array([5, 10, 30, 2]), np.array([7, 40, 50, 2])
    np.testing.assert_allclose(fv.variance_at(frames, ys, xs), np.square(err0[frames[:, None], ys, xs]), rtol=3e-7)


def test_variance_sum_from_data_equals_error_cube(scene):
    s, back, flat = scene
    data0, err0, _ = calibrate_cube(s["sci"], s["h"], background=back, flat=flat, fix_bad_pixels=True)
    cm = calibration_model(s["h"], back, flat, True, data0.shape[1:])
    data = np.empty_like(data0)
    fv = FrameVariance(data, cm, calibrate_data(s["sci"], cm, data))
    rng = np.random.default_rng(3)
    centers = np.array([24.0, 32.0]) + rng.normal(0, 1.2, (24, 1, 2))  # several whole-pixel groups
    region = (slice(0, 30), slice(0, 30))
    expect = variance_sum_nearest(err0, centers, 30, False, region)
    got = variance_sum_nearest(fv, centers, 30, False, region)
    assert np.isfinite(expect).all() and expect.max() > 0
    np.testing.assert_allclose(got, expect, rtol=2e-6)


def test_group_sum_compiled_equals_numpy(scene, monkeypatch):
    """The compiled pass (vampd/_kernels.c abs_moments) gives the numpy band loop's values bit for
    bit: same float32 sums in the same order; NaN (saturation) and repaired pixels included."""
    assert imaging._kernels is not None
    s, back, flat = scene
    cm = calibration_model(s["h"], back, flat, True, s["sci"].shape[1:])
    data = np.empty(s["sci"].shape, np.float32)
    fv = FrameVariance(data, cm, calibrate_data(s["sci"], cm, data))
    cases = [(np.array([3, 0, 7, 1]), slice(0, 48), slice(0, 64)), (np.array([9]), slice(7, 30), slice(11, 52))]
    fast = [fv.group_sum(*c) for c in cases]
    monkeypatch.setattr(calerror, "_kernels", None)
    slow = [fv.group_sum(*c) for c in cases]
    for a, b in zip(fast, slow):
        np.testing.assert_array_equal(a, b)
    assert np.isnan(fast[0]).sum() == 2 and np.isfinite(fast[1]).all()


@pytest.mark.parametrize("compiled", [True, False])
def test_calibrate_data_from_file_view(scene, compiled, monkeypatch):
    """The file's big-endian int16 + BZERO bytes (fitsio.read_raw: values = view ^ 0x8000) give
    the data of the native uint16 cube bit for bit, saturation and flip included, with the
    compiled pass and with the numpy fallback."""
    from vampd.stages import calibrate as calibrate_mod

    if not compiled:
        monkeypatch.setattr(calibrate_mod, "_kernels", None)
    s, back, flat = scene
    cm = calibration_model(s["h"], back, flat, True, s["sci"].shape[1:])
    native, viewed = np.empty(s["sci"].shape, np.float32), np.empty(s["sci"].shape, np.float32)
    e1 = calibrate_data(s["sci"], cm, native)
    e2 = calibrate_data((s["sci"] ^ np.uint16(0x8000)).astype(">u2"), cm, viewed, xor=0x8000)
    np.testing.assert_array_equal(viewed, native)
    np.testing.assert_array_equal(e2, e1)
    assert np.isnan(native[3]).sum() == 2


@pytest.mark.parametrize("mbi", [False, True], ids=["single", "mbi-spread"])
def test_chain_without_error_cube_matches_error_cube(tmp_path, monkeypatch, mbi):
    """process_file gives the same metrics and coadd with deferred errors (coadd only) as with the
    error cube (forced by also writing the calibrated product); MBI fields spread over the rows fall
    back to the error cube."""
    from test_pipeline import _cfg, _night, _raw

    import vampd.engine.chain as chain
    from vampd.engine.pipeline import process_file
    from vampd.stages.analyze import load_metrics

    made = []
    real = chain.FrameVariance
    monkeypatch.setattr(chain, "FrameVariance", lambda *a: made.append(1) or real(*a))
    truth, _ = _night(tmp_path, mbi=mbi, size=64 if mbi else 128)
    sections = {
        "coadd": {"coadd": True, "method": "median"},
        "frame_select": {"frame_select": True, "cutoff": 0.3},
        "analysis": {"window_size": 15, "phot_aper_rad": 5, "phot_ann_rad": [8, 12]},  # a band of < half the rows
    }
    path = _raw(tmp_path, truth, 0)[0]
    out = {}
    for mode in ("deferred", "cube"):
        cfg = _cfg(tmp_path, preset="mbi" if mbi else "quicklook", crop=48, **sections)
        cfg.calibrate.save_intermediate = mode == "cube"
        r = process_file(path, cfg, tmp_path / mode)
        prods = dict(r.products)
        assert ("calibrated" in prods) == (mode == "cube")
        with fits.open(prods["coadded"]) as h:
            out[mode] = [hdu.data.copy() for hdu in h if hdu.data is not None], load_metrics(prods["metrics"])[0]
        if mode == "deferred":
            assert bool(made) != mbi  # single field: deferred; MBI: fell back
    (dd, md), (dc, mc) = out["deferred"], out["cube"]
    for a, b in zip(dd, dc):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=0, equal_nan=True)
    assert md.keys() == mc.keys()
    for k in md:
        np.testing.assert_allclose(md[k], mc[k], rtol=1e-12, atol=1e-9, equal_nan=True)

"""The pipeline's fast paths give the same numbers as the reference implementations.

Region-only alignment, nearest-pixel variance sums, the sorted median, the in-RAM coadd
store, the banded Lanczos, the direct FITS reader/writer, the interpolated sidereal time
and the finite-only recenter shift, each against an independent computation.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from astropy.io import fits
from astropy.time import Time

from vampd import imaging
from vampd.fitsio import read_cube, read_frames, write_hdus_atomic
from vampd.imaging import LANCZOS_A, lanczos_weights, shift_cube, shift_window
from vampd.instrument.angles import SUBARU, local_sidereal_hours
from vampd.stages.align import align_cube, align_into, align_region, variance_sum_nearest
from vampd.stages.coadd import Coadder, _shift_finite, coadd_cube, nanmedian0


@pytest.fixture
def cube():
    rng = np.random.default_rng(7)
    n, ny, nx = 6, 48, 52
    data = (rng.normal(size=(n, ny, nx)) * 10 + 100).astype(np.float32)
    err = (np.abs(rng.normal(size=(n, ny, nx))) + 1).astype(np.float32)
    data[2, 20, 21] = err[2, 20, 21] = np.nan  # a saturated pixel
    centers = np.stack([rng.uniform(15, 33, (n, 2)), rng.uniform(10, 38, (n, 2))], axis=1)
    centers[4, 1] = np.nan  # a field without a centroid in one frame
    return data, err, centers


@pytest.mark.parametrize("crop,pad", [(30, True), (48, True), (70, False)])
def test_align_into_equals_align_cube_on_the_region(cube, crop, pad):
    data, err, centers = cube
    d4, _ = align_cube(data, err, centers, crop, pad)
    ys, xs = align_region(centers, crop, pad, data.shape[1:])
    # outside the region every aligned frame is NaN
    outside = np.ones(d4.shape[-2:], bool)
    outside[ys, xs] = False
    assert np.isnan(d4[..., outside]).all()
    idx = np.array([0, 2, 3, 5])
    out = np.empty((len(idx), 2, ys.stop - ys.start, xs.stop - xs.start), np.float32)
    align_into(data, centers[idx], crop, pad, (ys, xs), out, frames=idx)
    np.testing.assert_array_equal(out, d4[idx][:, :, ys, xs])


def test_variance_sum_nearest_by_hand():
    # one 10x10 frame, crop 4 without padding, centre (4.3, 5.6): origin = ceil(c - 2) = (3, 4),
    # sample offset q = c - origin - 1.5 = (-0.2, 0.1) -> nearest source = origin + y + round(q)
    err = np.arange(100, dtype=np.float32).reshape(1, 10, 10) / 10
    err[0, 4, 5] = np.nan
    centers = np.array([[[4.3, 5.6]]])
    region = align_region(centers, 4, False, (10, 10))
    assert region == (slice(0, 4), slice(0, 4))
    vs = variance_sum_nearest(err, centers, 4, False, region)
    expect = err[0, 3:7, 4:8].astype(np.float64) ** 2
    expect[np.isnan(expect)] = 0
    np.testing.assert_allclose(vs[0], expect, rtol=1e-6)
    # the aligned data are NaN exactly where the variance got nothing
    d4, _ = align_cube(err, None, centers, 4, False)
    np.testing.assert_array_equal(np.isnan(d4[0, 0]), vs[0] == 0)


def test_variance_sum_nearest_sums_frames_and_skips_nan_centres(cube):
    data, err, centers = cube
    region = align_region(centers, 30, True, data.shape[1:])
    total = variance_sum_nearest(err, centers, 30, True, region)
    parts = sum(variance_sum_nearest(err[i : i + 1], centers[i : i + 1], 30, True, region) for i in range(len(err)))
    np.testing.assert_allclose(total, parts, rtol=1e-6)
    only4 = variance_sum_nearest(err[4:5], centers[4:5], 30, True, region)
    assert (only4[1] == 0).all() and (only4[0] > 0).any()


@pytest.mark.parametrize("n", [1, 2, 7, 38])
def test_nanmedian0_matches_numpy(n):
    rng = np.random.default_rng(n)
    block = rng.normal(size=(n, 3, 40, 45)).astype(np.float32)
    block[:, :, :2] = np.nan  # padding rows
    block[: max(n // 2, 1), :, 5, :7] = np.nan  # cutout edges
    block[0, 0, 10, 10] = np.inf  # ignored like NaN
    ref = np.where(np.isinf(block), np.nan, block)
    with np.errstate(invalid="ignore"), pytest.warns(RuntimeWarning):
        expect = np.nanmedian(ref, axis=0)
    np.testing.assert_allclose(nanmedian0(block), expect, rtol=1e-6, equal_nan=True)


@pytest.mark.parametrize("method", ["median", "mean", "biweight"])
def test_coadder_slots_and_var_sum_equal_coadd_cube(method):
    rng = np.random.default_rng(3)
    d = rng.normal(size=(9, 2, 16, 16)).astype(np.float32)
    d[:, :, 0] = np.nan
    e = np.full_like(d, 0.5)
    ref_img, ref_err, n = coadd_cube(d, e, method)
    c = Coadder(method, capacity=9)
    for sl in (slice(0, 4), slice(4, 9)):
        chunk = d[sl]
        if method == "mean":
            c.add(chunk, var_sum=np.where(np.isfinite(chunk), 0.25, 0).sum(axis=0))
            continue
        view = c.slot(len(chunk), chunk.shape[1:])
        view[...] = chunk
        c.add(view, var_sum=np.where(np.isfinite(chunk), 0.25, 0).sum(axis=0))
    img, err, m = c.result()
    assert m == n == 9
    np.testing.assert_allclose(img, ref_img, rtol=1e-6, equal_nan=True)
    np.testing.assert_allclose(err, ref_err, rtol=1e-6, equal_nan=True)
    assert np.isnan(img[:, 0]).all()


def _lanczos_reference(frame, qy, qx):
    """Direct 2-D Lanczos-4 sum (edge replication), for a frame of finite values."""
    ny, nx = frame.shape
    out = np.empty_like(frame, dtype=np.float64)
    wy, wx = lanczos_weights([qy - math.floor(qy)])[0], lanczos_weights([qx - math.floor(qx)])[0]
    taps = np.arange(-LANCZOS_A + 1, LANCZOS_A + 1)
    for y in range(ny):
        rows = np.clip(y + math.floor(qy) + taps, 0, ny - 1)
        for x in range(nx):
            cols = np.clip(x + math.floor(qx) + taps, 0, nx - 1)
            out[y, x] = wy @ frame[np.ix_(rows, cols)].astype(np.float64) @ wx
    return out


def test_banded_lanczos_matches_direct_sum():
    rng = np.random.default_rng(5)
    frames = rng.normal(size=(2, 37, 41)).astype(np.float32)  # sizes not multiples of the band
    q = np.array([[0.3, -0.45], [-0.2, 0.15]])
    out = np.empty((2, 37, 41), np.float32)
    shift_window(frames, [0, 0], [0, 0], q[:, 0], q[:, 1], (37, 41), out)
    for i in range(2):
        ref = _lanczos_reference(frames[i], q[i, 0], q[i, 1])
        inside = out[i][np.isfinite(out[i])]
        assert inside.size > 0.9 * out[i].size
        np.testing.assert_allclose(out[i][np.isfinite(out[i])], ref[np.isfinite(out[i])], atol=2e-5)


@pytest.mark.parametrize("compiled", [True, False])
def test_banded_lanczos_matches_direct_sum_both_paths(compiled, monkeypatch):
    if not compiled:
        monkeypatch.setattr(imaging, "_kernels", None)
    rng = np.random.default_rng(5)
    frames = rng.normal(size=(2, 37, 41)).astype(np.float32)
    q = np.array([[2.3, -4.45], [-3.2, 0.15]])  # windows reaching beyond every edge
    out = np.empty((2, 37, 41), np.float32)
    shift_window(frames, [0, 0], [0, 0], q[:, 0], q[:, 1], (37, 41), out)
    for i in range(2):
        ok = np.isfinite(out[i])
        assert 0.6 * out[i].size < ok.sum() < out[i].size
        np.testing.assert_allclose(out[i][ok], _lanczos_reference(frames[i], q[i, 0], q[i, 1])[ok], atol=2e-5)


def test_compiled_shift_equals_numpy_path(monkeypatch):
    """The C kernel (vampd/_kernels.c) against the numpy banded products: NaN inside and on the
    edges, windows beyond the frame, a frame selection and a strided output view."""
    assert imaging._kernels is not None, "vampd._kernels was not built (C compiler missing at install?)"
    rng = np.random.default_rng(11)
    frames = rng.normal(size=(6, 70, 90)).astype(np.float32)
    frames[0, 33, 40] = np.nan
    frames[1, 0, :] = np.nan
    frames[2, :, -1] = np.nan
    frames[3, 5:9, 0] = np.inf
    index = np.array([5, 0, 1, 2, 3])
    r0, c0 = np.array([-12, 3, -2, 30, 60]), np.array([0, -20, 50, 2, -3])
    qy, qx = rng.uniform(-2, 2, 5), rng.uniform(-2, 2, 5)

    def run():
        big = np.full((5, 2, 50, 70), -7.0, np.float32)
        shift_window(frames, r0, c0, qy, qx, (46, 61), big[:, 1, 2:48, 3:64], index=index)
        return big

    fast = run()
    monkeypatch.setattr(imaging, "_kernels", None)
    slow = run()
    np.testing.assert_array_equal(np.isnan(fast), np.isnan(slow))
    np.testing.assert_array_equal(np.isinf(fast), np.isinf(slow))
    ok = np.isfinite(slow)
    assert np.isnan(fast).sum() > 100 and ok.sum() > 0.5 * fast.size
    np.testing.assert_allclose(fast[ok], slow[ok], rtol=0, atol=3e-6)
    assert (fast[:, 0] == -7).all() and (fast[:, 1, :2] == -7).all()  # nothing written outside the view


def test_shift_finite_equals_full_shift():
    rng = np.random.default_rng(2)
    img = np.full((2, 60, 60), np.nan, np.float32)
    img[:, 10:50, 12:47] = rng.normal(size=(2, 40, 35))
    img[0, 30, 30] = np.nan
    dy, dx = np.array([0.4, -2.6]), np.array([-1.3, 3.2])
    np.testing.assert_array_equal(_shift_finite(img, img, dy, dx), shift_cube(img, dy, dx))


def test_read_frames_equals_read_cube(tmp_path):
    rng = np.random.default_rng(1)
    raw = rng.integers(0, 65536, size=(5, 12, 10), dtype=np.uint16)
    raw[0, 0, 0], raw[0, 0, 1] = 0, 65535
    path = tmp_path / "raw.fits"
    fits.PrimaryHDU(raw).writeto(path)  # int16 + BZERO 32768 on disk
    assert fits.getheader(path)["BZERO"] == 32768
    for sl in (None, slice(1, 4)):
        a = read_frames(path, sl)
        b, _ = read_cube(path, sl)
        assert a.dtype == b.dtype == np.uint16
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(read_frames(path), raw)
    fpath = tmp_path / "float.fits"
    fits.PrimaryHDU(raw[0].astype(np.float32) / 3).writeto(fpath)
    np.testing.assert_array_equal(read_frames(fpath), read_cube(fpath)[0])


def test_write_hdus_atomic_reads_back(tmp_path):
    rng = np.random.default_rng(4)
    data = rng.normal(size=(2, 6, 5)).astype(np.float32)
    data[0, 0, 0] = np.nan
    h = fits.Header()
    h["OBJECT"] = ("HD 1234", "target")
    h["BZERO"] = 32768  # layout keys of the source header are dropped
    h["NAXIS3"] = 99
    h["HIERARCH DPP CONFIG HASH"] = ("abc123", "hash")
    h["LONGSTR"] = "x" * 100  # CONTINUE cards
    e = fits.Header()
    e["EXTNAME"] = "ERR"
    f = fits.Header()
    f["EXTNAME"] = "F1"
    f["FIELD"] = "F1"
    path = write_hdus_atomic(tmp_path / "p.fits", [(h, data), (e, data * 2), (f, None)])
    with fits.open(path) as hdul:
        hdul.verify("exception")
        assert [x.name for x in hdul] == ["PRIMARY", "ERR", "F1"]
        np.testing.assert_array_equal(hdul[0].data, data)
        np.testing.assert_array_equal(hdul[1].data, data * 2)
        assert hdul[2].data is None and hdul[2].header["FIELD"] == "F1"
        assert hdul[0].header["OBJECT"] == "HD 1234"
        assert hdul[0].header["LONGSTR"] == "x" * 100
        assert hdul[0].header["HIERARCH DPP CONFIG HASH"] == "abc123"
        assert "BZERO" not in hdul[0].header and hdul[0].header["NAXIS3"] == 2


def test_interpolated_sidereal_time_matches_astropy():
    rng = np.random.default_rng(0)
    mjd = np.concatenate([rng.uniform(58000, 61500, 40), 61004.45 + rng.uniform(0, 0.5, 40)])
    exact = Time(mjd, format="mjd", scale="ut1", location=SUBARU).sidereal_time("apparent").hour
    diff = (local_sidereal_hours(mjd) - exact + 12) % 24 - 12
    assert np.abs(diff).max() < 1e-7  # hours: < 1.5e-6 deg of hour angle


def test_compiled_kernels_name_bad_arguments():
    """Wrong dtype, shape or index: a specific error naming the kernel and the argument, nothing written."""
    from vampd import _kernels as k

    f32 = np.zeros((2, 3), np.float32)
    out = np.full((1, 3, 3), 7.0, np.float32)
    with pytest.raises(TypeError, match="lanczos_shift: frames must be a 3-D float32 array"):
        k.lanczos_shift(np.zeros((2, 3, 3)), 0, 0, 0, 0, 0, out)
    idx = np.array([5])
    with pytest.raises(IndexError, match="lanczos_shift: frame index out of range"):
        w8 = np.zeros((1, 8), np.float32)
        k.lanczos_shift(np.zeros((2, 3, 3), np.float32), idx, idx * 0, idx * 0, w8, w8, out)
    assert (out == 7).all()
    with pytest.raises(ValueError, match="error_model: shapes differ"):
        k.error_model(f32, np.zeros((2, 4), np.float32), None, f32, f32.copy(), False)
    with pytest.raises(TypeError, match="calibrate_u16: raw must be a 3-D uint16 array"):
        k.calibrate_u16(
            np.zeros((1, 2, 2), np.int16), 0, f32[:, :2], f32[:, :2], 1.0, np.zeros((1, 2, 2), np.float32), None
        )
    with pytest.raises(ValueError, match="abs_moments: window, index or strides out of range"):
        s = np.zeros((2, 2), np.float32)
        k.abs_moments(np.zeros((2, 3, 3), np.float32), idx, 0, 0, s, s.copy())

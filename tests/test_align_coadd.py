"""Registration, coadd, recenter, grouping and header combination (docs/instrument.md §5–§7, §12)."""

import math

import numpy as np
import pytest
from astropy.io import fits
from astropy.stats import biweight_location
from scipy.optimize import least_squares

from vampd.imaging import derotate, frame_center, shift_cube
from vampd.instrument.wcs import apply_wcs
from vampd.stages.align import (
    align_cube,
    align_header,
    aligned_size,
    frame_centers_from_metrics,
    intersect_diagonals,
    pad_width,
    reproject_cam2,
    similarity_from_spots,
)
from vampd.stages.coadd import Coadder, coadd_cube, coadd_header, recenter
from vampd.stages.combine import (
    average_cameras,
    circular_mean,
    combine_headers,
    group_key,
    pdi_group_keys,
)


def gaussian(shape, y0, x0, sigma=2.0, amp=1.0):
    yy, xx = np.indices(shape)
    return amp * np.exp(-((yy - y0) ** 2 + (xx - x0) ** 2) / (2 * sigma**2))


def fit_center(img, guess):
    """Least-squares Gaussian centre (y, x) of an image, NaNs ignored."""
    yy, xx = np.indices(img.shape)
    ok = np.isfinite(img)

    def resid(p):
        return (p[0] * np.exp(-((yy - p[1]) ** 2 + (xx - p[2]) ** 2) / (2 * p[3] ** 2)) + p[4] - img)[ok]

    r = least_squares(resid, [np.nanmax(img), guess[0], guess[1], 2.0, 0.0])
    return r.x[1:3]


# ---------------------------------------------------------------------------------------------
# imaging: docs/instrument.md §12 reference cases
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shift, where",
    [((-1, 0), (0, 1)), ((1, 0), (2, 1)), ((0, -1), (1, 0)), ((0, 1), (1, 2))],
)
def test_shift_frame_impulse(shift, where):
    img = np.zeros((3, 3), np.float32)
    img[1, 1] = 1
    out = shift_cube(img, *shift)
    assert out[where] == pytest.approx(1.0, abs=1e-6)
    assert np.nansum(np.abs(out)) == pytest.approx(1.0, abs=1e-6)


def test_derotate_frame():
    img = np.zeros((5, 5))
    img[2, 1] = 1
    for angle, where in ((90, (1, 2)), (-90, (3, 2))):
        out = derotate(img, angle)
        assert out[where] == pytest.approx(1.0, abs=1e-6)
        assert np.argwhere(np.abs(out) > 0.5).tolist() == [list(where)]


def test_derotate_frame_offset():
    img = np.zeros((7, 5))
    img[2, 1] = 1
    out = derotate(img, 90, center=(2, 2))
    assert out[1, 2] == pytest.approx(1.0, abs=1e-6)
    # rows far below the centre rotate out of a 5-wide frame -> NaN border
    assert np.isnan(derotate(np.ones((7, 5)), 90, center=(2, 2))[6, 2])


def test_derotate_batched_and_nan():
    cube = np.zeros((3, 21, 21))
    cube[:, 10, 14] = 1
    cube[1, 0, 0] = np.nan
    out = derotate(cube, 90)
    assert out.shape == cube.shape
    assert np.allclose(out[:, 14, 10], 1, atol=1e-6)
    # the NaN corner does not spread: only pixels whose nearest source is NaN/outside are NaN
    assert np.isfinite(out[1, 8:13, 8:13]).all()


@pytest.mark.parametrize(
    "shape, center",
    [((10, 10), (4.5, 4.5)), ((11, 11), (5, 5)), ((100, 11, 11), (5, 5)), ((10, 100, 16, 11), (7.5, 5))],
)
def test_frame_center(shape, center):
    assert frame_center(shape) == center


def test_shift_cube_recovers_gaussian_position():
    rng = np.random.default_rng(3)
    n = 12
    dy, dx = rng.uniform(-0.5, 0.5, n), rng.uniform(-0.5, 0.5, n)
    dy[:3] = [2.3, -1.7, 0.0]
    cube = np.stack([gaussian((48, 48), 23.4, 24.1)] * n).astype(np.float32)
    out = shift_cube(cube, dy, dx)
    for i in range(n):
        c = fit_center(out[i], (23.4 + dy[i], 24.1 + dx[i]))
        assert abs(c[0] - (23.4 + dy[i])) < 0.01
        assert abs(c[1] - (24.1 + dx[i])) < 0.01
    # flux is conserved (unit-sum kernel)
    assert np.nansum(out[5]) == pytest.approx(cube[5].sum(), rel=1e-4)


def test_shift_cube_nan_does_not_smear():
    img = np.ones((32, 32), np.float32)
    img[10, 20] = np.nan
    out = shift_cube(np.stack([img, img]), [0.3, 0.6], [-0.2, 0.0])
    # frame 0: nearest source of (10, 20) is (10, 20) itself
    assert np.isnan(out[0]).sum() == 1 and np.isnan(out[0, 10, 20])
    # frame 1: shifted by 0.6 in y -> nearest source of (11, 20) is (10, 20); row 0's
    # nearest source (row -1) is outside the frame
    assert np.isnan(out[1, 1:]).sum() == 1 and np.isnan(out[1, 11, 20])
    assert np.isnan(out[1, 0]).all()
    # the edge is replicated, not zero-filled: no ringing next to the border
    assert np.allclose(out[1, 1:4], 1.0, atol=1e-5) and np.allclose(out[0, :, :4], 1.0, atol=1e-5)
    # an integer shift brings NaN in from outside the frame
    out2 = shift_cube(img, 2.0, 0.0)
    assert np.isnan(out2[:2]).all() and np.isfinite(out2[2:9]).all()


# ---------------------------------------------------------------------------------------------
# align
# ---------------------------------------------------------------------------------------------


def test_pad_width():
    assert pad_width(536) == 110
    assert aligned_size(536, True) == 756
    assert aligned_size(536, False) == 536


@pytest.mark.parametrize("crop", [40, 41])
def test_align_random_subpixel_offsets_centred(crop):
    rng = np.random.default_rng(crop)
    n = 50
    centers = np.stack([rng.uniform(28, 35, n), rng.uniform(27, 34, n)], axis=-1)
    data = np.stack([gaussian((64, 64), *c) for c in centers]).astype(np.float32)
    err = np.sqrt(np.abs(data)) + 0.01
    d4, e4 = align_cube(data, err, centers[:, None, :], crop, pad=True)
    size = crop + 2 * pad_width(crop)
    assert d4.shape == e4.shape == (n, 1, size, size)
    image, ierr, ncoadd = coadd_cube(d4, e4, "mean")
    assert ncoadd == n
    mid = (size - 1) / 2
    cy, cx = fit_center(image[0], (mid, mid))
    assert abs(cy - mid) < 0.02 and abs(cx - mid) < 0.02
    # every single frame is centred too (no doubled offset, no 0.5 px bias for even crops)
    for i in range(0, n, 10):
        c = fit_center(d4[i, 0], (mid, mid))
        assert np.all(np.abs(c - mid) < 0.02)
    # padding is NaN
    assert np.isnan(d4[:, :, : pad_width(crop)]).all()


def test_align_mbi_fields_centred_and_edges_nan():
    rng = np.random.default_rng(7)
    n, crop = 6, 31
    field_centers = np.array([[20.3, 18.7], [20.6, 61.2], [55.1, 40.4], [70.2, 77.9]])
    centers = field_centers[None] + rng.uniform(-0.5, 0.5, (n, 4, 2))
    data = np.zeros((n, 80, 90), np.float32)
    for i in range(n):
        for c in centers[i]:
            data[i] += gaussian((80, 90), *c, amp=100).astype(np.float32)
    d4, _ = align_cube(data, None, centers, crop, pad=False)
    assert d4.shape == (n, 4, crop, crop)
    mid = (crop - 1) / 2
    for k in range(4):
        for i in (0, n - 1):
            c = fit_center(d4[i, k], (mid, mid))
            assert np.all(np.abs(c - mid) < 0.02), (k, i, c)
    # field 3 at y ≈ 70 in an 80-row frame: origin ≈ ceil(70.2 - 15.5) = 55, so cutout
    # rows 25.. (frame rows >= 80) are outside and NaN; likewise columns beyond x = 89
    assert np.isnan(d4[:, 3, 26:]).all() and np.isfinite(d4[:, 3, :24, :20]).all()
    assert np.isfinite(d4[:, 0]).all()


def test_align_nan_in_frame_stays_local():
    data = np.ones((2, 40, 40), np.float32)
    data[:, 20, 20] = np.nan
    centers = np.array([[[19.7, 19.6]], [[19.2, 19.9]]])
    d4, _ = align_cube(data, None, centers, 21, pad=False)
    for i in range(2):
        assert np.isnan(d4[i, 0]).sum() == 1


def test_align_nan_center_gives_nan_frame():
    data = np.ones((2, 30, 30), np.float32)
    d4, _ = align_cube(data, None, np.array([[[14.5, 14.5]], [[np.nan, np.nan]]]), 11, pad=False)
    assert np.isfinite(d4[0]).all() and np.isnan(d4[1]).all()


def test_intersect_diagonals_reference_cases():
    # docs/instrument.md §12 TestIntersectPoint, written as (y, x)
    assert np.allclose(intersect_diagonals([[0, -1], [0, 1], [-1, 0.5], [1, 0.5]]), [0, 0.5])
    assert np.allclose(intersect_diagonals([[0.5, -1], [0.5, 1], [-1, -0.5], [1, -0.5]]), [0.5, -0.5])
    # axis-aligned square in any order (an xfail in the reference)
    sq = np.array([[0, 0], [2, 2], [0, 2], [2, 0]], float) + [3, 5]
    assert np.allclose(intersect_diagonals(sq), [4, 6])
    rng = np.random.default_rng(0)
    pts = rng.normal(size=(100, 4, 2))
    assert intersect_diagonals(pts).shape == (100, 2)


def test_frame_centers_from_metrics():
    nfields, nframes = 2, 5
    x = np.full((nfields, 1, nframes), 10.0)
    y = np.full((nfields, 1, nframes), 20.0)
    x[1] = 30.0
    y[0, 0, 2] = np.nan
    metrics = {"modelx": x, "modely": y}
    c = frame_centers_from_metrics(metrics, "model")
    assert c.shape == (nframes, nfields, 2)
    assert np.allclose(c[:, 0], [20, 10]) and np.allclose(c[:, 1], [20, 30])  # NaN frame -> median
    with pytest.raises(KeyError, match="dftx"):
        frame_centers_from_metrics(metrics, "dft")
    # 4 satellite spots -> diagonal intersection
    spots = np.array([[20, 10], [20, 30], [10, 20], [30, 20]], float)  # (y, x)
    m4 = {
        "comy": np.broadcast_to(spots[:, 0][None, :, None], (1, 4, 3)),
        "comx": np.broadcast_to(spots[:, 1][None, :, None], (1, 4, 3)),
    }
    assert np.allclose(frame_centers_from_metrics(m4, "com"), [20, 20])


def test_align_header():
    h, fields = align_header(fits.Header({"OBJECT": "X"}), "dft", ["F610", "F670"])
    assert h["DPP ALIGN METH"] == "dft"
    assert [f["FIELD"] for f in fields] == ["F610", "F670"]
    assert fields[1]["EXTNAME"] == "F670"


def test_reproject_cam2_rotation_sign_and_scale():
    center = np.array([40.0, 40.0])
    ang = np.radians([0, 90, 180, 270]) + 0.3
    spots1 = center + 15 * np.stack([np.sin(ang), np.cos(ang)], axis=-1)
    # camera 2 sees the pattern rotated by −3° (clockwise as displayed) and shrunk by 1/1.02
    theta, scale = math.radians(3.0), 1.02
    d = spots1 - center
    z = (d[:, 1] + 1j * d[:, 0]) * np.exp(-1j * theta) / scale
    spots2 = center + np.stack([z.imag, z.real], axis=-1)
    angle, s = similarity_from_spots(spots1, spots2[::-1])  # order does not matter
    assert angle == pytest.approx(3.0, abs=1e-6)
    assert s == pytest.approx(1.02, abs=1e-9)
    img2 = sum(gaussian((81, 81), *p) for p in spots2).astype(np.float32)[None, None]
    out, _ = reproject_cam2(img2, None, angle, s)
    for p in spots1:
        y0, x0 = np.floor(p).astype(int) - 6
        c = fit_center(out[0, 0, y0 : y0 + 13, x0 : x0 + 13], p - [y0, x0]) + [y0, x0]
        assert np.all(np.abs(c - p) < 0.02)


# ---------------------------------------------------------------------------------------------
# coadd
# ---------------------------------------------------------------------------------------------


def test_coadd_methods_hand_values():
    # 4 frames, 1 field, 1x2 pixels; pixel 1 has a NaN frame
    d = np.array([1.0, 2.0, 3.0, 10.0])[:, None, None, None] * np.ones((4, 1, 1, 2))
    d[3, 0, 0, 1] = np.nan
    e = np.array([1.0, 1.0, 2.0, 2.0])[:, None, None, None] * np.ones((4, 1, 1, 2))
    im, er, n = coadd_cube(d, e, "mean")
    assert n == 4
    assert im[0, 0, 0] == pytest.approx(4.0) and im[0, 0, 1] == pytest.approx(2.0)
    assert er[0, 0, 0] == pytest.approx(math.sqrt(10) / 4)
    assert er[0, 0, 1] == pytest.approx(math.sqrt(6) / 3)
    im, er, _ = coadd_cube(d, e, "median")
    assert im[0, 0, 0] == pytest.approx(2.5) and im[0, 0, 1] == pytest.approx(2.0)
    assert er[0, 0, 0] == pytest.approx(math.sqrt(math.pi / 2) * math.sqrt(10) / 4, rel=1e-6)
    im, er, _ = coadd_cube(d, e, "biweight")
    assert im[0, 0, 0] == pytest.approx(biweight_location([1, 2, 3, 10], c=6.0), rel=1e-6)
    assert er[0, 0, 0] == pytest.approx(math.sqrt(10) / 4)


def test_coadd_varmean_weights_per_frame_and_field():
    rng = np.random.default_rng(1)
    sig = np.array([[1.0, 4.0], [2.0, 1.0], [4.0, 2.0]])  # (frame, field) noise levels
    d = 5 + sig[:, :, None, None] * rng.standard_normal((3, 2, 8, 8))
    e = np.ones_like(d)
    im, er, _ = coadd_cube(d, e, "varmean")
    w = 1 / d.reshape(3, 2, -1).var(axis=-1)
    for k in range(2):
        expect = np.sum(w[:, k, None, None] * d[:, k], axis=0) / w[:, k].sum()
        assert np.allclose(im[k], expect, rtol=1e-5)
        assert np.allclose(er[k], np.sqrt(np.sum(w[:, k] ** 2)) / w[:, k].sum(), rtol=1e-5)
    # field-specific weights: the noisiest frame of field 0 is the quietest of field 1
    assert np.argmin(w[:, 0]) == 2 and np.argmax(w[:, 1]) == 1


@pytest.mark.parametrize("method", ["median", "mean", "varmean", "biweight"])
@pytest.mark.filterwarnings("ignore:All-NaN slice")
def test_coadder_chunked_equals_in_memory(method, tmp_path):
    rng = np.random.default_rng(5)
    d = rng.normal(10, 2, (23, 2, 12, 12)).astype(np.float32)
    d[4, 0, 3, 3] = np.nan
    d[:, 1, 0, :] = np.nan  # NaN padding row
    e = rng.uniform(0.5, 1.5, d.shape).astype(np.float32)
    ref = coadd_cube(d, e, method)
    c = Coadder(method, tmpdir=tmp_path, block_bytes=3000)  # forces several row blocks
    for i in range(0, 23, 5):
        c.add(d[i : i + 5], e[i : i + 5])
    im, er, n = c.result()
    assert n == ref[2] == 23
    np.testing.assert_allclose(im, ref[0], rtol=1e-6, equal_nan=True)
    np.testing.assert_allclose(er, ref[1], rtol=1e-6, equal_nan=True)
    assert np.isnan(im[1, 0]).all()
    assert list(tmp_path.iterdir()) == []  # temp store removed
    if method == "median":
        np.testing.assert_allclose(im, np.nanmedian(d, axis=0), rtol=1e-6, equal_nan=True)
    if method == "biweight":
        expect = biweight_location(d.astype(np.float64), c=6.0, axis=0, ignore_nan=True)
        np.testing.assert_allclose(im, expect, rtol=1e-5, equal_nan=True)


@pytest.mark.parametrize("method", ["com", "peak", "model"])
def test_recenter_single_psf(method):
    img = gaussian((41, 41), 21.3, 19.6, sigma=2.0).astype(np.float32)
    out, err, (dy, dx) = recenter(img[None], img[None] * 0 + 0.1, method, 21)
    if method == "peak":
        assert (dy[0], dx[0]) == (-1.0, 0.0)
    else:
        assert dy[0] == pytest.approx(-1.3, abs=0.01) and dx[0] == pytest.approx(0.4, abs=0.01)
        assert np.all(np.abs(fit_center(out[0], (20, 20)) - 20) < 0.01)
    assert err.shape == out.shape


def test_recenter_satellite_spots():
    # 4 spots around (20.4, 19.7) in a 41x41 coadd; offsets from the centroid file
    offs = np.array([[0, 10], [10, 0], [0, -10], [-10, 0]], float)
    img = sum(gaussian((41, 41), 20.4 + o[0], 19.7 + o[1]) for o in offs).astype(np.float32)
    _, _, (dy, dx) = recenter(img, None, "model", 9, offsets=offs)
    assert dy[0] == pytest.approx(-0.4, abs=0.02) and dx[0] == pytest.approx(0.3, abs=0.02)


def test_coadd_header():
    h = coadd_header(
        fits.Header({"EXPTIME": 0.5}),
        "median",
        40,
        selection={"metric": "strehl", "quantile": 0.2, "cutoff": 0.31},
        recenter_method="com",
        calib_files={"BACKFILE": "/x/back.fits"},
        config_hash="abc123",
    )
    assert h["DPP COADD NCOADD"] == 40 and h["NCOADD"] == 40
    assert h["DPP COADD TINT"] == pytest.approx(20.0) and h["TINT"] == pytest.approx(20.0)
    assert h["DPP COADD METH"] == "median"
    assert h["DPP RECENTER"] is True and h["DPP RECENTER METH"] == "com"
    assert h["DPP SELECT METRIC"] == "strehl" and h["BACKFILE"] == "back.fits"
    assert h["DPP CONFIG HASH"] == "abc123" and "DPP VERSION" in h
    with pytest.raises(ValueError, match="coadd.method"):
        coadd_header(h, "sum", 1, 1.0)


# ---------------------------------------------------------------------------------------------
# combine
# ---------------------------------------------------------------------------------------------


def _hdr(i, hwp=0.0, cam=1, flc="A"):
    h = fits.Header()
    h["U_CAMERA"] = cam
    h["U_FLC"] = flc
    h["RET-ANG1"] = hwp
    h["MJD"] = 60000.0 + i * 1e-3
    return h


def test_group_key_cube_is_stem():
    assert group_key(_hdr(0), "/raw/VMPA00001234.fits", "cube") == "VMPA00001234"
    assert group_key(_hdr(0), "VMPB00000001.fits.fz", "cube") == "VMPB00000001"


def test_pdi_group_keys_stable_when_files_are_added():
    hwps = [0, 0, 45, 45, 22.5, 22.5, 67.5, 67.5]
    items = [(f"VMPA{i:08d}.fits", _hdr(i, h)) for i, h in enumerate(hwps)]
    items += [(f"VMPB{i:08d}.fits", _hdr(i, h, cam=2, flc="NA")) for i, h in enumerate(hwps[:4])]
    keys_early = pdi_group_keys(items[:3] + items[8:10])
    keys_all = pdi_group_keys(items)
    assert keys_all[0] == keys_all[1] == "VMPA00000000_cam1_FLCA"
    assert keys_all[2] == keys_all[3] == "VMPA00000002_cam1_FLCA"
    assert keys_all[8] == "VMPB00000000_cam2_FLCNA"
    early = dict(zip([p for p, _ in items[:3] + items[8:10]], keys_early))
    full = dict(zip([p for p, _ in items], keys_all))
    assert all(full[p] == k for p, k in early.items())
    # same within the tolerance: 45.02 continues the 45 run
    nxt = group_key(_hdr(9, 45.02), "VMPA00000009.fits", "pdi", previous=(keys_all[3], items[3][1]))
    assert nxt == keys_all[3]
    # shuffled arrival gives the same keys
    perm = np.random.default_rng(0).permutation(len(items))
    shuffled = pdi_group_keys([items[i] for i in perm])
    assert [shuffled[list(perm).index(i)] for i in range(len(items))] == keys_all


def _sci_header(i, derotang, pa_str, pa_end):
    h = fits.Header()
    h["OBJECT"] = "ABAUR"
    h["EXPTIME"] = 0.25
    h["TINT"] = 10.0
    h["NCOADD"] = 40
    h["PXSCALE"] = 6.0
    h["NAXIS"] = 2
    h["NAXIS1"] = 100
    h["NAXIS2"] = 100
    h["RA"] = "04:55:45.674"
    h["DEC"] = "+30:33:07.39"
    h["DEROTANG"] = derotang
    h["PA-STR"] = pa_str
    h["PA-END"] = pa_end
    h["MJD-STR"] = 59634.30 + 0.01 * i
    h["MJD-END"] = 59634.305 + 0.01 * i
    h["MJD"] = 59634.3025 + 0.01 * i
    h["AIRMASS"] = 1.1 + 0.1 * i
    h["NOISE"] = (1.0 + i, "[e-] noise error")
    h["FRAMEID"] = f"x{i}"
    return apply_wcs(h, derotang)


def test_combine_headers():
    hs = [_sci_header(0, 179.0, 176.0, 179.0), _sci_header(1, -177.0, -179.0, -176.0)]
    c = combine_headers(hs[::-1])  # sorted by MJD internally
    assert c["TINT"] == pytest.approx(20.0) and c["NCOADD"] == 80
    assert c["OBJECT"] == "ABAUR" and c["EXPTIME"] == 0.25
    assert c["AIRMASS"] == pytest.approx(1.15)
    assert c["NOISE"] == pytest.approx(math.sqrt(1 + 4) / 2)  # errors combined as RSS / n
    assert "FRAMEID" not in c  # varying string dropped
    assert c["PA-STR"] == 176.0 and c["PA-END"] == -176.0
    assert c["PA-ROT"] == pytest.approx(8.0)
    # circular mean of 179 and -177 is -179 (the arithmetic mean would be +1)
    assert math.cos(math.radians(c["DEROTANG"] - (-179.0))) == pytest.approx(1.0, abs=1e-9)
    assert c["MJD-STR"] == pytest.approx(59634.30) and c["MJD-END"] == pytest.approx(59634.315)
    assert c["MJD"] == pytest.approx(59634.3075)
    assert c["UT-STR"] == "07:12:00.000" and c["UT"] == "07:22:48.000" and c["HST-END"] == "21:33:36.000"
    assert c["RA"] == "04:55:45.674" and c["DEC"] == "+30:33:07.39"
    # WCS recomputed from the mean angle: a proper rotation matrix, not a shrunk average
    a = math.radians(c["DEROTANG"])
    assert c["PC1_1"] == pytest.approx(math.cos(a)) and c["PC2_1"] == pytest.approx(math.sin(a))
    assert c["PC1_1"] ** 2 + c["PC2_1"] ** 2 == pytest.approx(1.0)


def test_circular_mean_and_average_cameras():
    rng = np.random.default_rng(0)
    a = rng.uniform(-180, 180, 100)
    r = np.radians(a)
    assert circular_mean(a) == pytest.approx(math.degrees(math.atan2(np.sin(r).mean(), np.cos(r).mean())))
    d, e = average_cameras(np.full(3, 2.0), np.full(3, 3.0), np.full(3, 4.0), np.full(3, 4.0))
    assert np.allclose(d, 3.0) and np.allclose(e, 2.5)


def test_coadder_median_row_store_matches_nanmedian():
    """The preallocated median store (row-interleaved) gives np.nanmedian, also for rows wider
    than one sort block (600 frames x 300 px) and with NaN cut-outs and all-NaN pixels."""
    rng = np.random.default_rng(5)
    n, h, w = 600, 3, 300
    data = rng.normal(size=(n, 2, h, w)).astype(np.float32)
    data[:200, 0, 1, :40] = np.nan  # part of the frames cut off
    data[:, 1, 2, 7] = np.nan  # never valid
    err = np.ones_like(data)
    c = Coadder("median", capacity=n)
    for a in range(0, n, 256):
        view = c.slot(min(256, n - a), (2, h, w))
        view[...] = data[a : a + len(view)]
        c.add(view, var_sum=np.sum(err[a : a + len(view)] ** 2, axis=0))
    image, e, ncoadd = c.result()
    with np.errstate(all="ignore"), pytest.warns(RuntimeWarning):
        expect = np.nanmedian(data, axis=0)
    assert ncoadd == n
    np.testing.assert_allclose(image, expect, rtol=1e-6, atol=1e-7)
    assert np.isnan(image[1, 2, 7]) and np.isnan(e[1, 2, 7])
    count = np.isfinite(data).sum(axis=0)
    with np.errstate(all="ignore"):
        np.testing.assert_allclose(e[count > 0], (np.sqrt(n) / count * 1.2533141373155)[count > 0], rtol=1e-5)

"""Tests of ``vampd simulate``: layout, headers, flip, Mueller/triple-difference recovery,
photometry truth, streaming with faults, reproducibility."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from scipy.signal import fftconvolve

import vampd  # noqa: F401  (offline astropy)
from vampd.fitsio import fits_structure_complete, read_header
from vampd.instrument import HeaderError, fix_header, flip_cube, missing_keywords, update_angles
from vampd.instrument.fields import default_field_centers
from vampd.instrument.mueller import MuellerParams, instrument_mueller
from vampd.simulate.night import HWP_ORDER, SimConfig, simulate_night
from vampd.simulate.scene import render_ring
from vampd.simulate.writer import write_cube

SMALL = SimConfig().replace(size=64, nframes=3, calib_nframes=2)

# raw keys of docs/instrument.md §1.3 the pipeline reads from CMOS archive files
RAW_KEYS = [
    "U_CAMERA",
    "U_DETMOD",
    "EXPTIME",
    "FILTER01",
    "FILTER02",
    "RET-ANG1",
    "RET-MOD1",
    "U_FLC",
    "U_FLCST",
    "U_MBI",
    "OBS-MOD",
    "DATA-TYP",
    "OBJECT",
    "DATE-OBS",
    "UT-STR",
    "UT-END",
    "UT",
    "HST-STR",
    "HST-END",
    "HST",
    "MJD-STR",
    "MJD-END",
    "MJD",
    "RA",
    "DEC",
    "RADESYS",
    "EQUINOX",
    "ALTITUDE",
    "AZIMUTH",
    "AIRMASS",
    "D_IMRANG",
    "D_IMRPAP",
    "PRD-MIN1",
    "PRD-MIN2",
    "PRD-RNG1",
    "PRD-RNG2",
    "X_GRDAMP",
    "X_GRDSEP",
]


@pytest.fixture(scope="module")
def night(tmp_path_factory):
    out = tmp_path_factory.mktemp("night")
    return out, simulate_night(out, SMALL)


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_file_count_order_and_headers(night):
    out, truth = night
    raw = sorted((out / "raw").glob("*.fits"))
    assert len(raw) == 1 * 4 * 2 * 2 == len(truth["files"])
    rows = []
    for path in raw:
        with fits.open(path) as hdul:
            h = hdul[0].header
            data = hdul[0].data
            assert h["BITPIX"] == 16 and h["BZERO"] == 32768 and data.dtype == np.uint16
            assert data.shape == (3, 64, 64)
        assert [k for k in RAW_KEYS if k not in h] == []
        assert missing_keywords(h) == []
        fixed = fix_header(h, path)
        assert fixed["MJD-STR"] < fixed["MJD"] < fixed["MJD-END"]
        assert fixed["U_DETMOD"] == "FAST" and fixed["D_IMRPAP"] == -37.0
        rows.append((fixed["MJD"], fixed["U_CAMERA"], fixed["U_FLC"], fixed["RET-ANG1"], fixed))
        # sidecar: one line per frame
        assert len(path.with_suffix(".txt").read_text().splitlines()) == h["NAXIS3"]
    # instrument order of HWP angles, both cameras simultaneous, FLC A and B interleaved
    rows.sort(key=lambda r: (r[0], r[1]))
    assert [r[3] for r in rows[::4]] == list(HWP_ORDER)
    for i in range(0, 16, 4):
        a1, a2, b1, b2 = rows[i : i + 4]
        assert (a1[1], a2[1], b1[1], b2[1]) == (1, 2, 1, 2)
        assert a1[0] == a2[0] and (a1[2], b1[2]) == ("A", "B")
        # B starts one frame after A
        assert (b1[4]["MJD-STR"] - a1[4]["MJD-STR"]) * 86400 == pytest.approx(SMALL.exptime, abs=1e-4)
    # the pipeline's own PA/DEROTANG from the header equal the truth used by the forward model
    for t in truth["files"]:
        h = update_angles(fix_header(fits.getheader(out / t["path"])))
        assert h["PA"] == pytest.approx(t["pa"], abs=1e-6)
        assert h["DEROTANG"] == pytest.approx(t["derotang"], abs=1e-6)


def test_calibration_files_match_science(night):
    out, truth = night
    cal = [fix_header(fits.getheader(p)) for p in sorted((out / "calib").glob("*.fits"))]
    sci = fix_header(fits.getheader(out / truth["files"][0]["path"]))
    assert sorted((h["DATA-TYP"], h["U_CAMERA"]) for h in cal) == [("DARK", 1), ("DARK", 2), ("FLAT", 1), ("FLAT", 2)]
    for h in cal:
        for key in ("PRD-MIN1", "PRD-MIN2", "PRD-RNG1", "PRD-RNG2", "U_DETMOD", "EXPTIME", "FILTER01", "FILTER02"):
            assert h[key] == sci[key], key
        assert h["MJD"] < sci["MJD"]
    for p in (out / "calib").glob("*.fits"):
        assert len(p.with_suffix(".txt").read_text().splitlines()) == fits.getheader(p)["NAXIS3"] == 2
    dark = fits.getdata(out / "calib" / "VMPA00009000.fits").astype(float)
    # bias 200 adu plus read noise (0.403 e- / 0.103 e-/adu ≈ 3.9 adu) and a 2-adu column pattern
    assert np.median(dark) == pytest.approx(200, abs=3)
    flat = fits.getdata(out / "calib" / "VMPA00009001.fits").astype(float)
    assert np.median(flat) - 200 == pytest.approx(2000 / 0.103, rel=0.1)


def test_flip_convention_and_star_position():
    for pre_nbs, flipped in ((False, 2), (True, 1)):
        cfg = SMALL.replace(
            noise_free=True, write_float=True, calib=False, pre_nbs=pre_nbs, nframes=2, scene={"ring_flux": 0.0}
        )
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            truth = simulate_night(tmp, cfg)
            assert truth["flipped_camera"] == flipped
            for t in truth["files"][:4]:
                data = fits.getdata(Path(tmp) / t["path"]).astype(float) - 200.0
                fr = t["frames"]["fields"]["750-50"]
                for i in range(2):
                    img = data[i]
                    y, x = np.unravel_index(np.argmax(img), img.shape)
                    # the brightest pixel is the one nearest the true raw position
                    assert abs(y - fr["star_y_raw"][i]) <= 1 and abs(x - fr["star_x_raw"][i]) <= 1
                    if t["camera"] == flipped:
                        assert fr["star_y_raw"][i] == pytest.approx(63 - fr["star_y_cal"][i])
                    else:
                        assert fr["star_y_raw"][i] == pytest.approx(fr["star_y_cal"][i])
            # both cameras agree after the calibration flip
            h1, h2 = (fits.getheader(Path(tmp) / truth["files"][j]["path"]) for j in (0, 1))
            c1 = flip_cube(fits.getdata(Path(tmp) / truth["files"][0]["path"]), fix_header(h1))
            c2 = flip_cube(fits.getdata(Path(tmp) / truth["files"][1]["path"]), fix_header(h2))
            p1 = np.unravel_index(np.argmax(c1[0]), c1[0].shape)
            p2 = np.unravel_index(np.argmax(c2[0]), c2[0].shape)
            assert p1 == p2


def _triple(get, h1, h2):
    def dm(h):
        return 0.5 * (0.5 * (get(h, "A", 1) - get(h, "A", 2)) - 0.5 * (get(h, "B", 1) - get(h, "B", 2)))

    def dp(h):
        return 0.5 * (0.5 * (get(h, "A", 1) + get(h, "A", 2)) + 0.5 * (get(h, "B", 1) + get(h, "B", 2)))

    return 0.5 * (dm(h1) - dm(h2)), 0.5 * (dp(h1) + dp(h2))


def test_noise_free_triple_difference_recovers_injected_qu(tmp_path):
    """Acceptance: calibrate by hand, triple difference (docs/instrument.md §9.3), ideal Mueller inversion (§9.4)."""
    cfg = SMALL.replace(
        nframes=3,
        noise_free=True,
        write_float=True,
        rotation=False,
        identical_cameras=True,
        jitter_rms_px=0.0,
        flux_rms=0.0,
        strehl_range=(0.5, 0.5),
        calib=False,
        scene={"ring_radius_mas": 120.0, "ring_width_mas": 30.0, "star_flux": 2e5, "ring_flux": 4e5},
    )
    truth = simulate_night(tmp_path, cfg)
    imgs = {}
    for t in truth["files"]:
        with fits.open(tmp_path / t["path"]) as hdul:
            h = fix_header(hdul[0].header)
            cal = (hdul[0].data.astype(float) - h["BIAS"]) * h["GAIN"] / h["EXPTIME"]
        imgs[h["RET-ANG1"], h["U_FLC"], h["U_CAMERA"]] = (flip_cube(cal, h).mean(axis=0), t)
    q, iq = _triple(lambda h, f, c: imgs[h, f, c][0], 0.0, 45.0)
    u, iu = _triple(lambda h, f, c: imgs[h, f, c][0], 22.5, 67.5)

    params = MuellerParams.ideal("cmos")

    def row(h, f, c):
        t = imgs[h, f, c][1]
        return instrument_mueller(t["pa"], t["altitude"], t["azimuth"], t["hwp"], t["imrang"], f, c, params)[0]

    m_q = 2 * _triple(row, 0.0, 45.0)[0]
    m_u = 2 * _triple(row, 22.5, 67.5)[0]
    qt, ut = q - m_q[0] * iq, u - m_u[0] * iu
    sol = np.linalg.solve(np.array([[m_q[1], m_q[2]], [m_u[1], m_u[2]]]), np.stack([qt.ravel(), ut.ravel()]))
    q_rec, u_rec = (s.reshape(q.shape) for s in sol)

    # injected maps: ring Stokes on the calibrated grid, convolved with the file's PSF mix
    from vampd.simulate.night import _detectors, _field_layout, _field_models

    layout = _field_layout(cfg)
    fm = _field_models(cfg, _detectors(cfg), layout)[1, layout[0]["name"]]
    cy, cx = layout[0]["center"]
    star = (cy + cfg.star_offset[0], cx + cfg.star_offset[1])
    stokes = render_ring(cfg.scene, (64, 64), star, truth["files"][0]["derotang"], fm.pixel_scale)

    def conv(m):
        return 0.5 * fftconvolve(m, fm.core_kernel, mode="same") + 0.5 * fftconvolve(m, fm.halo_kernel, mode="same")

    q_true, u_true = conv(stokes[1]), conv(stokes[2])
    # I_Q-scale products are half the total (both-camera) intensity scale of the truth
    assert np.abs(2 * q_rec - q_true).max() / np.abs(q_true).max() < 2e-5
    assert np.abs(2 * u_rec - u_true).max() / np.abs(u_true).max() < 2e-5
    # azimuthal polarisation: Q_phi > 0 on the ring after derotation to North up
    from vampd.imaging import derotate

    ang = truth["files"][0]["derotang"]
    qd, ud = derotate(q_rec, ang, center=star), derotate(u_rec, ang, center=star)
    yy, xx = np.mgrid[:64, :64]
    theta = np.arctan2(star[1] - xx, yy - star[0])
    q_phi = -qd * np.cos(2 * theta) - ud * np.sin(2 * theta)
    r = np.hypot(yy - star[0], xx - star[1]) * fm.pixel_scale
    on_ring = np.abs(r - 120.0) < 10
    assert np.nanmedian(q_phi[on_ring]) > 0.5 * np.nanmax(np.abs(q_phi[on_ring]))


def test_aperture_photometry_matches_truth(tmp_path):
    from photutils.aperture import CircularAperture

    cfg = SMALL.replace(noise_free=True, write_float=True, calib=False, nframes=4, scene={"ring_flux": 0.0})
    truth = simulate_night(tmp_path, cfg)
    for t in truth["files"][:2]:
        with fits.open(tmp_path / t["path"]) as hdul:
            h = fix_header(hdul[0].header)
            cal = flip_cube((hdul[0].data.astype(float) - h["BIAS"]) * h["GAIN"] / h["EXPTIME"], h)
        fr = t["frames"]["fields"]["750-50"]
        for i in range(4):
            ap = CircularAperture((fr["star_x_cal"][i], fr["star_y_cal"][i]), r=8.0)
            flux = ap.do_photometry(cal[i], method="exact")[0][0]
            assert flux == pytest.approx(fr["aper_flux"][i], rel=0.01)
        assert 0 < min(fr["strehl_metric"]) <= max(fr["strehl_metric"]) <= 1


def test_stream_faults_sidecars_and_no_tmp(tmp_path):
    from vampd.simulate.stream import stream_night

    faults = ("truncated", "corrupt", "nonfits", "missing_keyword", "zero_byte")
    truth = stream_night(tmp_path, SMALL.replace(nframes=2, calib=False, faults=faults), cadence=0.0)
    raw = tmp_path / "raw"
    assert list(raw.glob("*.tmp")) == []
    assert len(list(raw.glob("*.fits"))) == 16
    for t in truth["files"]:
        assert len((tmp_path / t["path"]).with_suffix(".txt").read_text().splitlines()) == t["nframes"] == 2
    got = {f["fault"]: tmp_path / f["path"] for f in truth["faults"]}
    assert sorted(got) == sorted(faults)
    ok, why = fits_structure_complete(got["truncated"])
    assert not ok and "truncated" in why
    ok, why = fits_structure_complete(got["nonfits"])
    assert not ok and "SIMPLE" in why
    assert got["zero_byte"].stat().st_size == 0
    with pytest.raises(HeaderError, match="U_CAMERA"):
        fix_header(read_header(got["missing_keyword"]))
    assert fits_structure_complete(got["corrupt"])[0]  # structure intact, content garbage
    with pytest.warns(Warning):
        assert missing_keywords(read_header(got["corrupt"])) != []
    # healthy files are untouched
    healthy = [t for t in truth["files"] if t["fault"] is None]
    assert len(healthy) == 11
    assert all(fits_structure_complete(tmp_path / t["path"])[0] for t in healthy)


def test_stream_stop_event(tmp_path):
    from vampd.simulate.stream import stream_night

    stop = threading.Event()
    th = threading.Thread(
        target=stream_night,
        args=(tmp_path, SMALL.replace(nframes=1, calib=False)),
        kwargs={"cadence": 0.2, "stop_event": stop},
    )
    th.start()
    while not list((tmp_path / "raw").glob("*.txt")):
        th.join(0.05)
    stop.set()
    th.join(10)
    assert not th.is_alive()
    assert 1 <= len(list((tmp_path / "raw").glob("*.fits"))) < 16
    assert (tmp_path / "truth.json").exists()


def test_seeded_reproducibility(tmp_path):
    cfg = SMALL.replace(nframes=2, calib_nframes=2)
    a = simulate_night(tmp_path / "a", cfg)
    simulate_night(tmp_path / "b", cfg)
    simulate_night(tmp_path / "c", cfg.replace(seed=1))
    name = a["files"][5]["path"]
    assert _sha(tmp_path / "a" / name) == _sha(tmp_path / "b" / name)
    assert _sha(tmp_path / "a" / "calib/VMPB00009000.fits") == _sha(tmp_path / "b" / "calib/VMPB00009000.fits")
    assert _sha(tmp_path / "a" / name) != _sha(tmp_path / "c" / name)
    assert (tmp_path / "a" / "truth.json").read_bytes() == (tmp_path / "b" / "truth.json").read_bytes()


def test_chunked_writer_roundtrip(tmp_path):
    cube = np.random.default_rng(3).integers(0, 65536, size=(7, 5, 6)).astype(np.uint16)
    hdr = fits.Header()
    for key, val in (
        ("SIMPLE", True),
        ("BITPIX", 16),
        ("NAXIS", 3),
        ("NAXIS1", 6),
        ("NAXIS2", 5),
        ("NAXIS3", 7),
        ("BZERO", 32768),
    ):
        hdr[key] = val
    path = write_cube(tmp_path / "x.fits", hdr, (cube[i : i + 3] for i in range(0, 7, 3)))
    assert path.stat().st_size % 2880 == 0
    np.testing.assert_array_equal(fits.getdata(path), cube)
    with pytest.raises(ValueError, match="NAXISn"):
        write_cube(tmp_path / "y.fits", hdr, iter([cube[:2]]))
    assert not (tmp_path / "y.fits").exists() and list(tmp_path.glob("*.tmp")) == []


def test_modes_doublediff_mbi_coronagraphic_targets(tmp_path):
    dd = simulate_night(
        tmp_path / "dd", SMALL.replace(doublediff=True, ncycles=2, nframes=1, calib=False, targets=("ABAUR", "MWC480"))
    )
    assert len(dd["files"]) == 2 * 2 * 4 * 2
    h = fits.getheader(tmp_path / "dd" / dd["files"][0]["path"])
    assert h["U_FLCST"] == "OUT" and "U_FLC" not in h
    assert {t["target"] for t in dd["files"]} == {"ABAUR", "MWC480"}

    cfg = SMALL.replace(
        size=48,
        mbi=True,
        coronagraphic=True,
        nframes=1,
        calib=False,
        noise_free=True,
        write_float=True,
        scene={"ring_flux": 0.0, "coronagraph_leak": 1.0},
    )
    mb = simulate_night(tmp_path / "mb", cfg)
    t = mb["files"][1]  # camera 2
    h = fix_header(fits.getheader(tmp_path / "mb" / t["path"]))
    assert h["OBS-MOD"] == "IPOL_MBI" and (h["NAXIS2"], h["NAXIS1"]) == (96, 192)
    assert h["X_GRDSEP"] == 15.5
    cal = flip_cube(fits.getdata(tmp_path / "mb" / t["path"]).astype(float) - 200, h)[0]
    centers = default_field_centers(h, cal.shape)
    for name, (cy, cx) in centers.items():
        fr = t["frames"]["fields"][name]
        assert fr["star_y_cal"][0] == pytest.approx(cy + cfg.star_offset[0] + t["frames"]["jitter_dy_cal"][0])
        win = cal[int(cy) - 6 : int(cy) + 7, int(cx) - 6 : int(cx) + 7]
        y, x = np.unravel_index(np.argmax(win), win.shape)
        assert abs(int(cy) - 6 + y - fr["star_y_cal"][0]) <= 1 and abs(int(cx) - 6 + x - fr["star_x_cal"][0]) <= 1
        assert np.asarray(t["spots_cal_yx"][name]).shape == (4, 2)
    assert cal[0, :].max() == 0.0  # outside the field stops: no light

"""Spectrophotometric calibration: synthetic photometry, factors, sequence trigger (offline)."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

import vampd  # noqa: F401  (configures astropy offline)
from vampd.specphot import (
    DataFileError,
    SpecphotError,
    apply_units,
    conversion_factor,
    instrumental_flux,
    pdi_unit_factor,
    satellite_spot_contrast,
    scale_hdul,
    synthetic_photometry,
    zeropoint,
)

from conftest import DATA_DIR as DATA
from conftest import needs_data


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any connection attempt fails the test: proves astropy/synphot never download."""
    from astropy.utils.data import conf

    assert conf.allow_internet is False  # set by importing vampd

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture
def no_data(monkeypatch, tmp_path):
    monkeypatch.delenv("VAMPD_DATA_DIR", raising=False)
    return tmp_path


# ------------------------------------------------------------------------------------------
# synthetic photometry against the README figures of ../shared/data
# ------------------------------------------------------------------------------------------
@needs_data
def test_vega_through_675_50(data_env):
    import astropy.units as u
    from synphot import Observation
    from synphot import config as syn_config
    from synphot.units import VEGAMAG

    from vampd.specphot.synth import filter_bandpass, vega_spectrum

    vega = vega_spectrum()
    obs = Observation(vega, filter_bandpass("675-50"))
    assert obs.effstim(u.Jy).value == pytest.approx(2827.9, rel=5e-4)  # measured 2826.96
    assert obs.effstim(VEGAMAG, vegaspec=vega).value == pytest.approx(0.0, abs=1e-3)
    # synphot's own Vega loader now points at the local file, not a URL
    assert Path(syn_config.conf.vega_file).resolve() == (DATA / "alpha_lyr_stis_011.fits").resolve()


@needs_data
def test_g2v_v6_through_750_50(data_env):
    sp = synthetic_photometry("750-50", "pickles", "G2V", 6.0, "V")
    assert sp.flux_jy == pytest.approx(19.2, abs=0.05)  # 19.187 Jy
    assert sp.pivot_nm == pytest.approx(747.95, abs=0.01)
    # a brighter star by 1 mag is 10**0.4 brighter; the colour term is unchanged
    sp5 = synthetic_photometry("750-50", "pickles", "g2v", 5.0, "V")
    assert sp5.flux_jy / sp.flux_jy == pytest.approx(10**0.4, rel=1e-9)
    assert sp5.mag == pytest.approx(sp.mag - 1.0, abs=1e-9)


@needs_data
def test_spectrum_file_source_equals_pickles(data_env):
    path = DATA / "pickles_uvk" / "pickles_uk_26.fits"  # the G2V file itself
    a = synthetic_photometry("F670", "pickles", "G2V", 7.0, "V")
    b = synthetic_photometry("F670", path, None, 7.0, "V")
    assert b.flux_jy == pytest.approx(a.flux_jy, rel=1e-12)


@needs_data
def test_band_without_passband_file_names_it(data_env):
    with pytest.raises(DataFileError, match=r"johnson_b\.txt"):
        synthetic_photometry("750-50", "pickles", "G2V", 6.0, "B")


@needs_data
def test_unknown_sptype_lists_close_matches(data_env):
    with pytest.raises(ValueError, match="G2V"):
        synthetic_photometry("750-50", "pickles", "G2X", 6.0, "V")


def test_pickles_without_data_dir_names_missing_file(no_data):
    header = {"AIRMASS": 1.2, "PXAREA": 3.5e-5}
    with pytest.raises(DataFileError) as exc:
        conversion_factor("750-50", 1e5, header, "Jy", "pickles", sptype="G2V", mag=6.0, mag_band="V")
    msg = str(exc.value)
    assert "pickles_uvk/pickles_uk.fits" in msg
    assert "data_dir" in msg and "VAMPD_DATA_DIR" in msg


def test_data_dir_missing_file_message(tmp_path, monkeypatch):
    monkeypatch.setenv("VAMPD_DATA_DIR", str(tmp_path))
    from vampd.specphot.data import vega_file

    with pytest.raises(DataFileError, match=str(tmp_path / "alpha_lyr_stis_011.fits")):
        vega_file()


# ------------------------------------------------------------------------------------------
# zero points
# ------------------------------------------------------------------------------------------
def test_zeropoints_work_without_data_dir(no_data):
    header = {"AIRMASS": 1.5, "PXAREA": 2.5e-5}
    r = conversion_factor("750-50", None, header, "Jy", "zeropoints")
    expect = 4.08e-07 * 10 ** (0.4 * 0.033860277 * 1.5)
    assert r.c_fd == pytest.approx(expect, rel=1e-12)
    assert r.factor == pytest.approx(expect, rel=1e-12)
    assert r.zp_table == "builtin"
    r2 = conversion_factor("750-50", None, header, "Jy/arcsec^2", "zeropoints")
    assert r2.factor == pytest.approx(expect / 2.5e-5, rel=1e-12)
    with pytest.raises(SpecphotError, match="contrast"):
        conversion_factor("750-50", 1e5, header, "contrast", "zeropoints")
    with pytest.raises(SpecphotError, match="AIRMASS"):
        conversion_factor("750-50", None, {"PXAREA": 1.0}, "Jy", "zeropoints")


@needs_data
def test_zeropoints_prefer_data_dir_table(data_env):
    zp = zeropoint("750-50")
    assert zp.calib_fac == pytest.approx(5.2393884179753e-07, rel=1e-12)  # CSV, not the builtin 4.08e-7
    assert zp.table.endswith("vampires_zeropoints.csv")
    assert zp.c_fd(1.0) == pytest.approx(5.2393884179753e-07 * 10 ** (0.4 * 0.033860277), rel=1e-12)
    assert zeropoint("halpha").filter == "Halpha"


# ------------------------------------------------------------------------------------------
# pure pieces
# ------------------------------------------------------------------------------------------
def test_instrumental_flux_median_positive_pooled():
    a = np.array([[[1.0, 2.0, -5.0], [3.0, np.nan, 0.0]], [[10.0, 20.0, 30.0], [40.0, 50.0, 60.0]]])  # (2, 2, 3)
    b = np.array([[[4.0], [5.0]], [[-1.0], [70.0]]])  # a second file, one frame
    flux = instrumental_flux([{"photf": a, "sum": a * 2}, {"photf": b, "sum": b * 2}], "photometry")
    # field 0: positives 1,2,3,4,5 -> 3; field 1: 10..70 (7 values) -> 40
    np.testing.assert_allclose(flux, [3.0, 40.0])
    np.testing.assert_allclose(instrumental_flux({"photf": a, "sum": a * 2}, "sum"), [4.0, 70.0])
    with pytest.raises(SpecphotError, match="photometry"):
        instrumental_flux({"sum": a}, "photometry")
    assert np.isnan(instrumental_flux({"sum": -np.ones((1, 1, 3))}, "sum")[0])


def test_satellite_spot_contrast_values():
    x = 0.05 * 1000 / 750.0
    assert satellite_spot_contrast(0.05, 15.5, 750.0) == pytest.approx(-0.043 * x + 7.634 * x * x)
    x = 0.03 * 1000 / 650.0
    assert satellite_spot_contrast(0.03, 10.3, 650.0) == pytest.approx(-0.111 * x + 14.217 * x * x)
    with pytest.raises(SpecphotError, match="X_GRDSEP"):
        satellite_spot_contrast(0.05, 20.0, 750.0)


@needs_data
def test_coronagraphic_contrast_and_jy_use_star_flux(data_env):
    from vampd.instrument.filters import filter_info

    header = {"AIRMASS": 1.1, "PXAREA": 3.5e-5, "X_GRDAMP": 0.05, "X_GRDSEP": 15.5}
    c = satellite_spot_contrast(0.05, 15.5, filter_info("750-50").waveave)
    spot = 2000.0
    r = conversion_factor(
        "750-50", spot, header, "contrast", "pickles", sptype="G2V", mag=6.0, mag_band="V", coronagraphic=True
    )
    assert r.contrast == pytest.approx(c)
    assert r.star_flux == pytest.approx(spot / c)
    assert r.factor == pytest.approx(c / spot)  # a spot in contrast units equals its contrast
    rj = conversion_factor(
        "750-50", spot, header, "Jy", "pickles", sptype="G2V", mag=6.0, mag_band="V", coronagraphic=True
    )
    assert rj.factor * (spot / c) == pytest.approx(19.1867, rel=1e-4)  # the star, in Jy
    with pytest.raises(SpecphotError, match="X_GRDAMP"):
        conversion_factor(
            "750-50",
            spot,
            {"PXAREA": 1.0},
            "contrast",
            "pickles",
            sptype="G2V",
            mag=6.0,
            mag_band="V",
            coronagraphic=True,
        )


def test_apply_units_per_field():
    data = np.ones((2, 3, 4, 4))  # (frames, fields, y, x)
    err = -np.ones((2, 3, 4, 4))
    d, e = apply_units(data, err, [1.0, 2.0, 3.0])
    assert d.dtype == np.float32
    np.testing.assert_array_equal(d[1, :, 0, 0], [1, 2, 3])
    np.testing.assert_array_equal(e[0, :, 2, 2], [-1, -2, -3])
    with pytest.raises(SpecphotError):
        apply_units(data, None, [1.0, 2.0])


def test_split_sequences():
    from vampd.engine.specphot_trigger import split_sequences

    keys = ["a", "a", "a", "b", "b", "a"]
    assert split_sequences(keys) == [(0, 3, True), (3, 5, True), (5, 6, False)]
    assert split_sequences(keys, final=True)[-1] == (5, 6, True)
    assert split_sequences(keys, 2) == [(0, 2, True), (2, 3, True), (3, 5, True), (5, 6, False)]
    assert split_sequences([]) == []


def test_scale_hdul_sets_unit():
    hdul = fits.HDUList(
        [
            fits.PrimaryHDU(np.ones((2, 3, 3), np.float32)),
            fits.ImageHDU(np.ones((2, 3, 3), np.float32), name="ERR"),
            fits.ImageHDU(header=fits.Header([("FIELD", "F610")]), name="F610"),
            fits.ImageHDU(header=fits.Header([("FIELD", "F670")]), name="F670"),
        ]
    )
    scale_hdul(hdul, "Jy", {"F670": 3.0, "F610": 2.0})
    np.testing.assert_array_equal(hdul[0].data[:, 0, 0], [2.0, 3.0])
    assert all(h.header["BUNIT"] == "Jy" for h in hdul)


# ------------------------------------------------------------------------------------------
# the sequence trigger
# ------------------------------------------------------------------------------------------
def _raw(path, flux, obj="HD1", filt="750-50", mjd=60500.3, n=3, shape=(48, 48), exptime=0.1, cam=1):
    """A CMOS raw cube holding one Gaussian star of ``flux`` e-/s (no noise)."""
    from vampd.instrument.headers import fix_header

    h = fits.Header()
    cards = {
        "U_CAMERA": cam,
        "U_DETMOD": "FAST",
        "EXPTIME": exptime,
        "MJD-STR": mjd,
        "MJD-END": mjd + n * exptime / 86400,
        "MJD": mjd + n * exptime / 172800,
        "DATE-OBS": "2024-07-01",
        "DATA-TYP": "OBJECT",
        "OBJECT": obj,
        "RA": "01:00:00.000",
        "DEC": "+10:00:00.00",
        "FILTER01": filt,
        "FILTER02": "Open",
        "OBS-MOD": "IMAG",
        "AIRMASS": 1.2,
        "ALTITUDE": 56.4,
        "AZIMUTH": 100.0,
        "D_IMRANG": 10.0,
        "D_IMRPAP": -39.0,
        "RET-ANG1": 0.0,
        "U_FLC": "A",
    }
    for k, v in cards.items():
        h[k] = v
    fh = fix_header(h)
    y, x = np.mgrid[: shape[0], : shape[1]]
    cy, cx = (shape[0] - 1) / 2 + 0.3, (shape[1] - 1) / 2 - 0.2
    s = 1.6
    img = flux * np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * s * s)) / (2 * np.pi * s * s)
    adu = fh["BIAS"] + img * exptime / fh["EFFGAIN"]
    assert adu.max() < 65000
    fits.PrimaryHDU(np.repeat(np.round(adu)[None], n, 0).astype(np.uint16), header=h).writeto(path)


def _aperture(image, r=8.0):
    ny, nx = image.shape
    y, x = np.mgrid[:ny, :nx]
    return float(np.nansum(image[np.hypot(y - (ny - 1) / 2, x - (nx - 1) / 2) <= r]))


@needs_data
def test_sequence_calibration_end_to_end(data_env, tmp_path):
    """Acceptance: a G2V V=6 star through 750-50 is calibrated to its synthetic flux within 2 %."""
    from vampd.config import PipelineConfig
    from vampd.engine import specphot_trigger as st
    from vampd.engine.ledger import Ledger
    from vampd.engine.pipeline import process_file

    truth = synthetic_photometry("750-50", "pickles", "G2V", 6.0, "V").flux_jy
    c_fd_true = 4.0e-5  # Jy/(e-/s), chosen for the simulated instrument
    raw = tmp_path / "raw"
    raw.mkdir()
    paths = []
    for i, obj in enumerate(["HD1", "HD1", "HD2"]):
        p = raw / f"VMPA{i:08d}.fits"
        _raw(p, truth / c_fd_true, obj=obj, mjd=60500.3 + 0.001 * i)
        paths.append(str(p))
    cfg = PipelineConfig(
        name="t", specphot={"unit": "Jy", "source": "pickles", "sptype": "G2V", "mag": 6.0, "mag_band": "V"}
    )
    cfg.align.crop_width = 40
    out = tmp_path / "out"
    ledger = Ledger(out)
    computed = []
    for p in paths:
        ledger.register(p, "h")
        r = process_file(p, cfg, out)
        ledger.record_done(p, r.products, r.summary, r.metrics, "h")
        computed.append(st.on_file_done(ledger, cfg, out, p))
    # HD1's sequence completes when HD2 arrives; HD2's only at finalize
    assert computed[0] == [] and computed[1] == []
    assert [c["key"] for c in computed[2]] == ["cam1:VMPA00000000"]
    fin = st.on_finalize(ledger, cfg, out)
    assert [c["key"] for c in fin] == ["cam1:VMPA00000002"]
    assert st.on_finalize(ledger, cfg, out) == []  # idempotent

    rows = {r["key"]: r for r in ledger.specphot_rows("done")}
    assert set(rows) == {"cam1:VMPA00000000", "cam1:VMPA00000002"}
    assert json.loads(rows["cam1:VMPA00000000"]["members"]) == paths[:2]
    kinds = {r["kind"]: r["path"] for r in ledger.products(paths[0])}
    cal = Path(kinds["calibrated_flux"])
    assert cal == out / "specphot" / "t_VMPA00000000_coll_jy.fits"
    with fits.open(cal) as hdul:
        assert hdul[0].header["BUNIT"] == "Jy" and hdul["ERR"].header["BUNIT"] == "Jy"
        assert hdul[0].header["FILTNAME"] == "750-50"
        assert hdul[0].header["HIERARCH DPP FLUX C_FD 750-50"] == pytest.approx(c_fd_true, rel=0.02)
        flux_jy = _aperture(hdul[0].data[0])
    assert flux_jy == pytest.approx(truth, rel=0.02)
    # the e-/s product is untouched
    with fits.open(out / "coadded" / "t_VMPA00000000_coll.fits") as hdul:
        assert hdul[0].header.get("BUNIT", "e-/s") == "e-/s"
        assert _aperture(hdul[0].data[0]) == pytest.approx(truth / c_fd_true, rel=0.02)
    # Jy/arcsec^2 = Jy / pixel area (PXAREA from the plate scale)
    px = fits.getheader(cal)["PXAREA"]
    assert px == pytest.approx((fits.getheader(cal)["PXSCALE"] / 1000) ** 2, rel=1e-6)
    # PDI reads the factor of the target
    unit, factors = pdi_unit_factor(out, "HD1", "750-50", camera=1)
    assert unit == "Jy" and factors["750-50"] == pytest.approx(c_fd_true, rel=0.02)
    assert pdi_unit_factor(out, "NOPE", "750-50") == ("e-/s", {})
    # restart safety: a lost calibrated copy is redone at finalize, nothing else is
    cal.unlink()
    redo = st.on_finalize(ledger, cfg, out)
    assert [c["key"] for c in redo] == ["cam1:VMPA00000000"] and cal.exists()
    ledger.close()


def _fake_products(out: Path, stem: str, fields: list[str], fluxes: list[float], header: dict):
    """A metrics NPZ and a coadded product as the pipeline writes them (2 PSF-less fields)."""
    from vampd.stages.analyze import save_metrics

    nf = len(fields)
    photf = np.array(fluxes, float)[:, None, None] * np.array([0.9, 1.0, 1.1, -1.0])[None, None, :]
    mpath = out / "metrics" / f"t_{stem}_metrics.npz"
    save_metrics(mpath, {"photf": photf, "sum": photf}, fields)
    img = np.ones((nf, 5, 5), np.float32) * np.array(fluxes, np.float32)[:, None, None]
    hdr = fits.Header()
    for k, v in header.items():
        hdr[k] = v
    hdus = [fits.PrimaryHDU(img, header=hdr), fits.ImageHDU(img * 0.1, header=hdr, name="ERR")]
    for f in fields:
        h = hdr.copy()
        h["FIELD"] = f
        hdus.append(fits.ImageHDU(header=h, name=f))
    cpath = out / "coadded" / f"t_{stem}_coll.fits"
    cpath.parent.mkdir(parents=True, exist_ok=True)
    fits.HDUList(hdus).writeto(cpath)
    return [("metrics", str(mpath)), ("coadded", str(cpath))]


def _pickles_sequence_setup(tmp_path: Path, unit: str, sptype: str, mag: float):
    """A config calibrating every 2 files of a target with a Pickles V-band source, and its ledger."""
    from vampd.config import PipelineConfig
    from vampd.engine.ledger import Ledger

    specphot = {"unit": unit, "source": "pickles", "sptype": sptype, "mag": mag, "mag_band": "V", "sequence_files": 2}
    cfg = PipelineConfig(name="t", specphot=specphot)
    out = tmp_path / "out"
    return cfg, out, Ledger(out)


@needs_data
def test_mbi_fields_get_their_own_factor_and_count_trigger(data_env, tmp_path):
    from vampd.engine import specphot_trigger as st

    fields = ["F610", "F670", "F720", "F760"]
    fluxes = [1.0e5, 2.0e5, 3.0e5, 4.0e5]
    cfg, out, ledger = _pickles_sequence_setup(tmp_path, "Jy/arcsec^2", "K0III", 8.0)
    header = {"AIRMASS": 1.3, "PXAREA": 3.5e-5, "OBJECT": "T"}
    results = []
    for i in range(3):
        src = tmp_path / f"VMPB{i:08d}.fits"
        src.write_bytes(b"x")
        ledger.register(str(src), "h")
        prods = _fake_products(out, src.stem, fields, fluxes, header)
        ledger.record_done(
            str(src), prods, {"target": "T", "filter": ",".join(fields), "camera": 2, "mjd": 60500.0 + i}, {}, "h"
        )
        results.append(st.on_file_done(ledger, cfg, out, str(src)))
    # the count is reached at the second file; the third waits for finalize
    assert results[0] == [] and [r["key"] for r in results[1]] == ["cam2:VMPB00000000"] and results[2] == []
    f = results[1][0]["factors"]["VMPB00000000"]
    for fld, flux in zip(fields, fluxes, strict=True):
        expect = synthetic_photometry(fld, "pickles", "K0III", 8.0, "V").flux_jy / flux / 3.5e-5
        assert f[fld] == pytest.approx(expect, rel=1e-9)
    assert len(set(f.values())) == 4
    with fits.open(out / "specphot" / "t_VMPB00000000_coll_jyas2.fits") as hdul:
        for j, fld in enumerate(fields):
            assert hdul[0].data[j, 2, 2] == pytest.approx(fluxes[j] * f[fld], rel=1e-6)
            assert hdul[fld].header["FILTNAME"] == fld
            assert hdul[fld].header["BUNIT"] == "Jy/arcsec^2"
    assert [r["key"] for r in st.on_finalize(ledger, cfg, out)] == ["cam2:VMPB00000002"]
    ledger.close()


def test_trigger_failure_is_recorded_not_raised(no_data):
    from vampd.config import PipelineConfig
    from vampd.engine import specphot_trigger as st
    from vampd.engine.ledger import Ledger

    tmp = no_data
    cfg = PipelineConfig(
        name="t", specphot={"unit": "Jy", "source": "pickles", "sptype": "G2V", "mag": 6.0, "mag_band": "V"}
    )
    out = tmp / "out"
    ledger = Ledger(out)
    src = tmp / "VMPA00000009.fits"
    src.write_bytes(b"x")
    ledger.register(str(src), "h")
    prods = _fake_products(out, src.stem, ["750-50"], [1e5], {"AIRMASS": 1.0, "PXAREA": 3.5e-5})
    ledger.record_done(str(src), prods, {"target": "T", "filter": "750-50", "camera": 1, "mjd": 60500.0}, {}, "h")
    res = st.on_finalize(ledger, cfg, out)
    assert res[0]["state"] == "failed" and "pickles_uvk/pickles_uk.fits" in res[0]["error"]
    row = ledger.specphot_rows("failed")[0]
    assert "VAMPD_DATA_DIR" in row["error"]
    assert any("pickles_uk.fits" in e["message"] for e in ledger.events())
    ledger.close()


def test_zeropoints_e_per_s_is_a_no_op(no_data):
    from vampd.config import PipelineConfig
    from vampd.engine import specphot_trigger as st

    assert not st.specphot_enabled(PipelineConfig(name="t"))
    assert st.specphot_enabled(PipelineConfig(name="t", specphot={"unit": "Jy"}))


@needs_data
def test_late_file_moves_boundaries_and_supersedes(data_env, tmp_path):
    from vampd.engine import specphot_trigger as st

    cfg, out, ledger = _pickles_sequence_setup(tmp_path, "contrast", "G2V", 6.0)
    fluxes = {0: 1e5, 1: 2e5, 2: 4e5}

    def finish(i):
        src = tmp_path / f"VMPA{i:08d}.fits"
        src.write_bytes(b"x")
        ledger.register(str(src), "h")
        prods = _fake_products(out, src.stem, ["750-50"], [fluxes[i]], {"AIRMASS": 1.0, "PXAREA": 3.5e-5})
        ledger.record_done(
            str(src), prods, {"target": "T", "filter": "750-50", "camera": 1, "mjd": 60500.0 + i}, {}, "h"
        )
        return st.on_file_done(ledger, cfg, out, str(src))

    assert finish(1) == []
    first = finish(2)  # chunk [1, 2] is full
    assert [r["key"] for r in first] == ["cam1:VMPA00000001"]
    assert first[0]["factors"]["VMPA00000001"]["750-50"] == pytest.approx(1 / 2.9e5)  # median of 1.8,2,2.2,3.6,4,4.4 e5
    late = finish(0)  # file 0 finishes late: chunks become [0, 1] and [2]
    assert [r["key"] for r in late] == ["cam1:VMPA00000000"]
    states = {r["key"]: r["state"] for r in ledger.specphot_rows()}
    assert states == {"cam1:VMPA00000000": "done", "cam1:VMPA00000001": "superseded"}
    assert not (out / "specphot" / "t_T_750-50_cam1_VMPA00000001.json").exists()
    assert pdi_unit_factor(out, "T", "750-50") == (
        "contrast",
        {"750-50": pytest.approx(1 / 1.45e5)},
    )  # median of .9,1,1.1,1.8,2,2.2 e5
    ledger.close()

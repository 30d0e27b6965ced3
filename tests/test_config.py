"""Tests of vampd.config: schema, defaults, cross-field rules, TOML I/O, versions, presets, new/check."""

from __future__ import annotations

import argparse
import importlib
import re
import warnings
from pathlib import Path

import pytest

import vampd
from vampd import cli
from vampd.config import (
    DPP_COMPAT_VERSION,
    ConfigError,
    ConfigFileError,
    ConfigWarning,
    PipelineConfig,
    check_version,
    config_from_toml_str,
    load_config,
    resolve_data_dir,
    save_config,
    to_toml_str,
)
from vampd.config.presets import PRESETS, render_preset

from conftest import REFERENCE_CONFIG as REFERENCE
from conftest import REPO, SHARED, needs_reference_config


def run_cli(argv: list[str]) -> int:
    """``vampd.cli.main(argv)``; if the parser cannot be built because another sub-command's module
    is not importable yet, build just the new/check sub-parsers from cli's own definitions."""
    try:
        return cli.main(argv)
    except ModuleNotFoundError as exc:
        if "vampd.config" in str(exc):
            raise
        parser = argparse.ArgumentParser(prog="vampd")
        sub = parser.add_subparsers(dest="command")
        for name in ("new", "check"):
            cli.ARGUMENTS[name](sub.add_parser(name))
        args = parser.parse_args(argv)
        module, func, _ = cli.COMMANDS[args.command]
        return int(getattr(importlib.import_module(module), func)(args) or 0)


@pytest.fixture
def no_config_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConfigWarning)
        # the one expected notice: an [nrm] section is accepted but not processed
        warnings.filterwarnings("ignore", message=r"\[nrm\] is accepted", category=ConfigWarning)
        yield


# ---------------------------------------------------------------------------------------------------------
# schema and defaults


def test_defaults_match_reference_schema(no_config_warnings):
    cfg = PipelineConfig()
    assert (cfg.name, cfg.dpp_version, cfg.coronagraphic, cfg.planetary, cfg.save_adi_cubes) == (
        "",
        "0.14.3",
        False,
        False,
        False,
    )
    assert cfg.vampd_version == vampd.__version__
    assert cfg.target is None and cfg.polarimetry is None and cfg.nrm is None and not cfg.pdi
    assert cfg.combine.model_dump() == {"method": "cube", "save_intermediate": False}
    assert cfg.calibrate.model_dump() == {
        "calib_directory": None,
        "back_subtract": True,
        "flat_correct": False,
        "fix_bad_pixels": False,
        "save_intermediate": False,
    }
    assert cfg.analysis.model_dump() == {
        "fit_psf_model": False,
        "psf_model": "moffat",
        "photometry": True,
        "phot_aper_rad": 8.0,
        "phot_ann_rad": False,
        "strehl": True,
        "window_size": 21,
    }
    assert cfg.frame_select.model_dump() == {
        "frame_select": False,
        "metric": "strehl",
        "cutoff": 0.0,
        "save_intermediate": False,
    }
    assert cfg.align.model_dump() == {
        "align": True,
        "pad": True,
        "method": "dft",
        "crop_width": 536,
        "reproject": False,
        "save_intermediate": False,
    }
    assert cfg.coadd.model_dump() == {"coadd": True, "method": "median", "recenter": True, "recenter_method": "dft"}
    sp = cfg.specphot
    assert (sp.unit, sp.source, sp.sptype, sp.mag, sp.mag_band, sp.flux_metric, sp.sequence_files) == (
        "e-/s",
        "zeropoints",
        None,
        None,
        None,
        "photometry",
        None,
    )
    assert cfg.diff_images.model_dump() == {"make_diff": False, "save_double": False}
    pol = PipelineConfig(polarimetry={}).polarimetry
    assert pol.model_dump() == {
        "method": "triplediff",
        "derotate": True,
        "mm_correct": True,
        "hwp_adi_sync": True,
        "use_ideal_mm": False,
        "ip_correct": True,
        "ip_method": "aperture",
        "ip_radius": 15.0,
        "ip_radius2": None,
        "cyl_stokes": "azimuthal",
        "hwp_tolerance": 0.1,
        "set_timeout": 900.0,
        "mm_table": None,
        "leastsq_max_cond": 100.0,
        "leastsq_refresh_files": 8,
        "leastsq_refresh_seconds": 60.0,
        "leastsq_weights": "equal",
        "leastsq_snr_annulus": None,
    }
    assert PipelineConfig(nrm={}).nrm.nbootstrap == 1000
    w = cfg.watch
    assert (w.inputs, w.outdir, w.patterns, w.recursive, w.poll, w.poll_interval) == (
        [],
        None,
        ["*.fits", "*.fits.fz"],
        False,
        False,
        2.0,
    )
    assert (w.complete_timeout, w.settle_time, w.workers, w.expect_sidecar, w.max_tries) == (120.0, 0.5, 2, False, 3)
    assert (w.memory_factor, w.memory_limit_gb, w.queue_size, w.reconcile_interval, w.stop_timeout) == (
        6.0,
        None,
        64,
        30.0,
        60.0,
    )
    assert cfg.alerts.model_dump() == {
        "lag_seconds": 60.0,
        "flc_imbalance": 0.2,
        "hwp_grid_tolerance": 0.5,
        "idle_seconds": 120.0,
        "strehl_drop": 0.3,
        "flux_drop": 0.5,
        "disk_free_gb": 20.0,
    }


@needs_reference_config
def test_reference_example_loads_unchanged(no_config_warnings):
    cfg = load_config(REFERENCE)
    assert cfg.name == "20240115_HD169142"
    assert cfg.save_adi_cubes is True
    assert cfg.target.ra == "18:24:29.78" and cfg.target.parallax == 8.7 and cfg.target.pm_dec == -40.0
    # relative paths are relative to the config file's directory
    assert cfg.calibrate.calib_directory == REFERENCE.parent / "calib"
    assert cfg.analysis.phot_aper_rad == 10.0 and cfg.analysis.phot_ann_rad == (15.0, 25.0)
    assert cfg.frame_select.frame_select and cfg.frame_select.metric == "strehl" and cfg.frame_select.cutoff == 0.25
    assert cfg.align.crop_width == 256
    assert cfg.specphot.unit == "Jy/arcsec^2" and cfg.specphot.source == "pickles"
    assert (cfg.specphot.sptype, cfg.specphot.mag, cfg.specphot.mag_band) == ("F1V", 7.3, "V")
    assert cfg.diff_images.save_double
    assert cfg.pdi and cfg.polarimetry.method == "doublediff"
    assert (cfg.polarimetry.ip_method, cfg.polarimetry.ip_radius, cfg.polarimetry.ip_radius2) == ("annulus", 14.0, 20.0)
    # vampd-only sections take their defaults
    assert cfg.watch.workers == 2 and cfg.alerts.idle_seconds == 120.0


@pytest.mark.parametrize(
    "metric,key", [("max", "max"), ("peak", "max"), ("l2norm", "var"), ("normvar", "nvar"), ("strehl", "strehl")]
)
def test_frame_select_metrics_accepted(metric, key):
    cfg = PipelineConfig(frame_select={"frame_select": True, "metric": metric, "cutoff": 0.5})
    assert cfg.frame_select.metric_key == key


def test_cutoff_out_of_range_refused(tmp_path):
    with pytest.raises(ConfigError) as err:
        config_from_toml_str("[frame_select]\ncutoff = 1.7\n")
    assert "frame_select.cutoff = 1.7: must be between 0 and 1" in str(err.value)
    path = tmp_path / "bad.toml"
    path.write_text("[frame_select]\ncutoff = -0.1\n")
    with pytest.raises(ConfigError, match=r"frame_select\.cutoff = -0\.1"):
        load_config(path)
    # edges are allowed
    assert config_from_toml_str("[frame_select]\ncutoff = 1\n").frame_select.cutoff == 1.0


@pytest.mark.parametrize(
    "toml,expected",
    [
        ('[frame_select]\nmetric = "foo"\n', "frame_select.metric = \"foo\": must be 'max', 'peak'"),
        ('[align]\nmethod = "fft"\n', 'align.method = "fft"'),
        ("[align]\ncrop_width = 0\n", "align.crop_width = 0: must be >= 1"),
        ("[analysis]\nphot_ann_rad = true\n", "analysis.phot_ann_rad = true: must be false or [r_in, r_out]"),
        ("[analysis]\nphot_aper_rad = -3\n", "analysis.phot_aper_rad = -3: must be > 0"),
        ('[specphot]\nunit = "mJy"\n', 'specphot.unit = "mJy"'),
        ("[watch]\nworkers = 0\n", "watch.workers = 0: must be >= 1"),
        ("[alerts]\nflux_drop = 1.5\n", "alerts.flux_drop = 1.5: must be between 0 (excluded) and 1"),
        ('[target]\nname = "x"\nra = "25:00:00"\ndec = "0:0:0"\nparallax = 1.0\n', 'target.ra = "25:00:00"'),
        ('name = "a/b"\n', 'name = "a/b": must be filename-friendly'),
    ],
)
def test_invalid_values_name_the_field(toml, expected):
    with pytest.raises(ConfigError) as err:
        config_from_toml_str(toml)
    assert expected in str(err.value)


def test_several_problems_reported_together():
    with pytest.raises(ConfigError) as err:
        config_from_toml_str("[frame_select]\ncutoff = 2\n[align]\ncrop_width = -1\n")
    assert len(err.value.problems) == 2
    assert "frame_select.cutoff" in str(err.value) and "align.crop_width" in str(err.value)


def test_invalid_assignment_raises_config_error():
    cfg = PipelineConfig()
    with pytest.raises(ConfigError, match=r"frame_select\.cutoff = 3"):
        cfg.frame_select.cutoff = 3
    assert cfg.frame_select.cutoff == 0.0


# ---------------------------------------------------------------------------------------------------------
# cross-field rules


@pytest.mark.parametrize(
    "data,expected",
    [
        ({"polarimetry": {"ip_method": "annulus", "ip_radius": 14}}, "needs polarimetry.ip_radius2"),
        (
            {"polarimetry": {"ip_method": "annulus", "ip_radius": 14, "ip_radius2": 10}},
            "polarimetry.ip_radius2 = 10 must be greater than polarimetry.ip_radius = 14",
        ),
        ({"specphot": {"unit": "contrast", "source": "zeropoints"}}, 'specphot.unit = "contrast" cannot be produced'),
        ({"specphot": {"unit": "contrast", "source": None}}, 'specphot.unit = "contrast" cannot be produced'),
        ({"specphot": {"unit": "Jy", "source": "pickles", "sptype": "G2V"}}, "needs specphot.mag, specphot.mag_band"),
        ({"specphot": {"unit": "Jy", "source": "star.fits"}}, "needs specphot.sptype, specphot.mag, specphot.mag_band"),
        ({"specphot": {"unit": "Jy", "source": None}}, 'specphot.unit = "Jy" needs a specphot.source'),
        (
            {"specphot": {"unit": "Jy/arcsec^2", "source": None}},
            'specphot.unit = "Jy/arcsec^2" needs a specphot.source',
        ),
        (
            {"polarimetry": {"mm_correct": True, "derotate": False}},
            "polarimetry.mm_correct = true requires polarimetry.derotate",
        ),
        (
            {"frame_select": {"frame_select": True, "metric": "strehl"}, "analysis": {"strehl": False}},
            'frame_select.metric = "strehl" requires analysis.strehl = true',
        ),
        ({"align": {"method": "model"}}, 'align.method = "model" requires analysis.fit_psf_model = true'),
        ({"coadd": {"recenter_method": "model"}}, 'coadd.recenter_method = "model" requires analysis.fit_psf_model'),
        (
            {
                "specphot": {"unit": "Jy", "source": "pickles", "sptype": "G2V", "mag": 5.0, "mag_band": "V"},
                "analysis": {"photometry": False},
            },
            "requires analysis.photometry = true",
        ),
        (
            {"analysis": {"phot_ann_rad": [25, 15]}},
            "analysis.phot_ann_rad = [25, 15]: must be [r_in, r_out] with 0 <= r_in < r_out",
        ),
        ({"analysis": {"phot_ann_rad": [15, 15]}}, "r_in < r_out"),
        ({"coadd": {"coadd": False}}, "no product would be written"),
    ],
)
def test_cross_field_rules_refused(data, expected):
    with pytest.raises(ConfigError) as err:
        PipelineConfig.from_dict(data)
    assert expected in str(err.value)


@pytest.mark.parametrize(
    "data",
    [
        # the same options are fine when the rule's condition does not apply
        {"polarimetry": {"ip_method": "annulus", "ip_radius": 14, "ip_radius2": 20}},
        {"polarimetry": {"mm_correct": False, "derotate": False}},
        {"analysis": {"strehl": False}},  # frame selection off: metric strehl unused
        {"align": {"method": "model"}, "analysis": {"fit_psf_model": True}},
        {"specphot": {"unit": "Jy", "source": "zeropoints"}, "analysis": {"photometry": False}},
        {
            "specphot": {
                "unit": "Jy",
                "source": "pickles",
                "sptype": "G2V",
                "mag": 5.0,
                "mag_band": "V",
                "flux_metric": "sum",
            },
            "analysis": {"photometry": False},
        },
        {"coadd": {"coadd": False}, "align": {"save_intermediate": True}},
    ],
)
def test_cross_field_rules_allow_valid(data, no_config_warnings):
    cfg = PipelineConfig.from_dict(data)
    for section, values in data.items():  # accepted as given, nothing coerced away
        got = getattr(cfg, section)
        for key, value in values.items():
            assert getattr(got, key) == value, f"{section}.{key}"


def test_specphot_file_source_resolved_relative(tmp_path):
    (tmp_path / "cfg.toml").write_text(
        '[specphot]\nunit = "Jy"\nsource = "spectra/star.fits"\nsptype = "A0V"\nmag = 3.0\nmag_band = "V"\n'
    )
    cfg = load_config(tmp_path / "cfg.toml")
    assert cfg.specphot.source_kind == "file"
    assert cfg.specphot.source == tmp_path / "spectra" / "star.fits"


# ---------------------------------------------------------------------------------------------------------
# unknown keys


def test_unknown_keys_warn():
    with pytest.warns(ConfigWarning, match=r"unknown key align\.foo ignored"):
        cfg = config_from_toml_str("[align]\nfoo = 1\ncrop_width = 100\n")
    assert cfg.align.crop_width == 100
    with pytest.warns(ConfigWarning, match=r"unknown section \[polarisation\] ignored"):
        cfg = config_from_toml_str('[polarisation]\nmethod = "doublediff"\n')
    assert cfg.polarimetry is None
    with pytest.warns(ConfigWarning, match=r"unknown key colour ignored"):
        config_from_toml_str('colour = "red"\n')


def test_annulus_overlapping_aperture_warns():
    with pytest.warns(ConfigWarning, match="background annulus overlaps the aperture"):
        cfg = config_from_toml_str("[analysis]\nphot_aper_rad = 8\nphot_ann_rad = [5, 10]\n")
    assert cfg.analysis.phot_ann_rad == (5.0, 10.0)


def test_legacy_version_key():
    with pytest.warns(ConfigWarning, match="legacy key version"):
        cfg = config_from_toml_str('version = "0.14.0"\n')
    assert cfg.dpp_version == "0.14.0"
    with pytest.raises(ConfigError, match=r'version = "0\.9\.0" is not compatible'):
        config_from_toml_str('version = "0.9.0"\n')


# ---------------------------------------------------------------------------------------------------------
# versions (docs/instrument.md §11.4 / §12)


@pytest.mark.parametrize(
    "config,installed,expected",
    [
        ("0.1.0", "0.1.0", True),
        ("0.1.0", "0.2.0", False),
        ("0.2.2", "0.2.0", False),
        ("0.2.2", "0.2.4", True),
        ("0.3.0", "0.2.0", False),
        ("1.0.0", "1.0.0", True),
        ("1.2.0", "1.0.0", False),
        ("1.0.0", "1.2.0", True),
        ("1.2.3", "1.2.0", False),
        ("1.2.3", "1.2.5", True),
        ("1.2.3", "2.0.0", False),
    ],
)
def test_check_version_table(config, installed, expected):
    assert check_version(config, installed) is expected


def test_check_version_rejects_garbage():
    with pytest.raises(ValueError):
        check_version("abc", "0.1.0")


def test_version_keys_checked_on_load():
    assert DPP_COMPAT_VERSION == "0.14.3"
    assert config_from_toml_str('dpp_version = "0.14.1"\n').dpp_version == "0.14.1"
    with pytest.raises(ConfigError) as err:
        config_from_toml_str('dpp_version = "0.15.0"\n')
    msg = str(err.value)
    assert 'dpp_version = "0.15.0"' in msg and "0.14.3" in msg
    with pytest.raises(ConfigError, match=r'dpp_version = "0\.13\.2"'):
        config_from_toml_str('dpp_version = "0.13.2"\n')
    major, minor, patch = (int(x) for x in vampd.__version__.split(".")[:3])
    newer = f"{major}.{minor + 1}.0"
    with pytest.raises(ConfigError, match=rf'vampd_version = "{re.escape(newer)}" is not compatible with vampd'):
        config_from_toml_str(f'vampd_version = "{newer}"\n')
    assert config_from_toml_str(f'vampd_version = "{vampd.__version__}"\n').vampd_version == vampd.__version__
    # versions can be skipped (e.g. for upgrading tools)
    assert config_from_toml_str('dpp_version = "0.15.0"\n', check_versions=False).dpp_version == "0.15.0"


# ---------------------------------------------------------------------------------------------------------
# TOML round trip, paths, hashes


def _full_config(tmp_path: Path) -> PipelineConfig:
    return PipelineConfig(
        name="night",
        data_dir=tmp_path / "data",
        target={"name": "HD 169142", "ra": "18:24:29.78", "dec": "-29:46:49.3", "parallax": 8.7},
        calibrate={"calib_directory": tmp_path / "calib", "flat_correct": True},
        analysis={"phot_ann_rad": [12, 20]},
        specphot={
            "unit": "contrast",
            "source": "pickles",
            "sptype": "G2V",
            "mag": 5.5,
            "mag_band": "H",
            "sequence_files": 8,
        },
        polarimetry={
            "method": "triplediff",
            "mm_table": tmp_path / "mm.csv",
            "ip_method": "annulus",
            "ip_radius2": 30.0,
        },
        nrm={"nbootstrap": 50},
        watch={"inputs": [tmp_path / "raw1", tmp_path / "raw2"], "outdir": tmp_path / "out", "memory_limit_gb": 4.5},
        alerts={"disk_free_gb": 5},
    )


@needs_reference_config
def test_toml_round_trip(tmp_path, no_config_warnings):
    cfg = _full_config(tmp_path)
    text = to_toml_str(cfg)
    assert "None" not in text and "ip_radius2 = 30.0" in text
    assert config_from_toml_str(text) == cfg
    path = save_config(cfg, tmp_path / "sub" / "cfg.toml")
    assert load_config(path) == cfg
    assert not list((tmp_path / "sub").glob("*.part"))  # atomic write leaves no temp file
    # the reference file survives a save/load cycle
    ref = load_config(REFERENCE)
    save_config(ref, tmp_path / "ref.toml")
    assert load_config(tmp_path / "ref.toml") == ref
    # None fields are omitted, absent optional sections stay absent
    plain = PipelineConfig()
    text = to_toml_str(plain)
    assert "[polarimetry]" not in text and "[target]" not in text and "calib_directory" not in text
    assert config_from_toml_str(text) == plain


def test_relative_paths_resolved_against_config_dir(tmp_path):
    sub = tmp_path / "night"
    sub.mkdir()
    (sub / "cfg.toml").write_text(
        'data_dir = "../vampd-data"\n[calibrate]\ncalib_directory = "calib"\n'
        '[watch]\ninputs = ["raw", "/abs/raw"]\noutdir = "out"\n[polarimetry]\nmm_table = "mm.csv"\n'
    )
    cfg = load_config(sub / "cfg.toml")
    assert cfg.data_dir == tmp_path / "vampd-data"
    assert cfg.calibrate.calib_directory == sub / "calib"
    assert cfg.watch.inputs == [sub / "raw", Path("/abs/raw")]
    assert cfg.watch.outdir == sub / "out"
    assert cfg.polarimetry.mm_table == sub / "mm.csv"


def test_resolve_data_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("VAMPD_DATA_DIR", raising=False)
    assert resolve_data_dir(PipelineConfig()) is None
    monkeypatch.setenv("VAMPD_DATA_DIR", str(tmp_path / "env"))
    assert resolve_data_dir(PipelineConfig()) == tmp_path / "env"
    assert resolve_data_dir(PipelineConfig(data_dir=tmp_path / "cfg")) == tmp_path / "cfg"


def test_config_hash(tmp_path):
    cfg = load_config(REFERENCE)
    h = cfg.config_hash()
    assert re.fullmatch(r"[0-9a-f]{16}", h)
    save_config(cfg, tmp_path / "a.toml")
    assert load_config(tmp_path / "a.toml").config_hash() == h
    # not processing-relevant
    other = cfg.model_copy(deep=True)
    other.watch.workers = 7
    other.watch.inputs = [tmp_path]
    other.alerts.idle_seconds = 10
    other.name = "renamed"
    other.vampd_version = vampd.__version__
    assert other.config_hash() == h
    # processing-relevant
    changed = cfg.model_copy(deep=True)
    changed.frame_select.cutoff = 0.5
    assert changed.config_hash() != h
    changed = cfg.model_copy(deep=True)
    changed.polarimetry = None
    assert changed.config_hash() != h


def test_stage_hash():
    cfg = PipelineConfig()
    changed = cfg.model_copy(deep=True)
    changed.coadd.method = "mean"
    # coadd options do not touch the upstream stages, but do change coadd and everything after it
    for stage in ("calibrate", "analysis", "frame_select", "align", "specphot"):
        assert changed.stage_hash(stage) == cfg.stage_hash(stage)
    for stage in ("coadd", "polarimetry", "pdi", "diff_images", "adi"):
        assert changed.stage_hash(stage) != cfg.stage_hash(stage)
    changed = cfg.model_copy(deep=True)
    changed.calibrate.flat_correct = True
    assert changed.stage_hash("analyze") != cfg.stage_hash("analyze")
    assert cfg.stage_hash("select") == cfg.stage_hash("frame_select")
    with pytest.raises(ValueError, match="unknown stage"):
        cfg.stage_hash("nonsense")


# ---------------------------------------------------------------------------------------------------------
# presets, new, check


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_validate_and_files_match(preset, no_config_warnings):
    text = render_preset(preset, "20240115_test")
    cfg = config_from_toml_str(text)
    assert cfg.name == "20240115_test"
    assert text.count("\n# ") > 40  # commented template
    assert (REPO / "configs" / f"{preset}.toml").read_text() == render_preset(preset, preset)
    if preset.startswith("pdi"):
        assert cfg.polarimetry.method == preset.split("-")[1]
        assert cfg.combine.method == "cube"
    else:
        assert cfg.polarimetry is None
    if preset == "coronagraphic":
        assert cfg.coronagraphic and not cfg.frame_select.frame_select and cfg.analysis.photometry
    if preset == "mbi":
        assert cfg.align.crop_width == 536
    if preset == "quicklook":
        assert cfg.analysis.strehl and cfg.combine.method == "cube"


def test_render_preset_unknown():
    with pytest.raises(ValueError, match="unknown preset"):
        render_preset("nope", "x")


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_cli_new_output_validates(tmp_path, preset, capsys):
    path = tmp_path / f"{preset}.toml"
    assert run_cli(["new", str(path), "--preset", preset, "--name", "night1"]) == 0
    assert str(path) in capsys.readouterr().out
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConfigWarning)
        cfg = load_config(path)
    assert cfg.name == "night1"
    assert run_cli(["check", str(path)]) == 0


def test_cli_new_refuses_overwrite(tmp_path, capsys):
    path = tmp_path / "my night.toml"
    assert run_cli(["new", str(path)]) == 0
    assert load_config(path).name == "my_night"  # default name: the file's stem, made filename-friendly
    path.write_text("# edited by hand\n")
    assert run_cli(["new", str(path), "--preset", "mbi"]) == 1
    assert "--force" in capsys.readouterr().err
    assert path.read_text() == "# edited by hand\n"
    assert run_cli(["new", str(path), "--preset", "mbi", "--force"]) == 0
    assert load_config(path).align.crop_width == 536


def _runnable_reference(tmp_path):
    """The reference example next to an existing (empty) calibration directory."""
    cfg = tmp_path / "ref.toml"
    text = REFERENCE.read_text()
    assert 'sptype = "F1V"' in text
    cfg.write_text(text.replace('sptype = "F1V"', 'sptype = "F0V"'))  # F1V is not in the Pickles UVK atlas
    (tmp_path / "calib" / "background").mkdir(parents=True)
    return cfg


def test_cli_check_exit_codes(tmp_path, capsys, monkeypatch):
    if not (SHARED / "data" / "pickles_uvk").is_dir():
        pytest.skip("no shared data directory")
    monkeypatch.setenv("VAMPD_DATA_DIR", str(SHARED / "data"))
    monkeypatch.delenv("PYSYN_CDBS", raising=False)
    ref = _runnable_reference(tmp_path)
    assert run_cli(["check", str(ref)]) == 0
    out = capsys.readouterr().out
    assert (
        "doublediff" in out and load_config(ref).config_hash() in out and out.endswith("OK: configuration is valid\n")
    )
    assert (
        f"pickles_uvk/pickles_uk.fits: {SHARED / 'data' / 'pickles_uvk' / 'pickles_uk.fits'}  [$VAMPD_DATA_DIR]" in out
    )
    bad = tmp_path / "bad.toml"
    bad.write_text("[frame_select]\ncutoff = 1.7\n")
    assert run_cli(["check", str(bad)]) == 1
    assert "frame_select.cutoff = 1.7" in capsys.readouterr().err
    broken = tmp_path / "broken.toml"
    broken.write_text('name = "unterminated\n')
    assert run_cli(["check", str(broken)]) == 2
    assert run_cli(["check", str(tmp_path / "missing.toml")]) == 2
    with pytest.raises(ConfigFileError):
        load_config(tmp_path / "missing.toml")
    warn = tmp_path / "warn.toml"
    warn.write_text("[align]\nfoo = 1\n")
    assert run_cli(["check", str(warn)]) == 0
    assert "unknown key align.foo ignored" in capsys.readouterr().err


def test_options_without_effect_in_a_streaming_daemon_are_announced():
    """Reference options that vampd accepts but cannot honour say so instead of being ignored."""
    with warnings.catch_warnings():  # combine.method = "pdi" is streamed (HWP blocks): no warning
        warnings.simplefilter("error", ConfigWarning)
        assert config_from_toml_str('[combine]\nmethod = "pdi"\n').combine.method == "pdi"
    with pytest.warns(ConfigWarning, match="combine.save_intermediate has no effect"):
        config_from_toml_str("[combine]\nsave_intermediate = true\n")
    with pytest.warns(ConfigWarning, match=r"\[nrm\] is accepted but not processed"):
        config_from_toml_str("[nrm]\nnbootstrap = 10\n")


def test_check_names_a_spectral_type_missing_from_the_atlas(monkeypatch, capsys, tmp_path):
    if not (SHARED / "data" / "pickles_uvk").is_dir():
        pytest.skip("no shared data directory")
    monkeypatch.setenv("VAMPD_DATA_DIR", str(SHARED / "data"))
    ref = _runnable_reference(tmp_path)
    ref.write_text(ref.read_text().replace('sptype = "F0V"', 'sptype = "F1V"'))
    assert run_cli(["check", str(ref)]) == 1
    err = capsys.readouterr().err
    assert "error: specphot.sptype = 'F1V' is not in the Pickles atlas" in err and "F0V" in err


def test_check_reference_without_data_directory_cannot_run(monkeypatch, capsys):
    """The reference example asks for Pickles photometry and a calibration directory that does not
    exist: check exits 1 and says what is missing and how to fix it."""
    monkeypatch.delenv("VAMPD_DATA_DIR", raising=False)
    monkeypatch.delenv("PYSYN_CDBS", raising=False)
    assert run_cli(["check", str(REFERENCE)]) == 1
    cap = capsys.readouterr()
    assert "NOT OK" in cap.out and "pickles_uvk/pickles_uk.fits: NOT FOUND" in cap.out
    errors = [ln for ln in cap.err.splitlines() if ln.startswith("error: ")]
    assert any(
        "the Pickles atlas" in e and "data_dir" in e and "$VAMPD_DATA_DIR" in e and "$PYSYN_CDBS" in e for e in errors
    )
    assert any("calibrate.calib_directory" in e and "does not exist" in e and "vampd calib" in e for e in errors)
    assert "cannot run as configured" in cap.err


def test_check_finds_pickles_and_vega_in_the_synphot_tree(tmp_path, monkeypatch, capsys):
    """$PYSYN_CDBS: grid/pickles/dat_uvk/ and calspec/ (synphot's layout) serve Pickles and Vega."""
    from vampd.specphot.data import locate, pickles_file, vega_file

    data = SHARED / "data"
    if not (data / "pickles_uvk").is_dir():
        pytest.skip("no shared data directory")
    cdbs = tmp_path / "cdbs"
    (cdbs / "grid" / "pickles").mkdir(parents=True)
    (cdbs / "calspec").mkdir()
    (cdbs / "grid" / "pickles" / "dat_uvk").symlink_to(data / "pickles_uvk")
    (cdbs / "calspec" / "alpha_lyr_stis_011.fits").symlink_to(data / "alpha_lyr_stis_011.fits")
    onlybands = tmp_path / "bands"  # the data directory holds the VAMPIRES files, not the catalogues
    onlybands.mkdir()
    for name in ("vampires_filters.csv", "johnson_v.txt"):
        (onlybands / name).symlink_to(data / name)
    monkeypatch.setenv("VAMPD_DATA_DIR", str(onlybands))
    monkeypatch.setenv("PYSYN_CDBS", str(cdbs))
    assert pickles_file("F0V").parent == cdbs / "grid" / "pickles" / "dat_uvk"
    assert vega_file() == cdbs / "calspec" / "alpha_lyr_stis_011.fits"
    assert locate("johnson_v.txt")[1] == "data_dir"
    assert run_cli(["check", str(_runnable_reference(tmp_path))]) == 0
    out = capsys.readouterr().out
    assert f"alpha_lyr_stis_011.fits: {cdbs / 'calspec' / 'alpha_lyr_stis_011.fits'}  [$PYSYN_CDBS]" in out
    assert "johnson_v.txt: " + str(onlybands / "johnson_v.txt") + "  [$VAMPD_DATA_DIR]" in out


def test_unknown_key_suggests_the_nearest_and_prints_one_clean_line(tmp_path, capsys):
    import subprocess
    import sys

    bad = tmp_path / "typo.toml"
    bad.write_text("[frame_select]\ncuttoff = 0.3\n")
    assert run_cli(["check", str(bad)]) == 0
    assert "warning: unknown key frame_select.cuttoff ignored; did you mean `cutoff`?" in capsys.readouterr().err
    with pytest.warns(ConfigWarning, match="did you mean `cutoff`"):
        config_from_toml_str("[frame_select]\ncuttoff = 0.3\n")
    # a command that loads the config logs it as one line with level and logger, no warnings text
    p = subprocess.run(
        [sys.executable, "-m", "vampd.cli", "finalize", str(bad), "-o", str(tmp_path / "none")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = [ln for ln in p.stderr.splitlines() if "cuttoff" in ln]
    assert lines == ["WARNING vampd.config: unknown key frame_select.cuttoff ignored; did you mean `cutoff`?"]
    assert "ConfigWarning" not in p.stderr and "pydantic" not in p.stderr


def test_cli_help_shows_defaults_and_an_example(capsys):
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, p in sub.choices.items():
        text = p.format_help()
        assert "example:\n  vampd " + name in text, name
    helps = {n: " ".join(sub.choices[n].format_help().split()) for n in ("run", "live", "demo", "finalize", "new")}
    assert "(default: the config's watch.workers)" in helps["run"] and "(default: 1.0)" in helps["live"]
    assert "(default: 32)" in helps["demo"] and "(default: watch.outdir" in helps["finalize"]
    assert "(default: quicklook)" in helps["new"]
    assert sorted(cli.PRESET_NAMES) == sorted(PRESETS)


def test_verbosity_after_the_command():
    parser = cli.build_parser()
    assert parser.parse_args(["status", "-v"]).verbose == 1
    assert parser.parse_args(["-v", "status"]).verbose == 1
    assert parser.parse_args(["status", "-q"]).quiet == 1 and parser.parse_args(["status"]).quiet == 0
    assert parser.parse_args(["watch", "c.toml", "-vv"]).verbose == 2


def test_worker_log_lines_carry_level_and_logger():
    """Worker processes log as ``LEVEL logger [worker pid]: message`` (they have no handler of
    their own otherwise, and Python's last-resort handler prints the bare message)."""
    import subprocess
    import sys

    code = (
        "import logging; from vampd.engine.pool import _worker_init; import os; _worker_init(os.getppid()); "
        "logging.getLogger('vampd.pipeline').warning('disk slow'); logging.getLogger('vampd.x').info('quiet')"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if "disk slow" in ln]
    assert len(lines) == 1 and re.fullmatch(r"WARNING vampd\.pipeline \[worker \d+\]: disk slow", lines[0]), p.stderr
    assert "quiet" not in p.stderr

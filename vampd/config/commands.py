"""``vampd new`` and ``vampd check``."""

from __future__ import annotations

import argparse
import math
import sys
import warnings
from pathlib import Path

from vampd.config.io import ConfigFileError, load_config
from vampd.config.models import ConfigError, ConfigWarning, PipelineConfig, resolve_data_dir
from vampd.config.presets import PRESETS, render_preset
from vampd.filenames import safe_part

__all__ = ["cmd_new", "cmd_check", "summarize", "default_name"]


def default_name(path: str | Path) -> str:
    """A filename-friendly config name from a file name: its stem, odd characters replaced by ``_``."""
    stem = Path(path).name
    for suffix in (".toml", ".TOML"):
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
    return safe_part(stem, empty="vampd")


def cmd_new(args: argparse.Namespace) -> int:
    """Write a commented configuration template (``args.path``, ``args.preset``, ``args.name``,
    ``args.force``). Returns 0, or 1 if the file exists and ``--force`` was not given."""
    from vampd.fitsio import atomic_write

    path = Path(args.path)
    preset = getattr(args, "preset", None) or "quicklook"
    if preset not in PRESETS:
        print(f"vampd new: unknown preset {preset!r}; choose one of {', '.join(PRESETS)}", file=sys.stderr)
        return 1
    if path.exists() and not getattr(args, "force", False):
        print(f"vampd new: {path} exists; use --force to overwrite it", file=sys.stderr)
        return 1
    if path.is_dir():
        print(f"vampd new: {path} is a directory", file=sys.stderr)
        return 1
    name = args.name if getattr(args, "name", None) else default_name(path)
    try:
        text = render_preset(preset, name)
    except ConfigError as exc:
        print(f"vampd new: {exc}", file=sys.stderr)
        return 1
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    print(f'wrote {path} (preset "{preset}": {PRESETS[preset]}; name = "{name}")')
    print(f"next: edit it, then `vampd check {path}`")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    """Load and validate ``args.config``, say what a run will do, which data files are found where,
    and what would stop it.

    Returns 0 if it can run (warnings allowed), 1 if it cannot run as configured (invalid values,
    or a missing calibration directory, data file or spectrum: each named with how to fix it),
    2 if the file is missing or not TOML.
    """
    path = Path(args.config)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConfigWarning)
        try:
            cfg = load_config(path)
        except ConfigFileError as exc:
            print(f"vampd check: {exc}", file=sys.stderr)
            return 2
        except ConfigError as exc:
            _print_warnings(caught)
            print(f"vampd check: {exc}", file=sys.stderr)
            return 1
    errors, warns = diagnose(cfg)
    print(summarize(cfg, path, ok=not errors))
    _print_warnings(caught)
    for w in warns:
        print(f"warning: {w}", file=sys.stderr)
    for e in errors:
        print(f"error: {e}", file=sys.stderr)
    if errors:
        print(f"vampd check: {path} cannot run as configured ({len(errors)} error(s) above)", file=sys.stderr)
        return 1
    return 0


def _print_warnings(caught: list) -> None:
    for w in caught:
        if issubclass(w.category, ConfigWarning):
            print(f"warning: {w.message}", file=sys.stderr)


# -- what a run needs ---------------------------------------------------------------------------------
def data_needs(cfg: PipelineConfig) -> list[tuple[str, str, bool]]:
    """Data files a run with ``cfg`` reads: ``(name, what it is for, required)``. Optional files
    have a fallback (nominal filter curves, the built-in zero-point table)."""
    from vampd.specphot.data import BAND_FILES, PICKLES_INDEX, VEGA_FILE, ZEROPOINT_TABLE_NAME

    sp = cfg.specphot
    synthetic = sp.unit != "e-/s" and sp.source_kind in ("pickles", "file")
    needs = [
        (
            "vampires_filters.csv",
            "VAMPIRES filter curves" + ("" if synthetic else "; nominal top-hat bands are used"),
            synthetic,
        ),
        (ZEROPOINT_TABLE_NAME, "zero points; the built-in table is used", False),
    ]
    if synthetic:
        if sp.source_kind == "pickles":
            needs.append((PICKLES_INDEX, f"the Pickles atlas (spectral type {sp.sptype})", True))
        band = str(sp.mag_band or "V")
        band = band.upper() if band.lower() in ("r", "i") else band
        if band in BAND_FILES:
            needs.append((BAND_FILES[band], f"the {band} passband of specphot.mag_band", True))
        needs.append((VEGA_FILE, "the Vega spectrum (Vega magnitudes)", True))
    return needs


def data_report(cfg: PipelineConfig) -> list[tuple[str, str]]:
    """``(name, where)`` for every data file a run reads: the path and which convention found it
    (``data_dir``/``$VAMPD_DATA_DIR``, ``$PYSYN_CDBS``, an installed package), or "not found"."""
    from vampd.specphot.data import VEGA_FILE, locate, vega_file

    rows = []
    for name, purpose, required in data_needs(cfg):
        path, source = locate(name, cfg)
        if path is None and name == VEGA_FILE:
            try:
                path, source = vega_file(cfg), "installed package"
            except FileNotFoundError:
                pass
        if path is not None:
            rows.append((name, f"{path}  [{_source_label(cfg, source)}]"))
        else:
            rows.append((name, f"NOT FOUND (required: {purpose})" if required else f"not found ({purpose})"))
    return rows


def _source_label(cfg: PipelineConfig, source: str) -> str:
    if source == "data_dir":
        return "data_dir" if cfg.data_dir is not None else "$VAMPD_DATA_DIR"
    return source


def _fix_data(name: str, purpose: str) -> str:
    from vampd.specphot.data import PICKLES_DIR, VEGA_FILE

    cdbs = name.startswith(PICKLES_DIR) or name == VEGA_FILE
    return (
        f"{purpose}: {name} not found. Set `data_dir` in the configuration or $VAMPD_DATA_DIR to a "
        f"directory holding it"
        + (" (or $PYSYN_CDBS to a synphot data tree: grid/pickles/dat_uvk/, calspec/)" if cdbs else "")
        + "; vampd never downloads it"
    )


def diagnose(cfg: PipelineConfig) -> tuple[list[str], list[str]]:
    """``(errors, warnings)``: what stops a run with ``cfg`` and what only degrades it."""
    errors, warns = [], []
    cal = cfg.calibrate
    if cal.calib_directory is not None and (cal.back_subtract or cal.flat_correct) and not cal.calib_directory.is_dir():
        errors.append(
            f"calibrate.calib_directory = {cal.calib_directory} does not exist (needed for "
            f"{'background subtraction' if cal.back_subtract else 'flat correction'}): build it with "
            f"`vampd calib DARKS... FLATS... -o {cal.calib_directory}`, point calib_directory at the "
            "directory holding background/ and flat/, or set back_subtract = flat_correct = false"
        )
    if cfg.data_dir is not None and not cfg.data_dir.is_dir():
        warns.append(f"data_dir = {cfg.data_dir} does not exist")
    from vampd.specphot.data import PICKLES_INDEX, VEGA_FILE, locate, pickles_file, vega_file

    for name, purpose, required in data_needs(cfg):
        if not required or locate(name, cfg)[0] is not None:
            continue
        if name == VEGA_FILE:
            try:
                vega_file(cfg)
                continue
            except FileNotFoundError:
                pass
        errors.append(f'specphot.source = "{cfg.specphot.source_kind}" needs ' + _fix_data(name, purpose))
    sp = cfg.specphot
    if sp.unit != "e-/s" and sp.source_kind == "pickles" and locate(PICKLES_INDEX, cfg)[0] is not None:
        try:
            pickles_file(sp.sptype, cfg)
        except (ValueError, FileNotFoundError) as exc:
            errors.append(str(exc))
    if sp.source_kind == "file" and not Path(sp.source).is_file():
        errors.append(
            f"specphot.source = {sp.source}: spectrum file not found (give an existing FITS/ASCII "
            'spectrum, or use source = "pickles" or "zeropoints")'
        )
    po = cfg.polarimetry
    if (
        po is not None
        and po.mm_correct
        and not po.use_ideal_mm
        and po.mm_table is not None
        and not po.mm_table.exists()
    ):
        warns.append(f"polarimetry.mm_table = {po.mm_table} not found: the ideal Mueller model will be used")
    return errors, warns


def _onoff(flag: bool) -> str:
    return "on" if flag else "off"


def _dir_state(p: Path | None) -> str:
    if p is None:
        return "not set"
    return f"{p} ({'exists' if p.is_dir() else 'MISSING'})"


def _pad_side(crop: int) -> int:
    npad = 2 * math.floor((crop / 2) * (math.sqrt(2) - 1) / 2)
    return crop + 2 * npad


def _polarimetry_text(po) -> str:
    mm = "off"
    if po.mm_correct:
        if po.use_ideal_mm:
            mm = "ideal"
        elif po.mm_table is not None:
            mm = f"table {po.mm_table}" + ("" if po.mm_table.exists() else " (MISSING -> ideal)")
        else:
            mm = "ideal (no mm_table)"
    ip = "off"
    if po.ip_correct:
        ip = (
            f"aperture r={po.ip_radius:g} px"
            if po.ip_method == "aperture"
            else f"annulus {po.ip_radius:g}-{po.ip_radius2:g} px"
        )
    return (
        f"{po.method}, derotate {_onoff(po.derotate)}, MM {mm}, IP {ip}, {po.cyl_stokes}; "
        f"HWP tolerance {po.hwp_tolerance:g} deg, set timeout {po.set_timeout:g} s"
    )


def _science_rows(cfg: PipelineConfig) -> list[tuple[str, str]]:
    """The summary's rows for the per-file chain, specphot, polarimetry and difference images."""
    rows: list[tuple[str, str]] = []
    cal = cfg.calibrate
    if cal.calib_directory is None:
        caltxt = "no calib directory: bias subtraction only"
    else:
        caltxt = f"calib {_dir_state(cal.calib_directory)}; background {_onoff(cal.back_subtract)}, flat {_onoff(cal.flat_correct)}"
    caltxt += f", bad pixels {_onoff(cal.fix_bad_pixels)}"
    rows.append(("calibrate", caltxt))

    an = cfg.analysis
    ann = "" if an.phot_ann_rad is False else f", annulus {an.phot_ann_rad[0]:g}-{an.phot_ann_rad[1]:g} px"
    phot = f"photometry r={an.phot_aper_rad:g} px{ann}" if an.photometry else "photometry off"
    strehl = "strehl on" if an.strehl else "strehl off"
    if an.strehl and cfg.planetary:
        strehl += " (but planetary: no synthetic PSF, no Strehl)"
    rows.append(("analysis", f"{phot}; {strehl}; psf model {_onoff(an.fit_psf_model)}; window {an.window_size} px"))

    fs = cfg.frame_select
    rows.append(
        ("frame_select", f"on: {fs.metric}, discard {fs.cutoff:.0%} of each file" if fs.frame_select else "off")
    )
    al = cfg.align
    side = _pad_side(al.crop_width) if al.pad else al.crop_width
    rows.append(
        (
            "align",
            (f"on: {al.method}" if al.align else "off (fixed centres)")
            + f", crop {al.crop_width} px, pad {_onoff(al.pad)} -> {side} px"
            + (", reproject cam2" if al.reproject else ""),
        )
    )
    co = cfg.coadd
    if co.coadd:
        rows.append(("coadd", f"on: {co.method}" + (f", recenter {co.recenter_method}" if co.recenter else "")))
    else:
        rows.append(("coadd", "off (cubes kept)"))

    sp = cfg.specphot
    if sp.unit == "e-/s":
        sptxt = "e-/s (no flux calibration)"
    elif sp.source_kind in ("pickles", "file"):
        src = "pickles" if sp.source_kind == "pickles" else f"spectrum {sp.source}"
        if sp.source_kind == "file" and not Path(sp.source).exists():
            src += " (MISSING)"
        sptxt = f"{sp.unit} from {src} {sp.sptype} {sp.mag_band}={sp.mag:g}; flux {sp.flux_metric}"
    else:
        sptxt = f"{sp.unit} from {sp.source}"
    if sp.sequence_files:
        sptxt += f"; sequence calibration every {sp.sequence_files} files"
    rows.append(("specphot", sptxt))

    if cfg.polarimetry:
        rows.append(("polarimetry", _polarimetry_text(cfg.polarimetry)))
    di = cfg.diff_images
    rows.append(("diff_images", "off" if not di.make_diff else "single" + (" + double" if di.save_double else "")))
    return rows


def summarize(cfg: PipelineConfig, path: str | Path | None = None, ok: bool = True) -> str:
    """A short human summary of what a run with ``cfg`` will do (one ``label  text`` line each),
    the data files and where they were found; the last line says whether it can run."""
    rows: list[tuple[str, str]] = []
    versions = f"vampd {cfg.vampd_version}, dpp schema {cfg.dpp_version}"
    rows.append(("config", f"{path}" if path else "(in memory)"))
    rows.append(("name", f'"{cfg.name}"' + ("  (empty: products will start with '_')" if not cfg.name else "")))
    rows.append(("hash", f"{cfg.config_hash()}  ({versions})"))
    mode = "PDI " + cfg.polarimetry.method if cfg.polarimetry else "imaging (no PDI)"
    extras = [m for m, on in (("coronagraphic", cfg.coronagraphic), ("planetary", cfg.planetary)) if on]
    rows.append(("mode", mode + (" + " + ", ".join(extras) if extras else "") + f"; combine {cfg.combine.method}"))
    if cfg.target:
        t = cfg.target
        rows.append(("target", f"{t.name} {t.ra} {t.dec} (parallax {t.parallax:g} mas)"))
    else:
        rows.append(("target", "header coordinates"))

    rows += _science_rows(cfg)
    rows.append(("adi cubes", _onoff(cfg.save_adi_cubes)))
    data_dir = resolve_data_dir(cfg)
    if cfg.data_dir is not None:
        rows.append(("data dir", _dir_state(data_dir)))
    elif data_dir is not None:
        rows.append(("data dir", _dir_state(data_dir) + " [from $VAMPD_DATA_DIR]"))
    else:
        rows.append(("data dir", "not set (neither data_dir nor $VAMPD_DATA_DIR)"))
    rows += [("", f"{name}: {where}") for name, where in data_report(cfg)]

    w = cfg.watch
    inputs = ", ".join(_dir_state(p) for p in w.inputs) if w.inputs else "none in file (give -i DIR)"
    rows.append(("watch", f"inputs {inputs}"))
    mem = f"{w.memory_limit_gb:g} GB" if w.memory_limit_gb else f"{w.effective_memory_limit_gb():.1f} GB (50% RAM)"
    rows.append(
        (
            "",
            f"outdir {w.outdir or '(config directory)'}; {w.workers} workers, "
            f"{f'poll every {w.poll_interval:g}s' if w.poll else 'inotify'}, patterns {' '.join(w.patterns)}, "
            f"memory {mem}",
        )
    )
    width = max(len(k) for k, _ in rows)
    verdict = (
        "OK: configuration is valid" if ok else "NOT OK: the configuration is valid but cannot run (see the errors)"
    )
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows) + "\n" + verdict

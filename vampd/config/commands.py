"""``vampd new`` and ``vampd check``."""

from __future__ import annotations

import argparse
import math
import re
import sys
import warnings
from pathlib import Path

from vampd.config.io import ConfigFileError, load_config
from vampd.config.models import ConfigError, ConfigWarning, PipelineConfig, resolve_data_dir
from vampd.config.presets import PRESETS, render_preset

__all__ = ["cmd_new", "cmd_check", "summarize", "default_name"]


def default_name(path: str | Path) -> str:
    """A filename-friendly config name from a file name: its stem, odd characters replaced by ``_``."""
    stem = Path(path).name
    for suffix in (".toml", ".TOML"):
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", stem).strip("_") or "vampd"


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
    """Load and validate ``args.config`` and print what a run will do.

    Returns 0 if valid, 1 if invalid (message on stderr), 2 if the file is missing or not TOML.
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
    print(summarize(cfg, path))
    _print_warnings(caught)
    return 0


def _print_warnings(caught: list) -> None:
    for w in caught:
        if issubclass(w.category, ConfigWarning):
            print(f"warning: {w.message}", file=sys.stderr)


def _onoff(flag: bool) -> str:
    return "on" if flag else "off"


def _dir_state(p: Path | None) -> str:
    if p is None:
        return "not set"
    return f"{p} ({'exists' if p.is_dir() else 'MISSING'})"


def _pad_side(crop: int) -> int:
    npad = 2 * math.floor((crop / 2) * (math.sqrt(2) - 1) / 2)
    return crop + 2 * npad


def summarize(cfg: PipelineConfig, path: str | Path | None = None) -> str:
    """A short human summary of what a run with ``cfg`` will do (one ``label  text`` line each)."""
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
        po = cfg.polarimetry
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
        rows.append(
            (
                "polarimetry",
                f"{po.method}, derotate {_onoff(po.derotate)}, MM {mm}, IP {ip}, {po.cyl_stokes}; "
                f"HWP tolerance {po.hwp_tolerance:g} deg, set timeout {po.set_timeout:g} s",
            )
        )
    di = cfg.diff_images
    rows.append(
        ("diff_images", "off" if not di.make_diff else "single" + (" + double" if di.save_double else ""))
    )
    rows.append(("adi cubes", _onoff(cfg.save_adi_cubes)))
    data_dir = resolve_data_dir(cfg)
    if cfg.data_dir is not None:
        rows.append(("data dir", _dir_state(data_dir)))
    elif data_dir is not None:
        rows.append(("data dir", _dir_state(data_dir) + " [from $VAMPD_DATA_DIR]"))
    else:
        rows.append(("data dir", "not set (neither data_dir nor $VAMPD_DATA_DIR)"))

    w = cfg.watch
    inputs = ", ".join(_dir_state(p) for p in w.inputs) if w.inputs else "none in file (give -i DIR)"
    rows.append(("watch", f"inputs {inputs}"))
    mem = f"{w.memory_limit_gb:g} GB" if w.memory_limit_gb else f"{w.effective_memory_limit_gb():.1f} GB (50% RAM)"
    rows.append(
        (
            "",
            f"outdir {w.outdir or '(config directory)'}; {w.workers} workers, "
            f"{'poll every %gs' % w.poll_interval if w.poll else 'inotify'}, patterns {' '.join(w.patterns)}, "
            f"memory {mem}",
        )
    )
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows) + "\nOK: configuration is valid"

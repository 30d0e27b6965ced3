"""Commented configuration templates for ``vampd new`` (and the files in ``configs/``).

Each preset is a set of overrides of the model defaults; :func:`render_preset` writes every option of
every section with a short comment an observer can act on, and the result is validated before it is
returned. ``configs/{preset}.toml`` in the repository are exactly ``render_preset(preset, preset)``
(regenerate them with ``python -m vampd.config.presets configs``).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from vampd import __version__
from vampd.config.models import (
    DATA_DIR_ENV,
    DPP_COMPAT_VERSION,
    PipelineConfig,
)

__all__ = ["PRESETS", "render_preset", "preset_config", "write_preset_files"]

#: preset name -> one-line description
PRESETS: dict[str, str] = {
    "quicklook": "imaging: calibrate, PSF metrics with Strehl, register and coadd each file; no PDI",
    "pdi-triplediff": "polarimetry with HWP, FLC and both cameras (16 files per HWP set)",
    "pdi-doublediff": "polarimetry with HWP and both cameras, no FLC (8 files per HWP set)",
    "mbi": "multiband imaging (fields F610/F670/F720/F760): per-field metrics, registration and coadds",
    "coronagraphic": "coronagraphic imaging: satellite-spot photometry and registration, no frame selection",
}

_POL_COMMON = {
    "derotate": True,
    "mm_correct": True,
    "hwp_adi_sync": True,
    "use_ideal_mm": False,
    "ip_correct": True,
    "ip_method": "aperture",
    "ip_radius": 15.0,
    "cyl_stokes": "azimuthal",
}

_OVERRIDES: dict[str, dict[str, Any]] = {
    "quicklook": {
        "align": {"crop_width": 256},
    },
    "pdi-triplediff": {
        "align": {"crop_width": 256},
        "diff_images": {"make_diff": True, "save_double": True},
        "polarimetry": {"method": "triplediff", **_POL_COMMON},
    },
    "pdi-doublediff": {
        "align": {"crop_width": 256},
        "diff_images": {"make_diff": True, "save_double": False},
        "polarimetry": {"method": "doublediff", **_POL_COMMON},
    },
    "mbi": {
        "align": {"crop_width": 536, "pad": False},
    },
    "coronagraphic": {
        "coronagraphic": True,
        "analysis": {"strehl": False},
        "frame_select": {"frame_select": False, "metric": "normvar"},
        "align": {"crop_width": 256},
    },
}

# ---------------------------------------------------------------------------------------------------------
# comments

_HEADER = """\
# vampd configuration -- preset "{preset}": {description}
# Written by `vampd new` (vampd {version}). Check it with `vampd check FILE`; it prints what the night will
# do. Relative paths are relative to this file's directory. Keys left commented out take their default.
"""

_SECTION_NOTES: dict[str, str] = {
    "": "",
    "target": (
        "Target coordinates for precise parallactic angles (proper motion/parallax applied). Without this\n"
        "section the header RA/DEC are used. Uncomment and fill in to use it."
    ),
    "combine": (
        "How files are grouped. vampd streams per file and forms HWP sets from the per-file products,\n"
        'so keep "cube" (one group per raw file) also for polarimetry.'
    ),
    "calibrate": "Basic calibration: background or bias, flat, bad pixels, camera flip, conversion to e-/s.",
    "analysis": "Per-frame PSF metrics (written to metrics/*.npz): photometry, centroids, Strehl.",
    "frame_select": "Frame selection: discard the worst frames of each file by a quality metric.",
    "align": "Registration: crop each field around its PSF and shift it to the frame centre.",
    "coadd": "Collapse each registered file along time (the normal per-file product, coadded/).",
    "specphot": "Flux calibration: e-/s (none), contrast, Jy or Jy/arcsec^2.",
    "diff_images": "Quick diagnostic difference images (cam1 - cam2, and FLC A - B), not derotated.",
    "polarimetry": (
        "Polarimetric differential imaging; the presence of this section turns PDI on. Sets are formed\n"
        "from the per-file products as the HWP cycles; Stokes products update after each complete set."
    ),
    "no_polarimetry": (
        "[polarimetry] -- absent: no PDI. Add the section to enable it (see `vampd new --preset\npdi-triplediff`)."
    ),
    "watch": "vampd: directory watcher and worker pool (`vampd watch` options override these).",
    "alerts": "vampd: thresholds of the alerts shown by `vampd live`.",
}

_COMMENTS: dict[tuple[str, str], str] = {
    ("", "name"): "filename-friendly name prefixed to every product, e.g. 20240115_HD169142",
    ("", "vampd_version"): "vampd version this file was written for (checked when loaded)",
    ("", "dpp_version"): f"vampires_dpp schema this file follows ({DPP_COMPAT_VERSION}; keeps it readable by dpp)",
    ("", "coronagraphic"): "true behind a coronagraph: PSF metrics come from the four satellite spots",
    ("", "planetary"): "true for resolved targets (planets): no synthetic-PSF template, so no DFT centroid/Strehl",
    ("", "save_adi_cubes"): "write ADI cubes and derotation angles at finalize",
    ("", "data_dir"): f"directory with filter curves, zero points, Pickles atlas, Vega (default: ${DATA_DIR_ENV})",
    ("target", "name"): "SIMBAD-friendly name",
    ("target", "ra"): "right ascension, sexagesimal hours",
    ("target", "dec"): "declination, sexagesimal degrees",
    ("target", "parallax"): "mas",
    ("target", "pm_ra"): "mas/yr (times cos dec)",
    ("target", "pm_dec"): "mas/yr",
    ("target", "frame"): "coordinate frame",
    ("target", "obstime"): "epoch of the coordinates (Gaia DR3: J2016)",
    ("combine", "method"): '"cube" (recommended) or "pdi" (reference behaviour: group by HWP angle)',
    ("combine", "save_intermediate"): "write combined cubes to combined/ (large!)",
    ("calibrate", "calib_directory"): "masters from `vampd calib`; unset -> bias subtraction only",
    ("calibrate", "back_subtract"): "subtract the matching background (dark/sky); bias if none matches",
    ("calibrate", "flat_correct"): "divide by the matching flat, if one is found",
    ("calibrate", "fix_bad_pixels"): "sigma-clip and replace bad pixels (costs time)",
    ("calibrate", "save_intermediate"): "write calibrated cubes to calibrated/ (large!)",
    ("analysis", "fit_psf_model"): 'fit a Moffat model to every frame (slow; needed for method "model")',
    ("analysis", "psf_model"): 'only "moffat"',
    ("analysis", "photometry"): "aperture photometry of each PSF (needed for flux trends and specphot)",
    ("analysis", "phot_aper_rad"): "aperture radius, pixels",
    ("analysis", "phot_ann_rad"): "false, or [r_in, r_out] in pixels for a local-background annulus",
    ("analysis", "strehl"): 'Strehl ratio against the synthetic PSF (needed for metric "strehl")',
    ("analysis", "window_size"): "cutout side around each PSF, pixels (21 avoids most of the halo)",
    ("frame_select", "frame_select"): "turn frame selection on",
    ("frame_select", "metric"): '"strehl", "max" (= "peak"), "l2norm" or "normvar"; higher is better',
    ("frame_select", "cutoff"): "fraction of frames to discard, 0..1 (0.2 = worst 20 %)",
    ("frame_select", "save_intermediate"): "write selected cubes to selected/ (large!)",
    ("align", "align"): "register every frame (false: fixed centres from the centroid file/defaults)",
    ("align", "pad"): "pad with NaN so derotation keeps the corners (output side = crop + 2*pad)",
    ("align", "method"): '"dft" (cross-correlation, best), "com", "peak" or "model"',
    ("align", "crop_width"): "crop side in pixels, about the field of view (536 = a full MBI field)",
    ("align", "reproject"): "warp cam2 onto cam1 astrometry (needs centroid files with 4 spots)",
    ("align", "save_intermediate"): "write registered cubes to aligned/ (large!)",
    ("coadd", "coadd"): "collapse each file (false keeps cubes; then set align.save_intermediate)",
    ("coadd", "method"): '"median", "mean", "varmean" or "biweight"',
    ("coadd", "recenter"): "re-measure the centre on the coadded image and shift it to the frame centre",
    ("coadd", "recenter_method"): '"dft", "com" or "peak" ("model" needs fit_psf_model)',
    ("specphot", "unit"): '"e-/s", "contrast", "Jy" or "Jy/arcsec^2"',
    ("specphot", "source"): '"zeropoints" (tabulated), "pickles" (model for sptype) or a spectrum file',
    ("specphot", "sptype"): 'spectral type for pickles, e.g. "G2V"',
    ("specphot", "mag"): "reference magnitude of the star (Vega)",
    ("specphot", "mag_band"): '"U", "B", "V", "r", "i", "J", "H" or "K"',
    ("specphot", "flux_metric"): '"photometry" (aperture sum) or "sum" (window sum)',
    ("specphot", "sequence_files"): "vampd: calibrate a sequence after this many files of one target/filter",
    ("diff_images", "make_diff"): "single differences cam1 - cam2",
    ("diff_images", "save_double"): "double differences with the FLC (needs an FLC)",
    ("polarimetry", "method"): '"triplediff" (HWP x FLC x camera), "doublediff" (HWP x camera, no FLC) or "leastsq"',
    ("polarimetry", "derotate"): "derotate to north up, east left (required by mm_correct)",
    ("polarimetry", "mm_correct"): "correct instrumental polarisation and cross-talk with the Mueller model",
    ("polarimetry", "hwp_adi_sync"): "the HWP tracked the pupil (SYNCHRO_ADI); usual on-sky mode",
    ("polarimetry", "use_ideal_mm"): "true: ideal optics; false: fitted parameters from mm_table (ideal if none)",
    ("polarimetry", "ip_correct"): "remove residual IP measured around the frame centre",
    ("polarimetry", "ip_method"): '"aperture" or "annulus" (annulus needs ip_radius2)',
    ("polarimetry", "ip_radius"): "aperture radius / annulus inner radius, pixels",
    ("polarimetry", "ip_radius2"): "annulus outer radius, pixels",
    ("polarimetry", "cyl_stokes"): '"azimuthal" (Q_phi, U_phi) or "radial" (Q_r, U_r)',
    ("polarimetry", "hwp_tolerance"): "vampd: degrees an HWP angle may differ from 0/22.5/45/67.5",
    ("polarimetry", "set_timeout"): "vampd: seconds after which an incomplete HWP set is given up",
    ("polarimetry", "mm_table"): "vampd: CSV of fitted Mueller-model parameters (never downloaded)",
    ("polarimetry", "leastsq_max_cond"): "vampd leastsq: pixels with a worse HWP coverage (condition number) are NaN",
    ("polarimetry", "leastsq_refresh_files"): "vampd leastsq: rewrite the running products every N cubes",
    ("polarimetry", "leastsq_refresh_seconds"): "vampd leastsq: ... or every this many seconds",
    ("polarimetry", "leastsq_weights"): 'vampd leastsq: "equal" (unbiased; sandwich errors) or "ivar" (1/sigma^2)',
    ("polarimetry", "leastsq_snr_annulus"): "vampd leastsq: [r_in, r_out] px of the Q_phi S/N (default ip_radius, N/2)",
    ("watch", "inputs"): "directories to watch (or give -i DIR to `vampd watch`)",
    ("watch", "outdir"): "output directory (default: this file's directory)",
    ("watch", "patterns"): "raw file name patterns",
    ("watch", "recursive"): "also watch sub-directories",
    ("watch", "poll"): "poll instead of inotify (needed on NFS/CIFS mounts)",
    ("watch", "poll_interval"): "seconds between polls",
    ("watch", "complete_timeout"): "seconds after which a file that never completes is failed",
    ("watch", "settle_time"): "seconds a file must stay unchanged before it is read",
    ("watch", "workers"): "parallel worker processes",
    ("watch", "expect_sidecar"): "wait for the NAME.txt sidecar (one line per frame) before reading",
    ("watch", "max_tries"): "attempts per file before it is marked failed",
    ("watch", "memory_factor"): "memory reserved per job = cube size x this",
    ("watch", "memory_limit_gb"): "memory budget for all jobs, GB (default: half of the RAM)",
    ("watch", "queue_size"): "maximum queued files",
    ("watch", "reconcile_interval"): "seconds between re-scans that catch missed file events",
    ("watch", "stop_timeout"): "seconds to let running jobs finish on shutdown",
    ("alerts", "lag_seconds"): "one camera this many seconds behind the other -> alert",
    ("alerts", "flc_imbalance"): "fractional FLC A/B count difference -> alert",
    ("alerts", "hwp_grid_tolerance"): "degrees an HWP angle may be off the 22.5-degree grid",
    ("alerts", "idle_seconds"): "no new file for this long -> alert",
    ("alerts", "strehl_drop"): "Strehl below (1 - this) x running median -> alert",
    ("alerts", "flux_drop"): "flux below (1 - this) x running median -> alert",
    ("alerts", "disk_free_gb"): "free space on the output disk below this -> alert",
}

# shown commented-out for options whose value is unset (None)
_EXAMPLES: dict[tuple[str, str], Any] = {
    ("", "data_dir"): "/path/to/vampd-data",
    ("calibrate", "calib_directory"): "calib",
    ("specphot", "sptype"): "G2V",
    ("specphot", "mag"): 5.0,
    ("specphot", "mag_band"): "V",
    ("specphot", "sequence_files"): 16,
    ("polarimetry", "ip_radius2"): 25.0,
    ("polarimetry", "mm_table"): "mm_params.csv",
    ("polarimetry", "leastsq_snr_annulus"): [15.0, 40.0],
    ("watch", "outdir"): "reduced",
    ("watch", "memory_limit_gb"): 16.0,
}

_TARGET_EXAMPLE = {
    "name": "HD 169142",
    "ra": "18:24:29.78",
    "dec": "-29:46:49.3",
    "parallax": 8.7,
    "pm_ra": -2.4,
    "pm_dec": -40.0,
    "frame": "icrs",
    "obstime": "J2016",
}

_SECTIONS = ("combine", "calibrate", "analysis", "frame_select", "align", "coadd", "specphot", "diff_images")
_TOP = ("name", "vampd_version", "dpp_version", "coronagraphic", "planetary", "save_adi_cubes", "data_dir")


def _value(v: Any) -> str:
    """TOML literal of a simple value (inline arrays, so templates stay one key per line)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            raise ValueError(f"cannot write {v} to TOML")
        return repr(v)
    if isinstance(v, (str, Path)):
        return json.dumps(str(v))  # a JSON string is a valid TOML basic string
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} in a template")


def _lines_for(section: str, values: dict[str, Any], fields: list[str], commented: bool = False) -> list[str]:
    out = []
    for key in fields:
        comment = _COMMENTS.get((section, key))
        if comment:
            out.append(f"# {comment}")
        v = values.get(key)
        if v is None:
            ex = _EXAMPLES.get((section, key))
            out.append(f"# {key} = {_value(ex)}" if ex is not None else f"# {key} =")
        else:
            out.append(f"{'# ' if commented else ''}{key} = {_value(v)}")
    return out


def _comment_block(text: str) -> list[str]:
    return [f"# {line}" if line else "#" for line in text.splitlines()]


def preset_config(name: str, config_name: str | None = None) -> PipelineConfig:
    """The :class:`PipelineConfig` of a preset (``name`` as the config's name unless given)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; expected one of {', '.join(PRESETS)}")
    data = {"name": name if config_name is None else config_name, **_OVERRIDES[name]}
    return PipelineConfig(**data)


def render_preset(name: str, config_name: str) -> str:
    """A commented TOML template for preset ``name`` with ``name = config_name``.

    Every option of every section is written (unset ones commented out with an example value), each
    with a one-line explanation. The text is validated (by loading it back) before it is returned.

    Raises
    ------
    ValueError
        Unknown preset name.
    ConfigError
        ``config_name`` is not filename-friendly.
    """
    cfg = preset_config(name, config_name)
    dump = cfg.model_dump(mode="json")
    lines = _HEADER.format(preset=name, description=PRESETS[name], version=__version__).splitlines()
    lines.append("")
    lines += _lines_for("", dump, list(_TOP))

    # [target]: commented-out example
    lines.append("")
    lines += _comment_block(_SECTION_NOTES["target"])
    lines.append("# [target]")
    lines += _lines_for("target", _TARGET_EXAMPLE, list(_TARGET_EXAMPLE), commented=True)

    for section in _SECTIONS:
        lines.append("")
        lines += _comment_block(_SECTION_NOTES[section])
        lines.append(f"[{section}]")
        lines += _lines_for(section, dump[section], list(type(getattr(cfg, section)).model_fields))

    lines.append("")
    if cfg.polarimetry is None:
        lines += _comment_block(_SECTION_NOTES["no_polarimetry"])
    else:
        lines += _comment_block(_SECTION_NOTES["polarimetry"])
        lines.append("[polarimetry]")
        lines += _lines_for("polarimetry", dump["polarimetry"], list(type(cfg.polarimetry).model_fields))

    for section in ("watch", "alerts"):
        lines.append("")
        lines += _comment_block(_SECTION_NOTES[section])
        lines.append(f"[{section}]")
        lines += _lines_for(section, dump[section], list(type(getattr(cfg, section)).model_fields))

    text = "\n".join(lines) + "\n"

    # the template must load back to exactly the preset's configuration
    from vampd.config.io import config_from_toml_str

    back = config_from_toml_str(text, source=f"preset {name}")
    if back != cfg:  # pragma: no cover - a bug in this module
        raise RuntimeError(f"preset {name!r} does not round-trip through its template")
    return text


def write_preset_files(directory: str | Path) -> list[Path]:
    """Write ``{directory}/{preset}.toml`` for every preset (name = preset name)."""
    from vampd.fitsio import atomic_write

    directory = Path(directory)
    written = []
    for name in PRESETS:
        text = render_preset(name, name)
        written.append(atomic_write(directory / f"{name}.toml", lambda tmp, t=text: tmp.write_text(t)))
    return written


if __name__ == "__main__":  # python -m vampd.config.presets DIR
    for p in write_preset_files(sys.argv[1] if len(sys.argv) > 1 else "configs"):
        print(p)

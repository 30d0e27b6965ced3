"""Pydantic models of the vampd configuration.

The schema is the reference pipeline's (vampires_dpp 0.14, docs/instrument.md §11.3) so that its TOML files load
unchanged, plus vampd-only options (``vampd_version``, ``data_dir``, ``[watch]``, ``[alerts]`` and a few
extra keys in ``[polarimetry]`` and ``[specphot]``), all optional with defaults.

Departures from the reference, all deliberate:

* unknown keys are not silently ignored: each one produces a :class:`ConfigWarning` naming it;
* invalid values raise :class:`ConfigError` (a ``ValueError``) whose message names ``section.field``,
  the value and what is allowed;
* frame-select metric accepts both ``max`` and ``peak`` (ref bug docs/instrument.md §13.5);
* cross-field rules the reference forgot are enforced (annulus IP radii, zeropoints cannot give
  contrast, annulus radii ordered, at least one product written, recenter method ``model``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import warnings
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from vampd import __version__

__all__ = [
    "DPP_COMPAT_VERSION",
    "ConfigError",
    "ConfigWarning",
    "parse_version",
    "TargetConfig",
    "CombineConfig",
    "CalibrateConfig",
    "AnalysisConfig",
    "FrameSelectConfig",
    "AlignConfig",
    "CoaddConfig",
    "SpecphotConfig",
    "DiffImageConfig",
    "NRMConfig",
    "PolarimetryConfig",
    "WatchConfig",
    "AlertsConfig",
    "PipelineConfig",
    "STAGES",
    "FRAME_SELECT_METRIC_KEYS",
    "resolve_data_dir",
]

#: The reference pipeline version whose configuration schema vampd implements.
DPP_COMPAT_VERSION = "0.14.3"

#: Frame-select metric name (config) -> per-frame metrics key (docs/instrument.md §4).
FRAME_SELECT_METRIC_KEYS = {"max": "max", "peak": "max", "l2norm": "var", "normvar": "nvar", "strehl": "strehl"}

#: Environment variable naming the data directory when the config does not.
DATA_DIR_ENV = "VAMPD_DATA_DIR"


# ---------------------------------------------------------------------------------------------------------
# errors and warnings


class ConfigWarning(UserWarning):
    """A configuration is usable but something in it is ignored or suspicious (e.g. an unknown key)."""


class ConfigError(ValueError):
    """An invalid configuration.

    ``problems`` holds one line per problem, each naming ``section.field``, the value found and what is
    allowed; ``source`` is the file (or other origin) when known.
    """

    _headline: ClassVar[str] = "invalid configuration"

    def __init__(self, problems: list[str] | str, source: str | os.PathLike | None = None):
        if isinstance(problems, str):
            problems = [problems]
        self.problems = list(problems)
        self.source = None if source is None else str(source)
        where = f" in {self.source}" if self.source else ""
        if len(self.problems) == 1:
            msg = f"{self._headline}{where}: {self.problems[0]}"
        else:
            msg = f"{self._headline}{where} ({len(self.problems)} problems):\n" + "\n".join(
                f"  {p}" for p in self.problems
            )
        super().__init__(msg)

    @classmethod
    def from_validation_error(
        cls, exc: ValidationError, prefix: str = "", source: str | os.PathLike | None = None
    ) -> ConfigError:
        """Turn a pydantic ``ValidationError`` into readable ``section.field = value: problem`` lines."""
        lines: list[str] = []
        seen: set[str] = set()
        for err in exc.errors(include_url=False):
            path = _loc_to_path(err.get("loc", ()), prefix)
            msg = _readable_message(err)
            if err.get("type") == "vampd_rule":
                lines.extend(msg.splitlines())  # cross-field rules already name their fields
                continue
            elif err.get("type") == "missing":
                line = f"{path}: required key missing"
            elif path:
                line = f"{path} = {_toml_repr(err.get('input'))}: {msg}"
            else:
                line = msg
            if path in seen and err.get("type") != "vampd_rule":
                continue  # one line per field (unions report once per branch)
            seen.add(path)
            lines.append(line)
        return cls(lines or [str(exc)], source=source)


def _loc_to_path(loc: tuple, prefix: str) -> str:
    parts: list[str] = [prefix] if prefix else []
    for item in loc:
        if isinstance(item, int):
            if parts:
                parts[-1] += f"[{item}]"
            else:
                parts.append(f"[{item}]")
        elif re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", str(item)):
            parts.append(str(item))
        # anything else is a union branch tag like "literal['a','b']" or "function-after[...]"
    return ".".join(parts)


def _readable_message(err: dict) -> str:
    msg = str(err.get("msg", ""))
    for head in ("Value error, ", "Assertion failed, "):
        if msg.startswith(head):
            msg = msg[len(head) :]
    if msg.startswith("Input should be"):
        msg = "must be" + msg[len("Input should be") :]
    return msg


def _toml_repr(value: Any) -> str:
    """A value as it would be written in TOML (for messages)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (str, Path)):
        return json.dumps(str(value))
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_repr(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml_repr(v)}" for k, v in value.items()) + "}"
    if isinstance(value, BaseModel):
        return f"<{type(value).__name__}>"
    return repr(value)


def _rule(message: str) -> PydanticCustomError:
    """A cross-field rule violation; ``message`` names all fields involved."""
    return PydanticCustomError("vampd_rule", message)


# ---------------------------------------------------------------------------------------------------------
# reusable constrained types (custom messages: "must be between 0 and 1")


def _fmt_num(x: float) -> str:
    return f"{x:g}"


def _bounded(lo: float | None = None, hi: float | None = None, lo_open: bool = False, hi_open: bool = False):
    def check(v):
        if v is None:
            return v
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError("must be a finite number")
        bad = (lo is not None and (v <= lo if lo_open else v < lo)) or (
            hi is not None and (v >= hi if hi_open else v > hi)
        )
        if bad:
            lo_txt = None if lo is None else _fmt_num(lo) + (" (excluded)" if lo_open else "")
            hi_txt = None if hi is None else _fmt_num(hi) + (" (excluded)" if hi_open else "")
            if lo_txt and hi_txt:
                raise ValueError(f"must be between {lo_txt} and {hi_txt}")
            if lo_txt:
                raise ValueError(f"must be {'>' if lo_open else '>='} {_fmt_num(lo)}")
            raise ValueError(f"must be {'<' if hi_open else '<='} {_fmt_num(hi)}")
        return v

    return AfterValidator(check)


PositiveFloat = Annotated[float, _bounded(0, lo_open=True)]
NonNegFloat = Annotated[float, _bounded(0)]
Fraction = Annotated[float, _bounded(0, 1)]
PositiveFraction = Annotated[float, _bounded(0, 1, lo_open=True)]
PositiveInt = Annotated[int, _bounded(1)]

_VERSION_RE = re.compile(r"^\s*v?(\d+)\.(\d+)(?:\.(\d+))?")


def parse_version(text: str) -> tuple[int, int, int]:
    """Parse ``MAJOR.MINOR[.PATCH][suffix]`` into three ints (missing PATCH = 0; suffixes ignored).

    Raises
    ------
    ValueError
        If ``text`` does not start with ``MAJOR.MINOR``.
    """
    m = _VERSION_RE.match(str(text))
    if not m:
        raise ValueError(f"{text!r} is not a version of the form MAJOR.MINOR.PATCH")
    return int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)


def _check_version_string(v: str | None) -> str | None:
    if v is not None:
        parse_version(v)
    return v


VersionStr = Annotated[str, AfterValidator(_check_version_string)]


# ---------------------------------------------------------------------------------------------------------
# base model: unknown keys warn, errors become ConfigError


def _did_you_mean(key: str, known) -> str:
    """``"; did you mean `cutoff`?"`` for the nearest known key (difflib), else ``""``."""
    import difflib

    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.75)
    return f"; did you mean `{close[0]}`?" if close else ""


class _Model(BaseModel):
    """Common behaviour: unknown keys warn (naming them); invalid assignments raise ConfigError.

    (Sections are validated by pydantic directly, so constructing one alone raises pydantic's
    ``ValidationError``; :class:`PipelineConfig` and the loaders raise :class:`ConfigError`.)
    """

    model_config = ConfigDict(extra="ignore", validate_assignment=True, populate_by_name=True)

    #: dotted prefix used in messages (the TOML table name); "" for the top level
    _section: ClassVar[str] = ""

    def __setattr__(self, name: str, value: Any) -> None:
        try:
            super().__setattr__(name, value)
        except ValidationError as exc:
            raise ConfigError.from_validation_error(exc, prefix=self._section) from None

    @model_validator(mode="before")
    @classmethod
    def _warn_unknown_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key in data:
                if key not in cls.model_fields:
                    where = f"{cls._section}.{key}" if cls._section else str(key)
                    kind = "section" if isinstance(data[key], dict) and not cls._section else "key"
                    shown = f"[{where}]" if kind == "section" else where
                    warnings.warn(f"unknown {kind} {shown} ignored{_did_you_mean(str(key), cls.model_fields)}",
                                  ConfigWarning, stacklevel=2)
        return data


# ---------------------------------------------------------------------------------------------------------
# sections (reference schema)


class TargetConfig(_Model):
    """Astronomical coordinates of the target; absent -> header coordinates are used."""

    _section: ClassVar[str] = "target"

    name: str = Field(description="SIMBAD-friendly target name")
    ra: str = Field(description="Right ascension in sexagesimal hours, e.g. '18:24:29.78'")
    dec: str = Field(description="Declination in sexagesimal degrees, e.g. '-29:46:49.3'")
    parallax: PositiveFloat = Field(description="Parallax of the system in mas (distance = 1000/parallax pc)")
    pm_ra: float = Field(0.0, description="Proper motion of the RA axis (times cos dec) in mas/yr")
    pm_dec: float = Field(0.0, description="Proper motion of the Dec axis in mas/yr")
    frame: str = Field("icrs", description="Coordinate reference frame")
    obstime: str = Field("J2016", description="Epoch of the coordinates (J2016 coincides with Gaia DR3)")

    @field_validator("ra")
    @classmethod
    def _check_ra(cls, v: str) -> str:
        _parse_sexagesimal(v, 0.0, 24.0, "hours", "'18:24:29.78'")
        return v

    @field_validator("dec")
    @classmethod
    def _check_dec(cls, v: str) -> str:
        _parse_sexagesimal(v, -90.0, 90.0, "degrees", "'-29:46:49.3'")
        return v


def _parse_sexagesimal(text: str, lo: float, hi: float, unit: str, example: str) -> float:
    what = f"{unit} within [{_fmt_num(lo)}, {_fmt_num(hi)}], e.g. {example}"
    parts = re.split(r"[:\s hdms°'\"]+", text.strip())
    parts = [p for p in parts if p != ""]
    if not 1 <= len(parts) <= 3:
        raise ValueError(f"must be sexagesimal {what}")
    try:
        nums = [float(p) for p in parts]
    except ValueError:
        raise ValueError(f"must be sexagesimal {what}") from None
    sign = -1.0 if text.strip().startswith("-") else 1.0
    value = sign * sum(abs(n) / 60**i for i, n in enumerate(nums))
    if not lo <= value <= hi or any(not 0 <= abs(n) < 60 for n in nums[1:]):
        raise ValueError(f"must be sexagesimal {what}")
    return value


class CombineConfig(_Model):
    """How raw files are grouped. Every cube is reduced on arrival; with "pdi" the cubes of one HWP
    block (one camera and FLC state at one HWP angle, docs/instrument.md §7.1) are also coadded together and the
    block product is the HWP-set member; with "cube" the k-th cube of each block forms the k-th set."""

    _section: ClassVar[str] = "combine"

    method: Literal["cube", "pdi"] = Field(
        "cube",
        description='"cube": each FITS cube is its own group; "pdi": combine all frames of one HWP angle',
    )
    save_intermediate: bool = Field(False, description="Save the combined cubes into combined/ (large!)")

    @model_validator(mode="after")
    def _warn_streaming(self) -> CombineConfig:
        # accepted so that reference configs load unchanged, but say plainly that they do nothing
        # "pdi" is streamed: cubes of one HWP block are coadded together (vampd.engine.blocks)
        if self.save_intermediate:
            warnings.warn(
                "combine.save_intermediate has no effect in vampd: files are not concatenated",
                ConfigWarning,
                stacklevel=2,
            )
        return self


class CalibrateConfig(_Model):
    """Basic image calibration: background/bias, flat, bad pixels, camera flip, e-/s."""

    _section: ClassVar[str] = "calibrate"

    calib_directory: Path | None = Field(
        None,
        description="Calibration file directory; if not provided no background/flat calibration is done "
        "(bias subtraction only). Relative paths are relative to the config file.",
    )
    back_subtract: bool = Field(
        True,
        description="Subtract matching background files from calib_directory; if none is found, subtract "
        "the detector bias",
    )
    flat_correct: bool = Field(False, description="Divide by a matching flat from calib_directory, if found")
    fix_bad_pixels: bool = Field(
        False, description="Run one iteration of adaptive sigma clipping per frame and correct bad pixels"
    )
    save_intermediate: bool = Field(False, description="Save calibrated cubes into calibrated/")


class AnalysisConfig(_Model):
    """Per-frame PSF analysis (metrics NPZ per file, arrays (nfields, npsfs, nframes))."""

    _section: ClassVar[str] = "analysis"

    fit_psf_model: bool = Field(False, description="Fit a PSF model to each window")
    psf_model: Literal["moffat"] = Field("moffat", description="PSF model (only Moffat is available)")
    photometry: bool = Field(True, description="Aperture photometry at the centroid of each PSF")
    phot_aper_rad: PositiveFloat = Field(8.0, description="Aperture radius in pixels for circular photometry")
    phot_ann_rad: Literal[False] | tuple[float, float] = Field(
        False,
        description="false, or [r_in, r_out] in pixels: subtract the local background measured in this annulus",
    )
    strehl: bool = Field(
        True,
        description="Measure the Strehl ratio by comparing the PSF peak to the synthetic PSF peak, each "
        "normalised by the aperture flux",
    )
    window_size: PositiveInt = Field(21, description="Side length in pixels of the cutout around each PSF")

    @field_validator("phot_ann_rad", mode="before")
    @classmethod
    def _check_ann(cls, v: Any) -> Any:
        if v is False:
            return v
        if isinstance(v, (list, tuple)) and len(v) == 2 and all(
            isinstance(x, (int, float)) and not isinstance(x, bool) for x in v
        ):
            r_in, r_out = float(v[0]), float(v[1])
            if not (math.isfinite(r_in) and math.isfinite(r_out)) or r_in < 0 or r_in >= r_out:
                raise ValueError("must be [r_in, r_out] with 0 <= r_in < r_out (pixels)")
            return (r_in, r_out)
        raise ValueError("must be false or [r_in, r_out] in pixels")

    @model_validator(mode="after")
    def _warn_overlap(self) -> AnalysisConfig:
        if self.phot_ann_rad is not False and self.phot_ann_rad[0] < self.phot_aper_rad:
            # legal in the reference, but the background annulus then overlaps the source aperture
            warnings.warn(
                f"analysis.phot_ann_rad inner radius {_fmt_num(self.phot_ann_rad[0])} is smaller than "
                f"analysis.phot_aper_rad = {_fmt_num(self.phot_aper_rad)}: the background annulus overlaps "
                "the aperture",
                ConfigWarning,
                stacklevel=2,
            )
        return self


class FrameSelectConfig(_Model):
    """Frame selection by a per-frame quality metric (higher is better for every metric)."""

    _section: ClassVar[str] = "frame_select"

    frame_select: bool = Field(False, description="Select frames of each cube by the metric below")
    metric: Literal["max", "peak", "l2norm", "normvar", "strehl"] = Field(
        "strehl",
        description='Frame-selection metric ("max" and "peak" are the same: the window maximum; "l2norm" '
        'is the window variance; "normvar" variance/mean; "strehl" needs analysis.strehl)',
    )
    cutoff: Fraction = Field(
        0.0,
        description="Cutoff quantile in [0, 1]: 0.2 discards the 20 % worst frames of each cube",
    )
    save_intermediate: bool = Field(False, description="Save the frame-selected cubes into selected/ (large!)")

    @property
    def metric_key(self) -> str:
        """The per-frame metrics key this metric reads (docs/instrument.md §4)."""
        return FRAME_SELECT_METRIC_KEYS[self.metric]


_CentroidMethod = Literal["dft", "com", "peak", "model"]


class AlignConfig(_Model):
    """Frame registration: crop each field around its centre, sub-pixel shift, optional padding."""

    _section: ClassVar[str] = "align"

    align: bool = Field(True, description="Align frames by the given method")
    pad: bool = Field(True, description="Pad the crop with NaN so that derotation does not lose corners")
    method: _CentroidMethod = Field(
        "dft",
        description='Centroid used for registration: "dft" (cross-correlation with the synthetic PSF), '
        '"com", "peak" or "model" (needs analysis.fit_psf_model)',
    )
    crop_width: PositiveInt = Field(
        536, description="Post-alignment crop width in pixels, roughly the field of view"
    )
    reproject: bool = Field(False, description="Reproject cam2 astrometry onto cam1 for better differences")
    save_intermediate: bool = Field(False, description="Save the registered cubes into aligned/ (large!)")


class CoaddConfig(_Model):
    """Collapse of each registered cube along time."""

    _section: ClassVar[str] = "coadd"

    coadd: bool = Field(True, description="Coadd each cube; if false the data are kept as cubes")
    method: Literal["median", "mean", "varmean", "biweight"] = Field("median", description="Collapse method")
    recenter: bool = Field(True, description="Measure the PSF centre in the coadded image and re-align it")
    recenter_method: _CentroidMethod = Field(
        "dft", description="Centroid method used by recenter (\"model\" needs analysis.fit_psf_model)"
    )


class SpecphotConfig(_Model):
    """Spectrophotometric calibration: conversion of e-/s into contrast or Jy."""

    _section: ClassVar[str] = "specphot"

    unit: Literal["e-/s", "contrast", "Jy", "Jy/arcsec^2"] = Field("e-/s", description="Output unit")
    source: Literal["pickles", "zeropoints"] | Path | None = Field(
        "zeropoints",
        description='Spectrum source: "zeropoints" (tabulated instrument zero points), "pickles" (Pickles '
        "model for sptype, normalised to mag in mag_band) or a path to a calibrated spectrum file",
    )
    sptype: str | None = Field(None, description="Stellar spectral type (Pickles atlas), for pickles sources")
    mag: float | None = Field(None, description="Reference magnitude of the star (Vega system)")
    mag_band: Literal["U", "B", "V", "r", "i", "J", "H", "K"] | None = Field(
        None, description="Band of the reference magnitude"
    )
    flux_metric: Literal["photometry", "sum"] = Field(
        "photometry",
        description='Frame statistic used as instrumental flux: "photometry" (aperture sum) or "sum" '
        "(sum in the analysis window)",
    )
    # vampd extra
    sequence_files: PositiveInt | None = Field(
        None,
        description="vampd: run the sequence calibration after this many files of a target/filter sequence",
    )

    @field_validator("source", mode="before")
    @classmethod
    def _check_source(cls, v: Any) -> Any:
        if v is None or isinstance(v, (str, Path)):
            if isinstance(v, str) and not v.strip():
                raise ValueError('must be "pickles", "zeropoints" or a path to a spectrum file')
            return v
        raise ValueError('must be "pickles", "zeropoints" or a path to a spectrum file')

    @property
    def source_kind(self) -> str | None:
        """``"zeropoints"``, ``"pickles"``, ``"file"`` or ``None``."""
        if self.source is None or self.source in ("pickles", "zeropoints"):
            return self.source  # type: ignore[return-value]
        return "file"

    @model_validator(mode="after")
    def _rules(self) -> SpecphotConfig:
        problems = []
        kind = self.source_kind
        if self.unit in ("Jy", "Jy/arcsec^2") and kind is None:
            problems.append(f'specphot.unit = "{self.unit}" needs a specphot.source ("zeropoints", "pickles" or a file)')
        if self.unit == "contrast" and kind in ("zeropoints", None):
            problems.append(
                f'specphot.unit = "contrast" cannot be produced from specphot.source = '
                f'{_toml_repr(self.source) if self.source is not None else "none"}: use "pickles" or a spectrum file'
            )
        if kind in ("pickles", "file"):
            missing = [k for k in ("sptype", "mag", "mag_band") if getattr(self, k) is None]
            if missing:
                src = "pickles" if kind == "pickles" else "a spectrum file"
                problems.append(
                    f"specphot.source = {src} needs " + ", ".join(f"specphot.{k}" for k in missing)
                )
        if problems:
            raise _rule("\n".join(problems))
        return self


class DiffImageConfig(_Model):
    """Diagnostic single/double difference images (not derotated)."""

    _section: ClassVar[str] = "diff_images"

    make_diff: bool = Field(False, description="Make single-difference (cam1 - cam2) images")
    save_double: bool = Field(False, description="Also make FLC double-difference images (needs an FLC)")


class NRMConfig(_Model):
    """Non-redundant masking (accepted for compatibility; not processed by vampd)."""

    _section: ClassVar[str] = "nrm"

    nbootstrap: PositiveInt = Field(1000, description="Number of bootstrap samples")

    @model_validator(mode="after")
    def _warn_unsupported(self) -> NRMConfig:
        warnings.warn("[nrm] is accepted but not processed by vampd (no NRM observables)", ConfigWarning, stacklevel=2)
        return self


class PolarimetryConfig(_Model):
    """Polarimetric differential imaging; the section's presence enables PDI."""

    _section: ClassVar[str] = "polarimetry"

    method: Literal["triplediff", "doublediff", "leastsq"] = Field(
        "triplediff",
        description='"triplediff" (HWP x FLC x camera, 16 files per set), "doublediff" (HWP x camera, 8) or '
        '"leastsq" (vampd: per-pixel least squares over every cube, streamed)',
    )
    derotate: bool = Field(
        True, description="Derotate to north up, east left when forming Stokes images (needed for mm_correct)"
    )
    mm_correct: bool = Field(True, description="Apply the Mueller-matrix correction")
    hwp_adi_sync: bool = Field(True, description="The HWP was in pupil-tracking (ADI-synchronised) mode")
    use_ideal_mm: bool = Field(False, description="Use idealised components in the Mueller-matrix model")
    ip_correct: bool = Field(True, description="Post-hoc instrumental-polarisation correction")
    ip_method: Literal["aperture", "annulus"] = Field("aperture", description="Region for measuring the IP")
    ip_radius: PositiveFloat = Field(
        15.0, description='Radius in pixels ("aperture") or inner radius ("annulus") of the IP region'
    )
    ip_radius2: PositiveFloat | None = Field(None, description='Outer radius in pixels for ip_method = "annulus"')
    cyl_stokes: Literal["azimuthal", "radial"] = Field(
        "azimuthal", description='"azimuthal" -> (Q_phi, U_phi), "radial" -> (Q_r, U_r)'
    )
    # vampd extras
    hwp_tolerance: PositiveFloat = Field(
        0.1, description="vampd: HWP angles within this many degrees of a set angle count as that angle"
    )
    set_timeout: PositiveFloat = Field(
        900.0, description="vampd: seconds after which an incomplete open HWP set is declared broken"
    )
    mm_table: Path | None = Field(
        None,
        description="vampd: CSV table of fitted Mueller-model parameters (never downloaded); without it the "
        "ideal model is used",
    )
    # least squares (method = "leastsq")
    leastsq_max_cond: PositiveFloat = Field(
        100.0, description="vampd leastsq: pixels whose normal matrix has a (Frobenius) condition number above "
        "this are NaN (degenerate HWP coverage)"
    )
    leastsq_refresh_files: PositiveInt = Field(
        8, description="vampd leastsq: re-solve and rewrite the running products after this many new cubes"
    )
    leastsq_refresh_seconds: PositiveFloat = Field(
        60.0, description="vampd leastsq: ... or when this many seconds passed since the last refresh"
    )
    leastsq_weights: Literal["equal", "ivar"] = Field(
        "equal", description='vampd leastsq: "equal" (unit weights, errors by the sandwich estimator; unbiased '
        'with signal-dependent errors) or "ivar" (1/sigma^2 per pixel)'
    )
    leastsq_snr_annulus: tuple[PositiveFloat, PositiveFloat] | None = Field(
        None, description="vampd leastsq: (r_in, r_out) px of the Q_phi S/N region; default (ip_radius, N/2)"
    )

    @model_validator(mode="after")
    def _rules(self) -> PolarimetryConfig:
        problems = []
        if self.mm_correct and not self.derotate:
            problems.append("polarimetry.mm_correct = true requires polarimetry.derotate = true")
        if self.method == "leastsq" and not self.derotate:
            problems.append('polarimetry.method = "leastsq" requires polarimetry.derotate = true')
        if self.ip_method == "annulus":
            if self.ip_radius2 is None:
                problems.append(
                    'polarimetry.ip_method = "annulus" needs polarimetry.ip_radius2 (outer radius, '
                    f"> ip_radius = {_fmt_num(self.ip_radius)})"
                )
            elif self.ip_radius2 <= self.ip_radius:
                problems.append(
                    f"polarimetry.ip_radius2 = {_fmt_num(self.ip_radius2)} must be greater than "
                    f'polarimetry.ip_radius = {_fmt_num(self.ip_radius)} for ip_method = "annulus"'
                )
        if problems:
            raise _rule("\n".join(problems))
        return self


# ---------------------------------------------------------------------------------------------------------
# vampd-only sections


class WatchConfig(_Model):
    """vampd: the directory watcher, worker pool and its resource limits."""

    _section: ClassVar[str] = "watch"

    inputs: list[Path] = Field(default_factory=list, description="Directories to watch for raw files")
    outdir: Path | None = Field(None, description="Output directory (default: the config file's directory)")
    patterns: list[str] = Field(
        default_factory=lambda: ["*.fits", "*.fits.fz"], description="Glob patterns of raw files"
    )
    recursive: bool = Field(False, description="Also watch sub-directories")
    poll: bool = Field(False, description="Poll the directories instead of inotify (NFS/CIFS mounts)")
    poll_interval: PositiveFloat = Field(2.0, description="Seconds between polls")
    complete_timeout: PositiveFloat = Field(
        120.0, description="Seconds after which a file that never becomes complete is failed"
    )
    settle_time: NonNegFloat = Field(0.5, description="Seconds a file's size must stay constant before reading")
    workers: PositiveInt = Field(2, description="Worker processes")
    expect_sidecar: bool = Field(
        False, description="Require a NAME.txt sidecar with NAXIS3 lines before a file counts as complete"
    )
    max_tries: PositiveInt = Field(3, description="Attempts per file before it is marked failed")
    memory_factor: PositiveFloat = Field(6.0, description="Memory reserved per job = cube bytes x this factor")
    memory_limit_gb: PositiveFloat | None = Field(
        None, description="Memory budget of all jobs in GB (default: 50 % of the machine's RAM)"
    )
    queue_size: PositiveInt = Field(64, description="Maximum number of queued jobs")
    reconcile_interval: PositiveFloat = Field(
        30.0, description="Seconds between directory re-scans that catch missed events"
    )
    stop_timeout: PositiveFloat = Field(60.0, description="Seconds to wait for running jobs on shutdown")

    @field_validator("patterns")
    @classmethod
    def _check_patterns(cls, v: list[str]) -> list[str]:
        if not v or any(not p.strip() for p in v):
            raise ValueError('must be a non-empty list of glob patterns, e.g. ["*.fits", "*.fits.fz"]')
        return v

    def effective_memory_limit_gb(self) -> float:
        """``memory_limit_gb`` or, if unset, half of the physical memory (GB)."""
        if self.memory_limit_gb is not None:
            return float(self.memory_limit_gb)
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
            total = 8 * 1024**3
        return 0.5 * total / 1024**3


class AlertsConfig(_Model):
    """vampd: thresholds of the live view's alerts."""

    _section: ClassVar[str] = "alerts"

    lag_seconds: PositiveFloat = Field(60.0, description="Seconds a camera may lag the other before an alert")
    flc_imbalance: PositiveFraction = Field(
        0.2, description="Fractional difference of FLC A/B file counts that raises an alert"
    )
    hwp_grid_tolerance: PositiveFloat = Field(
        0.5, description="Degrees an HWP angle may be off the 0/22.5/45/67.5 grid"
    )
    idle_seconds: PositiveFloat = Field(120.0, description="Seconds without a new file before an idle alert")
    strehl_drop: PositiveFraction = Field(0.3, description="Fractional Strehl drop versus the running median")
    flux_drop: PositiveFraction = Field(0.5, description="Fractional flux drop versus the running median")
    disk_free_gb: NonNegFloat = Field(20.0, description="Alert when the output disk has less free space (GB)")


class ClusterConfig(_Model):
    """vampd: ``vampd reprocess`` on Dask distributed (optional extra ``[cluster]``)."""

    _section: ClassVar[str] = "cluster"

    scheduler: str | None = Field(
        None, description="Dask scheduler address, e.g. tcp://host:8786 (default: start a local cluster)"
    )
    local_workers: PositiveInt | None = Field(
        None, description="Worker processes of the local cluster (default: [watch].workers)"
    )
    oversubscribe: PositiveInt = Field(2, description="Tasks in flight per worker thread")
    memory_fraction: PositiveFraction = Field(
        0.5, description="Share of a worker's memory limit for task estimates when workers declare no MEMORY resource"
    )
    dashboard_address: str = Field(":8787", description="Dashboard address of the local cluster (':0' = any free port)")


# ---------------------------------------------------------------------------------------------------------
# the whole configuration

#: Per-file/product stages in processing order and the settings each depends on (its own and upstream).
STAGES: dict[str, tuple[str, ...]] = {
    "calibrate": ("combine", "calibrate", "target"),
    "analysis": ("coronagraphic", "planetary", "data_dir", "analysis"),
    "frame_select": ("frame_select",),
    "align": ("align",),
    "specphot": ("specphot",),
    "coadd": ("coadd",),
    "polarimetry": ("polarimetry",),
}
# products that branch off the coadd chain rather than following polarimetry
_BRANCHES: dict[str, tuple[str, ...]] = {
    "diff_images": ("diff_images",),
    "adi": ("save_adi_cubes",),
}
_STAGE_ALIASES = {"analyze": "analysis", "select": "frame_select", "pdi": "polarimetry", "diff": "diff_images"}

_NOT_PROCESSING = {"watch", "alerts", "cluster", "name", "dpp_version", "vampd_version"}


class PipelineConfig(_Model):
    """Data processing options of a vampd night (reference schema + vampd extras)."""

    _section: ClassVar[str] = ""

    name: str = Field("", description='Filename-friendly name used for outputs, e.g. "20230101_ABAur"')
    dpp_version: VersionStr = Field(
        DPP_COMPAT_VERSION,
        description="The vampires_dpp version this configuration is valid with (reference configs)",
    )
    vampd_version: VersionStr = Field(__version__, description="The vampd version this configuration is valid with")
    coronagraphic: bool = Field(False, description="Use coronagraphic routines (satellite spots)")
    planetary: bool = Field(False, description="Use planetary routines (no synthetic-PSF use in analysis)")
    save_adi_cubes: bool = Field(False, description="Save ADI cubes and derotation angles")
    data_dir: Path | None = Field(
        None,
        description="vampd: directory with filter curves, zero points, Pickles atlas and Vega; "
        f"falls back to ${DATA_DIR_ENV}",
    )
    target: TargetConfig | None = Field(None, description="Target coordinates; if not set, header values")
    combine: CombineConfig = Field(default_factory=CombineConfig, description="Frame combination options")
    calibrate: CalibrateConfig = Field(default_factory=CalibrateConfig, description="Basic image calibration")
    analysis: AnalysisConfig = Field(default_factory=AnalysisConfig, description="PSF/flux analysis")
    frame_select: FrameSelectConfig = Field(default_factory=FrameSelectConfig, description="Frame selection")
    align: AlignConfig = Field(default_factory=AlignConfig, description="Frame alignment")
    coadd: CoaddConfig = Field(default_factory=CoaddConfig, description="Cube coadding")
    specphot: SpecphotConfig = Field(default_factory=SpecphotConfig, description="Spectrophotometric calibration")
    diff_images: DiffImageConfig = Field(default_factory=DiffImageConfig, description="Diagnostic differences")
    nrm: NRMConfig | None = Field(None, description="Non-redundant masking (not processed by vampd)")
    polarimetry: PolarimetryConfig | None = Field(None, description="If set, enables PDI")
    watch: WatchConfig = Field(default_factory=WatchConfig, description="vampd: watcher and workers")
    alerts: AlertsConfig = Field(default_factory=AlertsConfig, description="vampd: live-view alert thresholds")
    cluster: ClusterConfig = Field(default_factory=ClusterConfig, description="vampd: reprocess on Dask")

    def __init__(self, **data: Any) -> None:
        # only the top level may override __init__: pydantic calls a custom __init__ of nested models
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise ConfigError.from_validation_error(exc) from None

    @field_validator("name")
    @classmethod
    def _check_name(cls, v: str) -> str:
        if any(c in v for c in "/\\") or any(ord(c) < 32 for c in v) or v in (".", ".."):
            raise ValueError("must be filename-friendly (no '/', '\\' or control characters)")
        return v

    @model_validator(mode="before")
    @classmethod
    def _legacy_version_key(cls, data: Any) -> Any:
        # the reference FAQ and `dpp upgrade` still write the old key `version`
        if isinstance(data, dict) and "version" in data:
            data = dict(data)
            old = data.pop("version")
            if "dpp_version" not in data:
                data["dpp_version"] = old
                warnings.warn("legacy key version read as dpp_version", ConfigWarning, stacklevel=2)
            else:
                warnings.warn("unknown key version ignored (dpp_version is set)", ConfigWarning, stacklevel=2)
        return data

    @model_validator(mode="after")
    def _cross_field_rules(self) -> PipelineConfig:
        problems = []
        an = self.analysis
        fs = self.frame_select
        if fs.frame_select and fs.metric == "strehl" and not an.strehl:
            problems.append('frame_select.metric = "strehl" requires analysis.strehl = true')
        if self.align.align and self.align.method == "model" and not an.fit_psf_model:
            problems.append('align.method = "model" requires analysis.fit_psf_model = true')
        if self.coadd.coadd and self.coadd.recenter and self.coadd.recenter_method == "model" and not an.fit_psf_model:
            problems.append('coadd.recenter_method = "model" requires analysis.fit_psf_model = true')
        sp = self.specphot
        if (
            sp.unit != "e-/s"
            and sp.source_kind in ("pickles", "file")
            and sp.flux_metric == "photometry"
            and not an.photometry
        ):
            problems.append(
                f'specphot.unit = "{sp.unit}" with specphot.flux_metric = "photometry" requires '
                'analysis.photometry = true (or use flux_metric = "sum")'
            )
        if not (
            self.coadd.coadd
            or self.calibrate.save_intermediate
            or self.combine.save_intermediate
            or (fs.frame_select and fs.save_intermediate)
            or self.align.save_intermediate
        ):
            problems.append(
                "no product would be written: with coadd.coadd = false set align.save_intermediate = true "
                "(or another save_intermediate)"
            )
        if problems:
            raise _rule("\n".join(problems))
        return self

    # -- convenience --------------------------------------------------------------------------------------

    @property
    def pdi(self) -> bool:
        """True if polarimetric differential imaging is enabled (a ``[polarimetry]`` section)."""
        return self.polarimetry is not None

    @classmethod
    def from_dict(cls, data: dict, source: str | os.PathLike | None = None) -> PipelineConfig:
        """Validate a plain dict (e.g. parsed TOML); errors raise :class:`ConfigError` naming ``source``."""
        if not isinstance(data, dict):
            raise ConfigError(f"expected a table of settings, got {type(data).__name__}", source=source)
        try:
            return cls(**data)
        except ConfigError as exc:
            raise ConfigError(exc.problems, source=source) from None

    def to_dict(self) -> dict:
        """Plain, TOML-ready dict (paths as strings, ``None`` omitted)."""
        return self.model_dump(mode="json", exclude_none=True)

    def processing_dict(self) -> dict:
        """The settings that change processed products (everything but [watch], [alerts], name, versions)."""
        return self.model_dump(mode="json", exclude=_NOT_PROCESSING)

    def config_hash(self) -> str:
        """Short stable hash (16 hex chars of sha256) of the processing-relevant settings.

        Equal for configs that process data identically, whatever their ``[watch]``, ``[alerts]``,
        ``name`` or version keys; used by the ledger to detect a changed configuration.
        """
        return _hash(self.processing_dict())

    def stage_hash(self, stage: str) -> str:
        """Hash of the settings a stage's products depend on: the stage's own options and all upstream.

        Stages (processing order): ``calibrate``, ``analysis``, ``frame_select``, ``align``, ``specphot``,
        ``coadd``, ``polarimetry``; plus the branches ``diff_images`` and ``adi`` (coadd chain + own
        option). Aliases: ``analyze``, ``select``, ``pdi``, ``diff``.
        """
        stage = _STAGE_ALIASES.get(stage, stage)
        keys: list[str] = []
        if stage in STAGES:
            for name, deps in STAGES.items():
                keys.extend(deps)
                if name == stage:
                    break
        elif stage in _BRANCHES:
            for name, deps in STAGES.items():
                keys.extend(deps)
                if name == "coadd":
                    break
            keys.extend(_BRANCHES[stage])
        else:
            allowed = ", ".join([*STAGES, *_BRANCHES, *_STAGE_ALIASES])
            raise ValueError(f"unknown stage {stage!r}; expected one of {allowed}")
        full = self.model_dump(mode="json")
        return _hash({"stage": stage, **{k: full[k] for k in keys}})


def _hash(obj: Any) -> str:
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def resolve_data_dir(cfg: PipelineConfig | None = None) -> Path | None:
    """The data directory: ``cfg.data_dir`` if set, else ``$VAMPD_DATA_DIR`` if set, else ``None``.

    The directory is not required to exist (callers fall back to nominal curves); ``vampd check``
    reports whether it does.
    """
    if cfg is not None and cfg.data_dir is not None:
        return cfg.data_dir
    env = os.environ.get(DATA_DIR_ENV, "").strip()
    if env:
        return Path(env).expanduser()
    return None

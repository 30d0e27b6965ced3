"""The reference pipeline's configuration sections (vampires_dpp 0.14 schema, docs/instrument.md §11.3):
[target], [combine], [calibrate], [analysis], [frame_select], [align], [coadd], [specphot],
[diff_images], [nrm] and [polarimetry], with vampd's extra keys in some of them."""

from __future__ import annotations

import math
import re
import warnings
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import (
    Field,
    field_validator,
    model_validator,
)

from vampd.config.base import (
    FRAME_SELECT_METRIC_KEYS,
    ConfigWarning,
    Fraction,
    PositiveFloat,
    PositiveInt,
    _fmt_num,
    _Model,
    _rule,
    _toml_repr,
)

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
        if (
            isinstance(v, (list, tuple))
            and len(v) == 2
            and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)
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
    crop_width: PositiveInt = Field(536, description="Post-alignment crop width in pixels, roughly the field of view")
    reproject: bool = Field(False, description="Reproject cam2 astrometry onto cam1 for better differences")
    save_intermediate: bool = Field(False, description="Save the registered cubes into aligned/ (large!)")


class CoaddConfig(_Model):
    """Collapse of each registered cube along time."""

    _section: ClassVar[str] = "coadd"

    coadd: bool = Field(True, description="Coadd each cube; if false the data are kept as cubes")
    method: Literal["median", "mean", "varmean", "biweight"] = Field("median", description="Collapse method")
    recenter: bool = Field(True, description="Measure the PSF centre in the coadded image and re-align it")
    recenter_method: _CentroidMethod = Field(
        "dft", description='Centroid method used by recenter ("model" needs analysis.fit_psf_model)'
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
            problems.append(
                f'specphot.unit = "{self.unit}" needs a specphot.source ("zeropoints", "pickles" or a file)'
            )
        if self.unit == "contrast" and kind in ("zeropoints", None):
            problems.append(
                f'specphot.unit = "contrast" cannot be produced from specphot.source = '
                f'{_toml_repr(self.source) if self.source is not None else "none"}: use "pickles" or a spectrum file'
            )
        if kind in ("pickles", "file"):
            missing = [k for k in ("sptype", "mag", "mag_band") if getattr(self, k) is None]
            if missing:
                src = "pickles" if kind == "pickles" else "a spectrum file"
                problems.append(f"specphot.source = {src} needs " + ", ".join(f"specphot.{k}" for k in missing))
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
        100.0,
        description="vampd leastsq: pixels whose normal matrix has a (Frobenius) condition number above "
        "this are NaN (degenerate HWP coverage)",
    )
    leastsq_refresh_files: PositiveInt = Field(
        8, description="vampd leastsq: re-solve and rewrite the running products after this many new cubes"
    )
    leastsq_refresh_seconds: PositiveFloat = Field(
        60.0, description="vampd leastsq: ... or when this many seconds passed since the last refresh"
    )
    leastsq_weights: Literal["equal", "ivar"] = Field(
        "equal",
        description='vampd leastsq: "equal" (unit weights, errors by the sandwich estimator; unbiased '
        'with signal-dependent errors) or "ivar" (1/sigma^2 per pixel)',
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

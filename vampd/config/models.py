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

This module holds the whole configuration (:class:`PipelineConfig`, the stage map and the data
directory) and re-exports the rest, so ``from vampd.config.models import X`` works for every public
name: the errors, constrained types and ``_Model`` base are in :mod:`vampd.config.base`, the
reference sections in :mod:`vampd.config.sections` and the vampd-only ones in
:mod:`vampd.config.vampd_sections`.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any, ClassVar

from pydantic import (
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from vampd import __version__
from vampd.config.base import (
    DATA_DIR_ENV,
    DPP_COMPAT_VERSION,
    FRAME_SELECT_METRIC_KEYS,
    ConfigError,
    ConfigWarning,
    VersionStr,
    _Model,
    _rule,
    parse_version,
)
from vampd.config.sections import (
    AlignConfig,
    AnalysisConfig,
    CalibrateConfig,
    CoaddConfig,
    CombineConfig,
    DiffImageConfig,
    FrameSelectConfig,
    NRMConfig,
    PolarimetryConfig,
    SpecphotConfig,
    TargetConfig,
)
from vampd.config.vampd_sections import AlertsConfig, ClusterConfig, WatchConfig

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

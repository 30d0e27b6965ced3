"""vampd configuration: pydantic models of the TOML schema, loading/saving, presets, `new`/`check`.

The schema is the reference pipeline's (vampires_dpp 0.14, docs/instrument.md §11.3), so its files load unchanged, plus
vampd-only options (``vampd_version``, ``data_dir``, ``[watch]``, ``[alerts]``, a few extra keys).
"""

from vampd.config.io import (
    ConfigFileError,
    check_version,
    config_from_toml_str,
    load_config,
    save_config,
    to_toml_str,
)
from vampd.config.models import (
    DPP_COMPAT_VERSION,
    FRAME_SELECT_METRIC_KEYS,
    AlertsConfig,
    AlignConfig,
    AnalysisConfig,
    CalibrateConfig,
    CoaddConfig,
    CombineConfig,
    ConfigError,
    ConfigWarning,
    DiffImageConfig,
    FrameSelectConfig,
    NRMConfig,
    PipelineConfig,
    PolarimetryConfig,
    SpecphotConfig,
    TargetConfig,
    WatchConfig,
    resolve_data_dir,
)

__all__ = [
    "DPP_COMPAT_VERSION",
    "FRAME_SELECT_METRIC_KEYS",
    "AlertsConfig",
    "AlignConfig",
    "AnalysisConfig",
    "CalibrateConfig",
    "CoaddConfig",
    "CombineConfig",
    "ConfigError",
    "ConfigFileError",
    "ConfigWarning",
    "DiffImageConfig",
    "FrameSelectConfig",
    "NRMConfig",
    "PipelineConfig",
    "PolarimetryConfig",
    "SpecphotConfig",
    "TargetConfig",
    "WatchConfig",
    "check_version",
    "config_from_toml_str",
    "load_config",
    "resolve_data_dir",
    "save_config",
    "to_toml_str",
]

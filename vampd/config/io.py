"""Reading and writing configuration TOML files, and the version-compatibility check (docs/instrument.md §11.4)."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

import tomli_w

import vampd
from vampd.config.models import DPP_COMPAT_VERSION, ConfigError, PipelineConfig, parse_version

__all__ = [
    "ConfigFileError",
    "check_version",
    "check_config_versions",
    "load_config",
    "save_config",
    "config_from_toml_str",
    "to_toml_str",
    "resolve_config_paths",
]


class ConfigFileError(ConfigError):
    """The configuration file is missing, unreadable or not valid TOML."""

    _headline = "cannot read configuration"


def check_version(config_version: str, installed_version: str) -> bool:
    """Whether a configuration written for ``config_version`` can be run by ``installed_version``.

    Semantic versioning as in the reference (docs/instrument.md §11.4): with installed MAJOR = 0, compatible iff MAJOR and
    MINOR are equal and installed PATCH >= config PATCH; with MAJOR >= 1, compatible iff MAJORs are equal
    and installed MINOR >= config MINOR, and, when MINORs are equal, installed PATCH >= config PATCH.

    Raises
    ------
    ValueError
        If either string is not ``MAJOR.MINOR[.PATCH]``.
    """
    cmaj, cmin, cpat = parse_version(config_version)
    imaj, imin, ipat = parse_version(installed_version)
    if imaj == 0:
        return cmaj == imaj and cmin == imin and ipat >= cpat
    if cmaj != imaj:
        return False
    if imin != cmin:
        return imin > cmin
    return ipat >= cpat


def check_config_versions(data: dict[str, Any], source: str | os.PathLike | None = None) -> None:
    """Check the version keys present in a parsed config (``vampd_version`` against this vampd,
    ``dpp_version`` — or the legacy ``version`` — against :data:`DPP_COMPAT_VERSION`).

    Raises
    ------
    ConfigError
        Naming the key, both versions and what to do.
    """
    problems = []
    checks = [("vampd_version", vampd.__version__, "vampd")]
    dpp_key = "dpp_version" if "dpp_version" in data else ("version" if "version" in data else None)
    if dpp_key:
        checks.append((dpp_key, DPP_COMPAT_VERSION, "the vampires_dpp schema vampd implements"))
    for key, installed, what in checks:
        if key not in data:
            continue
        value = data[key]
        try:
            ok = check_version(str(value), installed)
        except ValueError:
            problems.append(f'{key} = "{value}": not a version of the form MAJOR.MINOR.PATCH')
            continue
        if not ok:
            if key == "vampd_version":
                hint = (
                    f"install a vampd compatible with {value}, or review the file against vampd {installed} "
                    f'(`vampd new` shows the current template) and set vampd_version = "{installed}"'
                )
            else:
                hint = (
                    f"vampd reads configurations of vampires_dpp {DPP_COMPAT_VERSION}; update the file to that "
                    f'schema and set {key} = "{DPP_COMPAT_VERSION}" (or remove {key} and add vampd_version)'
                )
            problems.append(f'{key} = "{value}" is not compatible with {what} ({installed}): {hint}')
    if problems:
        raise ConfigError(problems, source=source)


# ---------------------------------------------------------------------------------------------------------


def _resolve(p: Path | None, base: Path) -> Path | None:
    if p is None:
        return None
    p = p.expanduser()
    if not p.is_absolute():
        p = Path(os.path.normpath(base / p))
    return p


def resolve_config_paths(cfg: PipelineConfig, base_dir: str | os.PathLike) -> PipelineConfig:
    """Make the paths of ``cfg`` absolute, relative ones taken relative to ``base_dir`` (in place).

    Paths: ``data_dir``, ``calibrate.calib_directory``, ``specphot.source`` (when a file),
    ``polarimetry.mm_table``, ``watch.inputs``, ``watch.outdir``.
    """
    base = Path(base_dir).expanduser().absolute()
    cfg.data_dir = _resolve(cfg.data_dir, base)
    cfg.calibrate.calib_directory = _resolve(cfg.calibrate.calib_directory, base)
    if cfg.specphot.source_kind == "file":
        cfg.specphot.source = _resolve(Path(cfg.specphot.source), base)
    if cfg.polarimetry is not None:
        cfg.polarimetry.mm_table = _resolve(cfg.polarimetry.mm_table, base)
    cfg.watch.inputs = [_resolve(p, base) for p in cfg.watch.inputs]
    cfg.watch.outdir = _resolve(cfg.watch.outdir, base)
    return cfg


def config_from_toml_str(
    text: str,
    base_dir: str | os.PathLike | None = None,
    source: str | os.PathLike | None = None,
    check_versions: bool = True,
) -> PipelineConfig:
    """Parse and validate TOML text.

    Parameters
    ----------
    text : str
        TOML document.
    base_dir : path-like, optional
        If given, relative paths in the config are made absolute relative to it; otherwise they are
        kept as written.
    source : path-like, optional
        Name used in error messages.
    check_versions : bool
        Refuse incompatible ``vampd_version`` / ``dpp_version`` keys (docs/instrument.md §11.4).

    Raises
    ------
    ConfigFileError
        If the text is not valid TOML.
    ConfigError
        If a value is invalid or a version incompatible.
    """
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigFileError(f"not valid TOML: {exc}", source=source) from None
    if check_versions:
        check_config_versions(data, source=source)
    cfg = PipelineConfig.from_dict(data, source=source)
    if base_dir is not None:
        try:
            resolve_config_paths(cfg, base_dir)
        except ConfigError as exc:
            raise ConfigError(exc.problems, source=source) from None
    return cfg


def load_config(path: str | os.PathLike, check_versions: bool = True) -> PipelineConfig:
    """Load and validate a configuration TOML file.

    Relative paths inside the file (``calibrate.calib_directory``, ``data_dir``, ``watch.inputs``,
    ``watch.outdir``, ``polarimetry.mm_table``, a spectrum file ``specphot.source``) are resolved
    relative to the file's directory. Unknown keys produce a :class:`~vampd.config.models.ConfigWarning`.

    Raises
    ------
    ConfigFileError
        The file is missing, unreadable or not TOML.
    ConfigError
        Invalid values, broken cross-field rules or an incompatible version.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigFileError("file not found", source=path) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigFileError(f"cannot read file: {exc}", source=path) from None
    return config_from_toml_str(text, base_dir=path.parent, source=path, check_versions=check_versions)


def to_toml_str(cfg: PipelineConfig) -> str:
    """Serialise ``cfg`` to TOML (``None`` values and absent optional sections omitted)."""
    return tomli_w.dumps(cfg.to_dict())


def save_config(cfg: PipelineConfig, path: str | os.PathLike) -> Path:
    """Atomically write ``cfg`` as TOML to ``path`` (see :func:`vampd.fitsio.atomic_write`).

    Paths are written as stored (absolute for configs from :func:`load_config`), so that a copy saved
    elsewhere still points at the same directories.
    """
    from vampd.fitsio import atomic_write

    text = to_toml_str(cfg)
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))

"""Shared ground of the configuration models: version constants, :class:`ConfigError` and
:class:`ConfigWarning` (and how pydantic errors become readable ``section.field`` lines), the
reusable constrained types, version parsing and the ``_Model`` base class (unknown keys warn)."""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from pathlib import Path
from typing import Annotated, Any, ClassVar

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    ValidationError,
    model_validator,
)
from pydantic_core import PydanticCustomError

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
                    warnings.warn(
                        f"unknown {kind} {shown} ignored{_did_you_mean(str(key), cls.model_fields)}",
                        ConfigWarning,
                        stacklevel=2,
                    )
        return data

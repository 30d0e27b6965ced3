"""Sequence factor files (``specphot/*.json``): save, load, and the unit factor for PDI products.

The sequence trigger writes one JSON file per calibrated target sequence and camera. The PDI code
reads them through :func:`pdi_unit_factor` when it writes a running Stokes product, so that the
Stokes images carry the calibrated unit without the PDI code knowing how the factor was made.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from astropy.io import fits

from vampd.filenames import safe_part
from vampd.fitsio import atomic_write

__all__ = [
    "FACTOR_DIR",
    "factor_file_name",
    "save_factor_file",
    "load_factor_files",
    "pdi_unit_factor",
    "scale_hdul",
    "slug",
]

FACTOR_DIR = "specphot"
_UNIT_SLUG = {"e-/s": "eps", "Jy": "jy", "Jy/arcsec^2": "jyas2", "contrast": "contrast"}


def slug(text: str) -> str:
    """File-name-safe form of a target/filter/unit (``"Jy/arcsec^2"`` → ``"jyas2"``)."""
    if text in _UNIT_SLUG:
        return _UNIT_SLUG[text]
    return safe_part(str(text), empty="none")


def factor_file_name(name: str, target: str, filt: str, camera: int, first_stem: str) -> str:
    """``{name}_{target}_{filter}_cam{n}_{first stem}.json`` (stable for a given sequence)."""
    return f"{name}_{slug(target)}_{slug(filt)}_cam{int(camera)}_{first_stem}.json"


def save_factor_file(path: Path, record: Mapping[str, Any]) -> Path:
    """Atomically write a sequence record as JSON."""
    text = json.dumps(record, indent=1, sort_keys=True, default=_json_default)
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def _json_default(v):
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    return str(v)


def load_factor_files(
    outdir, target: str | None = None, filt: str | None = None, camera: int | None = None
) -> list[dict]:
    """Sequence records of ``outdir/specphot`` matching target, filter and camera (any if None)."""
    out = []
    for p in sorted((Path(outdir) / FACTOR_DIR).glob("*.json")):
        try:
            rec = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(rec, dict) or "factors" not in rec:
            continue
        if target is not None and rec.get("target") != target:
            continue
        if filt is not None and rec.get("filter") != filt:
            continue
        if camera is not None and int(rec.get("camera", -1)) != int(camera):
            continue
        out.append(rec)
    return out


def pdi_unit_factor(outdir, target: str, filt: str, camera: int | None = None) -> tuple[str, dict[str, float]]:
    """Unit and per-field factor to apply to a running Stokes product of ``target`` in ``filt``.

    Parameters
    ----------
    outdir : path
        Night output directory (the trigger's files are in ``outdir/specphot``).
    target, filt : str
        ``OBJECT`` and the ledger's filter string (field names joined by commas).
    camera : int, optional
        Camera whose factor to use (to scale each camera before a difference); ``None`` combines
        both cameras.

    Returns
    -------
    unit, factors : str, dict
        ``("e-/s", {})`` while no sequence of this target is calibrated. Otherwise the configured
        unit and, per field, the median of the factors of every calibrated file of the target
        (over its sequences and the requested cameras).
    """
    recs = load_factor_files(outdir, target, filt, camera)
    if not recs:
        return "e-/s", {}
    unit = recs[-1]["unit"]
    per_field: dict[str, list[float]] = {}
    for rec in recs:
        if rec.get("unit") != unit:
            continue
        for _stem, fields in rec["factors"].items():
            for fld, val in fields.items():
                per_field.setdefault(fld, []).append(float(val))
    return unit, {f: float(np.median(v)) for f, v in per_field.items()}


def scale_hdul(
    hdul: fits.HDUList,
    unit: str,
    factors: Mapping[str, float] | float,
    fields: Sequence[str] | None = None,
    field_axis: int = -3,
) -> fits.HDUList:
    """Multiply a product's data and ``ERR`` by per-field factors and set ``BUNIT`` (in place).

    Parameters
    ----------
    hdul : HDUList
        Primary data with the fields on ``field_axis`` (or a single field), optional ``ERR``.
    unit : str
    factors : dict field → factor, or a float for every field
    fields : list of str, optional
        Field order of the data; default: the ``FIELD`` keys of the extensions, else the keys of
        ``factors`` in order.
    """
    if isinstance(factors, Mapping):
        if fields is None:
            fields = [h.header["FIELD"] for h in hdul[1:] if "FIELD" in h.header] or list(factors)
        f = np.array([factors[k] for k in fields], dtype=np.float64)
    else:
        f = np.array([float(factors)])
    for h in hdul:
        if h.data is not None and h.name in ("PRIMARY", "ERR"):
            data = np.asarray(h.data, dtype=np.float64)
            if f.size == 1:
                h.data = (data * abs(f[0]) if h.name == "ERR" else data * f[0]).astype(np.float32)
            else:
                shape = [1] * data.ndim
                shape[field_axis] = f.size
                g = f.reshape(shape)
                h.data = (data * (np.abs(g) if h.name == "ERR" else g)).astype(np.float32)
        h.header["BUNIT"] = unit
        h.header["HIERARCH DPP FLUX UNIT"] = unit
    return hdul

"""Locate and load the spectrophotometric data files of the data directory (never the network).

The data directory is named by ``data_dir`` in the configuration, else by the environment variable
``VAMPD_DATA_DIR``; the Pickles atlas and Vega are also found in the synphot data tree under
``$PYSYN_CDBS`` (``grid/pickles/dat_uvk/``, ``calspec/``), as synphot users keep them. It holds
instrument and catalogue data that vampd does not embed:

==================================  ===========================================================
``vampires_filters.csv``            VAMPIRES total-throughput curves (read through
                                    :func:`vampd.instrument.filters.load_filter_curve`)
``vampires_zeropoints.csv``         per-filter extinction k, C_FD (Jy s/e-), zero points
``pickles_uvk/pickles_uk.fits``     index of the Pickles (1998) UVK atlas (FILENAME, SPTYPE)
``pickles_uvk/pickles_uk_N.fits``   one Pickles spectrum each (WAVELENGTH Å, FLUX flam)
``johnson_v.txt``                   Johnson V passband (Å, throughput); other reference bands
                                    as ``johnson_{band}.txt`` / ``bessel_h.txt``
``alpha_lyr_stis_011.fits``         Vega (CALSPEC); may also come from a PyPI package that
                                    bundles it (astro-sedpy, pyphot)
==================================  ===========================================================

A missing file raises :class:`DataFileError`, whose message names the file and says how to point
vampd at a data directory.
"""

from __future__ import annotations

import csv
import functools
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from vampd.instrument.filters import DATA_DIR_ENV, FILTER_TABLE_NAME, resolve_data_dir

__all__ = [
    "DataFileError",
    "FILTER_TABLE_NAME",
    "ZEROPOINT_TABLE_NAME",
    "PICKLES_DIR",
    "PICKLES_INDEX",
    "VEGA_FILE",
    "BAND_FILES",
    "ZeroPointRow",
    "data_path",
    "locate",
    "CDBS_ENV",
    "data_dir_of",
    "load_zeropoint_table",
    "pickles_file",
    "vega_file",
    "band_file",
]

ZEROPOINT_TABLE_NAME = "vampires_zeropoints.csv"
PICKLES_DIR = "pickles_uvk"
PICKLES_INDEX = f"{PICKLES_DIR}/pickles_uk.fits"
VEGA_FILE = "alpha_lyr_stis_011.fits"
#: the synphot data tree (``$PYSYN_CDBS``): where it keeps the files vampd can take from it
CDBS_ENV = "PYSYN_CDBS"
_CDBS_TREE = {PICKLES_DIR: "grid/pickles/dat_uvk", VEGA_FILE: "calspec"}
#: reference band (``specphot.mag_band``) → passband file in the data directory.
#: "r" and "i" are Johnson R and I (as in the reference pipeline), not Sloan.
BAND_FILES = {
    "U": "johnson_u.txt",
    "B": "johnson_b.txt",
    "V": "johnson_v.txt",
    "R": "johnson_r.txt",
    "I": "johnson_i.txt",
    "J": "johnson_j.txt",
    "H": "bessel_h.txt",
    "K": "johnson_k.txt",
}
# PyPI packages known to bundle the CALSPEC Vega spectrum (package, path inside it)
_VEGA_PACKAGES = (
    ("sedpy", "data/alpha_lyr_stis_011.fits"),
    ("sedpy", "data/sed/alpha_lyr_stis_011.fits"),
)


class DataFileError(FileNotFoundError):
    """A data file that spectrophotometry needs is not available.

    The message names the file, where it was looked for and how to point vampd at it.
    """

    def __init__(self, name: str, directory: Path | None, purpose: str = ""):
        self.name = name
        self.directory = directory
        what = f" ({purpose})" if purpose else ""
        if directory is None:
            where = "no data directory is configured"
        elif not directory.is_dir():
            where = f"the data directory {directory} does not exist"
        else:
            where = f"{directory / name} not found"
        cdbs = any(name == k or name.startswith(k + "/") for k in _CDBS_TREE)
        also = f" (or {CDBS_ENV} to a synphot data tree holding it)" if cdbs else ""
        msg = (
            f"spectrophotometry needs the data file {name!r}{what}, but {where}. Set `data_dir` in the "
            f"configuration or the environment variable {DATA_DIR_ENV} to a directory holding it{also} "
            f"(instrument and catalogue data: vampires_filters.csv, vampires_zeropoints.csv, "
            f"pickles_uvk/, johnson_v.txt, {VEGA_FILE}); vampd never downloads it."
        )
        super().__init__(msg)


def data_dir_of(source=None) -> Path | None:
    """Data directory from a config (``cfg.data_dir``), a path, or ``$VAMPD_DATA_DIR``.

    Parameters
    ----------
    source : PipelineConfig, path-like or None
        A configuration object (its ``data_dir`` attribute is used), an explicit directory, or
        nothing (environment variable only).
    """
    if source is not None and hasattr(source, "data_dir"):
        source = source.data_dir
    return resolve_data_dir(source)


def _cdbs_path(name: str) -> Path | None:
    """``name`` in the synphot data tree ``$PYSYN_CDBS`` (Pickles and Vega only), if there."""
    root = os.environ.get(CDBS_ENV, "").strip()
    if not root:
        return None
    for prefix, sub in _CDBS_TREE.items():
        if name == prefix or name.startswith(prefix + "/"):
            rest = name[len(prefix) :].lstrip("/") or name
            path = Path(root).expanduser() / sub / rest
            if name == VEGA_FILE and not path.is_file():  # another CALSPEC version of Vega
                found = sorted(path.parent.glob("alpha_lyr_stis_*.fits"))
                path = found[-1] if found else path
            return path if path.is_file() else None
    return None


def locate(name: str, data_dir=None) -> tuple[Path | None, str]:
    """Where ``name`` is found: ``(path, source)`` with source ``"data_dir"`` (the configured
    or ``$VAMPD_DATA_DIR`` directory) or ``"$PYSYN_CDBS"``; ``(None, "")`` if nowhere."""
    directory = data_dir_of(data_dir)
    if directory is not None and (directory / name).is_file():
        return (directory / name).absolute(), "data_dir"
    cdbs = _cdbs_path(name)
    if cdbs is not None:
        return cdbs.absolute(), f"${CDBS_ENV}"
    return None, ""


def data_path(name: str, data_dir=None, purpose: str = "") -> Path:
    """Absolute path of ``name``: the data directory (``data_dir``, else ``$VAMPD_DATA_DIR``),
    then, for the Pickles atlas and Vega, the synphot tree under ``$PYSYN_CDBS``; else raise
    :class:`DataFileError`."""
    path, _source = locate(name, data_dir)
    if path is None:
        raise DataFileError(name, data_dir_of(data_dir), purpose)
    return path


@dataclass(frozen=True)
class ZeroPointRow:
    """One row of ``vampires_zeropoints.csv`` (only the columns vampd uses)."""

    filter: str
    k: float  # extinction [mag/airmass]
    c_fd: float  # conversion factor at airmass 0 [Jy/(e-/s)]
    zp_mag: float | None = None  # Vega-mag zero point
    zp_jy: float | None = None
    qe: float | None = None
    throughput: float | None = None


def _float(value: str) -> float | None:
    value = (value or "").strip()
    if not value:
        return None
    return float(value)


@functools.lru_cache(maxsize=4)
def _read_zeropoints(path: str) -> dict[str, ZeroPointRow]:
    out: dict[str, ZeroPointRow] = {}
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        cols = {c.strip().split(" ")[0].lower(): c for c in (reader.fieldnames or [])}
        need = {"filter", "k", "c_fd"}
        if not need <= set(cols):
            raise ValueError(
                f"{path}: zero-point table lacks column(s) {sorted(need - set(cols))} "
                f"(found {reader.fieldnames}); expected filter, k (mag/airmass), C_FD (Jy.s/e-)"
            )
        for lineno, row in enumerate(reader, start=2):
            name = (row[cols["filter"]] or "").strip()
            if not name:
                continue
            try:
                out[name] = ZeroPointRow(
                    name,
                    float(row[cols["k"]]),
                    float(row[cols["c_fd"]]),
                    _float(row.get(cols.get("zp_mag", ""), "")),
                    _float(row.get(cols.get("zp", ""), "")),
                    _float(row.get(cols.get("qe", ""), "")),
                    _float(row.get(cols.get("trans", ""), "")),
                )
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{path}, line {lineno}: bad value for filter {name!r} ({exc})") from None
    return out


def load_zeropoint_table(data_dir=None) -> dict[str, ZeroPointRow]:
    """Read ``vampires_zeropoints.csv`` from the data directory (cached per file).

    Raises
    ------
    DataFileError
        No data directory or no table in it.
    """
    path = data_path(ZEROPOINT_TABLE_NAME, data_dir, "per-filter zero points")
    return _read_zeropoints(str(path))


@functools.lru_cache(maxsize=4)
def _pickles_index(path: str) -> dict[str, str]:
    from astropy.io import fits

    with fits.open(path) as hdul:
        tab = hdul[1].data
        return {str(s).strip(): str(f).strip() for f, s in zip(tab["FILENAME"], tab["SPTYPE"])}


def pickles_file(sptype: str, data_dir=None) -> Path:
    """Spectrum file of the Pickles type ``sptype`` (case-insensitive, e.g. ``"G2V"``).

    Raises
    ------
    DataFileError
        Index or spectrum file missing.
    ValueError
        Unknown spectral type (the message lists the close matches).
    """
    index_path = data_path(PICKLES_INDEX, data_dir, "Pickles atlas index")
    index = _pickles_index(str(index_path))
    lookup = {k.lower(): v for k, v in index.items()}
    key = str(sptype).strip().lower()
    if key not in lookup:
        import difflib

        close = difflib.get_close_matches(str(sptype).strip(), list(index), n=6, cutoff=0.5)
        raise ValueError(
            f"specphot.sptype = {sptype!r} is not in the Pickles atlas ({index_path}); "
            f"close matches: {', '.join(close) or 'none'} (types look like G2V, K0III, M2I)"
        )
    name = lookup[key]
    if not name.endswith(".fits"):
        name += ".fits"
    return data_path(f"{PICKLES_DIR}/{name}", data_dir, f"Pickles spectrum of {sptype}")


def _packaged_vega() -> Path | None:
    for package, rel in _VEGA_PACKAGES:
        try:
            spec = importlib.util.find_spec(package)
        except (ImportError, ValueError):
            continue
        if spec is None or not spec.submodule_search_locations:
            continue
        for base in spec.submodule_search_locations:
            path = Path(base) / rel
            if path.is_file():
                return path
    return None


def vega_file(data_dir=None) -> Path:
    """The Vega spectrum: the data directory's ``alpha_lyr_stis_011.fits``, else a copy bundled by an
    installed PyPI package (astro-sedpy); else :class:`DataFileError`."""
    try:
        return data_path(VEGA_FILE, data_dir, "Vega spectrum")
    except DataFileError:
        packaged = _packaged_vega()
        if packaged is not None:
            return packaged
        raise


def band_file(band: str, data_dir=None) -> Path:
    """Passband file of the reference band ``band`` (U, B, V, R/r, I/i, J, H, K)."""
    key = str(band).strip()
    key = key.upper() if key.lower() in ("r", "i") else key
    if key not in BAND_FILES:
        raise ValueError(f"specphot.mag_band = {band!r}: expected one of U, B, V, r, i, J, H, K")
    return data_path(BAND_FILES[key], data_dir, f"{key} passband for specphot.mag_band")

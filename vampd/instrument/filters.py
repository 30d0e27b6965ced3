"""VAMPIRES filter curves, read from the data directory, with a nominal top-hat fallback.

The total-throughput table ``vampires_filters.csv`` (column ``wave`` in nm, then one column per
filter; docs/instrument.md §8.4) is read from a data directory that the user configures: an explicit
argument, else the environment variable ``VAMPD_DATA_DIR``. vampd never downloads it.

Without a data directory the simulator, the synthetic PSF and the analysis still work: each filter
then falls back to a nominal top-hat (:data:`NOMINAL_FILTERS`, built from the 50 % band edges of the
reference table) and a warning is logged once. Spectrophotometry needs the real curves and should
call :func:`load_filter_curve` with ``require=True``.
"""

from __future__ import annotations

import csv
import functools
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vampd.instrument.constants import PUPIL_DIAMETER

__all__ = [
    "DATA_DIR_ENV",
    "FILTER_TABLE_NAME",
    "NOMINAL_FILTERS",
    "PUPIL_DIAMETER_M",
    "FilterError",
    "FilterInfo",
    "band_edges",
    "canonical_filter_name",
    "data_dir",
    "resolve_data_dir",
    "filter_info",
    "load_filter_curve",
    "nominal_filter_curve",
]

log = logging.getLogger(__name__)

DATA_DIR_ENV = "VAMPD_DATA_DIR"
FILTER_TABLE_NAME = "vampires_filters.csv"
PUPIL_DIAMETER_M = PUPIL_DIAMETER  # the one definition is instrument.constants

# Nominal top-hats: (blue 50 % edge, red 50 % edge, peak throughput) in nm. Edges are the 50 % band
# edges of the reference table rounded to 0.1 nm (the red edges stop at ~776 nm, where the table's
# curves end), so a simulation without the data directory stays close to the real bands.
NOMINAL_FILTERS: dict[str, tuple[float, float, float]] = {
    "625-50": (600.7, 649.4, 1.0),
    "675-50": (650.9, 699.4, 1.0),
    "725-50": (700.3, 749.2, 1.0),
    "750-50": (724.1, 772.2, 1.0),
    "775-50": (750.2, 776.0, 1.0),
    "Open": (579.7, 776.0, 1.0),
    "F610": (579.8, 644.9, 1.0),
    "F670": (645.7, 694.6, 1.0),
    "F720": (695.8, 745.4, 1.0),
    "F760": (746.2, 776.0, 1.0),
    "Halpha": (655.8, 656.8, 1.0),
    "Ha-Cont": (646.7, 648.7, 1.0),
    "SII": (671.9, 672.9, 1.0),
    "SII-Cont": (680.5, 682.5, 1.0),
    "ND10": (579.7, 776.0, 0.1),
    "ND25": (579.7, 776.0, 10**-2.5),
}

_warned_fallback = False


class FilterError(ValueError):
    """Unknown filter name, or a filter table that lacks a requested column."""


def resolve_data_dir(explicit: str | os.PathLike | None = None) -> Path | None:
    """Resolve the data directory: ``explicit``, else ``$VAMPD_DATA_DIR``, else ``None``.

    Parameters
    ----------
    explicit : path-like, optional
        Directory given by the caller (e.g. from the configuration). Empty strings count as unset.

    Returns
    -------
    pathlib.Path or None
        The directory (not checked for existence here), or ``None`` if nothing is configured.
    """
    if explicit is not None and str(explicit) != "":
        return Path(explicit).expanduser()
    env = os.environ.get(DATA_DIR_ENV, "")
    if env:
        return Path(env).expanduser()
    return None


data_dir = resolve_data_dir  # public name of the design; functions below take a ``data_dir`` argument


def canonical_filter_name(name: str, names=None) -> str:
    """Return the canonical spelling of ``name`` (case-insensitive match) or raise FilterError."""
    names = list(NOMINAL_FILTERS) if names is None else list(names)
    lookup = {n.lower(): n for n in names}
    key = str(name).strip().lower()
    if key not in lookup:
        raise FilterError(f"unknown filter {name!r}; expected one of: {', '.join(names)}")
    return lookup[key]


@functools.lru_cache(maxsize=8)
def _read_table(path: str) -> tuple[tuple[str, ...], np.ndarray]:
    # The column names contain "-" (which genfromtxt(names=True) would mangle): use csv.
    with open(path, newline="") as fh:
        reader = csv.reader(fh)
        try:
            header = [h.strip() for h in next(reader)]
        except StopIteration:
            raise FilterError(f"{path}: empty filter table") from None
        rows = [row for row in reader if row and any(c.strip() for c in row)]
    if not header or header[0].lower() != "wave":
        raise FilterError(f"{path}: first column is {header[:1]}, expected 'wave' (nm)")
    try:
        table = np.array(rows, dtype=float)
    except ValueError as exc:
        raise FilterError(f"{path}: non-numeric value in filter table ({exc})") from None
    if table.ndim != 2 or table.shape[1] != len(header):
        raise FilterError(f"{path}: ragged filter table ({table.shape} for {len(header)} columns)")
    order = np.argsort(table[:, 0], kind="stable")
    return tuple(header), table[order]


@functools.lru_cache(maxsize=64)
def _curve_from_file(path: str, name: str) -> tuple[np.ndarray, np.ndarray]:
    header, table = _read_table(path)
    col = canonical_filter_name(name, header[1:])
    wave = table[:, 0].copy()
    thr = table[:, header.index(col)].copy()
    thr = np.nan_to_num(thr, nan=0.0)
    wave.flags.writeable = False
    thr.flags.writeable = False
    return wave, thr


@functools.lru_cache(maxsize=64)
def nominal_filter_curve(name: str, step_nm: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """Nominal top-hat curve of ``name`` (see :data:`NOMINAL_FILTERS`), on a ``step_nm`` grid.

    The grid runs 5 nm beyond each edge with zero throughput there, so :func:`band_edges`
    returns the nominal edges. Arrays are read-only (they are cached).
    """
    lo, hi, peak = NOMINAL_FILTERS[canonical_filter_name(name)]
    n = int(round((hi - lo + 10.0) / step_nm)) + 1
    wave = np.round(lo - 5.0 + step_nm * np.arange(n), 6)
    thr = np.where((wave >= lo - 1e-9) & (wave <= hi + 1e-9), peak, 0.0)
    wave.flags.writeable = False
    thr.flags.writeable = False
    return wave, thr


def load_filter_curve(
    name: str, data_dir: str | os.PathLike | None = None, require: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Throughput curve of a VAMPIRES filter.

    Parameters
    ----------
    name : str
        Filter name, matched case-insensitively against the table columns (``"750-50"``,
        ``"F670"``, ``"Halpha"``, ``"Open"``, ...).
    data_dir : path-like, optional
        Data directory holding ``vampires_filters.csv``; see :func:`data_dir` for the fallback
        order (argument, ``$VAMPD_DATA_DIR``).
    require : bool, optional
        If true, a missing data directory is an error instead of a top-hat fallback
        (spectrophotometry needs the real curves).

    Returns
    -------
    wave_nm, throughput : ndarray
        Read-only float arrays (cached per table path and filter).

    Raises
    ------
    FilterError
        Unknown filter (the message lists the known names) or a malformed table.
    FileNotFoundError
        A data directory is configured (or required) but the table is not in it.
    """
    global _warned_fallback
    directory = resolve_data_dir(data_dir)
    if directory is None:
        if require:
            raise FileNotFoundError(
                f"filter curve {name!r}: no data directory configured (pass data_dir or set "
                f"${DATA_DIR_ENV} to a directory holding {FILTER_TABLE_NAME})"
            )
        curve = nominal_filter_curve(name)  # raises FilterError for unknown names
        if not _warned_fallback:
            log.info(  # not a problem worth a line per run and worker: `vampd check` reports it
                "no data directory (set $%s): using nominal top-hat filter curves", DATA_DIR_ENV
            )
            _warned_fallback = True
        return curve
    path = directory / FILTER_TABLE_NAME
    if not path.is_file():
        raise FileNotFoundError(f"filter curve {name!r}: {path} not found (data directory)")
    return _curve_from_file(str(path.resolve()), str(name))


def band_edges(wave, throughput, frac: float = 0.5) -> tuple[float, float]:
    """First and last wavelength whose throughput is at least ``frac`` of the peak (docs/instrument.md §8.3).

    >>> band_edges([600, 610, 620, 630], [0.1, 0.6, 1.0, 0.5])
    (610.0, 630.0)
    """
    wave = np.asarray(wave, dtype=float)
    thr = np.asarray(throughput, dtype=float)
    peak = np.nanmax(thr)
    if not np.isfinite(peak) or peak <= 0:
        raise FilterError("filter curve has no positive throughput")
    idx = np.flatnonzero(thr >= frac * peak)
    return float(wave[idx[0]]), float(wave[idx[-1]])


@dataclass(frozen=True)
class FilterInfo:
    """Band summary written to field headers (docs/instrument.md §8.3): all wavelengths in nm.

    ``waveave`` is the throughput-weighted mean wavelength over the 50 % band (synphot's
    ``avgwave`` restricted to that range), ``wavefwhm = wavemax - wavemin``,
    ``dlamlam = wavefwhm / waveave``.
    """

    name: str
    wavemin: float
    wavemax: float
    waveave: float
    wavefwhm: float
    dlamlam: float

    @property
    def reselem_mas(self) -> float:
        """Resolution element λ/D in mas for the 7.92 m pupil (header ``RESELEM``)."""
        return float(np.rad2deg(self.waveave * 1e-9 / PUPIL_DIAMETER_M) * 3.6e6)


@functools.lru_cache(maxsize=64)
def _filter_info(name: str, directory: str | None) -> FilterInfo:
    wave, thr = load_filter_curve(name, directory)
    wmin, wmax = band_edges(wave, thr)
    sel = (wave >= wmin) & (wave <= wmax)
    if sel.sum() > 1:
        waveave = float(np.trapezoid(thr[sel] * wave[sel], wave[sel]) / np.trapezoid(thr[sel], wave[sel]))
    else:
        waveave = float(wave[sel][0])
    try:
        canon = canonical_filter_name(name)
    except FilterError:  # a column of a newer table that the nominal list does not know
        canon = str(name)
    fwhm = round(wmax - wmin, 9)  # the 0.1 nm grid is not exact in binary
    return FilterInfo(canon, wmin, wmax, waveave, fwhm, fwhm / waveave)


def filter_info(name: str, data_dir: str | os.PathLike | None = None) -> FilterInfo:
    """Band edges, average wavelength and fractional width of a filter (cached).

    Parameters
    ----------
    name : str
        Filter name (case-insensitive).
    data_dir : path-like, optional
        Data directory; without one the nominal top-hat is used.
    """
    directory = resolve_data_dir(data_dir)
    return _filter_info(str(name), None if directory is None else str(directory))

"""Synthetic photometry with synphot, offline (docs/instrument.md §8.3 steps 3–4).

Every spectrum and passband comes from the data directory (:mod:`vampd.specphot.data`); synphot's
own download paths (``from_vega()``, ``from_filter()``) are never used: the Vega spectrum is read
from the data directory and passed explicitly (and ``synphot.config.conf.vega_file`` is pointed at
the same local file so that nothing else in the process reaches for the network).

Parsing a filter curve and building a spectrum cost tens of ms; every object is cached per
(file, name), and :func:`synthetic_photometry` per (filter, source, type, mag, band, data dir).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import astropy.units as u
import numpy as np

from vampd.instrument.filters import canonical_filter_name, load_filter_curve
from vampd.specphot.data import band_file, data_dir_of, pickles_file, vega_file

__all__ = [
    "TELESCOPE_AREA_M2",
    "SynthPhot",
    "vega_spectrum",
    "filter_bandpass",
    "band_bandpass",
    "source_spectrum",
    "synthetic_photometry",
]

#: Subaru collecting area used for photon rates (docs/instrument.md §8.3 step 4) [m²]
TELESCOPE_AREA_M2 = 40.64


def _dir_key(data_dir) -> str | None:
    d = data_dir_of(data_dir)
    return None if d is None else str(Path(d).expanduser().resolve())


@functools.lru_cache(maxsize=4)
def _vega(path: str):
    from vampd._offline import configure_offline

    configure_offline()  # synphot never downloads (applied once per process)
    from synphot import SourceSpectrum
    from synphot import config as syn_config

    # later from_vega() calls anywhere in the process read this local file, not a URL
    syn_config.conf.vega_file = path
    return SourceSpectrum.from_file(path)


def vega_spectrum(data_dir=None):
    """Vega ``SourceSpectrum`` from the data directory (or a PyPI package that bundles it)."""
    return _vega(str(vega_file(data_dir)))


@functools.lru_cache(maxsize=64)
def _filter_bp(name: str, directory: str | None):
    from synphot import Empirical1D, SpectralElement

    wave, thr = load_filter_curve(name, directory, require=True)
    return SpectralElement(Empirical1D, points=np.asarray(wave) * u.nm, lookup_table=np.asarray(thr), keep_neg=False)


def filter_bandpass(name: str, data_dir=None):
    """VAMPIRES filter ``name`` as a synphot ``SpectralElement`` (cached; needs the real curves)."""
    return _filter_bp(canonical_filter_name(name), _dir_key(data_dir))


@functools.lru_cache(maxsize=16)
def _band_bp(path: str):
    from synphot import SpectralElement

    return SpectralElement.from_file(path, wave_unit=u.AA)


def band_bandpass(band: str, data_dir=None):
    """Reference passband of ``specphot.mag_band`` from the data directory (e.g. ``johnson_v.txt``)."""
    return _band_bp(str(band_file(band, data_dir)))


@functools.lru_cache(maxsize=32)
def _spectrum_file(path: str):
    from synphot import SourceSpectrum

    return SourceSpectrum.from_file(path)


def source_spectrum(source: str | Path, sptype: str | None = None, data_dir=None):
    """Un-normalised source spectrum: a Pickles type (``source="pickles"``) or a spectrum file.

    Parameters
    ----------
    source : {"pickles"} or path
        ``"pickles"`` takes ``sptype`` from the Pickles UVK atlas of the data directory; any other
        value is a file that ``synphot.SourceSpectrum.from_file`` reads (FITS table or ASCII).
    sptype : str, optional
        Spectral type for Pickles (``"G2V"``).
    """
    if str(source) == "pickles":
        if not sptype:
            raise ValueError('specphot.source = "pickles" needs specphot.sptype')
        return _spectrum_file(str(pickles_file(sptype, data_dir)))
    path = Path(source).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"specphot.source = {str(source)!r}: spectrum file not found")
    return _spectrum_file(str(path.resolve()))


@dataclass(frozen=True)
class SynthPhot:
    """Synthetic photometry of the renormalised source through one VAMPIRES filter.

    Attributes
    ----------
    filter : str
    flux_jy : float
        Effective stimulus in Jy (``Observation.effstim(u.Jy)``).
    mag : float
        Effective stimulus in Vega magnitudes.
    photon_rate : float
        Photons/s through the filter over :data:`TELESCOPE_AREA_M2`.
    refmag, refband : float, str
        The normalisation (``specphot.mag`` in ``specphot.mag_band``).
    """

    filter: str
    flux_jy: float
    mag: float
    photon_rate: float
    refmag: float
    refband: str
    pivot_nm: float


@functools.lru_cache(maxsize=256)
def _synth(
    filter_name: str, source: str, sptype: str | None, mag: float, band: str, directory: str | None
) -> SynthPhot:
    from synphot import Observation
    from synphot.units import VEGAMAG

    # the source first: a missing Pickles atlas is the most useful thing to report
    spec = source_spectrum(source, sptype, directory)
    ref = band_bandpass(band, directory)
    vega = vega_spectrum(directory)
    # taper: a spectrum file may not cover the whole reference band
    spec = spec.normalize(mag * VEGAMAG, band=ref, vegaspec=vega, force="taper")
    bp = filter_bandpass(filter_name, directory)
    obs = Observation(spec, bp, force="taper")
    return SynthPhot(
        filter=canonical_filter_name(filter_name),
        flux_jy=float(obs.effstim(u.Jy).value),
        mag=float(obs.effstim(VEGAMAG, vegaspec=vega).value),
        photon_rate=float(obs.countrate(area=TELESCOPE_AREA_M2 * u.m**2).value),
        refmag=float(mag),
        refband=band,
        pivot_nm=float(bp.pivot().to_value(u.nm)),
    )


def synthetic_photometry(
    filter_name: str,
    source: str | Path = "pickles",
    sptype: str | None = None,
    mag: float = 0.0,
    mag_band: str = "V",
    data_dir=None,
) -> SynthPhot:
    """Flux (Jy), Vega magnitude and photon rate of a star through a VAMPIRES filter (cached).

    The source (Pickles type or spectrum file) is renormalised to ``mag`` (Vega magnitudes) in
    ``mag_band`` using the Vega spectrum of the data directory, then observed through the filter.

    Examples
    --------
    Pickles G2V at V = 6 through 750-50 gives about 19.2 Jy with the reference curves.

    Raises
    ------
    vampd.specphot.data.DataFileError
        A file is missing (the message names it and says how to set the data directory).
    """
    band = str(mag_band).strip()
    band = band.upper() if band.lower() in ("r", "i") else band
    src = "pickles" if str(source) == "pickles" else str(Path(source).expanduser().resolve())
    return _synth(canonical_filter_name(filter_name), src, sptype, float(mag), band, _dir_key(data_dir))

"""Conversion factors from e-/s to the configured unit, per field (docs/instrument.md §8).

Pure functions: metrics and headers in, factors and headers out. The sequence trigger
(:mod:`vampd.engine.specphot_trigger`) reads the files and calls these.

Deviations from the reference, on purpose
------------------------------------------
* vampd products are already in e-/s (docs/instrument.md §2.6), so the instrumental flux is *not* divided by the
  exposure time again.
* The instrumental flux of a sequence is the median over all its files' PSFs and frames.
* Coronagraphic data: the star's flux is the satellite-spot flux divided by the spot contrast
  (docs/instrument.md §8.3.5) for *every* unit, so ``Jy`` is calibrated on the star rather than on one spot (the
  reference ignored the spot contrast there, docs/instrument.md §13.18).
* ``contrast`` is refused with ``zeropoints`` (nothing says how bright the star is).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from astropy.io import fits

from vampd.instrument.filters import PUPIL_DIAMETER_M, filter_info

__all__ = [
    "UNITS",
    "SpecphotError",
    "SpecphotResult",
    "instrumental_flux",
    "satellite_spot_contrast",
    "conversion_factor",
    "specphot_header",
    "apply_units",
    "calibrate_hdul",
]

UNITS = ("e-/s", "contrast", "Jy", "Jy/arcsec^2")
_METRIC_KEY = {"photometry": "photf", "sum": "sum"}
#: satellite-spot contrast per spot, P(x) = a·x + b·x², x = OPD in waves (Lucas+2024 table 9)
SPOT_CONTRAST_COEFFS: dict[float, tuple[float, float]] = {
    10.3: (-0.111, 14.217),
    15.5: (-0.043, 7.634),
    31.0: (-0.002, 0.561),
}


class SpecphotError(ValueError):
    """A calibration that cannot be made (missing metric or header keyword, unsupported unit)."""


def instrumental_flux(
    metrics: Mapping[str, np.ndarray] | Sequence[Mapping[str, np.ndarray]], flux_metric: str = "photometry"
) -> np.ndarray:
    """Instrumental flux per field [e-/s]: median over PSFs and frames, non-positive values excluded.

    Parameters
    ----------
    metrics : mapping or sequence of mappings
        Metrics of one file, or of every file of a sequence, each ``{key: (nfields, npsfs, nframes)}``
        (docs/instrument.md §3.3). Frames of several files are pooled.
    flux_metric : {"photometry", "sum"}
        ``photometry`` uses the aperture sum ``photf``, ``sum`` the window sum ``sum``.

    Returns
    -------
    ndarray (nfields,)
        NaN for a field without any positive value.

    Notes
    -----
    The data are already e-/s, so no division by the exposure time is made (the reference divided
    e-/s sums by EXPTIME once more; vampd does not).
    """
    if flux_metric not in _METRIC_KEY:
        raise SpecphotError(f"specphot.flux_metric = {flux_metric!r}: expected 'photometry' or 'sum'")
    key = _METRIC_KEY[flux_metric]
    parts = [metrics] if isinstance(metrics, Mapping) else list(metrics)
    if not parts:
        raise SpecphotError("instrumental_flux: no metrics given")
    arrays = []
    for i, m in enumerate(parts):
        if key not in m:
            hint = " (enable analysis.photometry)" if key == "photf" else ""
            raise SpecphotError(
                f"specphot.flux_metric = {flux_metric!r} needs metric {key!r}, absent from metrics #{i}{hint}"
            )
        a = np.asarray(m[key], dtype=float)
        if a.ndim != 3:
            raise SpecphotError(f"metric {key!r} #{i} has shape {a.shape}, expected (nfields, npsfs, nframes)")
        arrays.append(a.reshape(a.shape[0], -1))
    nf = {a.shape[0] for a in arrays}
    if len(nf) != 1:
        raise SpecphotError(f"metrics disagree on the number of fields: {sorted(nf)}")
    values = np.concatenate(arrays, axis=1)
    values = np.where(np.isfinite(values) & (values > 0), values, np.nan)
    out = np.full(values.shape[0], np.nan)
    ok = np.isfinite(values).any(axis=1)
    out[ok] = np.nanmedian(values[ok], axis=1)
    return out


def satellite_spot_contrast(grdamp_um: float, grdsep: float, waveave_nm: float) -> float:
    """Contrast of one astrogrid satellite spot relative to the star (docs/instrument.md §8.3.5).

    Parameters
    ----------
    grdamp_um : float
        Astrogrid amplitude ``X_GRDAMP`` [µm].
    grdsep : float
        Astrogrid separation ``X_GRDSEP`` [λ/D]; 10.3, 15.5 or 31.0.
    waveave_nm : float
        Average wavelength of the field's filter [nm].

    Examples
    --------
    >>> round(satellite_spot_contrast(0.05, 15.5, 750.0), 5)
    0.03107
    """
    for sep, (a, b) in SPOT_CONTRAST_COEFFS.items():
        if abs(float(grdsep) - sep) < 0.05:
            x = float(grdamp_um) * 1000.0 / float(waveave_nm)
            return float(a * x + b * x * x)
    raise SpecphotError(
        f"X_GRDSEP = {grdsep}: no satellite-spot contrast model (known separations: "
        f"{', '.join(str(s) for s in SPOT_CONTRAST_COEFFS)} λ/D)"
    )


@dataclass
class SpecphotResult:
    """Calibration of one field: factor to multiply e-/s by, and everything that produced it."""

    field: str
    filter: str
    unit: str
    factor: float
    source: str  # "zeropoints", "pickles" or "file"
    inst_flux: float | None = None  # e-/s, median over PSFs and frames (spots if coronagraphic)
    contrast: float = 1.0  # satellite-spot / star (1 without coronagraph)
    star_flux: float | None = None  # e-/s of the star = inst_flux / contrast
    c_fd: float | None = None  # Jy/(e-/s)
    airmass: float | None = None
    pxarea: float | None = None  # arcsec²/px
    zp_table: str | None = None
    mag: float | None = None  # synthetic Vega mag through the filter
    ref_flux_jy: float | None = None
    zp: float | None = None  # Vega mag giving 1 e-/s
    zp_jy: float | None = None
    throughput: float | None = None  # e-/photon
    refmag: float | None = None
    refband: str | None = None
    sptype: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {k: _plain(v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SpecphotResult:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def _plain(v):
    if isinstance(v, (np.floating, np.integer)):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _header_float(header: Mapping, key: str, what: str) -> float:
    try:
        return float(header[key])
    except KeyError:
        raise SpecphotError(f"header keyword {key} missing: needed for {what}") from None
    except (TypeError, ValueError):
        raise SpecphotError(f"header keyword {key} = {header[key]!r} is not a number (needed for {what})") from None


def conversion_factor(
    field_name: str,
    inst_flux: float | None,
    header: Mapping,
    unit: str,
    source: str = "zeropoints",
    *,
    filter_name: str | None = None,
    sptype: str | None = None,
    mag: float | None = None,
    mag_band: str | None = None,
    coronagraphic: bool = False,
    data_dir=None,
) -> SpecphotResult:
    """Conversion factor of one field from e-/s to ``unit`` (docs/instrument.md §8.2, §8.3).

    Parameters
    ----------
    field_name : str
        Field (its filter unless ``filter_name`` is given).
    inst_flux : float or None
        Instrumental flux [e-/s] from :func:`instrumental_flux` (not needed for zeropoints in Jy).
    header : mapping
        Product header: ``AIRMASS`` (zeropoints), ``PXAREA`` (Jy/arcsec²), ``X_GRDAMP`` and
        ``X_GRDSEP`` (coronagraphic).
    unit : {"e-/s", "contrast", "Jy", "Jy/arcsec^2"}
    source : {"zeropoints", "pickles"} or path
        Spectrum source; anything else is a spectrum file.

    Returns
    -------
    SpecphotResult
    """
    if unit not in UNITS:
        raise SpecphotError(f"specphot.unit = {unit!r}: expected one of {', '.join(UNITS)}")
    filt = filter_name or field_name
    kind = str(source) if str(source) in ("zeropoints", "pickles") else "file"
    res = SpecphotResult(field=field_name, filter=filt, unit=unit, factor=1.0, source=kind)
    res.pxarea = float(header["PXAREA"]) if "PXAREA" in header else None
    if inst_flux is not None and np.isfinite(inst_flux) and inst_flux > 0:
        res.inst_flux = float(inst_flux)
    if coronagraphic and (kind != "zeropoints" or unit == "contrast"):
        info = filter_info(filt, data_dir)
        res.contrast = satellite_spot_contrast(
            _header_float(header, "X_GRDAMP", "the satellite-spot contrast"),
            _header_float(header, "X_GRDSEP", "the satellite-spot contrast"),
            info.waveave,
        )
    if res.inst_flux is not None:
        res.star_flux = res.inst_flux / res.contrast

    if kind == "zeropoints":
        _calibrate_on_zeropoints(res, header, data_dir)
    else:
        _calibrate_on_spectrum(res, source, sptype, mag, mag_band, data_dir)
    res.factor = _unit_factor(res)
    return res


def _calibrate_on_zeropoints(res: SpecphotResult, header: Mapping, data_dir) -> None:
    """``c_fd`` [Jy/(e-/s)] from the filter's zero point at the header's airmass (docs/instrument.md §8.2), into ``res``."""
    from vampd.specphot.zeropoints import zeropoint

    if res.unit == "contrast":
        raise SpecphotError('specphot.unit = "contrast" cannot be made from specphot.source = "zeropoints"')
    zp = zeropoint(res.filter, data_dir)
    if res.unit != "e-/s":
        res.airmass = _header_float(header, "AIRMASS", "the zero-point extinction")
    else:
        res.airmass = header.get("AIRMASS")
    res.zp_table = zp.table
    if res.airmass is not None:
        res.c_fd = zp.c_fd(float(res.airmass))


def _calibrate_on_spectrum(res: SpecphotResult, source, sptype, mag, mag_band, data_dir) -> None:
    """``c_fd``, zero point and throughput from the star's synthetic photometry (docs/instrument.md §8.3), into ``res``.

    The spectrum is a Pickles type (``res.source == "pickles"``) or the file ``source``,
    normalised to ``mag`` in ``mag_band``; the star's flux is ``res.star_flux``.
    """
    if sptype is None and res.source == "pickles":
        raise SpecphotError('specphot.source = "pickles" needs specphot.sptype')
    if mag is None or mag_band is None:
        raise SpecphotError(f"specphot.source = {source!r} needs specphot.mag and specphot.mag_band")
    if res.star_flux is None:
        raise SpecphotError(
            f"field {res.field}: no positive instrumental flux (median of the flux metric over the "
            "sequence's PSFs and frames); cannot calibrate on the star"
        )
    from vampd.specphot.synth import synthetic_photometry

    spectrum = "pickles" if res.source == "pickles" else source
    sp = synthetic_photometry(res.filter, spectrum, sptype, mag, mag_band, data_dir)
    res.mag, res.ref_flux_jy = sp.mag, sp.flux_jy
    res.refmag, res.refband, res.sptype = sp.refmag, sp.refband, sptype
    res.c_fd = sp.flux_jy / res.star_flux
    res.zp = sp.mag + 2.5 * math.log10(res.star_flux)
    res.zp_jy = res.c_fd * 10 ** (0.4 * res.zp)
    res.throughput = res.star_flux / sp.photon_rate


def _unit_factor(res: SpecphotResult) -> float:
    """The factor from e-/s to ``res.unit`` (1 for e-/s)."""
    if res.unit == "Jy":
        return float(res.c_fd)
    if res.unit == "Jy/arcsec^2":
        if res.pxarea is None:
            raise SpecphotError("header keyword PXAREA missing: needed for Jy/arcsec^2")
        return float(res.c_fd) / res.pxarea
    if res.unit == "contrast":
        if res.star_flux is None:
            raise SpecphotError(f"field {res.field}: no positive instrumental flux; cannot compute a contrast")
        return 1.0 / res.star_flux
    return res.factor


def _g4(x: float) -> float:
    """4 significant figures (header values of docs/instrument.md §8.2)."""
    return float(f"{x:.4g}")


def specphot_header(
    header: fits.Header, results: Sequence[SpecphotResult], unit: str, data_dir=None, field_hdu: str | None = None
) -> fits.Header:
    """A copy of ``header`` with ``BUNIT`` and the ``DPP FLUX`` keys of every field (docs/instrument.md §1.3, §8).

    Parameters
    ----------
    header : Header
        Primary (or field) header of a product.
    results : sequence of SpecphotResult
        One per field, in field order.
    unit : str
    field_hdu : str, optional
        For a field HDU: its field name; the filter keys ``FILTNAME``/``WAVEMIN``/… then describe
        that field. For a primary header they describe the first field.
    """
    out = header.copy()
    out["BUNIT"] = unit
    out["HIERARCH DPP FLUX UNIT"] = unit
    if results:
        out["HIERARCH DPP FLUX SOURCE"] = results[0].source
    write_filter = not (results and results[0].source == "zeropoints" and unit == "e-/s")
    for r in results:
        f = r.field
        out[f"HIERARCH DPP FLUX FACTOR {f}"] = r.factor
        if r.inst_flux is not None:
            out[f"HIERARCH DPP FLUX INSTFLUX {f}"] = r.inst_flux
            out[f"HIERARCH DPP FLUX INSTMAG {f}"] = -2.5 * math.log10(r.inst_flux)
        out[f"HIERARCH DPP FLUX CONTRAST {f}"] = r.contrast
        if r.c_fd is not None:
            out[f"HIERARCH DPP FLUX C_FD {f}"] = _g4(r.c_fd)
        if r.source == "zeropoints":
            if r.zp_table is not None:
                out["HIERARCH DPP FLUX ZPTABLE"] = "builtin" if r.zp_table == "builtin" else "vampires_zeropoints.csv"
            continue
        out["HIERARCH DPP FLUX REFMAG"] = r.refmag
        out["HIERARCH DPP FLUX REFFILT"] = r.refband
        if r.sptype:
            out["HIERARCH DPP FLUX SPTYPE"] = r.sptype
        out[f"HIERARCH DPP FLUX MAG {f}"] = r.mag
        out[f"HIERARCH DPP FLUX REFFLUX {f}"] = r.ref_flux_jy
        out[f"HIERARCH DPP FLUX ZP {f}"] = r.zp
        out[f"HIERARCH DPP FLUX ZPJY {f}"] = r.zp_jy
        out[f"HIERARCH DPP FLUX THROUGH {f}"] = r.throughput
    if write_filter and results:
        target = next((r for r in results if r.field == field_hdu), results[0])
        info = filter_info(target.filter, data_dir)
        out["FILTNAME"] = (info.name, "filter of this field")
        out["WAVEMIN"] = (info.wavemin, "[nm] blue 50% edge")
        out["WAVEMAX"] = (info.wavemax, "[nm] red 50% edge")
        out["WAVEAVE"] = (info.waveave, "[nm] average wavelength")
        out["WAVEFWHM"] = (info.wavefwhm, "[nm] band width")
        out["DLAMLAM"] = (info.dlamlam, "fractional band width")
        out["DIAMETER"] = (PUPIL_DIAMETER_M, "[m] telescope diameter")
        out["RESELEM"] = (info.reselem_mas, "[mas] lambda/D")
    return out


def apply_units(data: np.ndarray, err: np.ndarray | None, factor) -> tuple[np.ndarray, np.ndarray | None]:
    """Multiply data and error by a per-field factor (field axis = third from last).

    Parameters
    ----------
    data, err : ndarray (..., nfields, ny, nx)
    factor : float or array (nfields,)

    Returns
    -------
    data, err : float32 ndarrays (new arrays)
    """
    f = np.asarray(factor, dtype=np.float64).reshape(-1)
    data = np.asarray(data)
    if f.size not in (1, data.shape[-3] if data.ndim >= 3 else 1):
        raise SpecphotError(f"apply_units: {f.size} factors for data of shape {data.shape} (fields on axis -3)")
    f = f[:, None, None] if data.ndim >= 3 else f
    out = (data * f).astype(np.float32)
    eout = None if err is None else (np.asarray(err) * np.abs(f)).astype(np.float32)
    return out, eout


def calibrate_hdul(
    hdul: fits.HDUList,
    results: Sequence[SpecphotResult],
    unit: str,
    data_dir=None,
    extra: Mapping[str, Any] | None = None,
) -> fits.HDUList:
    """A calibrated copy of a vampd product (primary data, ``ERR``, one header HDU per field).

    Data and error are multiplied by the field factors; every HDU gets ``BUNIT`` and the
    ``DPP FLUX`` keys; field HDUs get their own filter keys.
    """
    factors = [r.factor for r in results]
    data, err = apply_units(hdul[0].data, hdul["ERR"].data if "ERR" in hdul else None, factors)
    extra = dict(extra or {})

    def hdr(h, fld=None):
        h = specphot_header(h, results, unit, data_dir, field_hdu=fld)
        for k, v in extra.items():
            h[f"HIERARCH DPP FLUX {k}"] = v
        return h

    out = fits.HDUList([fits.PrimaryHDU(data, header=hdr(hdul[0].header))])
    for h in hdul[1:]:
        if h.name == "ERR":
            out.append(fits.ImageHDU(err, header=hdr(h.header), name="ERR"))
        else:
            out.append(fits.ImageHDU(h.data, header=hdr(h.header, h.header.get("FIELD", h.name)), name=h.name))
    return out

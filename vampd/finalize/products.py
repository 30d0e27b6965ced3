"""End-of-night products (docs/instrument.md §9.8, §11.1): the final collapse of the per-set Stokes files,
the MBI Stokes cube, footprint, Stokes table, ADI cubes and the output header table.

Deviations from the reference, on purpose (docs/instrument.md §13.13):

* the collapse over sets is a NaN-aware median (NaN is "no data", not 0); its error is
  ``sqrt(π/2)·sqrt(Σσ²)/n`` (the asymptotic efficiency of the median of Gaussian data);
  ``method="mean"`` gives ``Σx/n`` with ``sqrt(Σσ²)/n`` and ``method="ivar"`` the
  inverse-variance mean with ``1/sqrt(Σ1/σ²)``, each over the sets with a finite value;
* several fields (MBI) are collapsed by their **mean** (error RSS / n), as the running products
  do, and the polar products are recomputed from the mean Q, U;
* sets of different targets/filters are never mixed: one product group per (OBJECT, fields).

Every writer is deterministic (sorted inputs, no wall-clock keywords) and atomic, so a second
finalize rewrites byte-identical files.
"""

from __future__ import annotations

import csv
import io
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from astropy.io import fits

from vampd import __version__
from vampd.fitsio import atomic_write, write_fits_atomic
from vampd.instrument.angles import refresh_angles
from vampd.pdi.calibrated import write_calibrated
from vampd.pdi.cards import set_card
from vampd.pdi.running import set_exposure_cards
from vampd.pdi.stokes import product_names, stokes_products
from vampd.stages.combine import circular_mean, combine_headers

__all__ = [
    "COLLAPSE_METHODS",
    "StokesSet",
    "load_set_file",
    "collapse_sets",
    "collapse_fields",
    "final_header",
    "write_final_pdi",
    "write_table_csv",
    "header_table_rows",
    "adi_groups",
    "write_adi_cubes",
    "group_label",
]

COLLAPSE_METHODS = ("median", "mean", "ivar")
_STRUCTURAL = (
    "SIMPLE",
    "BITPIX",
    "NAXIS",
    "NAXIS1",
    "NAXIS2",
    "NAXIS3",
    "NAXIS4",
    "NAXIS5",
    "EXTEND",
    "BZERO",
    "BSCALE",
    "XTENSION",
    "PCOUNT",
    "GCOUNT",
    "EXTNAME",
    "CHECKSUM",
    "DATASUM",
    "DATE",
)
_SET_KEYS = ("DPP PDI SET INDEX", "DPP PDI SET KEY", "DPP PDI NMEMBERS")


@dataclass
class StokesSet:
    """One per-set Stokes file (docs/instrument.md §9.7): ``stokes``/``err`` (nfields, 4, N, N), headers, fields."""

    path: str
    stokes: np.ndarray
    err: np.ndarray
    header: fits.Header
    field_headers: list[fits.Header]
    fields: list[str]

    @property
    def mjd(self) -> float:
        return float(self.header.get("MJD", math.nan))

    @property
    def key(self) -> str:
        return str(self.header.get("HIERARCH DPP PDI SET KEY", Path(self.path).stem))

    @property
    def target(self) -> str:
        return str(self.header.get("OBJECT", "unknown"))


def load_set_file(path) -> StokesSet:
    """Read ``pdi/stokes/{name}_stokes_NNN.fits`` (PRIMARY, ERR, field header HDUs)."""
    with fits.open(path) as hdul:
        data = np.asarray(hdul[0].data, np.float32)
        err = np.asarray(hdul["ERR"].data, np.float32)
        header = hdul[0].header.copy()
        fhs = [h.header.copy() for h in hdul[1:] if h.name != "ERR" and h.data is None]
        fields = [h.name for h in hdul[1:] if h.name != "ERR" and h.data is None]
    if data.ndim == 3:
        data, err = data[None], err[None]
    if data.ndim != 4 or data.shape[1] != 4 or err.shape != data.shape:
        raise ValueError(f"{path}: Stokes data {data.shape} / ERR {err.shape}, expected (nfields, 4, N, N) twice")
    if not fields:
        fields = [str(header.get("FIELD", header.get("FILTER01", "F0")))]
        fhs = [header.copy()]
    if len(fields) != data.shape[0]:
        raise ValueError(f"{path}: {len(fields)} field HDUs for {data.shape[0]} fields")
    return StokesSet(str(path), data, err, header, fhs, fields)


def collapse_sets(
    stokes: np.ndarray, err: np.ndarray, method: str = "median"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Collapse ``(nsets, …)`` Stokes cubes over sets.

    Parameters
    ----------
    stokes, err : ndarray (nsets, …)
        NaN marks pixels without data.
    method : {"median", "mean", "ivar"}

    Returns
    -------
    data, err, count : ndarray (…)
        ``count`` = number of sets with a finite value per pixel.
    """
    if method not in COLLAPSE_METHODS:
        raise ValueError(f"collapse method = {method!r}, expected one of {COLLAPSE_METHODS}")
    x = np.asarray(stokes, np.float64)
    s = np.asarray(err, np.float64)
    ok = np.isfinite(x) & np.isfinite(s)
    n = ok.sum(axis=0)
    nn = np.where(n > 0, n, np.nan)
    var_sum = np.where(ok, s * s, 0.0).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        if method == "median":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN pixels stay NaN
                data = np.nanmedian(np.where(ok, x, np.nan), axis=0)
            e = math.sqrt(math.pi / 2) * np.sqrt(var_sum) / nn
            e = np.where(n == 1, np.sqrt(var_sum), e)  # one set: its own error
        elif method == "mean":
            data = np.where(ok, x, 0.0).sum(axis=0) / nn
            e = np.sqrt(var_sum) / nn
        else:
            good = ok & (s > 0)
            w = np.where(good, 1.0 / np.where(good, s * s, 1.0), 0.0)
            ws = w.sum(axis=0)
            wsn = np.where(ws > 0, ws, np.nan)
            data = (w * np.where(good, x, 0.0)).sum(axis=0) / wsn
            e = 1.0 / np.sqrt(wsn)
    return data.astype(np.float32), e.astype(np.float32), n.astype(np.int32)


def collapse_fields(
    data8: np.ndarray, err8: np.ndarray, cyl_stokes: str = "azimuthal"
) -> tuple[np.ndarray, np.ndarray]:
    """Mean over MBI fields of ``(nfields, 8, N, N)`` products (error RSS / n), polar products
    recomputed from the mean I_Q, I_U, Q, U → ``(8, N, N)``."""
    with np.errstate(invalid="ignore", divide="ignore"):
        n = np.sum(np.isfinite(data8[:, :4]), axis=0)
        nn = np.where(n > 0, n, np.nan)
        m = np.nansum(data8[:, :4], axis=0) / nn
        e = np.sqrt(np.nansum(err8[:, :4] ** 2, axis=0)) / nn
    d, s = stokes_products(m[None], e[None], cyl_stokes)
    return d[0], s[0]


def _drop_per_set_values(h: fits.Header) -> fits.Header:
    """Remove (in place) the per-set stellar polarisation/IP values: they vary, their mean is not a product value."""
    for key in list(h.keys()):
        if key.startswith("DPP PDI") and any(t in key for t in (" FLUX", "DOLP", "AOLP", "IP_P", "IP_ANG", "IP_POL")):
            h.remove(key, ignore_missing=True, remove_all=True)
    return h


def _strip(h: fits.Header) -> fits.Header:
    h = h.copy()
    for key in _STRUCTURAL:
        h.remove(key, ignore_missing=True, remove_all=True)
    for key in _SET_KEYS:
        h.remove(key, ignore_missing=True, remove_all=True)
    return h


def final_header(
    sets: Sequence[StokesSet],
    method: str,
    nfiles: int,
    provenance: dict | None = None,
    cyl_stokes: str = "azimuthal",
) -> fits.Header:
    """Primary header of the final collapse (docs/instrument.md §9.8): combined set headers (§7.2), ``NCOADD`` =
    Σ of the sets' NCOADD (frames, per camera), ``TINT`` = Σ of their TINT (per camera), the
    ``DPP COADD`` twins equal to them (:func:`~vampd.pdi.running.set_exposure_cards`), ``DPP PDI
    NFILES`` = number of unique raw files, WCS angle 0, plane names, collapse method and
    provenance (``provenance``: keyword → (value, comment)).

    Unlike the reference, ``NCOADD`` is a frame count in every product (per file, per set and
    final) and is not divided by the number of MBI fields: every field of a file comes from the
    same frames.
    """
    hdr = _drop_per_set_values(_strip(combine_headers([_strip(s.header) for s in sets])))
    tint = sum(float(s.header.get("TINT", 0.0) or 0.0) for s in sets)
    ncoadd = sum(float(s.header.get("NCOADD", 0) or 0) for s in sets)
    set_exposure_cards(hdr, ncoadd, tint, "(per camera, all sets)")
    set_card(hdr, "HIERARCH DPP PDI NFILES", int(nfiles), "unique raw files in the collapsed sets")
    refresh_angles(hdr)  # PA and DEROTANG at the collapse's MJD (combine_headers does it too)
    names = product_names(cyl_stokes)
    set_card(hdr, "CTYPE3", "STOKES", "plane axis")
    set_card(hdr, "STOKES", ",".join(names), "Stokes product planes")
    set_card(hdr, "BUNIT", "e-/s", "per camera; I_Q = mean beam; AOLP in rad")
    set_card(hdr, "HIERARCH DPP PDI NSETS", len(sets), "sets in the final collapse")
    set_card(hdr, "HIERARCH DPP PDI COLLAPSE", method, "collapse over sets")
    set_card(hdr, "HIERARCH DPP VERSION", __version__, "vampd version")
    for key, val in (provenance or {}).items():
        set_card(hdr, f"HIERARCH {key}", *(val if isinstance(val, tuple) else (val,)))
    return hdr


def group_label(target: str, fields: Sequence[str]) -> str:
    """File-name-safe ``{target}_{fields}`` used when a night has several product groups.

    Each part follows :func:`vampd.filenames.safe_part` (at most 64 characters, long values
    hashed), so a 600-character OBJECT still gives a name the file system accepts.
    """
    from vampd.filenames import safe_part

    parts = [safe_part(target)] + ([safe_part("-".join(fields))] if fields else [])
    return "_".join(parts)


def _final_paths(outdir, name: str, label: str | None) -> dict[str, Path]:
    """The reference's PDI product names (the running products' paths, so finalize replaces them)."""
    from vampd.pdi.running import running_paths

    paths = running_paths(outdir, name if not label else f"{name}_{label}")
    paths.pop("accumulator", None)
    return paths


def write_final_pdi(
    outdir,
    name: str,
    sets: Sequence[StokesSet],
    method: str = "median",
    cyl_stokes: str = "azimuthal",
    nfiles: int | None = None,
    provenance: dict | None = None,
    label: str | None = None,
    unit_factors: tuple[str, dict[str, float]] | None = None,
) -> dict[str, Path]:
    """Collapse ``sets`` (one target and field list) and write the final PDI products.

    Writes ``pdi/{name}[_{label}]_stokes_coll.fits`` (8, N, N) + ERR + field header HDUs,
    ``_stokes_cube.fits`` (nfields, 8, N, N) when nfields > 1, ``_footprint.fits`` (fraction of
    sets with a finite Q; (N, N) or (nfields, N, N)) and ``_stokes_table.csv`` (set headers,
    MJD order). With ``unit_factors = (unit, {field: factor})`` from specphot, calibrated copies
    ``…_stokes_coll_{unit}.fits`` (and ``…_stokes_cube_{unit}.fits`` for MBI) are written too
    (:func:`vampd.pdi.calibrated.write_calibrated`: every field by its own factor, AOLP unscaled).

    Returns the written paths by kind.
    """
    sets = _sorted_compatible(sets)
    fields = sets[0].fields
    nf = len(fields)
    data4, err4, count = collapse_sets(np.stack([s.stokes for s in sets]), np.stack([s.err for s in sets]), method)
    data8, err8 = stokes_products(data4, err4, cyl_stokes)  # (nf, 8, N, N)
    if nfiles is None:
        nfiles = sum(int(s.header.get("HIERARCH DPP PDI NMEMBERS", 0) or 0) for s in sets)
    hdr = final_header(sets, method, nfiles, provenance, cyl_stokes)
    fhdus = _final_field_hdus(sets[0], hdr, nfiles, cyl_stokes)
    paths = _final_paths(outdir, name, label)
    written, coll_hdr = _write_stokes_products(paths, data8, err8, hdr, fhdus, nf > 1, cyl_stokes)
    if unit_factors is not None and unit_factors[1]:
        # each field by its own factor; the MBI collapse is the mean of the calibrated fields
        unit, factors = unit_factors
        try:
            written.update(
                write_calibrated(
                    paths["coll"], paths["cube"], data8, err8, coll_hdr, fhdus, fields, unit, factors, cyl_stokes
                )
            )
        except ValueError as exc:
            warnings.warn(f"{paths['coll'].name}: no calibrated copy: {exc}", stacklevel=2)
    written["footprint"] = _write_footprint(paths["footprint"], count, len(sets), nf)
    rows = [dict({k: v for k, v in header_row(s.header).items() if k not in _STRUCTURAL}, path=s.path) for s in sets]
    written["table"] = write_table_csv(paths["table"], rows)
    return written


def _sorted_compatible(sets: Sequence[StokesSet]) -> list[StokesSet]:
    """``sets`` in (MJD, key) order, after checking they share one Stokes shape and field list."""
    if not sets:
        raise ValueError("no complete HWP set to collapse")
    sets = sorted(sets, key=lambda s: (s.mjd, s.key))
    fields = sets[0].fields
    shape = sets[0].stokes.shape
    for s in sets[1:]:
        if s.stokes.shape != shape or s.fields != fields:
            raise ValueError(
                f"{Path(s.path).name}: Stokes cube {s.stokes.shape} fields {s.fields}, "
                f"{Path(sets[0].path).name} has {shape} {fields}; cannot collapse them together"
            )
    return sets


def _final_field_hdus(first: StokesSet, hdr: fits.Header, nfiles: int, cyl_stokes: str) -> list[fits.ImageHDU]:
    """One header-only HDU per field (from the first set's), with the collapse's exposure cards."""
    fhdus = []
    for f, fh in zip(first.fields, first.field_headers, strict=False):
        h = _drop_per_set_values(_strip(fh))
        h["CTYPE3"] = "STOKES"
        h["STOKES"] = ",".join(product_names(cyl_stokes))
        h["FIELD"] = f
        set_exposure_cards(h, hdr["NCOADD"], hdr["TINT"], "(per camera, all sets)")
        set_card(h, "HIERARCH DPP PDI NFILES", int(nfiles), "unique raw files in the collapsed sets")
        fhdus.append(fits.ImageHDU(header=h, name=f))
    return fhdus


def _write_stokes_products(
    paths, data8, err8, hdr: fits.Header, fhdus, mbi: bool, cyl_stokes: str
) -> tuple[dict[str, Path], fits.Header]:
    """Write ``_stokes_cube`` (``mbi`` only) and ``_stokes_coll``; returns the paths and the collapse header."""
    written: dict[str, Path] = {}
    if mbi:
        written["cube"] = write_fits_atomic(
            paths["cube"],
            fits.HDUList(
                [fits.PrimaryHDU(data8, header=hdr), fits.ImageHDU(err8, name="ERR"), *[h.copy() for h in fhdus]]
            ),
        )
        coll, ecoll = collapse_fields(data8, err8, cyl_stokes)
        chdr = hdr.copy()
        chdr["FIELD"] = ("COMB", "mean over fields")
    else:
        coll, ecoll = data8[0], err8[0]
        chdr = hdr.copy()
    written["coll"] = write_fits_atomic(
        paths["coll"], fits.HDUList([fits.PrimaryHDU(coll, header=chdr), fits.ImageHDU(ecoll, name="ERR"), *fhdus])
    )
    return written, chdr


def _write_footprint(path, count: np.ndarray, nsets: int, nfields: int) -> Path:
    """Fraction of sets with a finite Q per pixel: (N, N), or (nfields, N, N) for MBI."""
    fp = (count[:, 2] / nsets).astype(np.float32)
    fhdr = fits.Header()
    fhdr["HIERARCH DPP PDI NSETS"] = (nsets, "sets in the final collapse")
    fhdr["COMMENT"] = "fraction of sets with a finite Q per pixel"
    return write_fits_atomic(path, fits.HDUList([fits.PrimaryHDU(fp[0] if nfields == 1 else fp, header=fhdr)]))


# ------------------------------------------------------------------------------------------------
# tables


def header_row(header: fits.Header) -> dict:
    """A header as an ordered ``{keyword: value}`` (no COMMENT/HISTORY, first occurrence wins)."""
    row: dict = {}
    for card in header.cards:
        k = card.keyword
        if not k or k in ("COMMENT", "HISTORY") or k in row:
            continue
        v = card.value
        row[k] = v if not isinstance(v, fits.card.Undefined) else ""
    return row


def header_table_rows(products: Sequence[str]) -> list[dict]:
    """Primary-header rows (+ ``path``) of reduced products, sorted by (MJD, path)."""
    rows = []
    for p in products:
        h = fits.getheader(p)
        row = header_row(h)
        for key in _STRUCTURAL:
            row.pop(key, None)
        row["path"] = str(p)
        rows.append(row)
    return sorted(rows, key=lambda r: (_float(r.get("MJD")), r["path"]))


def write_table_csv(path, rows: Sequence[dict]) -> Path:
    """CSV with the union of the rows' keys as columns (first-seen order), written atomically."""
    cols: list[str] = []
    seen = set()
    for r in rows:
        for k in r:
            if k not in seen:
                seen.add(k)
                cols.append(k)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    text = buf.getvalue()
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def _float(v) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return math.inf
    return f if math.isfinite(f) else math.inf


# ------------------------------------------------------------------------------------------------
# ADI cubes (docs/instrument.md §11.1)


@dataclass
class _Item:
    path: str
    mjd: float
    flc: str
    derotang: float
    target: str = ""
    extra: dict = field(default_factory=dict)


def adi_groups(rows: Sequence[dict], tolerance_days: float = 1e-5) -> list[list[dict]]:
    """Group header rows by (MJD, U_FLC) like the reference; in vampd the cameras' MJDs match
    within ``tolerance_days`` (≈0.9 s) rather than exactly. Rows need ``MJD``, ``U_FLC``, ``path``.
    Groups come in time order; members of a group sorted by path."""
    items = sorted(rows, key=lambda r: (str(r.get("U_FLC", "NA")), _float(r.get("MJD")), r["path"]))
    groups: list[list[dict]] = []
    for r in items:
        g = groups[-1] if groups else None
        if (
            g is not None
            and str(g[0].get("U_FLC", "NA")) == str(r.get("U_FLC", "NA"))
            and abs(_float(r.get("MJD")) - _float(g[0].get("MJD"))) <= tolerance_days
        ):
            g.append(r)
        else:
            groups.append([r])
    return sorted(groups, key=lambda g: (_float(g[0].get("MJD")), str(g[0].get("U_FLC", "NA")), g[0]["path"]))


def write_adi_cubes(outdir, name: str, rows: Sequence[dict], label: str | None = None) -> dict[str, Path]:
    """``adi/{name}[_{label}]_adi_cube.fits`` (ngroups, nfields, N, N) = group means of the coadded
    products, and ``_adi_angles.fits`` = the groups' mean DEROTANG (float32)."""
    groups = adi_groups(rows)
    if not groups:
        return {}
    cube, angles = [], []
    shape = None
    for g in groups:
        imgs = []
        for r in g:
            d = np.asarray(fits.getdata(r["path"]), np.float32)
            d = d[None] if d.ndim == 2 else d
            if shape is None:
                shape = d.shape
            if d.shape != shape:
                raise ValueError(f"{r['path']}: product shape {d.shape}, ADI cube has {shape}")
            imgs.append(d)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # NaN-padded corners
            cube.append(np.nanmean(np.stack(imgs), axis=0) if len(imgs) > 1 else imgs[0])
        angles.append(circular_mean([_float(r.get("DEROTANG", 0.0)) for r in g]))
    base = name if not label else f"{name}_{label}"
    adi = Path(outdir) / "adi"
    h = fits.Header()
    h["HIERARCH DPP ADI NGROUPS"] = (len(groups), "groups of (MJD, U_FLC)")
    h["HIERARCH DPP VERSION"] = (__version__, "vampd version")
    out = {
        "adi_cube": write_fits_atomic(
            adi / f"{base}_adi_cube.fits", fits.HDUList([fits.PrimaryHDU(np.stack(cube).astype(np.float32), header=h)])
        ),
        "adi_angles": write_fits_atomic(
            adi / f"{base}_adi_angles.fits", fits.HDUList([fits.PrimaryHDU(np.asarray(angles, np.float32))])
        ),
    }
    return out

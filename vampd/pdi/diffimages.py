"""Diagnostic difference images (docs/instrument.md §10), not derotated.

The reference groups products by **exact** MJD, which only works when both cameras' products
have identical combined times (docs/instrument.md §13.19). Here products are matched by the overlap of their
exposure spans ``[MJD-STR, MJD-END]`` (same target, filter, FLC state and HWP angle within the
tolerance; the partner with the largest overlap wins):

* single: one camera-1 and one camera-2 product of the same FLC state →
  ``diff/single/{name}_single_diff_{stem}.fits``: PRIMARY ``½(c1 − c2)``, ``SUM`` ``½(c1 + c2)``,
  ``ERR`` ``½·hypot(σ1, σ2)``, field header HDUs; NCOADD/TINT halved; WCS angle = DEROTANG;
* double: two single pairs (FLC A and B) that overlap in time →
  ``diff/double/{name}_double_diff_{stem}.fits``: PRIMARY ``½[(c1A − c2A) − (c1B − c2B)]``,
  ``SUM`` ``½Σ``, ``ERR`` ``½·sqrt(Σσ²)``; NCOADD/TINT divided by 4.

``{stem}`` is the input stem of the camera-1 (FLC A) product: a stable name under incremental
arrival, where the reference's running index is not.

Linear nights: the candidates of a new file come from an indexed ledger query over a time
window around it (:func:`near_records`), and each product's exposure span is read from its
header once and then kept in the ledger (``files.mjd_str/mjd_end``): the work per file does
not grow with the number of files already done.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from astropy.io import fits

from vampd.fitsio import output_stem, write_fits_atomic
from vampd.instrument.wcs import apply_wcs
from vampd.pdi.differences import double_difference, single_difference
from vampd.pdi.sets import nominal_hwp

__all__ = [
    "overlap",
    "match_single",
    "match_double",
    "write_single_diff",
    "write_double_diff",
    "diff_paths",
    "span_of",
    "near_records",
]

#: candidates of a new file: done files whose MJD is within this many spans of its own (and ≤ 0.02 d)
_SPANS_AROUND = 4.0
_MAX_WINDOW = 0.02


def overlap(a: Mapping, b: Mapping) -> float:
    """Overlap [days] of the spans ``[mjd_str, mjd_end]`` of two records (≤ 0: none)."""
    return min(float(a["mjd_end"]), float(b["mjd_end"])) - max(float(a["mjd_str"]), float(b["mjd_str"]))


def _compatible(a: Mapping, b: Mapping, tolerance: float) -> bool:
    if str(a.get("target")) != str(b.get("target")) or str(a.get("filter")) != str(b.get("filter")):
        return False
    ha, hb = a.get("hwp"), b.get("hwp")
    if ha is None or hb is None:
        return ha is None and hb is None
    if abs(float(ha) - float(hb)) <= tolerance:
        return True
    na = nominal_hwp(ha, tolerance)
    return na is not None and na == nominal_hwp(hb, tolerance)


def match_single(records: Sequence[Mapping], tolerance: float = 0.1) -> list[tuple[Mapping, Mapping]]:
    """Camera pairs ``(cam1, cam2)`` of the same FLC state whose exposure spans overlap.

    Each record needs ``path, camera, flc, hwp, mjd_str, mjd_end, target, filter``. Greedy by
    largest overlap; each record is used at most once. Sorted by the cam-1 start time.
    """
    c1 = [r for r in records if int(r["camera"]) == 1]
    c2 = [r for r in records if int(r["camera"]) == 2]
    cands = []
    for a in c1:
        for b in c2:
            if str(a.get("flc") or "NA") != str(b.get("flc") or "NA") or not _compatible(a, b, tolerance):
                continue
            ov = overlap(a, b)
            if ov > 0:
                cands.append((-ov, str(a["path"]), str(b["path"]), a, b))
    pairs = _greedy_pairs(cands)
    pairs.sort(key=lambda p: (float(p[0]["mjd_str"]), str(p[0]["path"])))
    return pairs


def _greedy_pairs(cands: list[tuple]) -> list[tuple]:
    """Pair candidates ``(-overlap, key_a, key_b, a, b)``: largest overlap first, each item used once."""
    cands.sort(key=lambda t: t[:3])
    used: set[str] = set()
    out = []
    for _, ka, kb, a, b in cands:
        if ka in used or kb in used:
            continue
        used.update((ka, kb))
        out.append((a, b))
    return out


def _span(pair):
    return {
        "mjd_str": min(float(r["mjd_str"]) for r in pair),
        "mjd_end": max(float(r["mjd_end"]) for r in pair),
    }


def match_double(pairs: Sequence[tuple[Mapping, Mapping]], tolerance: float = 0.1) -> list[tuple[tuple, tuple]]:
    """``(pair_A, pair_B)`` of single pairs with FLC A and B, same HWP/target/filter, overlapping spans."""
    pa = [p for p in pairs if str(p[0].get("flc")) == "A"]
    pb = [p for p in pairs if str(p[0].get("flc")) == "B"]
    cands = []
    for a in pa:
        for b in pb:
            if not _compatible(a[0], b[0], tolerance):
                continue
            ov = overlap(_span(a), _span(b))
            if ov > 0:
                cands.append((-ov, str(a[0]["path"]), str(b[0]["path"]), a, b))
    out = _greedy_pairs(cands)
    out.sort(key=lambda p: (float(p[0][0]["mjd_str"]), str(p[0][0]["path"])))
    return out


def _input_stem(product_path: str, name: str) -> str:
    stem = output_stem(product_path)
    if stem.startswith(f"{name}_"):
        stem = stem[len(name) + 1 :]
    if stem.endswith("_coll"):
        stem = stem[: -len("_coll")]
    return stem


def diff_paths(outdir, name: str, first_product: str) -> dict[str, Path]:
    """``diff/single/…`` and ``diff/double/…`` paths keyed by the first product's input stem."""
    stem = _input_stem(first_product, name)
    return {
        "single": Path(outdir) / "diff" / "single" / f"{name}_single_diff_{stem}.fits",
        "double": Path(outdir) / "diff" / "double" / f"{name}_double_diff_{stem}.fits",
    }


def _read(path):
    with fits.open(path) as hdul:
        data = np.asarray(hdul[0].data, np.float32)
        err = np.asarray(hdul["ERR"].data, np.float32)
        hdr = hdul[0].header.copy()
        fields = [h.header.copy() for h in hdul[1:] if h.name != "ERR" and h.data is None]
    return data, err, hdr, fields


def _out_header(hdr: fits.Header, divide: int) -> fits.Header:
    h = hdr.copy()
    for key in ("TINT", "NCOADD", "DPP COADD NCOADD", "DPP COADD TINT"):
        if key in h:
            h[key] = h[key] / divide
    h.remove("U_CAMERA", ignore_missing=True)
    try:
        h = apply_wcs(h, float(h.get("DEROTANG", 0.0)))
    except Exception:  # noqa: BLE001 -- WCS is decoration on a diagnostic image
        pass
    for key in ("BITPIX", "NAXIS", "NAXIS1", "NAXIS2", "NAXIS3", "BZERO", "BSCALE", "EXTEND", "SIMPLE"):
        h.remove(key, ignore_missing=True, remove_all=True)
    return h


def write_single_diff(path, prod1: str, prod2: str) -> Path:
    """Write a single-difference image from the cam-1 and cam-2 coadded products."""
    d1, e1, h1, f1 = _read(prod1)
    d2, e2, _, _ = _read(prod2)
    if d1.shape != d2.shape:
        raise ValueError(f"{Path(prod1).name} {d1.shape} and {Path(prod2).name} {d2.shape}: different shapes")
    diff, tot, err = single_difference(d1, d2, e1, e2)
    h = _out_header(h1, 2)
    hdus = [fits.PrimaryHDU(diff, header=h), fits.ImageHDU(tot, name="SUM"), fits.ImageHDU(err, name="ERR")]
    hdus += [fits.ImageHDU(header=fh, name=fh.get("EXTNAME", f"F{i}")) for i, fh in enumerate(f1)]
    return write_fits_atomic(path, fits.HDUList(hdus))


def write_double_diff(path, prod1a: str, prod2a: str, prod1b: str, prod2b: str) -> Path:
    """Write a double-difference image from four coadded products (cam1/cam2 × FLC A/B)."""
    arrs = [_read(p) for p in (prod1a, prod2a, prod1b, prod2b)]
    shapes = {a[0].shape for a in arrs}
    if len(shapes) != 1:
        raise ValueError(f"double difference of {Path(prod1a).name}…: different shapes {sorted(shapes)}")
    diff, tot, err = double_difference(*(a[0] for a in arrs), *(a[1] for a in arrs))
    h = _out_header(arrs[0][2], 4)
    hdus = [fits.PrimaryHDU(diff, header=h), fits.ImageHDU(tot, name="SUM"), fits.ImageHDU(err, name="ERR")]
    hdus += [fits.ImageHDU(header=fh, name=fh.get("EXTNAME", f"F{i}")) for i, fh in enumerate(arrs[0][3])]
    return write_fits_atomic(path, fits.HDUList(hdus))


def span_of(product) -> tuple[float, float] | None:
    """``(MJD-STR, MJD-END)`` of a coadded product (one header read), None if unreadable."""
    try:
        h = fits.getheader(product)
        return float(h["MJD-STR"]), float(h["MJD-END"])
    except (OSError, KeyError, TypeError, ValueError):
        return None


def _with_span(ledger, rec: dict) -> dict | None:
    if rec.get("mjd_str") is None or rec.get("mjd_end") is None:
        span = span_of(rec["product"])
        if span is None:
            return None
        ledger.record_span(rec["path"], *span)  # read once per product for the whole night
        rec = dict(rec, mjd_str=span[0], mjd_end=span[1])
    return rec


def near_records(ledger, path: str) -> list[dict]:
    """Records (with exposure spans) of the done files that may pair with ``path``: same
    target and filter, MJD within a few exposure spans of it. Cost independent of the night's
    length (indexed query, spans cached in the ledger)."""
    recs = ledger.diff_candidates(str(path), _MAX_WINDOW)
    this = next((r for r in recs if r["path"] == str(path)), None)
    if this is None or (this := _with_span(ledger, this)) is None:
        return []
    span = max(float(this["mjd_end"]) - float(this["mjd_str"]), 1e-6)
    window = min(_MAX_WINDOW, _SPANS_AROUND * span + 2.0 / 86400)
    mjd = float(this["mjd"])
    out = []
    for r in recs:
        if abs(float(r["mjd"]) - mjd) <= window:
            r = this if r["path"] == this["path"] else _with_span(ledger, r)
            if r is not None:
                out.append(r)
    return out

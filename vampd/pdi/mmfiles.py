"""Per-file Mueller matrices ``pdi/mm/{stem}_mm.fits`` (docs/instrument.md §9.4, §9.5).

PRIMARY = ``(nfields, 4, 4)`` float32 with the product's primary header; one ``(4, 4)``
ImageHDU per field (EXTNAME = field). The model parameters are the ideal ones
(``polarimetry.use_ideal_mm``) or a row of the table ``polarimetry.mm_table`` (never
downloaded); with neither, the ideal model is used and the header says so (``DPP PDI MM MODEL``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from astropy.io import fits

from vampd.fitsio import output_stem, write_fits_atomic
from vampd.instrument.mueller import MuellerParams, mm_table_key, mueller_from_header
from vampd.pdi.cards import set_card

__all__ = ["mm_params", "file_mueller", "mm_path", "write_mm_file"]


def mm_params(pcfg, field: str, header) -> tuple[MuellerParams, str]:
    """Model parameters for one field and a description for the headers.

    ``use_ideal_mm`` → ideal; else ``mm_table`` (row :func:`mm_table_key` of the field, or of
    FILTER01 for a single field); a missing table → ideal, said in the description.
    """
    kind = "emccd" if "U_EMGAIN" in header else "cmos"
    if pcfg.use_ideal_mm:
        return MuellerParams.ideal(kind), "ideal"
    table = getattr(pcfg, "mm_table", None)
    if table is None:
        return MuellerParams.ideal(kind), "ideal (no mm_table given)"
    table = Path(table)
    if not table.exists():
        return MuellerParams.ideal(kind), f"ideal (mm_table {table.name} missing)"
    key = mm_table_key(field)
    return MuellerParams.from_table(table, key, kind), f"table {table.name} row {key}"


def file_mueller(header: fits.Header, fields: list[str], pcfg, path=None) -> tuple[np.ndarray, list[str]]:
    """``(nfields, 4, 4)`` Mueller matrices of one reduced file and the model description per field.

    Raises
    ------
    vampd.instrument.headers.HeaderError
        A keyword the model needs is missing (names the file and keyword).
    """
    out = np.empty((len(fields), 4, 4))
    desc = []
    for i, f in enumerate(fields):
        params, d = mm_params(pcfg, f, header)
        out[i] = mueller_from_header(header, params, bool(pcfg.hwp_adi_sync), path=path)
        desc.append(d)
    return out, desc


def mm_path(outdir, product_path) -> Path:
    """``pdi/mm/{name}_{stem}_mm.fits`` for the coadded product ``{name}_{stem}_coll.fits``
    (the product stem with ``_coll`` replaced by ``_mm``)."""
    stem = output_stem(product_path)
    if stem.endswith("_coll"):
        stem = stem[: -len("_coll")]
    return Path(outdir) / "pdi" / "mm" / f"{stem}_mm.fits"


def write_mm_file(path, mm: np.ndarray, header: fits.Header, fields: list[str], desc: list[str]) -> Path:
    """Write the per-file Mueller matrices atomically."""
    hdr = header.copy()
    for key in ("BITPIX", "NAXIS", "NAXIS1", "NAXIS2", "NAXIS3", "NAXIS4", "BZERO", "BSCALE", "EXTEND", "SIMPLE"):
        hdr.remove(key, ignore_missing=True, remove_all=True)
    set_card(hdr, "HIERARCH DPP PDI MM MODEL", desc[0] if desc else "ideal", "Mueller-model parameters")
    hdus = [fits.PrimaryHDU(np.asarray(mm, np.float32), header=hdr)]
    for i, f in enumerate(fields):
        h = fits.Header()
        h["FIELD"] = (f, "MBI field / filter")
        set_card(h, "HIERARCH DPP PDI MM MODEL", desc[i], "Mueller-model parameters")
        hdus.append(fits.ImageHDU(np.asarray(mm[i], np.float32), header=h, name=f))
    return write_fits_atomic(path, fits.HDUList(hdus))

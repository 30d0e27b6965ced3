"""Tabulated instrument zero points (docs/instrument.md §8.2, ``specphot.source = "zeropoints"``).

c_fd = C_FD[filter] · 10^(0.4 · k[filter] · AIRMASS)  [Jy/(e-/s)]

Which table is authoritative
----------------------------
Two tables exist. The data directory's ``vampires_zeropoints.csv`` (the instrument team's table,
as shipped with the reference pipeline in 2023) gives a distinct C_FD for every filter. The
reference pipeline's current code carries a newer transcription (:data:`BUILTIN_ZEROPOINTS`,
Lucas et al. 2024 per its comments) in which 725-50 and 750-50 have the *same* factor, 4.08e-7 —
almost certainly a transcription error (an older release had 4.43e-7 / 5.24e-7, the CSV values).

vampd uses the data directory's CSV when it is there (it is instrument data the observatory can
update without a vampd release, and it is internally consistent), and otherwise the built-in
table, so that ``zeropoints`` works with no data directory at all. The extinction coefficients k
are identical in both. The table used is recorded in every product (``DPP FLUX ZPTABLE``) and in
the ledger.
"""

from __future__ import annotations

from dataclasses import dataclass

from vampd.instrument.filters import FilterError, canonical_filter_name
from vampd.specphot.data import ZEROPOINT_TABLE_NAME, DataFileError, load_zeropoint_table

__all__ = ["BUILTIN_ZEROPOINTS", "ZeroPoint", "zeropoint"]

#: docs/instrument.md §8.2 (reference HEAD): filter → (C_FD [Jy/(e-/s)] at airmass 0, k [mag/airmass])
BUILTIN_ZEROPOINTS: dict[str, tuple[float, float]] = {
    "625-50": (7.34e-07, 0.08117646),
    "675-50": (4.85e-07, 0.053832494),
    "725-50": (4.08e-07, 0.038406607),
    "750-50": (4.08e-07, 0.033860277),  # identical to 725-50 in the reference: likely a typo
    "775-50": (1.82e-06, 0.03136249),
    "Open": (1.83e-07, 0.06148405),
    "F610": (1.40e-06, 0.09034138),
    "F670": (6.81e-07, 0.056374893),
    "F720": (4.88e-07, 0.039893303),
    "F760": (1.17e-06, 0.031851713),
    "Halpha": (3.64e-05, 0.066533156),
    "Ha-Cont": (1.57e-05, 0.062191844),
    "SII": (6.35e-06, 0.0544875513),
    "SII-Cont": (7.89e-06, 0.05106129286),
}


@dataclass(frozen=True)
class ZeroPoint:
    """Zero point of one filter: ``calib_fac`` [Jy/(e-/s)] at airmass 0, extinction ``k``, and the
    table it came from (``"builtin"`` or the CSV path)."""

    filter: str
    calib_fac: float
    k: float
    table: str

    def c_fd(self, airmass: float) -> float:
        """Conversion factor at ``airmass`` [Jy/(e-/s)]."""
        return float(self.calib_fac * 10 ** (0.4 * self.k * float(airmass)))


def zeropoint(filter_name: str, data_dir=None) -> ZeroPoint:
    """Zero point of ``filter_name``: the data directory's CSV if present, else the built-in table.

    Raises
    ------
    vampd.instrument.filters.FilterError
        The filter is in neither table (ND filters have no zero point).
    """
    try:
        table = load_zeropoint_table(data_dir)
    except DataFileError:
        table = None
    if table is not None:
        lookup = {k.lower(): v for k, v in table.items()}
        row = lookup.get(str(filter_name).strip().lower())
        if row is not None:
            from vampd.specphot.data import data_path

            return ZeroPoint(row.filter, row.c_fd, row.k, str(data_path(ZEROPOINT_TABLE_NAME, data_dir)))
    try:
        name = canonical_filter_name(filter_name, BUILTIN_ZEROPOINTS)
    except FilterError:
        raise FilterError(
            f"filter {filter_name!r} has no tabulated zero point (known: {', '.join(BUILTIN_ZEROPOINTS)}); "
            'use specphot.source = "pickles" or a spectrum file'
        ) from None
    fac, k = BUILTIN_ZEROPOINTS[name]
    return ZeroPoint(name, fac, k, "builtin")

"""Header cards that always fit in 80 characters.

Long HIERARCH keys with per-field suffixes (``DPP PDI IQ FLUX_ERR 750-50``) and full-precision
floats leave little room for a comment; astropy then warns "Card is too long, comment will be
truncated" when the file is written. :func:`set_card` keeps the key and value (the reference's key
names, read by other tools) and shortens or drops the comment instead, silently.
"""

from __future__ import annotations

import warnings

from astropy.io import fits
from astropy.io.fits.verify import VerifyWarning

__all__ = ["STRUCTURAL_KEYS", "set_card", "strip_structural"]

_CARD = 80
#: cards that describe a file's data layout, not its content: a header copied onto a new
#: product must drop them (astropy rewrites them for the new data)
STRUCTURAL_KEYS = (
    "BITPIX",
    "NAXIS",
    "NAXIS1",
    "NAXIS2",
    "NAXIS3",
    "NAXIS4",
    "BZERO",
    "BSCALE",
    "EXTEND",
    "SIMPLE",
    "PCOUNT",
    "GCOUNT",
    "XTENSION",
    "EXTNAME",
)


def set_card(header: fits.Header, key: str, value, comment: str = "") -> None:
    """``header[key] = (value, comment)`` with the comment cut to what fits on one card."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", VerifyWarning)
        bare = fits.Card(key, value).image.rstrip()
    room = _CARD - len(bare) - 3  # " / "
    if isinstance(value, str) and len(bare) > _CARD:
        room = 0  # a long string value goes on CONTINUE cards: no comment
    header[key] = (value, comment[: max(room, 0)] if room > 0 else "")


def strip_structural(header: fits.Header, extra: tuple[str, ...] = ()) -> fits.Header:
    """A copy of ``header`` without the :data:`STRUCTURAL_KEYS` (and the ``extra`` keys).

    Parameters
    ----------
    header : astropy.io.fits.Header
        Header of an input file, to be reused for a product with other data.
    extra : tuple of str
        Further keys to drop (every occurrence).

    Returns
    -------
    astropy.io.fits.Header
        The copy; ``header`` is left unchanged.
    """
    h = header.copy()
    for key in STRUCTURAL_KEYS + tuple(extra):
        h.remove(key, ignore_missing=True, remove_all=True)
    return h

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

__all__ = ["set_card"]

_CARD = 80


def set_card(header: fits.Header, key: str, value, comment: str = "") -> None:
    """``header[key] = (value, comment)`` with the comment cut to what fits on one card."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", VerifyWarning)
        bare = fits.Card(key, value).image.rstrip()
    room = _CARD - len(bare) - 3  # " / "
    if isinstance(value, str) and len(bare) > _CARD:
        room = 0  # a long string value goes on CONTINUE cards: no comment
    header[key] = (value, comment[: max(room, 0)] if room > 0 else "")

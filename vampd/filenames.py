"""One rule for turning header text (OBJECT, filter, unit names) into file-name parts.

Header values are free text: a 600-character OBJECT made ``finalize`` abort with
ENAMETOOLONG, and ``HD 163296/b`` would name a sub-directory. :func:`safe_part` keeps a
short, portable, single path component; long values keep a readable prefix plus a hash of
the full text, so two long names that differ only at the end still give different files.
"""

from __future__ import annotations

import hashlib
import re

__all__ = ["MAX_PART", "NOT_UTF8", "safe_part"]

#: Longest part :func:`safe_part` returns (products add a run name and suffixes; the file
#: system limit is 255 bytes per name).
MAX_PART = 64

#: The one message for a watched file whose name is not valid UTF-8 (observer and runner).
NOT_UTF8 = "file name is not valid UTF-8: rename it"

_ODD = re.compile(r"[^A-Za-z0-9._+-]+")


def safe_part(text: str, *, empty: str = "unknown") -> str:
    """File-name-safe form of a header value (one path component, at most ``MAX_PART`` chars).

    Parameters
    ----------
    text : str
        Free text, e.g. an OBJECT or FILTER01 value (``None`` and numbers are str()-ed).
    empty : str
        What to return when nothing usable is left (``""``, ``"..."``, ``"///"``).

    Returns
    -------
    str
        Only ``[A-Za-z0-9._+-]``: runs of other characters (spaces, ``/``, non-ASCII) become
        one ``_``; no leading dot or ``_`` (no hidden files, no ``..``), no trailing ``_``.
        Longer than ``MAX_PART``: a prefix, ``_`` and 8 hex digits of the SHA-1 of the full
        original text.
    """
    raw = str(text)
    out = _ODD.sub("_", raw).lstrip("._").rstrip("_") or empty
    if len(out) <= MAX_PART:
        return out
    # hash the original (not the sanitised) text: "a b" and "a/b" stay distinct when long
    digest = hashlib.sha1(raw.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return f"{out[: MAX_PART - 9].rstrip('._')}_{digest}"

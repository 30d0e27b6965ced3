"""Set members derotated as they arrive, kept until their set completes.

A complete set's Stokes file needs every member derotated (docs/instrument.md §9.2): at 536²
that is 16 cubic-spline rotations, about half a second, and all of it would fall between "set
complete" and "Stokes file written" if it waited for the last member. Derotation is per member,
so the PDI trigger does it while the set is still open (:func:`warm`, after each rebuild) and
the set's completion only reads the results (:func:`get`).

The cache is in memory only: a restart recomputes what it needs, and an entry is keyed by the
product's path, size and modification time, so a rewritten product is never served stale.
Entries of processed sets are dropped (:func:`forget`); beyond ``MAX_BYTES`` the oldest go.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict

from vampd.pdi.process import Member, derotate_member, load_member

__all__ = ["get", "warm", "forget", "clear", "MAX_BYTES"]

MAX_BYTES = 256 * 2**20  # a full 536² set (16 members) holds ~75 MB

_lock = threading.Lock()
_entries: OrderedDict[tuple, tuple[Member, tuple]] = OrderedDict()


def _key(path: str, derotate_on: bool) -> tuple:
    st = os.stat(path)
    return (str(path), st.st_size, st.st_mtime_ns, bool(derotate_on))


def _nbytes(entry: tuple[Member, tuple]) -> int:
    m, (img, var) = entry
    return m.data.nbytes + m.err.nbytes + img.nbytes + var.nbytes


def get(path: str, derotate_on: bool) -> tuple[Member, tuple]:
    """``(member, (data, variance))`` of a reduced product, derotated unless ``derotate_on`` is
    false; from the cache when the file is unchanged, else read and derotated now.

    Raises
    ------
    SetInvalid
        The product cannot be read (see :func:`vampd.pdi.process.load_member`).
    """
    try:
        key = _key(path, derotate_on)
    except OSError:  # gone: load_member names the problem
        key = None
    return _cached(key) or _compute(path, key, derotate_on)


def _cached(key) -> tuple[Member, tuple] | None:
    with _lock:
        if key is None or key not in _entries:
            return None
        _entries.move_to_end(key)
        return _entries[key]


def _compute(path: str, key, derotate_on: bool) -> tuple[Member, tuple]:
    m = load_member(path)
    entry = (m, derotate_member(m, derotate_on))
    if key is not None:
        with _lock:
            _entries[key] = entry
            total = sum(_nbytes(e) for e in _entries.values())
            while len(_entries) > 1 and total > MAX_BYTES:
                _k, old = _entries.popitem(last=False)
                total -= _nbytes(old)
    return entry


def warm(paths, derotate_on: bool) -> int:
    """Derotate the members not cached yet; unreadable ones are skipped (their set reports them
    when it completes). Returns how many were computed."""
    n = 0
    for p in paths:
        try:
            key = _key(p, derotate_on)
            if _cached(key) is None:
                _compute(p, key, derotate_on)
                n += 1
        except Exception:  # noqa: BLE001 -- a bad product fails its set later, with its reason
            continue
    if n:
        # the completion's one costly first-time step is importing photutils (~0.3 s; the
        # region and aperture masks): pay it now, while the set is open
        import photutils.aperture  # noqa: F401
    return n


def forget(paths) -> None:
    """Drop the entries of these products (their set was processed)."""
    names = {str(p) for p in paths}
    with _lock:
        for k in [k for k in _entries if k[0] in names]:
            del _entries[k]


def clear() -> None:
    """Empty the cache."""
    with _lock:
        _entries.clear()

"""HWP blocks: runs of consecutive cubes of one camera and FLC state at one HWP angle (docs/instrument.md §7.1, §14).

A pure, deterministic function of the member records (the ledger's file rows), like
:mod:`vampd.pdi.sets`: the same records in any order give the same blocks.

* A *stream* is one (camera, FLC) pair; ``U_FLC`` missing → ``"NA"`` (docs/instrument.md §7.1).
* Inside a stream, in time order (MJD, then path), a new block starts whenever the nominal
  HWP angle (within the tolerance) or the target/filter differs from the previous cube's.
  So "another cube at the same HWP position" (same block) and "the HWP moved on" (next
  block) are told apart from the time order of each stream, never from arrival order.
* A block is *closed* when the next cube of its stream is known (reason ``hwp moved on``
  or ``target changed``), when a later cube of another target/filter exists (``target
  changed``), when the newest cube of the night is more than ``timeout`` s after its last
  cube (``timeout``), when ``timeout`` s of wall clock passed since its last cube arrived and
  no cube arrived in that time is still unknown (``now`` given: the daemon's periodic check,
  so a block closes even when no further file arrives), or at the end of the night
  (``end of night``). A closing fact only
  counts once every file that arrived before it is known (``horizon``): a cube still being
  reduced may belong to the block.
* ``combine.method = "pdi"``: a closed block is coadded into one product, the set member.
  ``"cube"``: the k-th cube of a block is the k-th set member of its slot (:func:`cube_index`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from vampd.fitsio import output_stem
from vampd.pdi.sets import nominal_hwp

__all__ = ["Block", "stream_of", "split_blocks", "cube_index", "block_name"]

_DAY = 86400.0
_DUP_MJD = 1e-7


def stream_of(rec: Mapping) -> tuple[int, str] | None:
    """``(camera, FLC)`` of a record, or None when the camera is unknown."""
    try:
        cam = int(rec.get("camera"))
    except (TypeError, ValueError):
        return None
    flc = str(rec.get("flc") or "NA").strip().upper()
    return cam, flc if flc in ("A", "B") else "NA"


@dataclass
class Block:
    """One HWP block of a (camera, FLC) stream.

    Attributes
    ----------
    camera, flc : stream
    hwp : float
        Nominal HWP angle (0, 45, 22.5, 67.5).
    target, filter : str
    members : list of dict
        Cube records in time order.
    closed : bool
    reason : str or None
        Why the block closed (or None while open).
    """

    camera: int
    flc: str
    hwp: float
    target: str
    filter: str
    members: list = field(default_factory=list)
    closed: bool = False
    reason: str | None = None

    @property
    def key(self) -> str:
        """Stable key: ``cam{camera}:FLC{flc}:{stem of the first cube}``."""
        return f"cam{self.camera}:FLC{self.flc}:{output_stem(self.members[0]['path'])}"

    @property
    def mjd(self) -> float:
        return float(self.members[0]["mjd"])

    @property
    def paths(self) -> list[str]:
        return [str(m["path"]) for m in self.members]

    @property
    def t_complete(self) -> float:
        """Latest arrival of its cubes (for the horizon rule)."""
        vals = [float(m.get("t_complete") or 0.0) for m in self.members]
        return max(vals) if vals else 0.0

    def label(self) -> str:
        return f"HWP {self.hwp:g} FLC {self.flc} cam{self.camera}"


def block_name(name: str, run: int, camera: int, flc: str) -> str:
    """Reference group key file name (docs/instrument.md §7.1, §11.1): ``{name}_{run:03d}_cam{cam}_FLC{flc}_coll.fits``."""
    return f"{name}_{int(run):03d}_cam{int(camera)}_FLC{flc}_coll.fits"


def _sort_key(m: Mapping):
    return (float(m["mjd"]), str(m["path"]))


def _usable(m: Mapping, tolerance: float) -> bool:
    try:
        ok = math.isfinite(float(m.get("mjd")))
    except (TypeError, ValueError):
        return False
    return ok and stream_of(m) is not None and nominal_hwp(m.get("hwp"), tolerance) is not None


def split_blocks(
    records: Iterable[Mapping],
    tolerance: float = 0.1,
    timeout: float | None = 900.0,
    final: bool = False,
    horizon: float = math.inf,
    now: float | None = None,
) -> list[Block]:
    """Blocks of every stream, closed or open (see the module docstring).

    Parameters
    ----------
    records : iterable of dict
        ``path``, ``camera``, ``flc``, ``hwp``, ``mjd``, ``target``, ``filter`` and
        optionally ``t_complete`` (arrival time). Records without a usable camera, HWP
        angle or MJD are left out (they cannot be in a block).
    tolerance : float
        HWP angle tolerance (degrees).
    timeout : float or None
        Seconds of observation time after a block's last cube before it closes.
    final : bool
        End of the night: every block closes.
    horizon : float
        Arrival time of the earliest file not yet known (still being reduced); a fact that
        arrived at or after it cannot close a block yet.
    now : float, optional
        Wall-clock time: a block whose last cube arrived (``t_complete``) more than ``timeout``
        s before ``now`` closes (``timeout``, wall clock) once every file that arrived in that
        time is known. None (batch runs, per-file rebuilds): observation time only.

    Returns
    -------
    list of Block
        Sorted by (first MJD, key).
    """
    recs = sorted((m for m in records if _usable(m, tolerance)), key=_sort_key)
    if not recs:
        return []
    streams: dict[tuple, list[Block]] = {}
    for m in recs:
        cam, flc = stream_of(m)
        hwp = nominal_hwp(m.get("hwp"), tolerance)
        tgt, filt = str(m.get("target") or ""), str(m.get("filter") or "")
        blocks = streams.setdefault((cam, flc), [])
        last = blocks[-1] if blocks else None
        if last is None or (last.hwp, last.target, last.filter) != (hwp, tgt, filt):
            blocks.append(Block(cam, flc, hwp, tgt, filt))
        blocks[-1].members.append(m)
    newest = recs[-1]
    later = _later_other(recs)
    out = []
    for blocks in streams.values():
        for i, b in enumerate(blocks):
            b.reason = _close_reason(
                b, blocks[i + 1] if i + 1 < len(blocks) else None, recs, later, newest, timeout, final, horizon
            ) or _stale(b, timeout, horizon, now)
            b.closed = b.reason is not None
            out.append(b)
    out.sort(key=lambda b: (b.mjd, b.key))
    return out


def _after(recs: list, mjd: float) -> int:
    """Index of the first record later than ``mjd`` (``recs`` sorted by MJD)."""
    lo, hi = 0, len(recs)
    while lo < hi:
        mid = (lo + hi) // 2
        if float(recs[mid]["mjd"]) <= mjd:
            lo = mid + 1
        else:
            hi = mid
    return lo


def _arrived(m: Mapping, horizon: float) -> bool:
    return float(m.get("t_complete") or 0.0) < horizon


def _later_other(recs: list) -> list[int]:
    """``nxt[i]``: index of the first record after ``i`` of another target/filter (len if none):
    one backward pass, so "target changed" costs O(1) per block."""
    nxt = [len(recs)] * len(recs)
    for i in range(len(recs) - 2, -1, -1):
        same = (recs[i + 1].get("target"), recs[i + 1].get("filter")) == (recs[i].get("target"), recs[i].get("filter"))
        nxt[i] = nxt[i + 1] if same else i + 1
    return nxt


def _close_reason(b: Block, nxt: Block | None, recs, later_idx, newest, timeout, final, horizon) -> str | None:
    if nxt is not None and _arrived(nxt.members[0], horizon):
        first = nxt.members[0]
        if (nxt.target, nxt.filter) != (b.target, b.filter):
            return f"target changed: {output_stem(first['path'])} observes {nxt.target or '?'}"
        return f"hwp moved on: {output_stem(first['path'])} at HWP {nxt.hwp:g}"
    if final:
        return "end of night"
    last = float(b.members[-1]["mjd"])
    i = _after(recs, last)
    later = None
    while i < len(recs):
        m = recs[i]
        if (str(m.get("target") or ""), str(m.get("filter") or "")) != (b.target, b.filter) and _arrived(m, horizon):
            later = m
            break
        i = later_idx[i] if (str(m.get("target") or ""), str(m.get("filter") or "")) == (b.target, b.filter) else i + 1
    if later is not None:
        return f"target changed: {output_stem(later['path'])} observes {later.get('target') or '?'}"
    gap = (float(newest["mjd"]) - last) * _DAY
    if timeout is not None and gap > timeout and _arrived(newest, horizon):
        return f"timeout: no cube for {gap:.0f} s (> {timeout:g} s)"
    return None


def _stale(b: Block, timeout: float | None, horizon: float, now: float | None) -> str | None:
    """The wall-clock rule: no cube for ``timeout`` s since the block's last one arrived, and
    every file that arrived in that time is known (none of them is the block's)."""
    if now is None or timeout is None:
        return None
    last = b.t_complete
    if last <= 0.0 or now - last <= timeout or horizon < last + timeout:
        return None
    return f"timeout: no cube arrived for {now - last:.0f} s (> {timeout:g} s, wall clock)"


def cube_index(records: Iterable[Mapping], tolerance: float = 0.1) -> dict[str, tuple[int, int]]:
    """``{path: (k, n)}``: the k-th (0-based) cube of a block of n cubes, for ``"cube"`` sets."""
    out = {}
    for b in split_blocks(records, tolerance, timeout=None):
        ks, k, prev = [], -1, None
        for m in b.members:
            # a record of the same exposure (|dMJD| < 1e-7 d) is a duplicate, not another cube
            if prev is None or abs(float(m["mjd"]) - prev) >= _DUP_MJD:
                k += 1
            prev = float(m["mjd"])
            ks.append(k)
        for m, k in zip(b.members, ks, strict=True):
            out[str(m["path"])] = (k, ks[-1] + 1)
    return out

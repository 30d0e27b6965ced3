"""HWP-set assembly for streaming PDI (docs/instrument.md §9.1, §13.19, §14).

A pure, deterministic function of the list of member records: the same records (in any order)
always give the same sets with the same keys, so the sets can be rebuilt from the ledger at any
time instead of being cached.

Rules (documented deviations from the reference's exact-equality, consecutive-window algorithm):

* Members are grouped per (target, filter/fields); inside a group they are walked in time order
  (MJD, then camera, FLC, path), independently of arrival order.
* ``RET-ANG1`` is matched to the nominal angles 0, 45, 22.5, 67.5 (modulo 90°, which is the same
  HWP state for linear polarisation) within ``tolerance`` degrees, not by float equality.
  A member outside every tolerance window cannot be in a set and is reported as rejected.
* A set is an open collection of slots — (HWP, FLC, camera) for triple difference (16), (HWP,
  camera) for double difference (8). A member fills its slot; the set is emitted as complete as
  soon as every slot is filled.
* A member whose slot is already filled by a record of the same time (|ΔMJD| < 1e-7 d) and the
  same slot is a duplicate file: it is skipped and listed.
* Several cubes per HWP position: the caller passes ``cube_of`` (:func:`vampd.pdi.blocks.cube_index`,
  decided from the time order of each camera/FLC stream) and the k-th cube of every slot is assembled
  with the other k-th cubes: the k-th set of the cycle. With ``combine.method = "pdi"`` the members
  are the HWP-block products instead (one per slot and cycle).
* A member whose slot is already filled by an earlier exposure, or whose HWP angle comes back after
  another angle, means the HWP moved on: a new cycle starts and the unfinished set is broken **once**
  (``hwp moved on``): members after the earlier block of that angle whose angle precedes it in the
  sequence 0, 45, 22.5, 67.5 are kept (a set that began mid-cycle), all others are dropped together.
  So one missing or bad file breaks one set (earlier versions slid the set member by member and
  left a cascade of fragments). Data that start mid-cycle form the reference's consecutive window
  (the first members in time that fill every slot).
* ``horizon``: a complete set is only reported complete once every file that arrived before its
  latest member is known (else ``open``, "waiting for earlier files"): what a batch or a busy
  daemon has not reduced yet may belong to it.
* The open set at the end of a group is broken when the night is over (``end of night``), when
  later data of another target/filter exist (``target changed``), or when the newest member of the
  night is more than ``timeout`` seconds after its last member (``timeout``), or (``now`` given:
  the daemon's periodic check) when ``timeout`` s of wall clock passed since its last member
  arrived and every file that arrived in that time is known (``timeout (wall clock)``, a
  permanent decision: the PDI trigger locks such a set); otherwise it stays open. Broken and open groups are recomputed at every rebuild; only complete sets (and sets that
  processing found invalid) are permanent: pass their keys and members as ``locked`` and their
  members are left out of the assembly.
* A member in state ``parked`` whose slot the ledger knows occupies it but makes the set unusable
  (``member failed``). Parked files without a recorded slot are not members at all (the PDI trigger
  names them in the reason of the set they would have filled).

Keys are ``{mode}:{target}:{filter}:{stem of the first member in time}``, stable under rebuilds.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from vampd.fitsio import output_stem

__all__ = [
    "HWP_ANGLES",
    "WALL_TIMEOUT",
    "MODES",
    "HWPSet",
    "SetAssembly",
    "nominal_hwp",
    "slot_of",
    "all_slots",
    "slot_label",
    "assemble_sets",
]

HWP_ANGLES = (0.0, 45.0, 22.5, 67.5)
WALL_TIMEOUT = "timeout (wall clock): "  # reason prefix of a set given up by the wall-clock rule
MODES = ("triplediff", "doublediff")
_DUP_MJD = 1e-7  # days (~9 ms): two records of the same exposure
_DAY = 86400.0


def nominal_hwp(angle, tolerance: float = 0.1) -> float | None:
    """The nominal set angle (0, 45, 22.5 or 67.5) within ``tolerance`` degrees of ``angle``
    (modulo 90°), or None.

    >>> nominal_hwp(22.49), nominal_hwp(90.02), nominal_hwp(10.0)
    (22.5, 0.0, None)
    """
    try:
        a = float(angle)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(a):
        return None
    for nom in HWP_ANGLES:
        d = (a - nom) % 90.0
        if min(d, 90.0 - d) <= tolerance:
            return nom
    return None


def all_slots(mode: str) -> list[tuple]:
    """Every slot of a set, in the order HWP, FLC, camera."""
    _check_mode(mode)
    if mode == "triplediff":
        return [(h, f, c) for h in HWP_ANGLES for f in ("A", "B") for c in (1, 2)]
    return [(h, c) for h in HWP_ANGLES for c in (1, 2)]


def slot_label(slot: tuple) -> str:
    """``"HWP 22.5 FLC A cam2"`` / ``"HWP 0 cam1"``."""
    h = f"{slot[0]:g}"
    if len(slot) == 3:
        return f"HWP {h} FLC {slot[1]} cam{slot[2]}"
    return f"HWP {h} cam{slot[1]}"


def slot_of(member: Mapping, mode: str, tolerance: float = 0.1) -> tuple | str:
    """The slot of a member record, or a string saying why it has none."""
    nom = nominal_hwp(member.get("hwp"), tolerance)
    if nom is None:
        return f"RET-ANG1 = {member.get('hwp')!r} is not within {tolerance:g} deg of 0/45/22.5/67.5"
    try:
        cam = int(member.get("camera"))
    except (TypeError, ValueError):
        return f"U_CAMERA = {member.get('camera')!r}, expected 1 or 2"
    if cam not in (1, 2):
        return f"U_CAMERA = {cam}, expected 1 or 2"
    if mode == "doublediff":
        return (nom, cam)
    flc = str(member.get("flc") or "NA").strip().upper()
    if flc not in ("A", "B"):
        return f"U_FLC = {member.get('flc')!r}, expected 'A' or 'B' for polarimetry.method = \"triplediff\""
    return (nom, flc, cam)


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"polarimetry.method = {mode!r}, expected one of {MODES}")


@dataclass
class HWPSet:
    """One (possibly incomplete) HWP set.

    Attributes
    ----------
    key : str
        Stable key (mode, target, filter, stem of the earliest member).
    mode : str
    state : {"complete", "open", "broken"}
    members : dict
        slot → member record.
    reason : str or None
        Why a set is broken.
    missing : list of str
        Labels of the empty slots.
    duplicates : list of str
        Paths of duplicate records skipped.
    """

    key: str
    mode: str
    state: str
    target: str
    filter: str
    members: dict = field(default_factory=dict)
    reason: str | None = None
    missing: list = field(default_factory=list)
    duplicates: list = field(default_factory=list)

    @property
    def paths(self) -> list[str]:
        """Member paths in slot order (HWP, FLC, camera)."""
        return [self.members[s]["path"] for s in all_slots(self.mode) if s in self.members]

    @property
    def mjd_range(self) -> tuple[float, float]:
        mjds = [float(m["mjd"]) for m in self.members.values()]
        return (min(mjds), max(mjds)) if mjds else (math.nan, math.nan)

    def member_list(self) -> list[dict]:
        """JSON-friendly list for the ledger: one dict per slot (slot label, path, state)."""
        out = []
        for s in all_slots(self.mode):
            if s in self.members:
                m = self.members[s]
                row = {"slot": slot_label(s), "path": m["path"], "state": m.get("state", "done")}
                if m.get("ncubes"):  # an HWP block (combine.method = "pdi"): its number of cubes
                    row["cubes"] = int(m["ncubes"])
                    row["mjd"] = float(m["mjd"])
                out.append(row)
        return out


@dataclass
class SetAssembly:
    """Result of :func:`assemble_sets`."""

    complete: list[HWPSet] = field(default_factory=list)
    open: list[HWPSet] = field(default_factory=list)
    broken: list[HWPSet] = field(default_factory=list)
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (path, why)

    @property
    def all(self) -> list[HWPSet]:
        return [*self.complete, *self.open, *self.broken]


def _sort_key(m: Mapping):
    return (float(m["mjd"]), int(m.get("camera") or 0), str(m.get("flc") or ""), str(m["path"]))


def _new_cycle(current: dict, hwp: float) -> tuple[dict, dict]:
    """Split ``current`` when a member at ``hwp`` starts a new cycle: ``(kept, dropped)``.

    Kept are the members after the earlier block at ``hwp`` whose angle comes before ``hwp`` in
    the instrument's sequence (0, 45, 22.5, 67.5): the new cycle began with them (e.g. a set
    that started mid-cycle). Everything else belongs to the unfinished cycle and is dropped
    together, so one missing file breaks one set, not a cascade of slides.
    """
    order = {h: i for i, h in enumerate(HWP_ANGLES)}
    cut = max(_sort_key(r) for s, r in current.items() if s[0] == hwp)
    kept = {s: r for s, r in current.items() if _sort_key(r) > cut and order[s[0]] < order[hwp]}
    return kept, {s: r for s, r in current.items() if s not in kept}


def _make_key(mode: str, target: str, filt: str, first: Mapping) -> str:
    return f"{mode}:{target}:{filt}:{output_stem(first['path'])}"


def _finish(mode, target, filt, members: dict, state: str, reason=None, duplicates=()) -> HWPSet:
    first = min(members.values(), key=_sort_key)
    missing = [slot_label(s) for s in all_slots(mode) if s not in members]
    return HWPSet(
        key=_make_key(mode, target, filt, first),
        mode=mode,
        state=state,
        target=target,
        filter=filt,
        members=dict(members),
        reason=reason,
        missing=missing,
        duplicates=list(duplicates),
    )


def assemble_sets(
    members: Iterable[Mapping],
    mode: str = "triplediff",
    tolerance: float = 0.1,
    timeout: float | None = 900.0,
    final: bool = False,
    locked: Mapping[str, Iterable[str]] | None = None,
    cube_of: Mapping[str, tuple[int, int]] | None = None,
    horizon: float = math.inf,
    now: float | None = None,
) -> SetAssembly:
    """Group member records into HWP sets (see the module docstring for the rules).

    Parameters
    ----------
    members : iterable of dict
        Records with ``path``, ``camera``, ``flc`` ("A"/"B"/"NA"), ``hwp`` (RET-ANG1), ``mjd``,
        ``target``, ``filter`` (field names) and optionally ``state`` ("done" default, or
        "parked").
    mode : {"triplediff", "doublediff"}
    tolerance : float
        HWP angle tolerance (degrees).
    timeout : float or None
        Seconds (in observation time) after which an incomplete set is broken, measured from its
        last member to the newest member of the night.
    final : bool
        End of night: every incomplete set is broken.
    locked : mapping key → member paths, optional
        Sets already made permanent (complete, or found invalid); their members are excluded.
    cube_of : mapping path → (k, n), optional
        Several cubes per HWP block (``combine.method = "cube"``): the k-th cube of each block
        of n (:func:`vampd.pdi.blocks.cube_index`) goes to the k-th set of the cycle.
    horizon : float
        Arrival time (``t_complete``) of the earliest file still being reduced: a set whose
        latest member arrived at or after it stays open (a file not yet known may belong to it).
    now : float, optional
        Wall-clock time: an open set whose latest member arrived (``t_complete``) more than
        ``timeout`` s before it is broken, reason starting with :data:`WALL_TIMEOUT`, once every
        file that arrived in that time is known. None: observation time only.

    Returns
    -------
    SetAssembly
    """
    _check_mode(mode)
    out = SetAssembly()
    groups, locked_at = _group_members(members, mode, tolerance, locked, cube_of, out)
    if not groups:
        return out
    newest = max(float(m["mjd"]) for g in groups.values() for m in g)
    # the latest member time of each target/filter, to tell "another target followed"
    group_last: dict[tuple, float] = {}
    for (tgt, flt, _k), ms in groups.items():
        group_last[(tgt, flt)] = max(group_last.get((tgt, flt), -math.inf), max(float(m["mjd"]) for m in ms))
    for (target, filt, kcube), ms in sorted(groups.items()):
        g = _Group(mode, target, filt, kcube, tolerance, horizon)
        nbroken = len(out.broken)
        _walk_group(g, sorted(ms, key=_sort_key), locked_at, out)
        if g.waiting:
            out.open.append(_finish(mode, target, filt, g.current, "open", "waiting for earlier files", g.dups))
        elif g.current:
            reason = _end_reason(g, group_last, newest, timeout, final, now)
            if reason is None:
                out.open.append(_finish(mode, target, filt, g.current, "open", None, g.dups))
            else:
                out.broken.append(_finish(mode, target, filt, g.current, "broken", reason, g.dups))
        if kcube > 0:  # a slot of cube k is empty: its HWP block had fewer cubes than the others
            for b in out.broken[nbroken:]:
                if b.missing:
                    b.reason = (
                        f"uneven HWP blocks: no cube {kcube + 1} at {', '.join(b.missing)}"
                        f" (cube without partners); {b.reason}"
                    )
    for lst in (out.complete, out.open, out.broken):
        lst.sort(key=lambda s: (s.mjd_range[0], s.key))
    return out


def _end_reason(g: _Group, group_last: dict, newest: float, timeout, final: bool, now) -> str | None:
    """Why the open set at the end of a group is broken (None: it stays open)."""
    last = max(float(r["mjd"]) for r in g.current.values())
    if final:
        return "end of night"
    if any(t > last for k, t in group_last.items() if k != (g.target, g.filt)):
        return "target changed"
    if timeout is not None and (newest - last) * _DAY > timeout:
        return f"timeout: no member for {(newest - last) * _DAY:.0f} s (> {timeout:g} s)"
    return _stale(g.current, timeout, g.horizon, now)


def _stale(current: dict, timeout: float | None, horizon: float, now: float | None) -> str | None:
    """The wall-clock rule of an open set (see :func:`assemble_sets`)."""
    if now is None or timeout is None:
        return None
    last = max(float(r.get("t_complete") or 0.0) for r in current.values())
    if last <= 0.0 or now - last <= timeout or horizon < last + timeout:
        return None
    return f"{WALL_TIMEOUT}no member arrived for {now - last:.0f} s (> {timeout:g} s)"


def _group_members(members, mode, tolerance, locked, cube_of, out: SetAssembly) -> tuple[dict, dict]:
    """``(groups, locked_at)``: the free members by (target, filter, cube index k), and the
    locked members' (MJD, stem) by (target, filter, slot) to recognise their duplicates."""
    excluded = {str(p) for paths in (locked or {}).values() for p in paths}
    groups: dict[tuple, list[Mapping]] = {}
    seen_paths = set()
    locked_at: dict[tuple, list] = {}
    for m in members:
        path = str(m["path"])
        if path in seen_paths:
            continue
        seen_paths.add(path)
        if path in excluded:
            slot = slot_of(m, mode, tolerance)
            try:
                if not isinstance(slot, str):
                    key = (str(m.get("target") or ""), str(m.get("filter") or ""), slot)
                    locked_at.setdefault(key, []).append((float(m.get("mjd")), output_stem(path)))
            except (TypeError, ValueError):
                pass
            continue
        try:
            mjd = float(m.get("mjd"))
        except (TypeError, ValueError):
            mjd = math.nan
        if not math.isfinite(mjd):
            out.rejected.append((path, f"MJD = {m.get('mjd')!r} is not a number"))
            continue
        k = (cube_of or {}).get(path, (0, 1))[0]
        groups.setdefault((str(m.get("target") or ""), str(m.get("filter") or ""), k), []).append(m)
    return groups, locked_at


@dataclass
class _Group:
    """Walking state of one (target, filter, k) group."""

    mode: str
    target: str
    filt: str
    kcube: int
    tolerance: float
    horizon: float
    current: dict = field(default_factory=dict)
    dups: list = field(default_factory=list)
    waiting: bool = False


def _walk_group(g: _Group, ms: list, locked_at: dict, out: SetAssembly) -> None:
    """Fill sets from the time-ordered members ``ms`` (module docstring rules)."""
    nslots = len(all_slots(g.mode))
    for m in ms:
        slot = slot_of(m, g.mode, g.tolerance)
        if isinstance(slot, str):
            out.rejected.append((str(m["path"]), slot))
            continue
        twin = next(
            (stem for t, stem in locked_at.get((g.target, g.filt, slot), ()) if abs(t - float(m["mjd"])) < _DUP_MJD),
            None,
        )
        if twin is not None:  # a duplicate of a member of a set already made permanent
            out.rejected.append((str(m["path"]), f"duplicate of {twin} (already in a complete set)"))
            continue
        cur = g.current
        prev = cur.get(slot)
        if prev is not None and abs(float(prev["mjd"]) - float(m["mjd"])) < _DUP_MJD:
            g.dups.append(str(m["path"]))
            continue
        last_slot = max(cur, key=lambda s: _sort_key(cur[s])) if cur else None
        came_back = last_slot is not None and last_slot[0] != slot[0] and any(s[0] == slot[0] for s in cur)
        if prev is not None or came_back:
            # the HWP moved on: this angle again (a slot repeated in time order, or the angle came
            # back after another one) starts a new cycle; the unfinished set breaks once
            kept, dropped = _new_cycle(cur, slot[0])
            why = (
                f"{slot_label(slot)} again in {output_stem(m['path'])}"
                if prev is not None
                else f"HWP {slot[0]:g} again in {output_stem(m['path'])} after HWP {last_slot[0]:g}"
            )
            out.broken.append(
                _finish(
                    g.mode,
                    g.target,
                    g.filt,
                    dropped,
                    "broken",
                    f"hwp moved on: {why} (next cycle) before the set completed",
                    g.dups,
                )
            )
            g.current, g.dups = kept, []
        g.current[slot] = m
        if len(g.current) == nslots:
            bad = [r for r in g.current.values() if str(r.get("state", "done")) != "done"]
            if not bad and max(float(r.get("t_complete") or 0.0) for r in g.current.values()) >= g.horizon:
                g.waiting = True  # complete, but a file that arrived earlier is still being reduced
                return
            if bad:
                names = ", ".join(output_stem(r["path"]) for r in bad)
                out.broken.append(
                    _finish(g.mode, g.target, g.filt, g.current, "broken", f"member failed: {names}", g.dups)
                )
            else:
                out.complete.append(_finish(g.mode, g.target, g.filt, g.current, "complete", None, g.dups))
            g.current, g.dups = {}, []

"""The HWP-set board of the live view: the open sets as the board shows them (from the PDI
trigger's ``sets`` rows, else assembled from the ``files`` table) and their panel."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

from rich import box
from rich.console import Group, RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from vampd.engine.ledger import Ledger
from vampd.live.common import STATE_STYLES, FileRow, camera_of, dur

__all__ = ["HWP_GRID", "SetView", "read_sets", "sets_panel", "board_height"]

HWP_GRID = (0.0, 45.0, 22.5, 67.5)


@dataclass
class SetView:
    """An HWP set as the board shows it: which slots are present and which are missing.

    ``members`` maps a slot label (``"HWP 22.5 FLC A cam2"``) to ``(file name, state)``.
    ``source`` is ``"ledger"`` (a ``sets`` row written by the PDI trigger) or ``"files"``
    (assembled here from the ``files`` table because PDI recorded no sets).
    """

    key: str
    mode: str
    state: str
    members: dict[str, tuple[str, str]] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    target: str | None = None
    filter: str | None = None
    reason: str | None = None
    created: float | None = None
    updated: float | None = None
    source: str = "ledger"


def _slot_label_of(row: FileRow | dict | None, mode: str, tolerance: float) -> str | None:
    from vampd.pdi.sets import slot_label, slot_of

    if row is None:
        return None
    rec = asdict(row) if isinstance(row, FileRow) else dict(row)
    rec["camera"] = camera_of(row)
    slot = slot_of(rec, mode, tolerance)
    return None if isinstance(slot, str) else slot_label(slot)


def _sets_from_ledger(led: Ledger, files: dict[str, FileRow], tolerance: float) -> list[SetView]:
    from vampd.pdi.sets import all_slots, slot_label

    out = []
    for r in led.set_rows("open"):
        mode = r["mode"] or "triplediff"
        try:
            members = json.loads(r["members"] or "[]")
        except ValueError:
            members = []
        present: dict[str, tuple[str, str]] = {}
        for m in members if isinstance(members, list) else []:
            path = m.get("path") if isinstance(m, dict) else str(m)
            fr = files.get(path) if path else None
            label = m.get("slot") if isinstance(m, dict) else None
            if not label and mode in ("triplediff", "doublediff"):
                label = _slot_label_of(fr, mode, tolerance)
            if not label:
                continue
            state = (m.get("state") if isinstance(m, dict) else None) or (fr.state if fr else "done")
            present[label] = (os.path.basename(path or "?"), state)
        try:
            slots = [slot_label(s) for s in all_slots(mode)]
        except ValueError:
            slots = list(present)
        parts = (r["key"] or "").split(":")
        out.append(
            SetView(
                key=r["key"],
                mode=mode,
                state=r["state"],
                members=present,
                missing=[s for s in slots if s not in present],
                target=parts[1] if len(parts) > 2 else None,
                filter=parts[2] if len(parts) > 3 else None,
                reason=r["reason"],
                created=r["created"],
                updated=r["updated"],
                source="ledger",
            )
        )
    return out


def _sets_from_files(files: dict[str, FileRow], mode: str, tolerance: float, timeout: float) -> list[SetView]:
    """Open sets assembled from the files table (PDI recorded none): what is filling."""
    from vampd.pdi.sets import assemble_sets, slot_label

    recs = []
    for f in files.values():
        if f.state not in ("done", "parked", "failed", "running", "queued", "pending") or f.mjd is None:
            continue
        recs.append(
            {
                "path": f.path,
                "camera": camera_of(f),
                "flc": f.flc,
                "hwp": f.hwp,
                "mjd": f.mjd,
                "target": f.target,
                "filter": f.filter,
                "state": "parked" if f.state == "parked" else "done",
            }
        )
    if not recs:
        return []
    asm = assemble_sets(recs, mode, tolerance=tolerance, timeout=timeout)
    out = []
    for s in asm.open:
        present = {slot_label(k): (os.path.basename(m["path"]), files[m["path"]].state) for k, m in s.members.items()}
        arr = [files[m["path"]].t_arrival for m in s.members.values() if files[m["path"]].t_arrival is not None]
        out.append(
            SetView(
                key=s.key,
                mode=mode,
                state="open",
                members=present,
                missing=list(s.missing),
                target=s.target,
                filter=s.filter,
                created=min(arr) if arr else None,
                updated=max(arr) if arr else None,
                source="files",
            )
        )
    return out


def read_sets(led: Ledger, cfg, files: dict[str, FileRow], set_counts: dict) -> tuple[list[SetView], str | None]:
    """``(open sets, mode)``: the PDI trigger's rows when there are any, else assembled from the files."""
    pcfg = getattr(cfg, "polarimetry", None) if cfg is not None else None
    from vampd.config.models import PolarimetryConfig
    from vampd.live.alerts import thresholds

    tol = (
        float(getattr(pcfg, "hwp_tolerance", 0.0) or 0.0)
        or thresholds(getattr(cfg, "alerts", None) if cfg is not None else None).hwp_grid_tolerance
    )
    open_sets: list[SetView] = []
    set_mode = None
    if sum(set_counts.values()):
        open_sets = _sets_from_ledger(led, files, tol)
        set_mode = open_sets[0].mode if open_sets else (pcfg.method if pcfg else None)
    else:
        pol = [
            f
            for f in files.values()
            if f.state == "done" and ((f.flc or "NA").upper() in ("A", "B") or "POL" in (f.obs_mod or "").upper())
        ]
        if pol:
            mode = (
                pcfg.method
                if pcfg is not None
                else ("triplediff" if any((f.flc or "").upper() in ("A", "B") for f in pol) else "doublediff")
            )
            timeout = float(getattr(pcfg, "set_timeout", None) or PolarimetryConfig.model_fields["set_timeout"].default)
            set_mode = mode
            open_sets = _sets_from_files(files, mode, tol, timeout)

    return open_sets, set_mode


def _set_table(s: SetView, now: float) -> Table:
    triple = s.mode == "triplediff"
    cols = [("A", 1), ("A", 2), ("B", 1), ("B", 2)] if triple else [(None, 1), (None, 2)]
    t = Table(box=None, show_edge=False, padding=(0, 1), header_style="bold")
    t.add_column("HWP", justify="right", no_wrap=True)
    for flc, cam in cols:
        t.add_column(f"{flc}·c{cam}" if flc else f"cam{cam}", justify="center", no_wrap=True)
    for h in HWP_GRID:
        row = [f"{h:g}"]
        for flc, cam in cols:
            label = f"HWP {h:g} FLC {flc} cam{cam}" if flc else f"HWP {h:g} cam{cam}"
            if label in s.members:
                name, state = s.members[label]
                tag = os.path.splitext(name)[0][-4:]
                mark = "✗" if state in ("parked", "failed") else "✓"
                row.append(Text(f"{mark}{tag}", style=STATE_STYLES.get(state, "green")))
            else:
                row.append(Text("·", style="bold yellow"))
        t.add_row(*row)
    return t


def sets_panel(snap, width: int) -> Panel:
    if not snap.open_sets:
        sc = snap.set_counts
        if sum(sc.values()):
            body: RenderableType = Text(
                f"no open set ({sc.get('complete', 0)} complete, {sc.get('broken', 0)} broken)", style="dim"
            )
        elif snap.set_mode is None:
            body = Text("no polarimetric data (no HWP sets)", style="dim")
        else:
            body = Text("no open set (waiting for the next HWP cycle)", style="dim")
        return Panel(body, title="HWP sets", title_align="left", box=box.ROUNDED)
    s = snap.open_sets[-1]  # the newest open set
    missing = Text()
    missing.append("missing: ", style="yellow")
    missing.append(", ".join(s.missing) if s.missing else "none", style="bold yellow" if s.missing else "green")
    parts: list[RenderableType] = [_set_table(s, snap.taken), missing]
    if len(snap.open_sets) > 1:
        others = ", ".join(
            f"{o.target} {o.filter} {len(o.members)}/{len(o.members) + len(o.missing)}"
            for o in snap.open_sets[:-1][-3:]
        )
        parts.append(Text(f"also open: {others}", style="dim"))
    have, total = len(s.members), len(s.members) + len(s.missing)
    age = dur(snap.taken - s.created) if s.created else "?"
    title = f"HWP set filling: {s.target or '?'} {s.filter or ''} {have}/{total} · age {age}"
    return Panel(
        Group(*parts), title=title, title_align="left", box=box.ROUNDED, border_style="yellow" if s.missing else "green"
    )


def board_height(snap) -> int:
    """Rows the set board needs (0 without an open set)."""
    return len(HWP_GRID) + 5 + (1 if len(snap.open_sets) > 1 else 0) if snap.open_sets else 0

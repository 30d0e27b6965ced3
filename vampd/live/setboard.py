"""The HWP-set board of the live view: the open sets as the board shows them (from the PDI
trigger's ``sets`` rows, else assembled from the ``files`` table) and their panel."""

from __future__ import annotations

import json
import os
import textwrap
from dataclasses import asdict, dataclass, field

from rich import box
from rich.console import Group, RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from vampd.engine.ledger import Ledger
from vampd.live.common import FileRow, camera_of, dur

__all__ = ["HWP_GRID", "SetView", "SlotCell", "read_sets", "sets_panel", "board_height", "LEGEND"]

HWP_GRID = (0.0, 45.0, 22.5, 67.5)
MARKS = {"done": "✓", "failed": "✗", "filling": "…", "processing": "⚙"}
CELL_STYLES = {"done": "green", "failed": "magenta", "filling": "yellow", "processing": "cyan"}
LEGEND = "×n cubes: ✓ in set … filling ⚙ processing ✗ failed · empty"
_BUSY = ("pending", "queued", "running", "failed")  # file states still to be reduced


@dataclass
class SlotCell:
    """One slot of the board: ``kind`` is ``done``/``failed`` (a set member), ``filling`` (an open
    HWP block) or ``processing`` (a closed block being coadded, or cubes being reduced), with
    its number of cubes."""

    kind: str
    ncubes: int

    def text(self) -> str:
        """``✓×2``, ``…×1``, ``⚙×3``, ``✗×1``."""
        return f"{MARKS.get(self.kind, '?')}×{self.ncubes}"


@dataclass
class SetView:
    """An HWP set as the board shows it: which slots are present and which are missing.

    ``members`` maps a slot label (``"HWP 22.5 FLC A cam2"``) to ``(file name, state)``.
    ``source`` is ``"ledger"`` (a ``sets`` row written by the PDI trigger), ``"files"``
    (assembled here from the ``files`` table because PDI recorded no sets) or ``"blocks"``
    (``combine.method = "pdi"``: no open set yet, only HWP blocks filling). ``cells`` holds the
    board's cell of every slot that is not empty (members, blocks filling or being coadded,
    cubes being reduced).
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
    cells: dict[str, SlotCell] = field(default_factory=dict)  # slot label → what the board shows
    filling: list[str] = field(default_factory=list)  # the open HWP blocks: "HWP 22.5 FLC A cam1, 1 cube"


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
        cells: dict[str, SlotCell] = {}
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
            # an HWP block member records its cubes (combine.method = "pdi"); a cube is one
            ncubes = int(m.get("cubes") or 1) if isinstance(m, dict) else 1
            cells[label] = SlotCell("failed" if state in ("parked", "failed") else "done", ncubes)
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
                cells=cells,
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
                cells={
                    k: SlotCell("failed" if st in ("parked", "failed") else "done", 1)
                    for k, (_n, st) in present.items()
                },
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
    blocks = led.block_rows(("open", "ready", "running"))  # HWP blocks not yet set members
    if sum(set_counts.values()):
        open_sets = _sets_from_ledger(led, files, tol)
        set_mode = open_sets[0].mode if open_sets else (pcfg.method if pcfg else None)
    elif sum(led.block_counts().values()):  # combine.method = "pdi": the sets are made of blocks
        set_mode = (
            pcfg.method if pcfg else ("triplediff" if any(b["flc"] in ("A", "B") for b in blocks) else "doublediff")
        )
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
    if set_mode in ("triplediff", "doublediff"):
        if not open_sets and blocks:  # every set complete (or none yet), the next one's blocks filling
            open_sets = [_set_of_blocks(blocks, set_mode)]
        if open_sets:
            _pending_cells(open_sets[-1], blocks, files, tol)
    return open_sets, set_mode


def _block_label(b, mode: str) -> str:
    from vampd.pdi.sets import slot_label

    return slot_label(
        (float(b["hwp"]), b["flc"], int(b["camera"])) if mode == "triplediff" else (float(b["hwp"]), int(b["camera"]))
    )


def _set_of_blocks(blocks: list, mode: str) -> SetView:
    """The set the newest HWP blocks fill, before the PDI trigger recorded it (no member yet)."""
    from vampd.pdi.sets import all_slots, slot_label

    newest = max(blocks, key=lambda b: (b["mjd"] or 0.0, b["key"]))
    arr = [b["t_complete"] for b in blocks if b["t_complete"] is not None]
    return SetView(
        key="blocks",
        mode=mode,
        state="open",
        missing=[slot_label(x) for x in all_slots(mode)],
        target=newest["target"],
        filter=newest["filter"],
        created=min(arr) if arr else None,
        updated=max(arr) if arr else None,
        source="blocks",
    )


def _same_group(s: SetView, target, filt) -> bool:
    return (s.target is None or str(target or "") == s.target) and (s.filter is None or str(filt or "") == s.filter)


def _pending_cells(s: SetView, blocks: list, files: dict[str, FileRow], tol: float) -> None:
    """The empty slots of ``s``: an open HWP block there is ``filling``, a closed one being
    coadded or cubes of that slot still being reduced are ``processing``."""
    for b in blocks:
        if not _same_group(s, b["target"], b["filter"]):
            continue
        label = _block_label(b, s.mode)
        ncubes = len(json.loads(b["members"] or "[]"))
        if label in s.cells or label not in s.missing:
            continue
        s.cells[label] = SlotCell("filling" if b["state"] == "open" else "processing", ncubes)
        if b["state"] == "open":
            s.filling.append(f"{label}, {ncubes} cube{'s' if ncubes != 1 else ''} so far")
    busy: dict[str, int] = {}
    for f in files.values():
        if f.state in _BUSY and f.hwp is not None and _same_group(s, f.target, f.filter):
            label = _slot_label_of(f, s.mode, tol)
            if label is not None and label in s.missing and label not in s.cells:
                busy[label] = busy.get(label, 0) + 1
    for label, n in busy.items():
        s.cells[label] = SlotCell("processing", n)


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
            cell = s.cells.get(label)
            if cell is not None:
                row.append(Text(cell.text(), style=CELL_STYLES.get(cell.kind, "")))
            else:
                row.append(Text("·", style="bold yellow"))
        t.add_row(*row)
    return t


def sets_panel(snap, width: int, room: int | None = None) -> Panel:
    """The set board: the newest open set's slots (cubes per slot), the empty slots, the blocks
    filling and a legend; ``room``: rows available (the legend and wrapping go first)."""
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
    parts: list[RenderableType] = [_set_table(s, snap.taken), *_board_lines(snap, _level(snap, width, room))]
    have, total = len(s.members), len(s.members) + len(s.missing)
    age = dur(snap.taken - s.created) if s.created else "?"
    title = f"HWP set filling: {s.target or '?'} {s.filter or ''} {have}/{total} · age {age}"
    return Panel(
        Group(*parts), title=title, title_align="left", box=box.ROUNDED, border_style="yellow" if s.missing else "green"
    )


def _board_lines(snap, level: int = 0) -> list[Text]:
    """The lines under the table: empty slots, the blocks filling, other open sets, the legend.
    ``level`` 1 leaves out the legend, 2 also keeps the filling blocks to one line (small screens)."""
    s = snap.open_sets[-1]
    empty = [m for m in s.missing if m not in s.cells]
    missing = Text()
    missing.append("missing: ", style="yellow")
    if empty:
        missing.append(", ".join(empty) if len(empty) <= 4 else f"{len(empty)} slots (·)", style="bold yellow")
    else:
        missing.append("none" if not s.missing else f"none empty, {len(s.missing)} in progress", style="green")
    out = [missing]
    if s.filling:  # the HWP blocks still taking cubes
        filling = Text("block filling: " + "; ".join(s.filling), style="yellow")
        if level >= 2:
            filling.no_wrap, filling.overflow = True, "ellipsis"
        out.append(filling)
    if len(snap.open_sets) > 1:
        others = ", ".join(
            f"{o.target} {o.filter} {len(o.members)}/{len(o.members) + len(o.missing)}"
            for o in snap.open_sets[:-1][-3:]
        )
        out.append(Text(f"also open: {others}", style="dim"))
    if level == 0:
        out.append(Text(LEGEND, style="dim"))
    return out


def _height(snap, width: int, level: int) -> int:
    inner = max(width - 4, 10)
    # borders 2, table header and the HWP rows, then the lines under it as rich wraps them
    lines = _board_lines(snap, level)
    return 2 + 1 + len(HWP_GRID) + sum(1 if t.no_wrap else len(textwrap.wrap(t.plain, inner)) or 1 for t in lines)


def _level(snap, width: int, room: int | None) -> int:
    """The fullest variant of the board that fits in ``room`` rows (the smallest if none does)."""
    for level in (0, 1):
        if room is None or _height(snap, width, level) <= room:
            return level
    return 2


def board_height(snap, width: int, room: int | None = None) -> int:
    """Rows the set board needs at ``width`` (outer, borders included; 0 without an open set),
    in its fullest variant that fits in ``room`` rows."""
    if not snap.open_sets:
        return 0
    return _height(snap, width, _level(snap, width, room))

"""The live view: a pure function from a :class:`~vampd.live.snapshot.Snapshot` to a rich renderable.

The header (night, target, config, daemon, counts, sets) is packed into as many lines as it
needs and is never cut. At ≥ 100 × 30: alerts, latest files (by observation time), the HWP-set
board next to the trends, the running PDI next to the parked files (reasons in full). Smaller
terminals get the compact layout: alerts, then one line each for the sets, the running PDI and
every parked file, then the latest files (and the set board if there is room).
"""

from __future__ import annotations

import os

from rich import box
from rich.cells import cell_len
from rich.console import Group, RenderableType
from rich.layout import Layout
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from vampd.live.alerts import Alert, compute_alerts
from vampd.live.common import STATE_STYLES, FileRow, camera_of, mjd_ut, ut
from vampd.live.common import dur as _dur
from vampd.live.common import flux_str as _flux
from vampd.live.common import fmt as _g
from vampd.live.common import state_text as _state
from vampd.live.pdiview import pdi_line, pdi_panel
from vampd.live.setboard import board_height, sets_panel
from vampd.live.snapshot import Snapshot
from vampd.live.sparkline import sparkline

__all__ = ["render", "STATE_STYLES", "render_text"]

LEVEL_STYLES = {"error": "bold red", "warning": "yellow", "info": "cyan"}
_WIDE = 100


# -- panels --------------------------------------------------------------------------------------------
def _pack(groups: list[list[Text]], width: int) -> list[Text]:
    """Lines of at most ``width`` cells: each group starts a new line, its segments are packed
    ``a │ b`` and go to the next line rather than being cut (the header never says ``…``)."""
    lines: list[Text] = []
    for segs in groups:
        cur = Text()
        for seg in segs:
            if cur.plain and cell_len(cur.plain) + 3 + cell_len(seg.plain) > width:
                lines.append(cur)
                cur = Text()
            if cur.plain:
                cur.append(" │ ", style="dim")
            cur.append_text(seg)
        if cur.plain:
            lines.append(cur)
    return lines


def _seg(text: str, style: str = "") -> Text:
    return Text(text, style=style)


def _daemon_segments(snap: Snapshot, compact: bool) -> list[Text]:
    d = snap.daemon
    if d.get("alive"):
        up = _dur(snap.taken - (d.get("started") or snap.taken))
        beat = _dur(snap.taken - (d.get("heartbeat") or snap.taken))
        return [
            _seg("● daemon running", "bold green"),
            _seg(
                f"pid {d.get('pid')} up {up}, beat {beat} ago"
                if compact
                else f"pid {d.get('pid')} up {up}, last beat {beat} ago"
            ),
        ]
    if d.get("pid") is None:
        return [
            _seg("■ DAEMON NOT RUNNING", "bold red reverse"),
            _seg("batch ledger" if compact else "last recorded state (batch ledger: no daemon has run here)", "red"),
        ]
    how = "stopped" if d.get("stopped") else "gone"
    last = d.get("stopped") or d.get("heartbeat")
    ago = _dur(snap.taken - last) if last else "?"
    return [
        _seg("■ DAEMON NOT RUNNING", "bold red reverse"),
        _seg(
            f"pid {d.get('pid')} {how} {ago} ago"
            if compact
            else f"last recorded state: pid {d.get('pid')} {how} at {ut(last)} UT (wall clock), {ago} ago",
            "red",
        ),
    ]


def _count_segments(snap: Snapshot, compact: bool) -> list[Text]:
    f = (snap.status or {}).get("files", {})
    c = snap.counts
    lat = (snap.status or {}).get("latency", {})
    files = Text(f"files {f.get('total', 0)}: ")
    files.append(f"{f.get('done', 0)} done", style="green")
    files.append(
        f", {c.get('running', 0)} run, {f.get('pending', 0)} pend, "
        if compact
        else f", {c.get('running', 0)} running, {f.get('pending', 0)} pending, "
    )
    files.append(f"{c.get('parked', 0)} parked", style="magenta" if c.get("parked") else "")
    if c.get("failed"):
        files.append(f", {c['failed']} to retry", style="red")
    sc = snap.set_counts
    if snap.leastsq:  # least squares: cubes, Q_phi S/N and coverage per HWP angle of the latest group
        a = max(snap.leastsq, key=lambda x: x.get("updated") or 0.0)
        sets = _seg(
            f"lsq {a['ncubes']} cubes S/N {_g(a['snr'], '.1f')} HWP "
            + " ".join(f"{h}:{n}" for h, n in a["coverage"].items()),
            "bold",
        )
    else:
        sets = _seg(
            f"sets {sc.get('complete', 0)} complete, {sc.get('open', 0)} open, {sc.get('broken', 0)} broken", "bold"
        )
    bc = snap.block_counts or {}
    if sum(bc.values()):  # combine.method = "pdi": HWP blocks
        sets.append(
            f" │ blocks {bc.get('done', 0)} done, {bc.get('open', 0)} open"
            if compact
            else f" │ HWP blocks {bc.get('done', 0)} done, {bc.get('open', 0)} open,"
            f" {bc.get('ready', 0) + bc.get('running', 0)} coadding, {bc.get('failed', 0)} failed"
        )
    p50, p95 = _g(lat.get("median"), ".1f"), _g(lat.get("p95"), ".1f")
    if compact:
        return [files, sets, _seg(f"{_g(snap.throughput, '.1f')}/min q{snap.queue} p50 {p50} s p95 {p95} s")]
    segs = [
        files,
        sets,
        _seg(f"{_g(snap.throughput, '.1f')} files/min, queue {snap.queue}"),
        _seg(f"latency p50 {p50} s, p95 {p95} s"),
    ]
    if snap.disk_free_gb is not None:
        segs.append(_seg(f"disk {snap.disk_free_gb:.0f} GB free"))
    return segs


def header_lines(snap: Snapshot, width: int) -> list[Text]:
    """The header's lines for an inner width of ``width`` cells (wrapped, never cut)."""
    compact = width < _WIDE - 4
    if compact:
        first = [
            _seg("vampd live", "bold"),
            _seg(f"{snap.target or '?'}", "bold"),
            _seg(f"night {snap.night or '?'}"),
            _seg(f"now {ut(snap.taken)} UT (wall clock)", "dim"),
        ]
    else:
        first = [
            _seg("vampd live", "bold"),
            _seg(f"night {snap.night or '?'} HST"),
            _seg(f"target {snap.target or '?'}", "bold"),
            _seg(f"config {snap.config_name or '–'}"),
            _seg(f"now {ut(snap.taken)} UT (wall clock)", "dim"),
        ]
    if not snap.ledger_found:
        return _pack([first, [_seg(f"no ledger yet: {snap.problem}", "bold red")]], width)
    return _pack([first, _daemon_segments(snap, compact), _count_segments(snap, compact)], width)


def _wrapped_height(lines: list[Text], width: int) -> int:
    """Rows the lines take at ``width`` (rich wraps words; a segment longer than a line wraps too)."""
    from rich.console import Console

    con = Console(width=max(width, 1), file=open(os.devnull, "w"), legacy_windows=False)
    try:
        return sum(len(t.wrap(con, max(width, 1))) for t in lines)
    finally:
        con.file.close()


def _header(snap: Snapshot, width: int) -> tuple[RenderableType, int]:
    """The header group and its height in rows (borders included)."""
    inner = width - 4  # heavy border and padding
    lines = header_lines(snap, inner)
    return Group(*lines), _wrapped_height(lines, inner) + 2


def _alerts_panel(alerts: list[Alert], nlines: int) -> Panel:
    if not alerts:
        body: RenderableType = Text("✓ all good: no alerts", style="green")
        style = "green"
    else:
        lines = []
        shown = alerts if len(alerts) <= nlines else alerts[: nlines - 1]
        for a in shown:
            t = Text()
            t.append(f"{a.level.upper():7s} ", style=LEVEL_STYLES.get(a.level, ""))
            t.append(a.message)
            t.no_wrap = True
            t.overflow = "ellipsis"
            lines.append(t)
        if len(shown) < len(alerts):
            lines.append(Text(f"… {len(alerts) - len(shown)} more alert(s)", style="dim"))
        body = Group(*lines)
        style = "red" if any(a.level == "error" for a in alerts) else "yellow"
    return Panel(body, title=f"alerts ({len(alerts)})", title_align="left", border_style=style, box=box.ROUNDED)


_FILE_COLUMNS = [  # (name, width priority: lower is kept longer)
    ("obs UT", 0),
    ("file", 1),
    ("cam", 0),
    ("FLC", 2),
    ("HWP", 2),
    ("filter", 7),
    ("kept", 5),
    ("Strehl", 3),
    ("FWHM", 6),
    ("flux", 4),
    ("offset", 8),
    ("sat", 9),
    ("latency", 6),
    ("state", 0),
]
_COL_WIDTH = {
    "obs UT": 9,
    "file": 17,
    "cam": 3,
    "FLC": 3,
    "HWP": 5,
    "filter": 6,
    "kept": 5,
    "Strehl": 6,
    "FWHM": 5,
    "flux": 6,
    "offset": 6,
    "sat": 3,
    "latency": 7,
    "state": 7,
}


def _file_cells(f: FileRow) -> dict:
    cam = camera_of(f)
    return {
        # observation time; a file without one shows its arrival on the wall clock, marked "~"
        "obs UT": mjd_ut(f.mjd) or ("~" + ut(f.t_arrival) if f.t_arrival else "–"),
        "file": f.name,
        "cam": str(cam) if cam else "?",
        "FLC": f.flc or "–",
        "HWP": _g(f.hwp, "g"),
        "filter": f.filter or "–",
        "kept": f"{f.nkept}/{f.nframes}" if f.nkept is not None else (str(f.nframes) if f.nframes else "–"),
        "Strehl": _g(f.strehl, ".2f"),
        "FWHM": _g(f.fwhm, ".2f"),
        "flux": _flux(f.flux),
        "offset": _g(f.offset, ".2f"),
        "latency": _g(f.latency, ".1f"),
        "state": f.state,
        "sat": "–" if f.nsat is None else Text(str(f.nsat), style="bold red" if f.nsat else ""),
    }


def _latest_panel(snap: Snapshot, width: int, nrows: int) -> Panel:
    budget = width - 4  # panel borders and padding
    cols = [c for c, _ in _FILE_COLUMNS]
    for c, _p in sorted(_FILE_COLUMNS, key=lambda cp: -cp[1]):  # drop least important until it fits
        if sum(_COL_WIDTH[k] + 2 for k in cols) - 2 <= budget:
            break
        if _p > 0:
            cols.remove(c)
    t = Table(box=None, padding=(0, 1), show_edge=False, pad_edge=False, header_style="bold underline")
    for c in cols:
        t.add_column(
            c,
            justify="right" if c in ("HWP", "kept", "Strehl", "FWHM", "flux", "offset", "sat", "latency") else "left",
            no_wrap=True,
            overflow="ellipsis",
            width=_COL_WIDTH[c],
        )
    for f in snap.latest[: max(nrows, 0)]:
        cells = _file_cells(f)
        t.add_row(
            *[_state(cells[c]) if c == "state" else cells[c] for c in cols],
            style="" if f.state == "done" else STATE_STYLES.get(f.state, ""),
        )
    n = len(snap.latest)
    title = f"latest files by observation time ({min(n, nrows)} of {snap.status.get('files', {}).get('total', n)})"
    if any(f.mjd is None for f in snap.latest[: max(nrows, 0)]):
        title += ", ~ = arrival (wall clock)"
    return Panel(t, title=title, title_align="left", box=box.ROUNDED, padding=(0, 0))


def _trends_panel(snap: Snapshot, width: int) -> Panel:
    if not snap.trends:
        return Panel(Text("no finished files yet", style="dim"), title="trends", title_align="left", box=box.ROUNDED)
    cams = sorted(snap.trends)
    # label 6 + per camera: sparkline + last value 6, each column with 1 cell of padding per side
    spark_w = max(4, (width - 4 - 8 - len(cams) * 8) // max(len(cams), 1) - 3)
    t = Table(box=None, show_header=True, padding=(0, 1), show_edge=False)
    t.add_column("", no_wrap=True, min_width=6)
    for cam in cams:
        t.add_column(f"cam{cam}", no_wrap=True, overflow="crop", width=spark_w)
        t.add_column("last", justify="right", no_wrap=True, min_width=6)
    for attr, label, fmt in (
        ("strehl", "Strehl", ".2f"),
        ("fwhm", "FWHM", ".2f"),
        ("flux", "flux", None),
        ("offset", "offset", ".2f"),
    ):
        row: list = [label]
        for cam in cams:
            vals = [getattr(f, attr) for f in snap.trends[cam]]
            good = [v for v in vals if v is not None]
            row.append(Text(sparkline(vals, spark_w), style="cyan"))
            row.append(_flux(good[-1]) if fmt is None and good else (_g(good[-1], fmt) if good else "–"))
        t.add_row(*row)
    return Panel(t, title="trends (per camera, oldest → newest)", title_align="left", box=box.ROUNDED)


def problem_reason(f: FileRow) -> str:
    """A parked/failed file's error on one line, without its own path or name in front."""
    err = " ".join((f.error or "no reason recorded").replace(f.path, f.name).split())
    for prefix in (f"{f.name}: ", f"{f.name} "):
        if err.startswith(prefix):
            err = err[len(prefix) :]
    return err


def _problem_lines(problems: list[FileRow], width: int) -> list[Text]:
    """One entry per parked/failed file: ``name  state  reason``, the reason wrapped under it
    (never cut)."""
    import textwrap

    lines = []
    for f in problems:
        state = f"{f.state}×{f.tries}" if f.state == "failed" else f.state
        head = Text()
        head.append(f.name, style="bold")
        head.append(f"  {state}  ", style=STATE_STYLES.get(f.state, ""))
        reason = problem_reason(f)
        first_w = max(width - cell_len(head.plain), 10)
        parts = textwrap.wrap(reason, first_w) or [""]
        head.append(parts[0])
        lines.append(head)
        rest = " ".join(parts[1:])
        for chunk in textwrap.wrap(rest, max(width - 2, 10)):
            lines.append(Text("  " + chunk))
    return lines


def _problems_panel(snap: Snapshot, width: int, nrows: int) -> Panel:
    """Parked and failed files with their reasons in full; ``nrows`` rows inside the borders
    (whole entries only: the title says how many are not shown)."""
    if not snap.problems:
        return Panel(Text("no parked files", style="green"), title="parked files", title_align="left", box=box.ROUNDED)
    inner = width - 4
    shown: list[Text] = []
    nfiles = 0
    for f in snap.problems:
        one = _problem_lines([f], inner)
        if len(shown) + len(one) > max(nrows, 1) and nfiles:
            break
        shown += one
        nfiles += 1
    more = len(snap.problems) - nfiles
    title = f"parked files ({len(snap.problems)}{', ' + str(more) + ' not shown' if more > 0 else ''})"
    return Panel(Group(*shown), title=title, title_align="left", border_style="magenta", box=box.ROUNDED)


def _problems_height(snap: Snapshot, width: int, max_rows: int) -> int:
    """Rows the parked-files panel needs at ``width`` (borders included), at most ``max_rows``."""
    if not snap.problems:
        return 3
    return min(len(_problem_lines(snap.problems, width - 4)), max_rows - 2) + 2


# -- compact (80×24): one line each for sets, running PDI and every parked file -----------------------------
def _compact_lines(snap: Snapshot, width: int, max_parked: int) -> list[Text]:
    sc = snap.set_counts
    sets = Text()
    sets.append(f"sets {sc.get('complete', 0)} complete", style="bold")
    sets.append(f", {sc.get('open', 0)} open, {sc.get('broken', 0)} broken")
    if snap.open_sets:
        o = snap.open_sets[-1]
        sets.append(
            f"; filling {o.target or '?'} {len(o.members)}/{len(o.members) + len(o.missing)}",
            style="yellow" if o.missing else "green",
        )
        if o.missing:
            sets.append(f", missing: {', '.join(o.missing)}", style="yellow")
    pdi = pdi_line(snap.pdi)
    out = [sets, pdi]
    for f in snap.problems[:max_parked]:
        t = Text()
        t.append(f"{f.state} ", style=STATE_STYLES.get(f.state, ""))
        t.append(f.name, style="bold")
        t.append(f": {problem_reason(f)}")
        out.append(t)
    if len(snap.problems) > max_parked:
        out.append(Text(f"… and {len(snap.problems) - max_parked} more parked file(s)", style="dim"))
    for t in out:
        t.no_wrap = True
        t.overflow = "ellipsis"
    return out


# -- layout ----------------------------------------------------------------------------------------------
def render(snap: Snapshot, width: int = 120, height: int = 40, alerts: list[Alert] | None = None) -> Layout:
    """The whole screen for ``snap`` at ``width`` × ``height`` characters.

    At ≥ 100 × 30 the full layout (latest files, set board next to trends, running PDI next to
    the parked files); smaller terminals get the compact layout, where the set count, the running
    PDI and every parked file (with its reason) keep one line each above the latest files. The
    header wraps instead of being cut.

    Parameters
    ----------
    snap : Snapshot
    width, height : int
        Terminal size.
    alerts : list of Alert, optional
        Default: :func:`~vampd.live.alerts.compute_alerts` with default thresholds.

    Returns
    -------
    rich.layout.Layout
        Print it on a console of the same size (``Console(width=…, height=…)``).
    """
    width, height = max(int(width), 40), max(int(height), 10)
    if alerts is None:
        alerts = compute_alerts(snap, None, snap.taken)
    head, head_h = _header(snap, width)
    head_h = min(head_h, max(height - 6, 3))
    rows: list[tuple[str, Layout]] = [("header", Layout(Panel(head, box=box.HEAVY, padding=(0, 1)), size=head_h))]
    left = height - head_h
    a_lines = min(max(len(alerts), 1), 6 if height >= 30 else 2)
    a_h = a_lines + 2 + (1 if len(alerts) > a_lines else 0)
    a_h = min(a_h, max(3, left - 6))
    rows.append(("alerts", Layout(_alerts_panel(alerts, a_h - 2), size=a_h)))
    left -= a_h
    if not snap.ledger_found:
        return _stack(rows, Layout(Panel(Text("waiting for the daemon to create the ledger…", style="dim"))))
    if width >= _WIDE and height >= 30:
        return _stack(rows + _wide_rows(snap, width, left))
    return _stack(rows + _compact_rows(snap, width, left))


def _compact_rows(snap: Snapshot, width: int, left: int) -> list[tuple[str, Layout]]:
    """Small terminals: the one-line summaries (sets, running PDI, parked files), the latest
    files, then the set board if there is room."""
    latest_min = 6 if left >= 14 else 4  # borders, column header, three files (one on tiny screens)
    room = max(left - latest_min - 2 - 2, 1)  # summary panel borders, the sets and PDI lines
    n = len(snap.problems)
    max_parked = n if n <= room else max(room - 1, 1)  # keep a line for "… and N more"
    lines = _compact_lines(snap, width - 4, max_parked)
    sum_h = min(len(lines) + 2, max(left - latest_min, 3))
    out = [("summary", Layout(Panel(Group(*lines[: sum_h - 2]), box=box.ROUNDED, padding=(0, 1)), size=sum_h))]
    left -= sum_h
    sets_h = board_height(snap, width, left - 7)
    extra = []
    if sets_h and left - sets_h >= 7:
        extra.append(("sets", Layout(sets_panel(snap, width, sets_h), size=sets_h)))
        left -= sets_h
    out.append(("latest", Layout(_latest_panel(snap, width, max(left - 3, 0)), size=left)))
    return out + extra


def _wide_rows(snap: Snapshot, width: int, left: int) -> list[tuple[str, Layout]]:
    latest_min = 7
    avail = left - latest_min
    pdi_rows = len(snap.pdi.sets) if snap.pdi and snap.pdi.sets else 0
    pdi_h = (1 + 2 + min(pdi_rows, 4) + 2) if pdi_rows else 3
    # the board's legend and wrapped lines give way to the running PDI and parked files below
    open_h = board_height(snap, width * 11 // 20, avail - pdi_h)
    mid_h = max(open_h or 3, 7 if snap.trends else 3)
    left_w = width * 3 // 5
    extra: list[tuple[str, Layout]] = []
    bot_h = max(pdi_h, _problems_height(snap, width - left_w, max(avail - mid_h, 3)))
    if avail >= mid_h + bot_h or avail >= mid_h:
        mid = Layout(size=mid_h)
        mid.split_row(
            Layout(sets_panel(snap, width * 11 // 20, mid_h), ratio=11),
            Layout(_trends_panel(snap, width * 9 // 20), ratio=9),
        )
        extra.append(("middle", mid))
        avail -= mid_h
    bot_h = max(pdi_h, _problems_height(snap, width - left_w, max(avail, 3)))
    if avail >= bot_h:
        bot = Layout(size=bot_h)
        # the set table needs more room than the parked-files list (3:2)
        bot.split_row(
            Layout(pdi_panel(snap.pdi, left_w, bot_h - 5), size=left_w),
            Layout(_problems_panel(snap, width - left_w, bot_h - 2), ratio=1),
        )
        extra.append(("bottom", bot))
        avail -= bot_h
    latest_h = latest_min + avail
    return [("latest", Layout(_latest_panel(snap, width, max(latest_h - 3, 0)), size=latest_h))] + extra


def _stack(rows: list[tuple[str, Layout]], last: Layout | None = None) -> Layout:
    root = Layout(name="root")
    children = []
    for name, lay in rows:
        lay.name = name
        children.append(lay)
    if last is not None:
        children.append(last)
    else:
        children[-1].size = None  # the last panel takes what is left
    root.split_column(*children)
    return root


def render_text(
    snap: Snapshot, width: int = 120, height: int = 40, alerts: list[Alert] | None = None, color: bool = False
) -> str:
    """The screen as text (``color`` → with ANSI styles): what ``vampd live --once`` prints."""
    from rich.console import Console

    console = Console(
        width=width,
        height=height,
        record=True,
        file=open(os.devnull, "w"),
        force_terminal=color,
        color_system="standard" if color else None,
        legacy_windows=False,
    )
    console.print(render(snap, width, height, alerts))
    text = console.export_text(styles=color)
    console.file.close()
    return text

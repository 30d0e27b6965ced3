"""The live view: a pure function from a :class:`~vampd.live.snapshot.Snapshot` to a rich renderable.

Panels, most important first (narrow or short terminals drop from the end): header (night,
target, config, daemon), alerts, latest files, the HWP-set board, trends, running PDI,
parked/failed files. At ≥ 100 columns the set board sits next to the trends and PDI next to
the parked files.
"""

from __future__ import annotations

import datetime as _dt
import math
import os

from rich import box
from rich.console import Group, RenderableType
from rich.layout import Layout
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from vampd.live.alerts import Alert, compute_alerts
from vampd.live.snapshot import HWP_GRID, FileRow, SetView, Snapshot, camera_of
from vampd.live.sparkline import sparkline

__all__ = ["render", "STATE_STYLES", "render_text"]

STATE_STYLES = {
    "done": "green", "failed": "red", "parked": "magenta", "pending": "dim", "queued": "dim",
    "running": "cyan", "ignored": "dim",
}
LEVEL_STYLES = {"error": "bold red", "warning": "yellow", "info": "cyan"}
_WIDE = 100


# -- formatting ---------------------------------------------------------------------------------------
def _dur(s: float | None) -> str:
    if s is None or not math.isfinite(s):
        return "–"
    s = max(0.0, s)
    if s < 60:
        return f"{s:.0f}s"
    if s < 3600:
        return f"{int(s // 60)}m{int(s % 60):02d}s"
    return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m"


def _ut(t: float | None) -> str:
    if t is None:
        return "–"
    return _dt.datetime.fromtimestamp(t, _dt.timezone.utc).strftime("%H:%M:%S")


def _mjd_ut(mjd: float | None) -> str | None:
    if mjd is None:
        return None
    return _ut((mjd - 40587.0) * 86400.0)


def _g(v: float | None, fmt: str = ".2f") -> str:
    return "–" if v is None or not math.isfinite(v) else format(v, fmt)


def _flux(v: float | None) -> str:
    if v is None or not math.isfinite(v):
        return "–"
    if abs(v) < 1e4:
        return f"{v:.0f}"
    e = int(math.floor(math.log10(abs(v))))
    return f"{v / 10**e:.2f}e{e}"


def _state(state: str) -> Text:
    return Text(state, style=STATE_STYLES.get(state, ""))


# -- panels --------------------------------------------------------------------------------------------
def _header(snap: Snapshot, width: int) -> RenderableType:
    st = snap.status or {}
    f = st.get("files", {})
    d = snap.daemon
    line1 = Text()
    line1.append("vampd live", style="bold")
    line1.append(f"  night {snap.night or '?'} HST", style="")
    line1.append(f"  target {snap.target or '?'}", style="bold")
    line1.append(f"  config {snap.config_name or '?'}")
    line1.append(f"  {_ut(snap.taken)} UT", style="dim")
    line2 = Text()
    if not snap.ledger_found:
        line2.append(f"no ledger yet: {snap.problem}", style="bold red")
        for line in (line1, line2):
            line.no_wrap = True
            line.overflow = "ellipsis"
        return Group(line1, line2)
    if d.get("alive"):
        line2.append("● daemon running", style="bold green")
        line2.append(f" pid {d.get('pid')} up {_dur(snap.taken - (d.get('started') or snap.taken))}"
                     f" (beat {_dur(snap.taken - (d.get('heartbeat') or snap.taken))} ago)")
    elif d.get("pid") is None:
        line2.append("■ DAEMON NOT RUNNING", style="bold red reverse")
        line2.append(" — last recorded state (batch ledger: no daemon has run here)", style="red")
    else:
        how = "stopped" if d.get("stopped") else "gone"
        last = d.get("stopped") or d.get("heartbeat")
        line2.append("■ DAEMON NOT RUNNING", style="bold red reverse")
        line2.append(f" — last recorded state (pid {d.get('pid')} {how} at {_ut(last)} UT, "
                     f"{_dur(snap.taken - last) if last else '?'} ago)", style="red")
    line3 = Text()
    lat = st.get("latency", {})
    if width < _WIDE:  # compact
        line3.append(f"files {f.get('total', 0)}: ")
        line3.append(f"{f.get('done', 0)} done", style="green")
        line3.append(f" {snap.counts.get('running', 0)} run {f.get('pending', 0)} pend ")
        line3.append(f"{snap.counts.get('failed', 0) + snap.counts.get('parked', 0)} bad",
                     style="red" if snap.counts.get("failed") or snap.counts.get("parked") else "")
        line3.append(f" │ {_g(snap.throughput, '.1f')}/min q{snap.queue} p50 {_g(lat.get('median'), '.1f')}s"
                     f" p95 {_g(lat.get('p95'), '.1f')}s │ sets {snap.set_counts.get('complete', 0)} done")
        for line in (line1, line2, line3):
            line.no_wrap = True
            line.overflow = "ellipsis"
        return Group(line1, line2, line3)
    line3.append(f"files {f.get('total', 0)}: ")
    line3.append(f"{f.get('done', 0)} done", style="green")
    line3.append(", ")
    line3.append(f"{snap.counts.get('running', 0)} running", style="cyan")
    line3.append(f", {f.get('pending', 0)} pending, ")
    line3.append(f"{snap.counts.get('failed', 0)} failed", style="red" if snap.counts.get("failed") else "")
    line3.append(", ")
    line3.append(f"{snap.counts.get('parked', 0)} parked", style="magenta" if snap.counts.get("parked") else "")
    line3.append(f" │ {_g(snap.throughput, '.1f')} files/min  queue {snap.queue}"
                 f"  latency p50 {_g(lat.get('median'), '.1f')} s p95 {_g(lat.get('p95'), '.1f')} s")
    sc = snap.set_counts
    line3.append(f" │ sets {sc.get('complete', 0)} complete, {sc.get('open', 0)} open, {sc.get('broken', 0)} broken")
    bc = getattr(snap, "block_counts", {}) or {}
    if sum(bc.values()):
        line3.append(f" │ HWP blocks {bc.get('done', 0)} done, {bc.get('open', 0)} open,"
                     f" {bc.get('ready', 0) + bc.get('running', 0)} coadding, {bc.get('failed', 0)} failed")
    if snap.disk_free_gb is not None:
        line3.append(f" │ disk {snap.disk_free_gb:.0f} GB free")
    for line in (line1, line2, line3):
        line.no_wrap = True
        line.overflow = "ellipsis"
    return Group(line1, line2, line3)


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
    ("time", 0), ("file", 1), ("cam", 0), ("FLC", 2), ("HWP", 2), ("filter", 7), ("kept", 5),
    ("Strehl", 3), ("FWHM", 6), ("flux", 4), ("offset", 8), ("latency", 6), ("state", 0),
]
_COL_WIDTH = {"time": 8, "file": 17, "cam": 3, "FLC": 3, "HWP": 5, "filter": 6, "kept": 5, "Strehl": 6,
              "FWHM": 5, "flux": 6, "offset": 6, "latency": 7, "state": 7}


def _file_cells(f: FileRow) -> dict:
    cam = camera_of(f)
    return {
        "time": _mjd_ut(f.mjd) or _ut(f.t_arrival), "file": f.name, "cam": str(cam) if cam else "?",
        "FLC": f.flc or "–", "HWP": _g(f.hwp, "g"), "filter": f.filter or "–",
        "kept": f"{f.nkept}/{f.nframes}" if f.nkept is not None else (str(f.nframes) if f.nframes else "–"),
        "Strehl": _g(f.strehl, ".2f"), "FWHM": _g(f.fwhm, ".2f"), "flux": _flux(f.flux),
        "offset": _g(f.offset, ".2f"), "latency": _g(f.latency, ".1f"), "state": f.state,
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
        t.add_column(c, justify="right" if c in ("HWP", "kept", "Strehl", "FWHM", "flux", "offset", "latency") else "left",
                     no_wrap=True, overflow="ellipsis", width=_COL_WIDTH[c])
    for f in snap.latest[: max(nrows, 0)]:
        cells = _file_cells(f)
        t.add_row(*[_state(cells[c]) if c == "state" else cells[c] for c in cols],
                  style="" if f.state == "done" else STATE_STYLES.get(f.state, ""))
    n = len(snap.latest)
    title = f"latest files ({min(n, nrows)} of {snap.status.get('files', {}).get('total', n)})"
    return Panel(t, title=title, title_align="left", box=box.ROUNDED, padding=(0, 0))


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


def _sets_panel(snap: Snapshot, width: int) -> Panel:
    if not snap.open_sets:
        if snap.set_mode is None:
            body: RenderableType = Text("no polarimetric data (no HWP sets)", style="dim")
        else:
            body = Text("no open set (waiting for the next HWP cycle)", style="dim")
        return Panel(body, title="HWP sets", title_align="left", box=box.ROUNDED)
    s = snap.open_sets[-1]  # the newest open set
    missing = Text()
    missing.append("missing: ", style="yellow")
    missing.append(", ".join(s.missing) if s.missing else "none", style="bold yellow" if s.missing else "green")
    parts: list[RenderableType] = [_set_table(s, snap.taken), missing]
    if len(snap.open_sets) > 1:
        others = ", ".join(f"{o.target} {o.filter} {len(o.members)}/{len(o.members) + len(o.missing)}"
                           for o in snap.open_sets[:-1][-3:])
        parts.append(Text(f"also open: {others}", style="dim"))
    have, total = len(s.members), len(s.members) + len(s.missing)
    age = _dur(snap.taken - s.created) if s.created else "?"
    title = f"HWP set filling: {s.target or '?'} {s.filter or ''} {have}/{total} · age {age}"
    return Panel(Group(*parts), title=title, title_align="left", box=box.ROUNDED,
                 border_style="yellow" if s.missing else "green")


def _trends_panel(snap: Snapshot, width: int) -> Panel:
    if not snap.trends:
        return Panel(Text("no finished files yet", style="dim"), title="trends", title_align="left", box=box.ROUNDED)
    cams = sorted(snap.trends)
    spark_w = max(6, (width - 6 - 8 - len(cams) * 10) // max(len(cams), 1))
    t = Table(box=None, show_header=True, padding=(0, 1), show_edge=False)
    t.add_column("", no_wrap=True)
    for cam in cams:
        t.add_column(f"cam{cam}", no_wrap=True, overflow="crop")
        t.add_column("last", justify="right", no_wrap=True)
    for attr, label, fmt in (("strehl", "Strehl", ".2f"), ("fwhm", "FWHM", ".2f"), ("flux", "flux", None),
                             ("offset", "offset", ".2f")):
        row: list = [label]
        for cam in cams:
            vals = [getattr(f, attr) for f in snap.trends[cam]]
            good = [v for v in vals if v is not None]
            row.append(Text(sparkline(vals, spark_w), style="cyan"))
            row.append(_flux(good[-1]) if fmt is None and good else (_g(good[-1], fmt) if good else "–"))
        t.add_row(*row)
    return Panel(t, title="trends (per camera, oldest → newest)", title_align="left", box=box.ROUNDED)


def _pdi_panel(snap: Snapshot, width: int, nrows: int) -> Panel:
    """Sets done, Q_φ S/N and one row per set and field; columns are dropped from the right
    (model IP, then measured IP) when ``width`` (the panel's outer width) cannot hold them, so the
    star's DoLP is never cut."""
    p = snap.pdi
    if p is None or (not p.sets and not p.nsets):
        return Panel(Text("no PDI yet", style="dim"), title="running PDI", title_align="left", box=box.ROUNDED)
    head = Text()
    head.append(f"sets done {p.nsets}", style="bold")
    if p.qphi_snr is not None:
        head.append(f"   Qphi S/N (annulus) {p.qphi_snr:.1f}", style="bold green" if p.qphi_snr > 5 else "yellow")

    def pct(v):
        return _g(None if v is None else 100 * v, "+.2f")

    shown = p.sets[-max(nrows, 1):]
    rows = [[str(s.index if s.index is not None else "?"), s.field or "",
             f"{pct(s.dolp)}±{_g(None if s.dolp_err is None else 100 * s.dolp_err, '.2f')}",
             f"{_g(s.aolp, '.1f')}±{_g(s.aolp_err, '.1f')}",
             f"{pct(s.ip_pq)}/{pct(s.ip_pu)}", f"{pct(s.mm_ip_pq)}/{pct(s.mm_ip_pu)}"] for s in shown]
    names = ["set", "field", "DoLP %", "AoLP °", "IP q/u %", "model q/u %"]
    need = [max([len(n)] + [len(r[j]) for r in rows]) + 2 for j, n in enumerate(names)]  # + cell padding
    ncol = len(names)
    while ncol > 4 and sum(need[:ncol]) > width - 4:  # panel border and margins
        ncol -= 1
    t = Table(box=box.SIMPLE_HEAD, show_edge=False, padding=(0, 1))
    for c in names[:ncol]:
        t.add_column(c, justify="left" if c == "field" else "right", no_wrap=True, overflow="ellipsis")
    for r in rows:
        t.add_row(*r[:ncol])
    return Panel(Group(head, t) if p.sets else head, title="running PDI", title_align="left", box=box.ROUNDED)


def _problems_panel(snap: Snapshot, width: int, nrows: int) -> Panel:
    if not snap.problems:
        return Panel(Text("no parked or failed files", style="green"), title="parked files", title_align="left",
                     box=box.ROUNDED)
    t = Table(box=None, show_header=False, padding=(0, 1), expand=True, show_edge=False)
    t.add_column("file", no_wrap=True)
    t.add_column("state", no_wrap=True)
    t.add_column("error", no_wrap=True, overflow="ellipsis", ratio=1)
    for f in snap.problems[: max(nrows, 1)]:
        err = (f.error or "").replace(f.path, f.name).replace("\n", " ")
        t.add_row(f.name, _state(f"{f.state}×{f.tries}" if f.state == "failed" else f.state), err)
    more = len(snap.problems) - max(nrows, 1)
    title = f"parked/failed files ({len(snap.problems)}{', ' + str(more) + ' not shown' if more > 0 else ''})"
    return Panel(t, title=title, title_align="left", border_style="magenta", box=box.ROUNDED)


# -- layout ----------------------------------------------------------------------------------------------
def render(snap: Snapshot, width: int = 120, height: int = 40, alerts: list[Alert] | None = None) -> Layout:
    """The whole screen for ``snap`` at ``width`` × ``height`` characters.

    Parameters
    ----------
    snap : Snapshot
    width, height : int
        Terminal size; panels are dropped (least important first) when it is small.
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
    wide = width >= _WIDE
    head_h = 5
    rows: list[tuple[str, Layout]] = [("header", Layout(Panel(_header(snap, width), box=box.HEAVY,
                                                                   padding=(0, 1)), size=head_h))]
    left = height - head_h
    a_lines = min(max(len(alerts), 1), 6 if height >= 30 else 3)
    a_h = a_lines + 2 + (1 if len(alerts) > a_lines else 0)
    a_h = min(a_h, max(3, left - 6))
    rows.append(("alerts", Layout(_alerts_panel(alerts, a_h - 2), size=a_h)))
    left -= a_h
    if not snap.ledger_found:
        return _stack(rows, Layout(Panel(Text("waiting for the daemon to create the ledger…", style="dim"))))

    latest_min = min(7 if height >= 30 else 5, left)
    avail = left - latest_min
    open_h = 0
    if snap.open_sets:
        open_h = len(HWP_GRID) + 1 + 1 + 2 + (1 if len(snap.open_sets) > 1 else 0)
    sets_h = open_h or 3
    trend_h = 5 + 2 if snap.trends else 3
    pdi_rows = len(snap.pdi.sets) if snap.pdi and snap.pdi.sets else 0
    pdi_h = (1 + 2 + min(pdi_rows, 4) + 2) if pdi_rows else 3
    prob_rows = min(len(snap.problems), 5)
    prob_h = (prob_rows + 2) if prob_rows else 3
    extra: list[tuple[str, Layout]] = []
    if wide:
        mid_h = max(sets_h, trend_h)
        if avail >= mid_h:
            mid = Layout(size=mid_h)
            mid.split_row(Layout(_sets_panel(snap, width // 2), ratio=11), Layout(_trends_panel(snap, width // 2), ratio=9))
            extra.append(("middle", mid))
            avail -= mid_h
        elif avail >= sets_h:
            extra.append(("sets", Layout(_sets_panel(snap, width), size=sets_h)))
            avail -= sets_h
        bot_h = max(pdi_h, prob_h)
        if avail >= bot_h:
            bot = Layout(size=bot_h)
            # the set table needs more room than the parked-files list (3:2)
            bot.split_row(Layout(_pdi_panel(snap, width * 3 // 5, bot_h - 5), ratio=3),
                          Layout(_problems_panel(snap, width - width * 3 // 5, bot_h - 2), ratio=2))
            extra.append(("bottom", bot))
            avail -= bot_h
        elif avail >= prob_h and snap.problems:
            extra.append(("problems", Layout(_problems_panel(snap, width, prob_h - 2), size=prob_h)))
            avail -= prob_h
    else:
        for name, h, make in (("sets", sets_h, lambda h: _sets_panel(snap, width)),
                              ("trends", trend_h, lambda h: _trends_panel(snap, width)),
                              ("problems", prob_h, lambda h: _problems_panel(snap, width, h - 2)),
                              ("pdi", pdi_h, lambda h: _pdi_panel(snap, width, h - 5))):
            if name == "problems" and not snap.problems or name == "pdi" and not pdi_rows:
                continue  # nothing to say: leave the room to the files
            if avail >= h:
                extra.append((name, Layout(make(h), size=h)))
                avail -= h
    latest_h = latest_min + avail
    nfile_rows = max(latest_h - 3, 0)
    latest = Layout(_latest_panel(snap, width, nfile_rows), size=latest_h)
    rows.append(("latest", latest))
    rows.extend(extra)
    return _stack(rows)


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


def render_text(snap: Snapshot, width: int = 120, height: int = 40, alerts: list[Alert] | None = None,
                color: bool = False) -> str:
    """The screen as text (``color`` → with ANSI styles): what ``vampd live --once`` prints."""
    from rich.console import Console

    console = Console(width=width, height=height, record=True, file=open(os.devnull, "w"),
                      force_terminal=color, color_system="standard" if color else None, legacy_windows=False)
    console.print(render(snap, width, height, alerts))
    text = console.export_text(styles=color)
    console.file.close()
    return text

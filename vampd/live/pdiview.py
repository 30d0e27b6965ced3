"""The running PDI in the live view: the per-set Stokes files (``pdi/stokes/*_stokes_*.fits``:
the star's DoLP/AoLP, IP and the Qphi signal in an annulus), read with a (path, mtime) cache,
and their panel (full layout) and one-line summary (compact layout)."""

from __future__ import annotations

import glob
import math
import os
from dataclasses import dataclass, field

from rich import box
from rich.console import Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from vampd.live.common import cached, fmt, num

__all__ = ["PdiSet", "PdiSummary", "annulus_radii", "qphi_annulus", "pdi_summary", "pdi_panel", "pdi_line"]


@dataclass
class PdiSet:
    """One per-set Stokes file: star polarisation and IP per field (header values)."""

    path: str
    index: int | None
    key: str | None
    field: str | None
    dolp: float | None = None
    dolp_err: float | None = None
    aolp: float | None = None
    aolp_err: float | None = None
    ip_pq: float | None = None  # residual IP measured (after the Mueller correction)
    ip_pu: float | None = None
    mm_ip_pq: float | None = None  # IP predicted by the Mueller model
    mm_ip_pu: float | None = None
    qphi_sum: float | None = None  # Σ Qphi in the annulus (e-/s)
    qphi_var: float | None = None  # its variance


@dataclass
class PdiSummary:
    """Running PDI: the per-set Stokes files and the Qphi S/N of their sum in an annulus."""

    nsets: int = 0
    sets: list[PdiSet] = field(default_factory=list)
    qphi_snr: float | None = None
    annulus: tuple[float, float] | None = None


_PDI_CACHE: dict[tuple[str, int], list[PdiSet]] = {}


def _pdi_file(path: str) -> list[PdiSet]:
    """Header values and the annulus Qphi sum/variance of one per-set Stokes file, per field."""
    import numpy as np
    from astropy.io import fits

    out = []
    with fits.open(path, memmap=False) as hdul:
        hdr = hdul[0].header
        data = np.asarray(hdul[0].data, dtype=np.float64)
        err = np.asarray(hdul["ERR"].data, dtype=np.float64) if "ERR" in hdul else None
    if data.ndim == 3:
        data = data[None]
        err = err[None] if err is not None else None
    fields = [k[len("DPP PDI DOLP ") :] for k in hdr if k.startswith("DPP PDI DOLP ") and "_ERR" not in k]
    if not fields:
        fields = [str(hdr.get("FIELD", hdr.get("FILTER01", "")))]
    idx = hdr.get("DPP PDI SET INDEX")
    key = hdr.get("DPP PDI SET KEY")

    def g(k):
        v = num(hdr.get(k))
        return None if v is None or v == -999.0 else v

    for j, f in enumerate(fields):
        ps = PdiSet(
            path=path,
            index=int(idx) if idx is not None else None,
            key=key,
            field=f,
            dolp=g(f"DPP PDI DOLP {f}"),
            dolp_err=g(f"DPP PDI DOLP_ERR {f}"),
            aolp=g(f"DPP PDI AOLP {f}"),
            aolp_err=g(f"DPP PDI AOLP_ERR {f}"),
            ip_pq=g(f"DPP PDI IP_PQ {f}"),
            ip_pu=g(f"DPP PDI IP_PU {f}"),
            mm_ip_pq=g(f"DPP PDI MM IP_PQ {f}"),
            mm_ip_pu=g(f"DPP PDI MM IP_PU {f}"),
        )
        if j < data.shape[0] and data.shape[1] >= 4:
            s, v = qphi_annulus(
                data[j, 2], data[j, 3], None if err is None else err[j, 2], None if err is None else err[j, 3]
            )
            ps.qphi_sum, ps.qphi_var = s, v
        out.append(ps)
    return out


def annulus_radii(shape) -> tuple[float, float]:
    """The annulus of the running Qphi S/N: 0.1 to 0.4 of the frame side (px)."""
    n = min(shape[-2:])
    return max(3.0, 0.1 * n), 0.4 * n


def qphi_annulus(q, u, eq=None, eu=None) -> tuple[float, float]:
    """Σ Qphi and its variance in the annulus of :func:`annulus_radii` around the frame centre.

    Qphi = −Q cos 2φ − U sin 2φ with φ = atan2(cx − x, y − cy) (North up, East left): a
    centro-symmetric azimuthal pattern has positive Qphi. NaN pixels are left out.
    """
    import numpy as np

    ny, nx = q.shape
    cy, cx = (ny - 1) / 2, (nx - 1) / 2
    y, x = np.mgrid[:ny, :nx]
    r = np.hypot(y - cy, x - cx)
    r_in, r_out = annulus_radii(q.shape)
    phi = np.arctan2(cx - x, y - cy)
    c2, s2 = np.cos(2 * phi), np.sin(2 * phi)
    qphi = -q * c2 - u * s2
    sel = (r >= r_in) & (r < r_out) & np.isfinite(qphi)
    if eq is None or eu is None:
        var = np.zeros_like(qphi)
    else:
        var = (c2 * eq) ** 2 + (s2 * eu) ** 2
        sel &= np.isfinite(var)
    return float(qphi[sel].sum()), float(var[sel].sum())


def pdi_summary(outdir: str, set_counts: dict) -> PdiSummary | None:
    """The per-set Stokes files of ``outdir`` and the Qphi S/N of their sum (None without PDI)."""
    paths = sorted(glob.glob(os.path.join(outdir, "pdi", "stokes", "*_stokes_*.fits")))
    if not paths:
        return PdiSummary(nsets=set_counts.get("complete", 0)) if set_counts.get("complete") else None
    sets: list[PdiSet] = []
    for p in paths:
        got = cached(_PDI_CACHE, p, _pdi_file)
        if got:
            sets.extend(got)
    out = PdiSummary(nsets=len({s.path for s in sets}) or set_counts.get("complete", 0), sets=sets)
    # S/N of Σ Qphi over every set in the annulus of the first field (sets are North-up, they add)
    first = {}
    for s in sets:
        first.setdefault(s.path, s)
    tot = [(s.qphi_sum, s.qphi_var) for s in first.values() if s.qphi_sum is not None and s.qphi_var]
    if tot:
        out.qphi_snr = sum(t[0] for t in tot) / math.sqrt(sum(t[1] for t in tot))
    return out


def pdi_panel(p: PdiSummary | None, width: int, nrows: int) -> Panel:
    """Sets done, Q_φ S/N and one row per set and field; columns are dropped from the right
    (model IP, then measured IP) when ``width`` (the panel's outer width) cannot hold them, so the
    star's DoLP is never cut."""
    if p is None or (not p.sets and not p.nsets):
        return Panel(Text("no PDI yet", style="dim"), title="running PDI", title_align="left", box=box.ROUNDED)
    head = Text()
    head.append(f"sets done {p.nsets}", style="bold")
    if p.qphi_snr is not None:
        head.append(f"   Qphi S/N (annulus) {p.qphi_snr:.1f}", style="bold green" if p.qphi_snr > 5 else "yellow")

    def pct(v):
        return fmt(None if v is None else 100 * v, "+.2f")

    shown = p.sets[-max(nrows, 1) :]
    rows = [
        [
            str(s.index if s.index is not None else "?"),
            s.field or "",
            f"{pct(s.dolp)}±{fmt(None if s.dolp_err is None else 100 * s.dolp_err, '.2f')}",
            f"{fmt(s.aolp, '.1f')}±{'>90' if (s.aolp_err or 0) > 90 else fmt(s.aolp_err, '.1f')}",
            f"{pct(s.ip_pq)}/{pct(s.ip_pu)}",
            f"{pct(s.mm_ip_pq)}/{pct(s.mm_ip_pu)}",
        ]
        for s in shown
    ]
    names = ["set", "field", "DoLP %", "AoLP °", "IP q/u %", "model q/u %"]
    need = [max([len(n)] + [len(r[j]) for r in rows]) + 2 for j, n in enumerate(names)]  # + cell padding
    ncol = len(names)
    while ncol > 4 and sum(need[:ncol]) + 1 > width - 4:  # panel border and margins
        ncol -= 1
    t = Table(box=box.SIMPLE_HEAD, show_edge=False, padding=(0, 1))
    for c in names[:ncol]:
        t.add_column(c, justify="left" if c == "field" else "right", no_wrap=True, overflow="ellipsis")
    for r in rows:
        t.add_row(*r[:ncol])
    return Panel(Group(head, t) if p.sets else head, title="running PDI", title_align="left", box=box.ROUNDED)


def pdi_line(p: PdiSummary | None) -> Text:
    """The compact layout's one line: sets done, Qphi S/N and the latest set's DoLP/AoLP."""
    pdi = Text()
    pdi.append("running PDI: ", style="bold")
    if p is None or (not p.sets and not p.nsets):
        pdi.append("no PDI yet", style="dim")
    else:
        pdi.append(f"sets done {p.nsets}")
        if p.qphi_snr is not None:
            pdi.append(f" · Qphi S/N {p.qphi_snr:.1f}", style="bold green" if p.qphi_snr > 5 else "yellow")
        if p.sets:
            s = p.sets[-1]
            dolp = fmt(None if s.dolp is None else 100 * s.dolp, "+.2f")
            pdi.append(f" · DoLP {dolp} % AoLP {fmt(s.aolp, '.0f')}° (set {s.index})")
    return pdi

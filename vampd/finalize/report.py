"""The night report: ``report/report.md`` and ``report/report.html`` with the figures of
:mod:`vampd.finalize.previews` (a one-page night summary first, then previews, trends, the set
timeline and IP per set).

Each table comes from one ledger query (``Ledger.state_table``, ``Ledger.target_table``, read by
:func:`vampd.finalize.commands.read_night` from a snapshot). Everything is deterministic: PNGs carry
no ``Software`` metadata, the report has no finalize timestamp (only the data's own times), lists
are sorted. The HTML is self-contained apart from the PNGs, which it references relatively (the
report directory can be copied or served as it is).
"""

from __future__ import annotations

import html
import math
import os
import re
from pathlib import Path

import numpy as np

from vampd import __version__

__all__ = ["write_report", "markdown_to_html", "preview_meta"]


def _fmt(v, spec: str = ".4g") -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return format(v, spec) if math.isfinite(v) else "nan"
    return str(v)


def _rel(p, outdir: Path) -> str:
    try:
        return str(Path(p).resolve().relative_to(outdir.resolve()))
    except ValueError:
        return str(p)


def _cell(text) -> str:
    """A table cell: one line, no pipe."""
    return " ".join(str(text).replace("|", "/").split())


def _ut(mjd) -> str:
    if mjd is None:
        return "–"
    from vampd.finalize.previews import mjd_to_datetime

    return f"{mjd_to_datetime(float(mjd))[0]:%Y-%m-%d %H:%M:%S}"


def _set_records(night: dict) -> list[dict]:
    """Sets with the UT span ``t0``/``t1`` (MJD) of their members, by time."""
    mjd = {f["path"]: f.get("mjd") for f in night["files"]}
    out = []
    for s in night["sets"]:
        # HWP-block members (combine = "pdi") are products, not input files: their row has the MJD
        ts = [mjd.get(m.get("path"), m.get("mjd")) for m in s["members"] if isinstance(m, dict)]
        ts = [t for t in ts if t is not None]
        out.append(dict(s, t0=min(ts) if ts else None, t1=max(ts) if ts else None))
    return sorted(out, key=lambda s: (s["t0"] if s["t0"] is not None else math.inf, s["key"]))


# -- sections (each returns markdown lines) -------------------------------------------------------------
def _provenance(outdir: Path, cfg, night: dict, provenance: dict, method: str, config_path) -> list[str]:
    L = [
        "## Provenance",
        "",
        f"* vampd version: {__version__}",
        f"* configuration: `{Path(config_path).name}`, hash `{cfg.config_hash()}`",
        f"* output directory: `{outdir}`",
        f"* final collapse over sets: {method}",
    ]
    calib = [v[0] for k, v in sorted(provenance.items()) if k.startswith("DPP FINAL CALIB")]
    L.append("* calibration files: " + (", ".join(f"`{c}`" for c in calib) if calib else "none (bias only)"))
    if night["flush"].get("daemon"):
        L.append(
            f"* **daemon pid {night['flush']['daemon']} was still running**: this report is a snapshot; "
            "pending files were not processed and open sets were not closed"
        )
    else:
        L.append(f"* files processed by the flush: {night['flush'].get('processed', 0)}")
    return L + [""]


def _counts(night: dict, sets: list[dict]) -> list[str]:
    rows = night["state_table"]
    L = ["## Counts", "", "| state | files |", "|---|---:|"]
    L += [f"| {state} | {n} |" for state, n in rows]
    L += [f"| **total** | **{sum(n for _s, n in rows)}** |", ""]
    nsets = {st: sum(s["state"] == st for s in sets) for st in ("complete", "broken", "open")}
    L += [f"HWP sets: **{nsets['complete']} complete**, **{nsets['broken']} broken**, {nsets['open']} open.", ""]
    return L


def _targets(night: dict) -> list[str]:
    rows = night["target_table"]
    L = [
        "## Targets",
        "",
        "| target | filter | camera | files done | parked | unfinished | open-shutter [s] | frames kept | span (UT) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        span = f"{_ut(r['mjd0'])} – {_ut(r['mjd1'])[11:]}" if r["mjd0"] is not None else "–"
        L.append(
            f"| {_cell(r['target'])} | {_cell(r['filter'])} | {r['camera'] or '?'} | {r['done']} | {r['parked']} | "
            f"{r['unfinished']} | {r['shutter']:.2f} | {int(r['nkept'])}/{int(r['nframes'])} | {span} |"
        )
    mj = [m for r in rows for m in (r["mjd0"], r["mjd1"]) if m is not None]
    if mj:
        total_open = sum(r["shutter"] for r in rows)
        span_s = (max(mj) - min(mj)) * 86400.0
        ncam = max(1, len({r["camera"] for r in rows if r["camera"]}))
        eff = (total_open / ncam) / span_s if span_s > 0 else float("nan")
        L += [
            "",
            f"Observing efficiency: open-shutter time {total_open:.2f} s over {ncam} camera(s) in "
            f"{span_s:.1f} s between the first and last file midpoints → {100 * eff:.1f} % per camera.",
        ]
    return L + [""]


def preview_meta(header, group: dict, sets: list[dict]):
    """:class:`~vampd.finalize.previews.PreviewMeta` of a final Stokes product: target, filter(s),
    pixel scale and unit from its header, UT span from the member files of its sets."""
    from vampd.finalize.previews import PreviewMeta

    keys = {s["key"] for s in group["sets"]}
    span = [t for s in sets if s["key"] in keys for t in (s["t0"], s["t1"]) if t is not None]
    span = span or [s["mjd"] for s in group["sets"] if s.get("mjd") is not None]
    return PreviewMeta(
        target=str(header.get("OBJECT", group["target"])),
        filter=", ".join(group["fields"]),
        pixel_scale_mas=float(header.get("PXSCALE", 6.0)),
        unit=str(header.get("BUNIT", "e-/s")),
        mjd0=min(span) if span else None,
        mjd1=max(span) if span else None,
        nsets=int(group["nsets"]),
        nfiles=int(group["nfiles"]),
    )


def _load_planes(group: dict, sets: list[dict]):
    """``(planes, meta, coll path)`` of a PDI group's final product (previews' input)."""
    from astropy.io import fits

    from vampd.finalize.previews import preview_planes

    coll = group["paths"]["coll"]
    with fits.open(coll) as h:
        data = np.asarray(h[0].data, float)
        names = str(h[0].header["STOKES"]).split(",")
        meta = preview_meta(h[0].header, group, sets)
    fp = group["paths"].get("footprint")
    footprint = fits.getdata(fp) if fp and os.path.exists(fp) else None
    return preview_planes(data, names, footprint), meta, coll


def _polarimetry(outdir: Path, rdir: Path, pdi_info: list[dict], sets: list[dict]) -> tuple[list[str], tuple | None]:
    """Previews per PDI group; returns the lines and the first group's ``(planes, meta)``."""
    from vampd.finalize.previews import preview_figure, save_figure, stokes_limit

    if not pdi_info:
        return [], None
    L, first = ["## Polarimetry", ""], None
    for g in pdi_info:
        planes, meta, coll = _load_planes(g, sets)
        first = first or (planes, meta)
        stem = Path(coll).name.replace("_stokes_coll.fits", "")
        qk = "Q_PHI" if "Q_PHI" in planes else "Q_R"
        limit = stokes_limit(planes[qk])
        prev = {
            k: save_figure(preview_figure(img, k, meta, None if k == "I" else limit), rdir / f"{stem}_{k.lower()}.png")
            for k, img in planes.items()
        }
        L += [
            f"### {g['target']} ({', '.join(g['fields'])}): {g['nsets']} sets, {g['nfiles']} files",
            "",
            " ".join(f"![{k}]({_rel(p, rdir)})" for k, p in prev.items()),
            "",
            f"North up, East left; offsets from the star in arcsec. I on an asinh stretch; {qk} and its "
            f"partner on a diverging map centred on zero, both within ±{limit:.3g} {meta.unit} (positive red); "
            f"grey: outside the derotated footprint. Data: `{_rel(coll, outdir)}`.",
            "",
        ]
    return L, first


def _ip_rows(pdi_info: list[dict]) -> list[dict]:
    rows = []
    for g in pdi_info:
        for s in g["sets"]:
            h = s["header"]
            m = re.search(r"_stokes_(\d+)\.fits$", str(s["path"]))
            for f in g["fields"]:
                rows.append(
                    {
                        "set": Path(s["path"]).name,
                        "field": f,
                        "index": int(m.group(1)) if m else None,
                        "model_pq": h.get(f"HIERARCH DPP PDI MM IP_PQ {f}"),
                        "model_pu": h.get(f"HIERARCH DPP PDI MM IP_PU {f}"),
                        "resid_pq": h.get(f"HIERARCH DPP PDI IP_PQ {f}"),
                        "resid_pu": h.get(f"HIERARCH DPP PDI IP_PU {f}"),
                        "dolp": h.get(f"HIERARCH DPP PDI DOLP {f}"),
                    }
                )
    return rows


def _ip(rdir: Path, pdi_info: list[dict]) -> list[str]:
    from vampd.finalize.previews import ip_figure, save_figure

    rows = _ip_rows(pdi_info)
    if not rows:
        return []
    p = save_figure(ip_figure(rows), rdir / "ip_per_set.png")
    L = [
        "### Instrumental polarisation per set",
        "",
        f"![IP]({_rel(p, rdir)})",
        "",
        "| set | field | model IP_PQ | model IP_PU | residual IP_PQ | residual IP_PU | star DoLP |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        L.append(
            f"| {r['set']} | {r['field']} | {_fmt(r['model_pq'])} | {_fmt(r['model_pu'])} | "
            f"{_fmt(r['resid_pq'])} | {_fmt(r['resid_pu'])} | {_fmt(r['dolp'])} |"
        )
    return L + [""]


def _timeline(rdir: Path, sets: list[dict]) -> list[str]:
    from vampd.finalize.previews import save_figure, timeline_figure

    if not sets:
        return []
    fig = timeline_figure(sets)
    L = ["## HWP set timeline", ""]
    if fig is not None:
        L += [f"![sets]({_rel(save_figure(fig, rdir / 'sets_timeline.png'), rdir)})", ""]
    L += ["| # | state | start (UT) | members | key | reason |", "|---:|---|---|---:|---|---|"]
    for i, s in enumerate(sets):
        L.append(
            f"| {i} | {s['state']} | {_ut(s['t0'])} | {len(s['members'])} | `{s['key']}` | {_cell(s.get('reason') or '')} |"
        )
    return L + [""]


def _trends(rdir: Path, files: list[dict]) -> list[str]:
    from vampd.finalize.previews import save_figure, trends_figure

    fig = trends_figure(files)
    if fig is None:
        return []
    return ["## Metric trends", "", f"![trends]({_rel(save_figure(fig, rdir / 'metrics_trends.png'), rdir)})", ""]


def _specphot(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    cols = list(dict.fromkeys(k for r in rows for k in r))
    L = ["## Spectrophotometric calibration", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    L += ["| " + " | ".join(_cell(_fmt(r.get(c))) for c in cols) + " |" for r in rows]
    return L + [""]


def _parked(night: dict) -> list[str]:
    bad = [f for f in night["files"] if f["state"] in ("parked", "failed", "pending", "queued", "running")]
    L = ["## Parked and unfinished files", ""]
    if not bad:
        return L + ["None.", ""]
    L += ["| file | state | reason |", "|---|---|---|"]
    for f in sorted(bad, key=lambda f: f["path"]):
        reason = f.get("error") or ("daemon still running" if night["flush"].get("daemon") else "not processed")
        reason = str(reason).replace(f["path"], Path(f["path"]).name).splitlines()[0][:300]
        L.append(f"| `{Path(f['path']).name}` | {f['state']} | {_cell(reason)} |")
    return L + [""]


def _products(outdir: Path, rdir: Path, night: dict, written: dict) -> list[str]:
    L = ["## Products", ""]
    L += [f"* `{_rel(p, outdir)}`" for p in sorted({p for ps in written.values() for p in ps})]
    per_file = sorted({p["path"] for p in night["products"]})
    L += ["", f"Per-file products: {len(per_file)} (under `coadded/`, `metrics/`, …)."]
    pngs = sorted(str(q) for q in rdir.glob("*.png"))
    return L + ["", "Report figures: " + ", ".join(f"`{_rel(q, outdir)}`" for q in pngs), ""]


def _summary(rdir: Path, name: str, night: dict, sets: list[dict], first) -> Path:
    from vampd.finalize.previews import save_figure, summary_figure

    targets = sorted({str(f["target"]) for f in night["files"] if f.get("target")})
    mj = [f["mjd"] for f in night["files"] if f.get("mjd") is not None]
    when = f"{_ut(min(mj))} – {_ut(max(mj))[11:]} UT" if mj else ""
    title = f"vampd night summary: {name} — {', '.join(targets) or 'no target'} — {when}"
    planes, meta = first if first else (None, None)
    return save_figure(summary_figure(title, planes, meta, night["files"], sets), rdir / f"{name}_night_summary.png")


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.part")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_report(
    outdir,
    cfg,
    night: dict,
    pdi_info: list[dict],
    written: dict,
    specphot_rows: list[dict],
    provenance: dict,
    method: str,
    config_path,
) -> Path:
    """Write ``report/report.md``, ``report/report.html`` and the PNGs; return the markdown's path."""
    outdir = Path(outdir)
    rdir = outdir / "report"
    rdir.mkdir(parents=True, exist_ok=True)
    name = cfg.name or "vampd"
    sets = _set_records(night)
    pol, first = _polarimetry(outdir, rdir, pdi_info, sets)
    body = (
        _provenance(outdir, cfg, night, provenance, method, config_path)
        + _counts(night, sets)
        + _targets(night)
        + pol
        + _ip(rdir, pdi_info)
        + _timeline(rdir, sets)
        + _trends(rdir, night["files"])
        + _specphot(specphot_rows)
        + _parked(night)
    )
    summary = _summary(rdir, name, night, sets, first)
    head = [f"# vampd night report: {name}", "", f"![night summary]({_rel(summary, rdir)})", ""]
    link = ["HTML version: [report.html](report.html)", ""]
    rest = body + _products(outdir, rdir, night, written)
    path = rdir / "report.md"
    _atomic_text(path, "\n".join(head + link + rest))
    _atomic_text(rdir / "report.html", markdown_to_html("\n".join(head + rest), f"vampd night report: {name}"))
    return path


# -- markdown → HTML (the subset the report uses) -----------------------------------------------------------
_CSS = (
    "body{font-family:sans-serif;max-width:72em;margin:2em auto;padding:0 1em;color:#222}"
    "table{border-collapse:collapse;margin:0.5em 0}td,th{border:1px solid #bbb;padding:2px 8px;font-size:90%}"
    "th{background:#eee}code{background:#f4f4f4;padding:0 2px}img{max-width:100%;vertical-align:top}"
)


def _inline(text: str) -> str:
    out = html.escape(text, quote=False)
    out = re.sub(r"!\[([^\]]*)\]\(([^)]+)\)", r'<img alt="\1" src="\2">', out)
    out = re.sub(r"\[([^\]]+)\]\(([^)]+)\)", r'<a href="\2">\1</a>', out)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", out)


def _table(rows: list[str]) -> list[str]:
    cells = [[c.strip() for c in r.strip().strip("|").split("|")] for r in rows]
    out = ["<table>", "<tr>" + "".join(f"<th>{_inline(c)}</th>" for c in cells[0]) + "</tr>"]
    out += ["<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in cells[2:]]
    return out + ["</table>"]


def markdown_to_html(text: str, title: str) -> str:
    """A standalone HTML page of the report's markdown (headings, tables, lists, images, paragraphs)."""
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
    ]
    lines, i = text.splitlines(), 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("|"):
            j = i
            while j < len(lines) and lines[j].startswith("|"):
                j += 1
            out += _table(lines[i:j])
            i = j
            continue
        if line.startswith("* "):
            j = i
            while j < len(lines) and lines[j].startswith("* "):
                j += 1
            out += ["<ul>"] + [f"<li>{_inline(x[2:])}</li>" for x in lines[i:j]] + ["</ul>"]
            i = j
            continue
        m = re.match(r"(#{1,4}) (.*)", line)
        if m:
            out.append(f"<h{len(m.group(1))}>{_inline(m.group(2))}</h{len(m.group(1))}>")
        elif line.strip():
            out.append(f"<p>{_inline(line)}</p>")
        i += 1
    return "\n".join(out + ["</body></html>", ""])

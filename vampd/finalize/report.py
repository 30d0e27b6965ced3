"""The night report: ``report.md`` with PNG previews (matplotlib, Agg backend).

Everything here is deterministic: PNGs are written without the ``Software`` metadata, the report
carries no finalize timestamp (only the data's own times), lists are sorted.

Previews are written pixel-for-pixel (``imsave``, each data pixel → ``PREVIEW_ZOOM``² PNG pixels,
origin lower-left = North up, East left) with the perceptually monotonic ``inferno`` colormap:
``I`` with an asinh stretch between the 1st and 99.8th percentiles, ``Q_phi``/``U_phi`` linear
and symmetric about 0 (±99.5th percentile of |Q_phi|, the same limits for both), so a positive
Q_phi ring is brighter than the background.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from vampd import __version__

__all__ = ["PREVIEW_ZOOM", "preview_arrays", "write_previews", "write_trends", "write_timeline", "write_report"]

PREVIEW_ZOOM = 3
_PNG_META = {"Software": None}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def preview_arrays(coll: np.ndarray, names: list[str]) -> dict[str, tuple[np.ndarray, float, float]]:
    """Stretched images ``{plane: (image in [0, 1], vmin, vmax)}`` for I_Q, Q_PHI/Q_R, U_PHI/U_R."""
    out = {}
    idx = {n: i for i, n in enumerate(names)}
    i_img = np.nan_to_num(np.asarray(coll[idx["I_Q"]], float))
    lo, hi = np.percentile(i_img, [1.0, 99.8])
    hi = hi if hi > lo else lo + 1.0
    x = np.clip((i_img - lo) / (hi - lo), 0, 1)
    out["I"] = (np.arcsinh(10 * x) / np.arcsinh(10), float(lo), float(hi))
    qn = "Q_PHI" if "Q_PHI" in idx else "Q_R"
    un = "U_PHI" if "U_PHI" in idx else "U_R"
    q = np.nan_to_num(np.asarray(coll[idx[qn]], float))
    u = np.nan_to_num(np.asarray(coll[idx[un]], float))
    v = float(np.percentile(np.abs(q), 99.5)) or 1.0
    for key, img in ((qn, q), (un, u)):
        out[key] = (np.clip((img + v) / (2 * v), 0, 1), -v, v)
    return out


def write_previews(coll: np.ndarray, names: list[str], outdir, stem: str) -> dict[str, Path]:
    """PNG per preview plane: ``report/{stem}_{plane}.png``."""
    plt = _plt()
    out = {}
    for key, (img, _lo, _hi) in preview_arrays(coll, names).items():
        big = np.kron(img, np.ones((PREVIEW_ZOOM, PREVIEW_ZOOM)))
        path = Path(outdir) / "report" / f"{stem}_{key.lower()}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.part")
        plt.imsave(tmp, big, cmap="inferno", vmin=0.0, vmax=1.0, origin="lower", format="png", metadata=_PNG_META)
        os.replace(tmp, path)
        out[key] = path
    return out


def _savefig(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.part")
    fig.savefig(tmp, format="png", dpi=80, metadata=_PNG_META)
    os.replace(tmp, path)
    return path


def _hours(mjd: np.ndarray, mjd0: float) -> np.ndarray:
    return (np.asarray(mjd, float) - mjd0) * 24.0


def write_trends(files: list[dict], path) -> Path | None:
    """Strehl, FWHM and flux per camera against time (hours since the first file)."""
    done = [f for f in files if f["state"] == "done" and f.get("mjd") is not None]
    if not done:
        return None
    plt = _plt()
    mjd0 = min(f["mjd"] for f in done)
    fig, axes = plt.subplots(3, 1, figsize=(7, 6), sharex=True)
    for ax, key, label in zip(axes, ("strehl", "fwhm", "flux"), ("Strehl", "FWHM [px]", "flux [e-/s]")):
        for cam in sorted({f.get("camera") for f in done if f.get("camera") is not None}):
            pts = [(f["mjd"], f["metrics"].get(key)) for f in done if f.get("camera") == cam]
            pts = [(t, v) for t, v in pts if isinstance(v, (int, float)) and math.isfinite(v)]
            if pts:
                t, v = np.array(pts).T
                ax.plot(_hours(t, mjd0), v, ".", label=f"cam{cam}")
        ax.set_ylabel(label)
    axes[0].legend(loc="best", fontsize=8)
    axes[-1].set_xlabel(f"hours since MJD {mjd0:.5f}")
    fig.tight_layout()
    out = _savefig(fig, Path(path))
    plt.close(fig)
    return out


def write_timeline(sets: list[dict], path) -> Path | None:
    """One bar per HWP set from its first to its last member, coloured by state."""
    sets = [s for s in sets if s.get("t0") is not None]
    if not sets:
        return None
    plt = _plt()
    mjd0 = min(s["t0"] for s in sets)
    colours = {"complete": "tab:green", "broken": "tab:red", "open": "tab:orange"}
    fig, ax = plt.subplots(figsize=(7, 0.4 * len(sets) + 1.2))
    for i, s in enumerate(sets):
        t0, t1 = _hours([s["t0"], s["t1"]], mjd0)
        ax.barh(i, max(t1 - t0, 1e-3), left=t0, color=colours.get(s["state"], "grey"))
    ax.set_yticks(range(len(sets)))
    ax.set_yticklabels([f"{i}: {s['state']}" for i, s in enumerate(sets)], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel(f"hours since MJD {mjd0:.5f}")
    fig.tight_layout()
    out = _savefig(fig, Path(path))
    plt.close(fig)
    return out


def _ip_rows(pdi_info: list[dict]) -> list[dict]:
    rows = []
    for g in pdi_info:
        for s in g["sets"]:
            h = s["header"]
            for f in g["fields"]:
                rows.append({
                    "set": Path(s["path"]).name, "field": f,
                    "model_pq": h.get(f"HIERARCH DPP PDI MM IP_PQ {f}"), "model_pu": h.get(f"HIERARCH DPP PDI MM IP_PU {f}"),
                    "resid_pq": h.get(f"HIERARCH DPP PDI IP_PQ {f}"), "resid_pu": h.get(f"HIERARCH DPP PDI IP_PU {f}"),
                    "dolp": h.get(f"HIERARCH DPP PDI DOLP {f}"),
                })
    return rows


def write_ip_plot(rows: list[dict], path) -> Path | None:
    """Residual IP (measured after the model correction) and the model's IP per set."""
    if not rows:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3))
    x = np.arange(len(rows))
    for key, mk in (("model_pq", "o"), ("model_pu", "s"), ("resid_pq", "x"), ("resid_pu", "+")):
        v = np.array([r[key] if isinstance(r[key], (int, float)) else np.nan for r in rows], float)
        ax.plot(x, 100 * v, mk, label=key)
    ax.set_xlabel("set")
    ax.set_ylabel("IP [%]")
    ax.legend(fontsize=7, ncol=4)
    fig.tight_layout()
    out = _savefig(fig, Path(path))
    plt.close(fig)
    return out


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


def _set_records(night: dict) -> list[dict]:
    mjd = {f["path"]: f.get("mjd") for f in night["files"]}
    out = []
    for s in night["sets"]:
        # HWP-block members (combine = "pdi") are products, not input files: their row has the MJD
        ts = [mjd.get(m.get("path"), m.get("mjd")) for m in s["members"] if isinstance(m, dict)]
        ts = [t for t in ts if t is not None]
        out.append(dict(s, t0=min(ts) if ts else None, t1=max(ts) if ts else None))
    return sorted(out, key=lambda s: (s["t0"] if s["t0"] is not None else math.inf, s["key"]))


def _ut(mjd) -> str:
    if mjd is None:
        return "–"
    from astropy.time import Time

    return Time(float(mjd), format="mjd", scale="utc").strftime("%Y-%m-%d %H:%M:%S")


def write_report(outdir, cfg, night: dict, pdi_info: list[dict], written: dict, specphot_rows: list[dict],
                 provenance: dict, method: str, config_path) -> Path:
    """Write ``report/report.md`` (+ PNGs) and return its path."""
    from astropy.io import fits

    outdir = Path(outdir)
    rdir = outdir / "report"
    rdir.mkdir(parents=True, exist_ok=True)
    name = cfg.name or "vampd"
    files = night["files"]
    sets = _set_records(night)
    L: list[str] = [f"# vampd night report: {name}", ""]

    # --- provenance ---------------------------------------------------------------------
    L += ["## Provenance", "",
          f"* vampd version: {__version__}",
          f"* configuration: `{Path(config_path).name}`, hash `{cfg.config_hash()}`",
          f"* output directory: `{outdir}`",
          f"* final collapse over sets: {method}"]
    calib = [v[0] for k, v in sorted(provenance.items()) if k.startswith("DPP FINAL CALIB")]
    L.append("* calibration files: " + (", ".join(f"`{c}`" for c in calib) if calib else "none (bias only)"))
    if night["flush"].get("daemon"):
        L.append(f"* **daemon pid {night['flush']['daemon']} was still running**: this report is a snapshot; "
                 "pending files were not processed and open sets were not closed")
    else:
        L.append(f"* files processed by the flush: {night['flush'].get('processed', 0)}")
    L.append("")

    # --- counts and efficiency ------------------------------------------------------------
    states = {}
    for f in files:
        states[f["state"]] = states.get(f["state"], 0) + 1
    L += ["## Counts", "", "| files | " + " | ".join(sorted(states)) + " |",
          "|---|" + "---|" * len(states), "| | " + " | ".join(str(states[s]) for s in sorted(states)) + " |", ""]
    nsets = {st: sum(s["state"] == st for s in sets) for st in ("complete", "broken", "open")}
    L.append(f"HWP sets: **{nsets['complete']} complete**, **{nsets['broken']} broken**, {nsets['open']} open.")
    L.append("")

    # --- targets ----------------------------------------------------------------------------
    L += ["## Targets", "", "| target | filter | camera | files done | parked | open-shutter [s] | frames kept | span (UT) |",
          "|---|---|---|---|---|---|---|---|"]
    groups: dict[tuple, list] = {}
    for f in files:
        groups.setdefault((str(f.get("target")), str(f.get("filter")), f.get("camera") or 0), []).append(f)
    total_open, total_span = 0.0, []
    for (t, filt, cam), fs in sorted(groups.items()):
        done = [f for f in fs if f["state"] == "done"]
        shutter = sum((f.get("nframes") or 0) * (f.get("exptime") or 0.0) for f in done)
        total_open += shutter
        nfr = sum(int(f["metrics"].get("nframes") or f.get("nframes") or 0) for f in done)
        nkept = sum(int(f["metrics"].get("nkept", f["metrics"].get("nframes", 0)) or 0) for f in done)
        mj = [f["mjd"] for f in fs if f.get("mjd") is not None]
        total_span += mj
        span = f"{_ut(min(mj))} – {_ut(max(mj))[11:]}" if mj else "–"
        L.append(f"| {t} | {filt} | {cam} | {len(done)} | {sum(f['state'] == 'parked' for f in fs)} | "
                 f"{shutter:.2f} | {nkept}/{nfr} | {span} |")
    if total_span:
        span_s = (max(total_span) - min(total_span)) * 86400.0
        ncam = max(1, len({f.get("camera") for f in files if f.get("camera")}))
        eff = (total_open / ncam) / span_s if span_s > 0 else float("nan")
        L += ["", f"Observing efficiency: open-shutter time {total_open:.2f} s over {ncam} camera(s) in "
              f"{span_s:.1f} s between the first and last file midpoints → {100 * eff:.1f} % per camera."]
    L.append("")

    # --- PDI ------------------------------------------------------------------------------------
    pngs: dict[str, Path] = {}
    if pdi_info:
        L += ["## Polarimetry", ""]
        for g in pdi_info:
            coll = g["paths"]["coll"]
            with fits.open(coll) as h:
                data = np.asarray(h[0].data, float)
                names = str(h[0].header["STOKES"]).split(",")
            stem = Path(coll).name.replace("_stokes_coll.fits", "")
            prev = write_previews(data, names, outdir, stem)
            L.append(f"### {g['target']} ({', '.join(g['fields'])}): {g['nsets']} sets, {g['nfiles']} files")
            L.append("")
            L.append(" ".join(f"![{k}]({_rel(p, rdir)})" for k, p in prev.items()))
            L.append("")
            L.append(f"Previews: North up, East left; I asinh stretch; Q_phi/U_phi linear, inferno colormap, "
                     f"zero = mid-scale (see `{_rel(coll, outdir)}`).")
            L.append("")
        iprows = _ip_rows(pdi_info)
        if iprows:
            p = write_ip_plot(iprows, rdir / "ip_per_set.png")
            L += ["### Instrumental polarisation per set", "", f"![IP]({_rel(p, rdir)})", "",
                  "| set | field | model IP_PQ | model IP_PU | residual IP_PQ | residual IP_PU | star DoLP |",
                  "|---|---|---|---|---|---|---|"]
            for r in iprows:
                L.append(f"| {r['set']} | {r['field']} | {_fmt(r['model_pq'])} | {_fmt(r['model_pu'])} | "
                         f"{_fmt(r['resid_pq'])} | {_fmt(r['resid_pu'])} | {_fmt(r['dolp'])} |")
            L.append("")

    # --- sets timeline ---------------------------------------------------------------------------
    if sets:
        p = write_timeline(sets, rdir / "sets_timeline.png")
        L += ["## HWP set timeline", "", f"![sets]({_rel(p, rdir)})", "",
              "| # | state | start (UT) | members | key | reason |", "|---|---|---|---|---|---|"]
        for i, s in enumerate(sets):
            reason = (s.get("reason") or "").replace("|", "/")
            L.append(f"| {i} | {s['state']} | {_ut(s['t0'])} | {len(s['members'])} | `{s['key']}` | {reason} |")
        L.append("")

    # --- metric trends ----------------------------------------------------------------------------
    p = write_trends(files, rdir / "metrics_trends.png")
    if p is not None:
        L += ["## Metric trends", "", f"![trends]({_rel(p, rdir)})", ""]

    # --- specphot ---------------------------------------------------------------------------------
    if specphot_rows:
        L += ["## Spectrophotometric calibration", ""]
        cols = list(dict.fromkeys(k for r in specphot_rows for k in r))
        L += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for r in specphot_rows:
            L.append("| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |")
        L.append("")

    # --- parked files -------------------------------------------------------------------------------
    bad = [f for f in files if f["state"] in ("parked", "failed", "pending", "queued", "running")]
    L += ["## Parked and unfinished files", ""]
    if bad:
        L += ["| file | state | reason |", "|---|---|---|"]
        for f in sorted(bad, key=lambda f: f["path"]):
            reason = f.get("error") or ("daemon still running" if night["flush"].get("daemon") else "not processed")
            L.append(f"| `{Path(f['path']).name}` | {f['state']} | {str(reason).replace('|', '/').splitlines()[0][:300]} |")
    else:
        L.append("None.")
    L.append("")

    # --- products ------------------------------------------------------------------------------------
    L += ["## Products", ""]
    final = sorted({p for ps in written.values() for p in ps})
    for p in final:
        L.append(f"* `{_rel(p, outdir)}`")
    per_file = sorted({p["path"] for p in night["products"]})
    L += ["", f"Per-file products: {len(per_file)} (under `coadded/`, `metrics/`, …)."]
    pngs_all = sorted(str(q) for q in rdir.glob("*.png"))
    L += ["", "Report figures: " + ", ".join(f"`{_rel(q, outdir)}`" for q in pngs_all), ""]
    text = "\n".join(L)
    path = rdir / "report.md"
    tmp = path.with_name(".report.md.part")
    tmp.write_text(text)
    os.replace(tmp, path)
    del pngs
    return path

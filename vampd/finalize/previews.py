"""The night report's figures: previews a scientist can paste into a log, trends, set timeline.

matplotlib is imported here only, lazily, inside the functions (``vampd --help`` stays fast),
and only :class:`matplotlib.figure.Figure` objects with the Agg canvas are used (no pyplot global
state). Every ``*_figure`` function returns the figure so tests can inspect it; the ``write_*``
functions save it atomically without the ``Software`` metadata, so a second finalize writes the
same bytes.

Image conventions (the Stokes products are derotated North up, East left, star at the centre
``(N-1)/2``): axes are offsets from the star in arcsec, ΔRA increasing to the left (East) and
ΔDec upwards; a compass and a scale bar are drawn on every image. ``I`` is shown on an asinh
stretch; ``Q_phi``/``U_phi`` on a diverging map centred on zero with symmetric limits (the same
limits for both, so their amplitudes compare), positive red. Pixels outside the footprint of the
derotated sets (or not finite) are masked and drawn light grey.
"""

from __future__ import annotations

import datetime as _dt
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "PreviewMeta",
    "preview_planes",
    "stokes_limit",
    "preview_figure",
    "trends_figure",
    "timeline_figure",
    "ip_figure",
    "summary_figure",
    "save_figure",
    "mjd_to_datetime",
]

_PNG_META = {"Software": None}
_DPI = 100
_BAD = "0.82"  # masked pixels: light grey, never a colour of the map
_MJD0 = _dt.datetime(1858, 11, 17, tzinfo=_dt.UTC)


@dataclass
class PreviewMeta:
    """What a preview's title, axes and colour bar say."""

    target: str = "?"
    filter: str = ""
    pixel_scale_mas: float = 1.0  # mas per pixel of the Stokes image
    unit: str = "e-/s"
    mjd0: float | None = None
    mjd1: float | None = None
    nsets: int = 0
    nfiles: int = 0

    def title(self, plane: str) -> str:
        when = ""
        if self.mjd0 is not None:
            t0, t1 = mjd_to_datetime([self.mjd0, self.mjd1 if self.mjd1 is not None else self.mjd0])
            when = f"{t0:%Y-%m-%d %H:%M:%S}–{t1:%H:%M:%S} UT, "
        sets = f"{self.nsets} set{'s' if self.nsets != 1 else ''}" + (f" ({self.nfiles} files)" if self.nfiles else "")
        return f"{self.target}  {self.filter}  {_PLANE_LABEL.get(plane, plane)}\n{when}{sets}"


_PLANE_LABEL = {"I": "total intensity I", "Q_PHI": r"$Q_\phi$", "U_PHI": r"$U_\phi$", "Q_R": r"$Q_r$", "U_R": r"$U_r$"}


def mjd_to_datetime(mjd) -> list[_dt.datetime]:
    """UTC datetimes of MJDs (no leap-second bookkeeping: good to a second for plotting)."""
    return [_MJD0 + _dt.timedelta(days=float(m)) for m in np.atleast_1d(np.asarray(mjd, float))]


def preview_planes(coll: np.ndarray, names: list[str], footprint: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """``{"I": I_Q, "Q_PHI": …, "U_PHI": …}`` (or Q_R/U_R) as float arrays, NaN where not finite
    or outside ``footprint`` (coverage > 0; a per-field cube counts a pixel covered by any field)."""
    idx = {n: i for i, n in enumerate(names)}
    mask = None
    if footprint is not None:
        fp = np.asarray(footprint, float)
        mask = ~(np.nan_to_num(fp if fp.ndim == 2 else fp.max(axis=0)) > 0)
    out = {}
    qn = "Q_PHI" if "Q_PHI" in idx else "Q_R"
    un = "U_PHI" if "U_PHI" in idx else "U_R"
    for key, src in (("I", "I_Q"), (qn, qn), (un, un)):
        img = np.array(coll[idx[src]], dtype=float)
        img[~np.isfinite(img)] = np.nan
        if mask is not None and mask.shape == img.shape:
            img[mask] = np.nan
        out[key] = img
    return out


def stokes_limit(q: np.ndarray, u: np.ndarray | None = None, pct: float = 99.5) -> float:
    """Symmetric colour limit ``v`` (plot ``-v … +v``) of the polarised planes: the ``pct``
    percentile of |Q_phi| over finite pixels (1 if there are none)."""
    a = np.abs(q[np.isfinite(q)])
    v = float(np.percentile(a, pct)) if a.size else 0.0
    return v if v > 0 and math.isfinite(v) else 1.0


def _figure(w: float, h: float, layout: str | None = None):
    from matplotlib.figure import Figure

    return Figure(figsize=(w, h), dpi=_DPI, layout=layout)


def _nice(x: float) -> float:
    """The largest of 1, 2, 2.5, 5 × 10^k not above ``x``."""
    e = 10 ** math.floor(math.log10(x))
    return max(m * e for m in (1, 2, 2.5, 5) if m * e <= x)


def _decorate(ax, half: float, color: str = "k") -> None:
    """Compass (N up, E left) in the top-left corner and a scale bar at the bottom right, drawn in
    ``color`` with a contrasting outline so they read on any part of the map."""
    from matplotlib import patheffects

    halo = "w" if color == "k" else "k"
    fx = [patheffects.withStroke(linewidth=1.5, foreground=halo)]
    kw = dict(
        xycoords="axes fraction",
        textcoords="axes fraction",
        color=color,
        fontsize=8,
        ha="center",
        va="center",
        path_effects=fx,
        arrowprops=dict(arrowstyle="<-", color=color, lw=1.2, path_effects=fx),
    )
    ax.annotate("N", xy=(0.12, 0.78), xytext=(0.12, 0.95), **kw)
    ax.annotate("E", xy=(0.12, 0.78), xytext=(0.0 + 0.02, 0.78), **kw)
    bar = _nice(0.4 * half)
    x0, y0 = -0.9 * half + bar, -0.88 * half  # data coords (ΔRA axis points left)
    ax.plot([x0, x0 - bar], [y0, y0], color=color, lw=2.5, solid_capstyle="butt", path_effects=fx)
    label = f'{bar:g}"' if bar >= 0.1 else f"{bar * 1000:g} mas"
    ax.text(x0 - bar / 2, y0 + 0.04 * half, label, ha="center", va="bottom", fontsize=8, color=color, path_effects=fx)


def preview_figure(img: np.ndarray, plane: str, meta: PreviewMeta, limit: float | None = None):
    """One image with axes in arcsec from the star, colour bar with unit, title, compass and
    scale bar. ``plane``: ``"I"`` (asinh stretch) or a polarised plane (diverging, ``±limit``)."""
    from matplotlib import colormaps
    from matplotlib.colors import AsinhNorm, Normalize

    n_y, n_x = img.shape
    ps = meta.pixel_scale_mas / 1000.0
    cx, cy = (n_x - 1) / 2, (n_y - 1) / 2
    # pixel edges in arcsec; ΔRA = -(x - cx): East (positive ΔRA) to the left
    extent = ((cx + 0.5) * ps, -(n_x - 1 - cx + 0.5) * ps, -(cy + 0.5) * ps, (n_y - 1 - cy + 0.5) * ps)
    good = img[np.isfinite(img)]
    if plane == "I":
        hi = float(np.max(good)) if good.size else 1.0
        lo = float(np.percentile(good, 1.0)) if good.size else 0.0
        hi = hi if hi > lo else lo + 1.0
        norm = AsinhNorm(linear_width=max(1e-3 * (hi - lo), 1e-12), vmin=lo, vmax=hi)
        cmap = colormaps["magma"].with_extremes(bad=_BAD)
    else:
        v = limit if limit else stokes_limit(img)
        norm = Normalize(vmin=-v, vmax=v)
        cmap = colormaps["RdBu_r"].with_extremes(bad=_BAD)
    fig = _figure(5.2, 4.6)
    ax = fig.add_axes((0.15, 0.11, 0.64, 0.73))
    im = ax.imshow(
        np.ma.masked_invalid(img), origin="lower", extent=extent, cmap=cmap, norm=norm, interpolation="nearest"
    )
    ax.set_xlabel(r"$\Delta$RA [arcsec] (East left)")
    ax.set_ylabel(r"$\Delta$Dec [arcsec]")
    ax.set_title(meta.title(plane), fontsize=9)
    cax = fig.add_axes((0.82, 0.11, 0.035, 0.73))
    cb = fig.colorbar(im, cax=cax)
    cb.set_label(f"{_PLANE_LABEL.get(plane, plane)} [{meta.unit}]")
    _decorate(ax, min(abs(extent[0]), abs(extent[3])), "w" if plane == "I" else "k")
    return fig


def save_figure(fig, path) -> Path:
    """Atomic PNG write (temp file in the same directory, then rename), no Software metadata."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.part")
    fig.savefig(tmp, format="png", dpi=_DPI, metadata=_PNG_META)
    os.replace(tmp, path)
    return path


# -- trends, timeline, IP -------------------------------------------------------------------------
def _time_axis(ax, mjds) -> None:
    from matplotlib.dates import AutoDateLocator, DateFormatter

    loc = AutoDateLocator(minticks=3, maxticks=7, tz=_dt.UTC)
    ax.xaxis.set_major_locator(loc)
    ax.xaxis.set_major_formatter(DateFormatter("%H:%M:%S", tz=_dt.UTC))
    day = mjd_to_datetime(min(mjds))[0]
    ax.set_xlabel(f"UT on {day:%Y-%m-%d}")


def _metric_points(done: list[dict], cam, key: str):
    pts = [(f["mjd"], f["metrics"].get(key)) for f in done if f.get("camera") == cam]
    pts = [(t, v) for t, v in pts if isinstance(v, (int, float)) and math.isfinite(v)]
    return ([], []) if not pts else (mjd_to_datetime([p[0] for p in pts]), [p[1] for p in pts])


def trends_figure(
    files: list[dict], keys=(("strehl", "Strehl"), ("fwhm", "FWHM [px]"), ("flux", "flux [e-/s]")), fig=None, axes=None
):
    """Metrics per camera against UT clock time (done files with an MJD); ``None`` if none."""
    done = [f for f in files if f["state"] == "done" and f.get("mjd") is not None]
    if not done:
        return None
    if axes is None:
        fig = _figure(7, 1.9 * len(keys) + 0.6, layout="constrained")
        axes = fig.subplots(len(keys), 1, sharex=True, squeeze=False)[:, 0]
    cams = sorted({f.get("camera") for f in done if f.get("camera") is not None})
    for ax, (key, label) in zip(axes, keys):
        for cam in cams:
            t, v = _metric_points(done, cam, key)
            if t:
                ax.plot(t, v, ".", ms=5, label=f"cam{cam}")
        ax.set_ylabel(label)
        ax.ticklabel_format(axis="y", useOffset=False)  # values as they are, no "1e-5+3.441"
        ax.grid(alpha=0.3)
    if cams:
        axes[0].legend(loc="best", fontsize=8)
    _time_axis(axes[-1], [f["mjd"] for f in done])
    return fig


_SET_COLOURS = {"complete": "tab:green", "broken": "tab:red", "open": "tab:orange"}


def timeline_figure(sets: list[dict], fig=None, ax=None):
    """One bar per HWP set from its first to its last member (UT), coloured by state; y = set
    number (integers). ``None`` if no set has times."""
    from matplotlib.dates import date2num
    from matplotlib.patches import Patch

    sets = [s for s in sets if s.get("t0") is not None]
    if not sets:
        return None
    if ax is None:
        fig = _figure(7, 0.35 * len(sets) + 1.5)
        ax = fig.add_axes((0.12, 0.3, 0.83, 0.62))
    span = max(max(s["t1"] for s in sets) - min(s["t0"] for s in sets), 1.0 / 86400.0)
    for i, s in enumerate(sets):
        t0, t1 = mjd_to_datetime([s["t0"], s["t1"]])
        width = max((t1 - t0).total_seconds() / 86400.0, 0.01 * span)  # a short set stays visible
        ax.barh(i, width, left=date2num(t0), height=0.6, color=_SET_COLOURS.get(s["state"], "grey"))
    _integer_axis(ax.yaxis, range(len(sets)))
    ax.set_ylim(len(sets) - 0.5, -0.5)
    ax.set_ylabel("set #")
    ax.legend(handles=[Patch(color=c, label=k) for k, c in _SET_COLOURS.items()], fontsize=7, ncol=3, loc="best")
    _time_axis(ax, [s["t0"] for s in sets])
    return fig


def _integer_axis(axis, values) -> None:
    """Ticks at whole set numbers only (every set when there are few)."""
    from matplotlib.ticker import FixedLocator, MaxNLocator

    vals = sorted({int(v) for v in np.asarray(values, float) if math.isfinite(v)})
    axis.set_major_locator(FixedLocator(vals) if len(vals) <= 16 else MaxNLocator(integer=True))


def ip_figure(rows: list[dict]):
    """Residual IP (after the model) and the model's IP per set, in %, set numbers as integers."""
    if not rows:
        return None
    fig = _figure(7, 3)
    ax = fig.add_axes((0.1, 0.18, 0.86, 0.72))
    # rows without a set number (least squares: one solved group, no sets) count in order
    x = np.array([r["index"] if isinstance(r.get("index"), (int, float)) else i for i, r in enumerate(rows)], float)
    for key, mk, label in (
        ("model_pq", "o", "model q"),
        ("model_pu", "s", "model u"),
        ("resid_pq", "x", "residual q"),
        ("resid_pu", "+", "residual u"),
    ):
        v = np.array([r[key] if isinstance(r[key], (int, float)) else np.nan for r in rows], float)
        ax.plot(x, 100 * v, mk, label=label)
    _integer_axis(ax.xaxis, x)
    ax.set_xlim(np.nanmin(x) - 0.5, np.nanmax(x) + 0.5)
    ax.axhline(0, color="0.5", lw=0.8)
    ax.set_xlabel("set #")
    ax.set_ylabel("IP [%]")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=4)
    return fig


def summary_figure(
    title: str, planes: dict[str, np.ndarray] | None, meta: PreviewMeta | None, files: list[dict], sets: list[dict]
):
    """The one-page night summary. With PDI: I and Q_phi, Strehl per camera and the set timeline
    against UT; without: Strehl, FWHM and flux per camera against UT."""
    if not planes or meta is None:
        fig = trends_figure(files)
        if fig is None:
            fig = _figure(7, 2)
            fig.text(0.5, 0.5, "no finished files", ha="center", va="center")
        fig.suptitle(title, fontsize=11)
        return fig
    fig = _figure(11, 8.5)
    fig.suptitle(title, fontsize=12)
    qk = "Q_PHI" if "Q_PHI" in planes else "Q_R"
    for j, key in enumerate(("I", qk)):
        sub = preview_figure(planes[key], key, meta, None if key == "I" else stokes_limit(planes[qk]))
        ax = fig.add_axes((0.05 + 0.5 * j, 0.47, 0.38, 0.42))
        _copy_image(sub, ax, fig)
    t_ax = fig.add_axes((0.08, 0.07, 0.4, 0.28))
    trends_figure(files, keys=(("strehl", "Strehl"),), fig=fig, axes=[t_ax])
    s_ax = fig.add_axes((0.58, 0.07, 0.38, 0.28))
    if timeline_figure(sets, fig=fig, ax=s_ax) is None:
        s_ax.set_axis_off()
        s_ax.text(0.5, 0.5, "no HWP sets", ha="center", va="center")
    return fig


def _copy_image(src_fig, ax, fig) -> None:
    """Re-draw the image of a preview figure on ``ax`` of ``fig`` (same data, norm, map, labels)."""
    sax = src_fig.axes[0]
    im = sax.images[0]
    new = ax.imshow(
        im.get_array(),
        origin="lower",
        extent=im.get_extent(),
        cmap=im.get_cmap(),
        norm=im.norm,
        interpolation="nearest",
    )
    ax.set_xlabel(sax.get_xlabel(), fontsize=8)
    ax.set_ylabel(sax.get_ylabel(), fontsize=8)
    ax.set_title(sax.get_title(), fontsize=8)
    cb = fig.colorbar(new, ax=ax, fraction=0.046, pad=0.03)
    cb.set_label(src_fig.axes[1].get_ylabel(), fontsize=8)
    ext = im.get_extent()
    _decorate(ax, min(abs(ext[0]), abs(ext[3])), "w" if "intensity" in sax.get_title() else "k")

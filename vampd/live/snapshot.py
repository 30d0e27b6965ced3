"""A read-only, consistent snapshot of a night's ledger: everything the live view shows.

The ledger is opened with a ``mode=ro`` URI and read inside one read transaction (WAL: the
daemon keeps committing while we read, and we see one consistent state). Nothing here writes
anything; the daemon is never disturbed.

Besides the ledger, a snapshot looks at a few small things on disk, each cached by
(path, mtime) so a refresh every second stays cheap: the primary header of the newest coadded
product per camera (which calibration masters were used), the per-set Stokes files of PDI
(``pdi/stokes/*_stokes_*.fits``: the star's DoLP/AoLP, IP, and the Qphi signal in an annulus)
and the free space of the output disk.
"""

from __future__ import annotations

import datetime as _dt
import glob
import json
import math
import os
import re
import shutil
import sqlite3
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vampd.engine.ledger import LEDGER_NAME, Ledger, daemon_alive
from vampd.live.status import collect_status

__all__ = [
    "FileRow",
    "SetView",
    "PdiSet",
    "PdiSummary",
    "Snapshot",
    "take_snapshot",
    "camera_of",
    "night_label",
    "obs_time",
    "status_with_alerts",
]

HWP_GRID = (0.0, 45.0, 22.5, 67.5)
_NLATEST = 60  # rows of "latest files" kept (the view shows what fits)
_NTREND = 80  # done files per camera kept for the trends
_THROUGHPUT_WINDOW = 300.0  # seconds


@dataclass
class FileRow:
    """One ``files`` row with its quicklook metrics unpacked."""

    path: str
    state: str
    camera: int | None = None
    flc: str | None = None
    hwp: float | None = None
    filter: str | None = None
    target: str | None = None
    exptime: float | None = None
    mjd: float | None = None
    nframes: int | None = None
    obs_mod: str | None = None
    stage: str | None = None
    tries: int = 0
    error: str | None = None
    nkept: int | None = None
    strehl: float | None = None
    fwhm: float | None = None
    flux: float | None = None
    offset: float | None = None
    nsat: int | None = None  # frames with a saturated PSF core
    latency: float | None = None
    t_seen: float | None = None
    t_complete: float | None = None
    t_done: float | None = None

    @property
    def name(self) -> str:
        return os.path.basename(self.path)

    @property
    def t_arrival(self) -> float | None:
        """When the file was complete on disk (or first seen)."""
        return self.t_complete if self.t_complete is not None else self.t_seen


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


@dataclass
class Snapshot:
    """Everything the live view shows, read at time ``taken``.

    ``status`` is exactly :func:`vampd.live.status.collect_status` (same numbers as
    ``vampd status --json``), read in the same transaction as the rest.
    """

    outdir: str
    taken: float
    ledger_found: bool = True
    problem: str | None = None
    status: dict = field(default_factory=dict)
    counts: dict = field(default_factory=dict)
    daemon: dict = field(default_factory=dict)
    config_path: str | None = None
    config_name: str | None = None
    target: str | None = None
    night: str | None = None
    throughput: float | None = None  # files per minute over the last 5 minutes
    queue: int = 0
    latest: list[FileRow] = field(default_factory=list)
    trends: dict[int, list[FileRow]] = field(default_factory=dict)
    recent: list[FileRow] = field(default_factory=list)  # newest files of the current sequence (all states)
    set_counts: dict = field(default_factory=dict)
    leastsq: list = field(default_factory=list)  # Ledger.lsq_status() (issue 13)
    block_counts: dict = field(default_factory=dict)
    open_sets: list[SetView] = field(default_factory=list)
    set_mode: str | None = None
    pdi: PdiSummary | None = None
    problems: list[FileRow] = field(default_factory=list)  # failed and parked
    events: list[dict] = field(default_factory=list)
    disk_free_gb: float | None = None
    calibration: dict[int, dict] = field(default_factory=dict)
    calib_expected: bool = False
    last_arrival: float | None = None

    @property
    def daemon_alive(self) -> bool:
        return bool(self.daemon.get("alive"))

    def to_dict(self) -> dict:
        return asdict(self)


# -- small helpers ----------------------------------------------------------------------------------
def camera_of(row: FileRow | dict) -> int | None:
    """The camera of a file: the recorded ``U_CAMERA``, else the name (VMPA → 1, VMPB → 2)."""
    cam = row.camera if isinstance(row, FileRow) else row.get("camera")
    if cam is not None:
        try:
            return int(cam)
        except (TypeError, ValueError):
            pass
    name = os.path.basename(row.path if isinstance(row, FileRow) else str(row.get("path", "")))
    if name.startswith("VMPA"):
        return 1
    if name.startswith("VMPB"):
        return 2
    return None


def obs_time(row: FileRow) -> float | None:
    """Unix time of the observation (MJD), else of the file's arrival (wall clock)."""
    if row.mjd is not None:
        return (row.mjd - 40587.0) * 86400.0
    return row.t_arrival


def night_label(mjd: float | None) -> str | None:
    """The HST date on which the night began (noon to noon HST) of an MJD (UT)."""
    if mjd is None or not math.isfinite(mjd):
        return None
    ut = _dt.datetime(1858, 11, 17, tzinfo=_dt.UTC) + _dt.timedelta(days=float(mjd))
    return (ut - _dt.timedelta(hours=22)).date().isoformat()


def _num(v) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _file_row(r: sqlite3.Row) -> FileRow:
    m: dict[str, Any] = {}
    if r["metrics"]:
        try:
            m = json.loads(r["metrics"]) or {}
        except (TypeError, ValueError):
            m = {}
    return FileRow(
        path=r["path"],
        state=r["state"],
        camera=r["camera"],
        flc=r["flc"],
        hwp=_num(r["hwp"]),
        filter=r["filter"],
        target=r["target"],
        exptime=_num(r["exptime"]),
        mjd=_num(r["mjd"]),
        nframes=r["nframes"] if r["nframes"] is not None else m.get("nframes"),
        obs_mod=r["obs_mod"],
        stage=r["stage"],
        tries=r["tries"] or 0,
        error=r["error"],
        nkept=m.get("nkept"),
        strehl=_num(m.get("strehl")),
        fwhm=_num(m.get("fwhm")),
        flux=_num(m.get("flux")),
        offset=_num(m.get("offset")),
        nsat=m.get("nsat"),
        latency=_num(r["latency"]),
        t_seen=r["t_seen"],
        t_complete=r["t_complete"],
        t_done=r["t_done"],
    )


# -- caches of small on-disk reads (keyed by path and mtime) ----------------------------------------
_HEADER_CACHE: dict[tuple[str, int], dict] = {}
_PDI_CACHE: dict[tuple[str, int], list[PdiSet]] = {}


def _cached(cache: dict, path: str, fn):
    try:
        key = (path, os.stat(path).st_mtime_ns)
    except OSError:
        return None
    if key not in cache:
        if len(cache) > 4096:
            cache.clear()
        try:
            cache[key] = fn(path)
        except (OSError, ValueError, KeyError, TypeError, IndexError):
            cache[key] = None
    return cache[key]


def _calib_header(path: str) -> dict:
    from astropy.io import fits

    h = fits.getheader(path)
    return {
        "back": h.get("BACKFILE"),
        "flat": h.get("FLATFILE"),
        "detector": f"{h.get('U_DETMOD', h.get('DETMODE', '?'))} mode, EXPTIME {h.get('EXPTIME', '?')} s",
        "product": os.path.basename(path),
    }


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
        v = _num(hdr.get(k))
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


def _load_config(path: str | None):
    if not path or not os.path.exists(path):
        return None
    try:
        import warnings

        from vampd.config import load_config

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return load_config(path, check_versions=False)
    except Exception:  # a broken config must not break the view; the daemon reports it
        return None


# -- sets -------------------------------------------------------------------------------------------
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


# -- the snapshot -----------------------------------------------------------------------------------
def take_snapshot(
    outdir: os.PathLike | str, now: float | None = None, config_path: str | None = None, read_products: bool = True
) -> Snapshot:
    """Read everything the live view shows, in one read transaction on a read-only ledger.

    Parameters
    ----------
    outdir : path
        Output directory holding ``vampd.sqlite``.
    now : float, optional
        Wall-clock time of the snapshot (default: now); used for ages and liveness.
    config_path : str, optional
        Configuration to take alert thresholds, calibration and PDI settings from (default:
        the one the daemon recorded at start, if any).
    read_products : bool
        Also read the small on-disk things (coadded headers, per-set Stokes files).

    Returns
    -------
    Snapshot
        With ``ledger_found=False`` (and ``problem`` saying why) if there is no ledger yet.
    """
    now = time.time() if now is None else now
    outdir = str(Path(outdir).resolve())
    snap = Snapshot(outdir=outdir, taken=now)
    try:
        snap.disk_free_gb = shutil.disk_usage(outdir).free / 1024**3
    except OSError:
        pass
    try:
        led = Ledger(outdir, readonly=True)
    except (FileNotFoundError, sqlite3.Error) as exc:
        snap.ledger_found = False
        snap.problem = str(exc)
        return snap
    try:
        led.begin_read()  # one read transaction: a consistent view while the daemon commits
        _read(led, snap, now, config_path, read_products)
    finally:
        led.end_read()
        led.close()
    return snap


def _read(led: Ledger, snap: Snapshot, now: float, config_path: str | None, read_products: bool) -> None:
    snap.status = collect_status(snap.outdir, now=now, ledger=led)
    snap.counts = led.counts()
    info = led.daemon_info()
    if info is not None:
        snap.daemon = {k: info[k] for k in info.keys()}
    snap.daemon["alive"] = daemon_alive(info, now=now)
    snap.config_path = config_path or snap.daemon.get("config") or None
    cfg = _load_config(snap.config_path)
    snap.config_name = (
        (getattr(cfg, "name", None) or None)
        if cfg is not None
        else (Path(snap.config_path).stem if snap.config_path else None)
    )
    snap.queue = snap.counts["pending"] + snap.counts["queued"] + snap.counts["running"]
    snap.set_counts = led.set_counts()
    snap.leastsq = led.lsq_status()
    snap.block_counts = led.block_counts()

    files = {r["path"]: _file_row(r) for r in led.all_files()}
    rows = sorted(files.values(), key=lambda f: (f.t_arrival or 0.0, f.path))
    # the view lists files by observation time (newest first); a file without an MJD (parked
    # before its header was read) goes where it arrived
    by_obs = sorted(files.values(), key=lambda f: (obs_time(f) or 0.0, f.path))
    snap.latest = by_obs[-_NLATEST:][::-1]
    snap.last_arrival = rows[-1].t_arrival if rows else None
    done = [f for f in rows if f.state == "done"]
    by_mjd = sorted(done, key=lambda f: (f.mjd if f.mjd is not None else -1.0, f.path))
    if by_mjd:
        snap.target = by_mjd[-1].target
        snap.night = night_label(by_mjd[-1].mjd)
    for cam in sorted({camera_of(f) for f in done} - {None}):
        snap.trends[cam] = [f for f in by_mjd if camera_of(f) == cam][-_NTREND:]
    # the current sequence: newest files of the latest target/filter (all states)
    if rows:
        ref = by_mjd[-1] if by_mjd else rows[-1]
        snap.recent = [f for f in rows[-200:] if f.target in (None, ref.target) and f.filter in (None, ref.filter)]
    recent_done = [f.t_done for f in done if f.t_done is not None and now - f.t_done <= _THROUGHPUT_WINDOW]
    if done:
        first = min(f.t_done for f in done if f.t_done is not None) if any(f.t_done for f in done) else now
        window = min(_THROUGHPUT_WINDOW, max(now - first, 1.0))
        snap.throughput = 60.0 * len(recent_done) / window
    snap.problems = sorted(
        (f for f in rows if f.state in ("failed", "parked")), key=lambda f: (f.t_arrival or 0.0, f.path), reverse=True
    )
    snap.events = [{k: e[k] for k in e.keys()} for e in led.events(30)]

    # sets: the PDI trigger's rows when there are any, else assembled from the files
    pcfg = getattr(cfg, "polarimetry", None) if cfg is not None else None
    from vampd.config.models import PolarimetryConfig
    from vampd.live.alerts import thresholds

    tol = (
        float(getattr(pcfg, "hwp_tolerance", 0.0) or 0.0)
        or thresholds(getattr(cfg, "alerts", None) if cfg is not None else None).hwp_grid_tolerance
    )
    if sum(snap.set_counts.values()):
        snap.open_sets = _sets_from_ledger(led, files, tol)
        snap.set_mode = snap.open_sets[0].mode if snap.open_sets else (pcfg.method if pcfg else None)
    else:
        pol = [f for f in done if (f.flc or "NA").upper() in ("A", "B") or "POL" in (f.obs_mod or "").upper()]
        if pol:
            mode = (
                pcfg.method
                if pcfg is not None
                else ("triplediff" if any((f.flc or "").upper() in ("A", "B") for f in pol) else "doublediff")
            )
            timeout = float(getattr(pcfg, "set_timeout", None) or PolarimetryConfig.model_fields["set_timeout"].default)
            snap.set_mode = mode
            snap.open_sets = _sets_from_files(files, mode, tol, timeout)

    # calibration actually used, per camera (header of the newest coadded product)
    cal = getattr(cfg, "calibrate", None) if cfg is not None else None
    snap.calib_expected = bool(cal is not None and cal.calib_directory and (cal.back_subtract or cal.flat_correct))
    if read_products:
        for cam, trend in snap.trends.items():
            if not trend:
                continue
            newest = max(trend, key=lambda f: f.t_done or 0.0)
            prod = led.product_path(newest.path, "coadded")
            if prod is not None:
                info = _cached(_HEADER_CACHE, prod, _calib_header)
                if info is not None:
                    snap.calibration[cam] = dict(
                        info,
                        file=newest.name,
                        back_expected=bool(cal and cal.calib_directory and cal.back_subtract),
                        flat_expected=bool(cal and cal.calib_directory and cal.flat_correct),
                    )
        snap.pdi = _pdi_summary(snap.outdir, snap.set_counts)


_STOKES_RE = re.compile(r"_stokes_(\d+)\.fits$")


def _pdi_summary(outdir: str, set_counts: dict) -> PdiSummary | None:
    paths = sorted(glob.glob(os.path.join(outdir, "pdi", "stokes", "*_stokes_*.fits")))
    if not paths:
        return PdiSummary(nsets=set_counts.get("complete", 0)) if set_counts.get("complete") else None
    sets: list[PdiSet] = []
    for p in paths:
        got = _cached(_PDI_CACHE, p, _pdi_file)
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


def status_with_alerts(outdir: os.PathLike | str, now: float | None = None) -> dict:
    """``collect_status`` plus ``alerts`` (list of dicts), read in one snapshot."""
    from vampd.live.alerts import alerts_config_for, compute_alerts

    snap = take_snapshot(outdir, now=now)
    if not snap.ledger_found:
        raise FileNotFoundError(snap.problem or f"{outdir}/{LEDGER_NAME}: no ledger")
    st = dict(snap.status)
    st["alerts"] = [a.to_dict() for a in compute_alerts(snap, alerts_config_for(snap), snap.taken)]
    return st

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

import json
import os
import shutil
import sqlite3
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vampd.engine.ledger import LEDGER_NAME, Ledger, daemon_alive
from vampd.live.common import FileRow, cached, camera_of, night_label, num, obs_time
from vampd.live.pdiview import PdiSet, PdiSummary, annulus_radii, pdi_summary, qphi_annulus
from vampd.live.setboard import HWP_GRID, SetView, read_sets
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
    "HWP_GRID",
    "annulus_radii",
    "qphi_annulus",
]

_NLATEST = 60  # rows of "latest files" kept (the view shows what fits)
_NTREND = 80  # done files per camera kept for the trends
_THROUGHPUT_WINDOW = 300.0  # seconds


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
        hwp=num(r["hwp"]),
        filter=r["filter"],
        target=r["target"],
        exptime=num(r["exptime"]),
        mjd=num(r["mjd"]),
        nframes=r["nframes"] if r["nframes"] is not None else m.get("nframes"),
        obs_mod=r["obs_mod"],
        stage=r["stage"],
        tries=r["tries"] or 0,
        error=r["error"],
        nkept=m.get("nkept"),
        strehl=num(m.get("strehl")),
        fwhm=num(m.get("fwhm")),
        flux=num(m.get("flux")),
        offset=num(m.get("offset")),
        nsat=m.get("nsat"),
        latency=num(r["latency"]),
        t_seen=r["t_seen"],
        t_complete=r["t_complete"],
        t_done=r["t_done"],
    )


_HEADER_CACHE: dict[tuple[str, int], dict] = {}


def _calib_header(path: str) -> dict:
    from astropy.io import fits

    h = fits.getheader(path)
    return {
        "back": h.get("BACKFILE"),
        "flat": h.get("FLATFILE"),
        "detector": f"{h.get('U_DETMOD', h.get('DETMODE', '?'))} mode, EXPTIME {h.get('EXPTIME', '?')} s",
        "product": os.path.basename(path),
    }


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
    cfg = _read_counts(led, snap, now, config_path)
    files = {r["path"]: _file_row(r) for r in led.all_files()}
    _read_files(snap, files, now)
    snap.events = [{k: e[k] for k in e.keys()} for e in led.events(30)]
    snap.open_sets, snap.set_mode = read_sets(led, cfg, files, snap.set_counts)
    # calibration actually used, per camera (header of the newest coadded product)
    cal = getattr(cfg, "calibrate", None) if cfg is not None else None
    snap.calib_expected = bool(cal is not None and cal.calib_directory and (cal.back_subtract or cal.flat_correct))
    if read_products:
        _read_calibration(led, snap, cal)
        snap.pdi = pdi_summary(snap.outdir, snap.set_counts)


def _read_counts(led: Ledger, snap: Snapshot, now: float, config_path: str | None):
    """Status, counts, the daemon row and the configuration (returned: None if unreadable)."""
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
    return cfg


def _read_files(snap: Snapshot, files: dict[str, FileRow], now: float) -> None:
    """Latest files, trends, the current sequence, throughput and the parked files."""
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


def _read_calibration(led: Ledger, snap: Snapshot, cal) -> None:
    """Per camera: the calibration masters named in the newest coadded product's header."""
    for cam, trend in snap.trends.items():
        if not trend:
            continue
        newest = max(trend, key=lambda f: f.t_done or 0.0)
        prod = led.product_path(newest.path, "coadded")
        if prod is not None:
            info = cached(_HEADER_CACHE, prod, _calib_header)
            if info is not None:
                snap.calibration[cam] = dict(
                    info,
                    file=newest.name,
                    back_expected=bool(cal and cal.calib_directory and cal.back_subtract),
                    flat_expected=bool(cal and cal.calib_directory and cal.flat_correct),
                )


def status_with_alerts(outdir: os.PathLike | str, now: float | None = None) -> dict:
    """``collect_status`` plus ``alerts`` (list of dicts), read in one snapshot."""
    from vampd.live.alerts import alerts_config_for, compute_alerts

    snap = take_snapshot(outdir, now=now)
    if not snap.ledger_found:
        raise FileNotFoundError(snap.problem or f"{outdir}/{LEDGER_NAME}: no ledger")
    st = dict(snap.status)
    st["alerts"] = [a.to_dict() for a in compute_alerts(snap, alerts_config_for(snap), snap.taken)]
    return st

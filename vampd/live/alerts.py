"""Observer alerts: pure rules over a ledger snapshot, thresholds from the ``[alerts]`` section.

Each rule looks at the *current sequence* (the newest files of the latest target and filter,
``Snapshot.recent``) unless it says otherwise, so an old problem does not alert all night.

========================  =======  ======================================================
code                      level    raised when
========================  =======  ======================================================
``daemon_down``           error    the ledger has a daemon row but no live daemon
``disk_full``             error    free space of the output disk < ``disk_free_gb``
``camera_missing``        warning  one camera has ≥ 4 files in the sequence, the other none
``camera_lag``            warning  a camera's newest file arrived > ``lag_seconds`` after the other's
``flc_imbalance``         warning  FLC A/B median flux (per camera) or file counts differ by
                                   more than ``flc_imbalance`` (fraction of their mean/max)
``hwp_off_grid``          warning  an HWP angle is > ``hwp_grid_tolerance`` from 0/22.5/45/67.5
``idle``                  warning  no new file for ``idle_seconds`` while a set is open (or
                                   within 10 × ``idle_seconds`` of the last file)
``frame_mismatch``        warning  simultaneous camera 1 / camera 2 files hold different frame counts
``strehl_drop``           warning  median Strehl of a camera's last 3 files < (1 − ``strehl_drop``)
                                   × the median of the files before (same target and filter)
``flux_drop``             warning  the same with the flux and ``flux_drop``
``no_calibration``        warning  calibration masters are configured but the newest product of a
                                   camera used none (no master matches its detector set-up)
``parked``                warning  files processing gave up on
``retrying``              info     failed files that will be retried
========================  =======  ======================================================
"""

from __future__ import annotations

import logging
import os
import statistics
from dataclasses import asdict, dataclass
from typing import Any

from vampd.live.snapshot import HWP_GRID, FileRow, Snapshot, camera_of

__all__ = ["Alert", "LEVELS", "compute_alerts", "alerts_config_for", "hwp_grid_offset", "AlertMonitor"]

LEVELS = ("error", "warning", "info")
_SEQ_MIN = 4  # files a camera needs in the sequence before the other one counts as missing


@dataclass(frozen=True)
class Alert:
    """One alert: ``level`` (error, warning, info), a stable ``code``, a plain ``message`` and the
    ``subject`` it is about (camera, file, ...) so that the same alert can be recognised while its
    numbers change."""

    level: str
    code: str
    message: str
    subject: str = ""

    @property
    def key(self) -> str:
        return f"{self.code}:{self.subject}"

    def to_dict(self) -> dict:
        return asdict(self)


def hwp_grid_offset(angle: float) -> float:
    """Distance (deg) of an HWP angle from the nearest of 0/22.5/45/67.5 (modulo 90°)."""
    return min(min((angle - g) % 90.0, 90.0 - (angle - g) % 90.0) for g in HWP_GRID)


def _cfg(cfg: Any, name: str, default: float) -> float:
    v = getattr(cfg, name, None) if cfg is not None else None
    if v is None and isinstance(cfg, dict):
        v = cfg.get(name)
    return float(default if v is None else v)


def alerts_config_for(snap: Snapshot):
    """The ``[alerts]`` section of the snapshot's configuration, or the defaults."""
    from vampd.config.models import AlertsConfig
    from vampd.live.snapshot import _load_config

    cfg = _load_config(snap.config_path)
    return getattr(cfg, "alerts", None) or AlertsConfig()


def _names(rows, n=3) -> str:
    names = [r.name if isinstance(r, FileRow) else str(r) for r in rows]
    return ", ".join(names[:n]) + (f" (+{len(names) - n} more)" if len(names) > n else "")


def compute_alerts(snap: Snapshot, cfg: Any = None, now: float | None = None) -> list[Alert]:
    """The alerts of a snapshot, most severe first.

    Parameters
    ----------
    snap : Snapshot
    cfg : AlertsConfig or dict, optional
        Thresholds (``lag_seconds``, ``flc_imbalance``, ``hwp_grid_tolerance``,
        ``idle_seconds``, ``strehl_drop``, ``flux_drop``, ``disk_free_gb``); defaults if None.
    now : float, optional
        Wall-clock time (default: the snapshot's time).
    """
    now = snap.taken if now is None else now
    lag_s = _cfg(cfg, "lag_seconds", 60.0)
    imb = _cfg(cfg, "flc_imbalance", 0.2)
    tol = _cfg(cfg, "hwp_grid_tolerance", 0.5)
    idle_s = _cfg(cfg, "idle_seconds", 120.0)
    s_drop = _cfg(cfg, "strehl_drop", 0.3)
    f_drop = _cfg(cfg, "flux_drop", 0.5)
    disk = _cfg(cfg, "disk_free_gb", 20.0)
    out: list[Alert] = []
    add = out.append

    if not snap.ledger_found:
        return [Alert("error", "no_ledger", snap.problem or "no ledger here")]

    # daemon
    d = snap.daemon
    if d.get("pid") is not None and not d.get("alive"):
        if d.get("stopped") is None:
            hb = d.get("heartbeat")
            ago = f", last heartbeat {now - hb:.0f} s ago" if hb else ""
            add(Alert("error", "daemon_down", f"daemon not running (pid {d['pid']} gone{ago})"))
    # disk
    if snap.disk_free_gb is not None and snap.disk_free_gb < disk:
        add(Alert("error", "disk_full", f"output disk nearly full: {snap.disk_free_gb:.1f} GB free (< {disk:g} GB)"))

    recent = snap.recent
    by_cam: dict[int, list[FileRow]] = {}
    for f in recent:
        cam = camera_of(f)
        if cam is not None:
            by_cam.setdefault(cam, []).append(f)

    # cameras missing / lagging
    cams = {c: rows for c, rows in by_cam.items() if c in (1, 2)}
    if len(cams) == 1:
        (have, rows), = cams.items()
        if len(rows) >= _SEQ_MIN:
            other = 3 - have
            add(Alert("warning", "camera_missing",
                      f"camera {other} missing: no files in this sequence (camera {have} has {len(rows)})",
                      f"cam{other}"))
    elif len(cams) == 2:
        newest = {c: max((f.t_arrival or 0.0) for f in rows) for c, rows in cams.items()}
        ahead = max(newest, key=newest.get)
        behind = 3 - ahead
        lag = newest[ahead] - newest[behind]
        if lag > lag_s:
            n_extra = sum((f.t_arrival or 0.0) > newest[behind] for f in cams[ahead])
            add(Alert("warning", "camera_lag",
                      f"camera {behind} lags camera {ahead} by {lag:.0f} s ({n_extra} newer camera {ahead} "
                      f"file(s) without a camera {behind} partner; threshold {lag_s:g} s)", f"cam{behind}"))

    # FLC A/B balance, per camera
    for cam, rows in sorted(cams.items()):
        a = [f for f in rows if (f.flc or "").upper() == "A"]
        b = [f for f in rows if (f.flc or "").upper() == "B"]
        fa = [f.flux for f in a if f.state == "done" and f.flux is not None]
        fb = [f.flux for f in b if f.state == "done" and f.flux is not None]
        if fa and fb:
            ma, mb = statistics.median(fa), statistics.median(fb)
            mean = 0.5 * (ma + mb)
            if mean > 0 and abs(ma - mb) / mean > imb:
                add(Alert("warning", "flc_imbalance",
                          f"camera {cam}: FLC A/B flux imbalance {abs(ma - mb) / mean:.0%} "
                          f"(A {ma:.4g}, B {mb:.4g} e-/s; threshold {imb:.0%})", f"cam{cam}:flux"))
        na, nb = len(a), len(b)
        if max(na, nb) >= 5 and abs(na - nb) / max(na, nb) > imb:
            add(Alert("warning", "flc_imbalance",
                      f"camera {cam}: FLC A/B file counts {na}/{nb} differ by more than {imb:.0%}",
                      f"cam{cam}:count"))

    # HWP angles off the grid (polarimetric files only)
    off = [f for f in recent if f.hwp is not None and (f.flc or "NA").upper() in ("A", "B", "NA")
           and ((f.flc or "").upper() in ("A", "B") or "POL" in (f.obs_mod or "").upper())
           and hwp_grid_offset(f.hwp) > tol]
    if off:
        worst = max(off, key=lambda f: hwp_grid_offset(f.hwp))
        add(Alert("warning", "hwp_off_grid",
                  f"HWP angle off the 0/22.5/45/67.5 grid: {_names(off)} (e.g. {worst.name} RET-ANG1 = "
                  f"{worst.hwp:g}°, {hwp_grid_offset(worst.hwp):.2f}° off; tolerance {tol:g}°)",
                  worst.name))

    # idle
    if snap.daemon_alive and snap.last_arrival is not None:
        gap = now - snap.last_arrival
        in_sequence = bool(snap.open_sets) or gap < 10 * idle_s
        if gap > idle_s and in_sequence:
            why = "with an HWP set open" if snap.open_sets else "during the sequence"
            add(Alert("warning", "idle", f"no new file for {gap:.0f} s {why} (threshold {idle_s:g} s)"))

    # frame counts of simultaneous files of the two cameras
    if len(cams) == 2:
        bad = []
        for f1 in cams[1]:
            if f1.nframes is None or f1.mjd is None:
                continue
            half = max(1.0, 0.5 * (f1.exptime or 0.0) * f1.nframes) / 86400.0
            for f2 in cams[2]:
                if (f2.mjd is not None and f2.nframes is not None and abs(f2.mjd - f1.mjd) < half
                        and (f2.flc or "") == (f1.flc or "")
                        and (f1.hwp is None or f2.hwp is None or abs(f1.hwp - f2.hwp) < 1e-3)):
                    if f2.nframes != f1.nframes:
                        bad.append((f1, f2))
                    break
        if bad:
            f1, f2 = bad[-1]
            add(Alert("warning", "frame_mismatch",
                      f"different frame counts between the cameras in {len(bad)} pair(s): e.g. {f1.name} has "
                      f"{f1.nframes}, {f2.name} has {f2.nframes}", f2.name))

    # Strehl / flux drop per camera (same target and filter as its newest file)
    for cam, trend in sorted(snap.trends.items()):
        if not trend:
            continue
        last = trend[-1]
        same = [f for f in trend if f.target == last.target and f.filter == last.filter]
        for attr, thr, code, label in (("strehl", s_drop, "strehl_drop", "Strehl"), ("flux", f_drop, "flux_drop", "flux")):
            vals = [getattr(f, attr) for f in same if getattr(f, attr) is not None]
            if len(vals) < 6:
                continue
            now_v = statistics.median(vals[-3:])
            ref = statistics.median(vals[-33:-3])
            if ref > 0 and now_v < (1 - thr) * ref:
                add(Alert("warning", code,
                          f"camera {cam}: {label} dropped {1 - now_v / ref:.0%} (last 3 files {now_v:.3g} vs "
                          f"{ref:.3g} before; threshold {thr:.0%})", f"cam{cam}"))

    # calibration
    for cam, info in sorted(snap.calibration.items()):
        missing = [k for k, exp in (("background", info.get("back_expected")), ("flat", info.get("flat_expected")))
                   if exp and not info.get("back" if k == "background" else "flat")]
        if missing:
            add(Alert("warning", "no_calibration",
                      f"camera {cam}: no {' or '.join(missing)} master for the current detector configuration "
                      f"({info.get('detector') or '?'}; {info.get('file')})", f"cam{cam}"))

    # processing problems
    parked = [f for f in snap.problems if f.state == "parked"]
    failed = [f for f in snap.problems if f.state == "failed"]
    if parked:
        add(Alert("warning", "parked", f"{len(parked)} file(s) parked: {_names(parked)}"))
    if failed:
        add(Alert("info", "retrying", f"{len(failed)} file(s) failed, will retry: {_names(failed)}"))

    out.sort(key=lambda a: LEVELS.index(a.level) if a.level in LEVELS else len(LEVELS))
    return out


class AlertMonitor:
    """Log alerts as they are raised and cleared (for the daemon: alerts reach the journal).

    Parameters
    ----------
    outdir : path
        Output directory (the ledger is read through :func:`~vampd.live.snapshot.take_snapshot`).
    config_path : str, optional
    logger : logging.Logger, optional
        Default ``vampd.alerts``.
    """

    def __init__(self, outdir, config_path: str | None = None, logger: logging.Logger | None = None):
        self.outdir = os.fspath(outdir)
        self.config_path = config_path
        self.log = logger or logging.getLogger("vampd.alerts")
        self.active: dict[str, Alert] = {}

    def poll(self, now: float | None = None, cfg: Any = None) -> tuple[list[Alert], list[Alert]]:
        """Take a snapshot, log new alerts (warning/error) and cleared ones (info).

        Returns ``(raised, cleared)``.
        """
        from vampd.live.snapshot import take_snapshot

        snap = take_snapshot(self.outdir, now=now, config_path=self.config_path)
        cur = {a.key: a for a in compute_alerts(snap, cfg if cfg is not None else alerts_config_for(snap), now)
               if a.code != "daemon_down"}  # the daemon polling itself is alive by definition
        raised = [a for k, a in cur.items() if k not in self.active]
        cleared = [a for k, a in self.active.items() if k not in cur]
        for a in raised:
            lvl = logging.ERROR if a.level == "error" else logging.WARNING if a.level == "warning" else logging.INFO
            self.log.log(lvl, "alert %s: %s", a.code, a.message)
        for a in cleared:
            self.log.info("alert cleared %s: %s", a.code, a.message)
        self.active = cur
        return raised, cleared

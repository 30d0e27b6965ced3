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

__all__ = ["Alert", "LEVELS", "compute_alerts", "alerts_config_for", "hwp_grid_offset", "thresholds", "AlertMonitor"]

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


def thresholds(cfg: Any = None):
    """The alert thresholds as an :class:`~vampd.config.models.AlertsConfig` (the only place their
    defaults live): ``cfg`` itself, a dict of some of them, or ``None`` for the defaults."""
    from vampd.config.models import AlertsConfig

    if cfg is None:
        return AlertsConfig()
    if isinstance(cfg, dict):
        return AlertsConfig(**{k: v for k, v in cfg.items() if v is not None})
    return cfg


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
        ``idle_seconds``, ``strehl_drop``, ``flux_drop``, ``disk_free_gb``); the
        :class:`~vampd.config.models.AlertsConfig` defaults for those not given.
    now : float, optional
        Wall-clock time (default: the snapshot's time).
    """
    now = snap.taken if now is None else now
    if not snap.ledger_found:
        return [Alert("error", "no_ledger", snap.problem or "no ledger here")]
    t = thresholds(cfg)
    cams: dict[int, list[FileRow]] = {}
    for f in snap.recent:
        cam = camera_of(f)
        if cam in (1, 2):
            cams.setdefault(cam, []).append(f)
    out = (
        _daemon_rules(snap, t, now)
        + _camera_rules(cams, t)
        + _flc_rules(cams, t)
        + _hwp_rule(snap, t)
        + _idle_rule(snap, t, now)
        + _frame_rule(cams)
        + _drop_rules(snap, t)
        + _calibration_rule(snap)
        + _problem_rules(snap)
    )
    out.sort(key=lambda a: LEVELS.index(a.level) if a.level in LEVELS else len(LEVELS))
    return out


def _daemon_rules(snap: Snapshot, t, now: float) -> list[Alert]:
    out = []
    d = snap.daemon
    if d.get("pid") is not None and not d.get("alive") and d.get("stopped") is None:
        hb = d.get("heartbeat")
        ago = f", last heartbeat {now - hb:.0f} s ago" if hb else ""
        out.append(Alert("error", "daemon_down", f"daemon not running (pid {d['pid']} gone{ago})"))
    if snap.disk_free_gb is not None and snap.disk_free_gb < t.disk_free_gb:
        out.append(
            Alert(
                "error",
                "disk_full",
                f"output disk nearly full: {snap.disk_free_gb:.1f} GB free (< {t.disk_free_gb:g} GB)",
            )
        )
    return out


def _camera_rules(cams: dict[int, list[FileRow]], t) -> list[Alert]:
    """One camera missing from the sequence, or lagging the other."""
    if len(cams) == 1:
        ((have, rows),) = cams.items()
        if len(rows) < _SEQ_MIN:
            return []
        other = 3 - have
        return [
            Alert(
                "warning",
                "camera_missing",
                f"camera {other} missing: no files in this sequence (camera {have} has {len(rows)})",
                f"cam{other}",
            )
        ]
    if len(cams) != 2:
        return []
    newest = {c: max((f.t_arrival or 0.0) for f in rows) for c, rows in cams.items()}
    ahead = max(newest, key=newest.get)
    behind = 3 - ahead
    lag = newest[ahead] - newest[behind]
    if lag <= t.lag_seconds:
        return []
    n_extra = sum((f.t_arrival or 0.0) > newest[behind] for f in cams[ahead])
    return [
        Alert(
            "warning",
            "camera_lag",
            f"camera {behind} lags camera {ahead} by {lag:.0f} s ({n_extra} newer camera {ahead} "
            f"file(s) without a camera {behind} partner; threshold {t.lag_seconds:g} s)",
            f"cam{behind}",
        )
    ]


def _flc_rules(cams: dict[int, list[FileRow]], t) -> list[Alert]:
    """FLC A/B balance per camera: median flux and file counts."""
    out, imb = [], t.flc_imbalance
    for cam, rows in sorted(cams.items()):
        a = [f for f in rows if (f.flc or "").upper() == "A"]
        b = [f for f in rows if (f.flc or "").upper() == "B"]
        fa = [f.flux for f in a if f.state == "done" and f.flux is not None]
        fb = [f.flux for f in b if f.state == "done" and f.flux is not None]
        if fa and fb:
            ma, mb = statistics.median(fa), statistics.median(fb)
            mean = 0.5 * (ma + mb)
            if mean > 0 and abs(ma - mb) / mean > imb:
                out.append(
                    Alert(
                        "warning",
                        "flc_imbalance",
                        f"camera {cam}: FLC A/B flux imbalance {abs(ma - mb) / mean:.0%} "
                        f"(A {ma:.4g}, B {mb:.4g} e-/s; threshold {imb:.0%})",
                        f"cam{cam}:flux",
                    )
                )
        na, nb = len(a), len(b)
        if max(na, nb) >= 5 and abs(na - nb) / max(na, nb) > imb:
            out.append(
                Alert(
                    "warning",
                    "flc_imbalance",
                    f"camera {cam}: FLC A/B file counts {na}/{nb} differ by more than {imb:.0%}",
                    f"cam{cam}:count",
                )
            )
    return out


def _hwp_rule(snap: Snapshot, t) -> list[Alert]:
    """HWP angles off the grid (polarimetric files only)."""
    tol = t.hwp_grid_tolerance
    off = [
        f
        for f in snap.recent
        if f.hwp is not None
        and (f.flc or "NA").upper() in ("A", "B", "NA")
        and ((f.flc or "").upper() in ("A", "B") or "POL" in (f.obs_mod or "").upper())
        and hwp_grid_offset(f.hwp) > tol
    ]
    if not off:
        return []
    worst = max(off, key=lambda f: hwp_grid_offset(f.hwp))
    return [
        Alert(
            "warning",
            "hwp_off_grid",
            f"HWP angle off the 0/22.5/45/67.5 grid: {_names(off)} (e.g. {worst.name} RET-ANG1 = "
            f"{worst.hwp:g}°, {hwp_grid_offset(worst.hwp):.2f}° off; tolerance {tol:g}°)",
            worst.name,
        )
    ]


def _idle_rule(snap: Snapshot, t, now: float) -> list[Alert]:
    if not snap.daemon_alive or snap.last_arrival is None:
        return []
    gap, idle_s = now - snap.last_arrival, t.idle_seconds
    if gap > idle_s and (bool(snap.open_sets) or gap < 10 * idle_s):
        why = "with an HWP set open" if snap.open_sets else "during the sequence"
        return [Alert("warning", "idle", f"no new file for {gap:.0f} s {why} (threshold {idle_s:g} s)")]
    return []


def _frame_rule(cams: dict[int, list[FileRow]]) -> list[Alert]:
    """Simultaneous camera 1 / camera 2 files with different frame counts."""
    if len(cams) != 2:
        return []
    bad = []
    for f1 in cams[1]:
        if f1.nframes is None or f1.mjd is None:
            continue
        half = max(1.0, 0.5 * (f1.exptime or 0.0) * f1.nframes) / 86400.0
        for f2 in cams[2]:
            if (
                f2.mjd is not None
                and f2.nframes is not None
                and abs(f2.mjd - f1.mjd) < half
                and (f2.flc or "") == (f1.flc or "")
                and (f1.hwp is None or f2.hwp is None or abs(f1.hwp - f2.hwp) < 1e-3)
            ):
                if f2.nframes != f1.nframes:
                    bad.append((f1, f2))
                break
    if not bad:
        return []
    f1, f2 = bad[-1]
    return [
        Alert(
            "warning",
            "frame_mismatch",
            f"different frame counts between the cameras in {len(bad)} pair(s): e.g. {f1.name} has "
            f"{f1.nframes}, {f2.name} has {f2.nframes}",
            f2.name,
        )
    ]


def _drop_rules(snap: Snapshot, t) -> list[Alert]:
    """Strehl / flux drop per camera (same target and filter as its newest file)."""
    out = []
    for cam, trend in sorted(snap.trends.items()):
        if not trend:
            continue
        last = trend[-1]
        same = [f for f in trend if f.target == last.target and f.filter == last.filter]
        for attr, thr, code, label in (
            ("strehl", t.strehl_drop, "strehl_drop", "Strehl"),
            ("flux", t.flux_drop, "flux_drop", "flux"),
        ):
            vals = [getattr(f, attr) for f in same if getattr(f, attr) is not None]
            if len(vals) < 6:
                continue
            now_v = statistics.median(vals[-3:])
            ref = statistics.median(vals[-33:-3])
            if ref > 0 and now_v < (1 - thr) * ref:
                out.append(
                    Alert(
                        "warning",
                        code,
                        f"camera {cam}: {label} dropped {1 - now_v / ref:.0%} (last 3 files {now_v:.3g} vs "
                        f"{ref:.3g} before; threshold {thr:.0%})",
                        f"cam{cam}",
                    )
                )
    return out


def _calibration_rule(snap: Snapshot) -> list[Alert]:
    out = []
    for cam, info in sorted(snap.calibration.items()):
        missing = [
            k
            for k, exp in (("background", info.get("back_expected")), ("flat", info.get("flat_expected")))
            if exp and not info.get("back" if k == "background" else "flat")
        ]
        if missing:
            out.append(
                Alert(
                    "warning",
                    "no_calibration",
                    f"camera {cam}: no {' or '.join(missing)} master for the current detector configuration "
                    f"({info.get('detector') or '?'}; {info.get('file')})",
                    f"cam{cam}",
                )
            )
    return out


def _problem_rules(snap: Snapshot) -> list[Alert]:
    parked = [f for f in snap.problems if f.state == "parked"]
    failed = [f for f in snap.problems if f.state == "failed"]
    out = []
    if parked:
        out.append(Alert("warning", "parked", f"{len(parked)} file(s) parked: {_names(parked)}"))
    if failed:
        out.append(Alert("info", "retrying", f"{len(failed)} file(s) failed, will retry: {_names(failed)}"))
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
        cur = {
            a.key: a
            for a in compute_alerts(snap, cfg if cfg is not None else alerts_config_for(snap), now)
            if a.code != "daemon_down"
        }  # the daemon polling itself is alive by definition
        raised = [a for k, a in cur.items() if k not in self.active]
        cleared = [a for k, a in self.active.items() if k not in cur]
        for a in raised:
            lvl = logging.ERROR if a.level == "error" else logging.WARNING if a.level == "warning" else logging.INFO
            self.log.log(lvl, "alert %s: %s", a.code, a.message)
        for a in cleared:
            self.log.info("alert cleared %s: %s", a.code, a.message)
        self.active = cur
        return raised, cleared

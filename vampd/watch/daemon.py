"""The daemon's main loop: observer hints → completeness → ledger → pool → ledger.

One thread (the main one) owns the ledger; the watchdog observer thread only queues paths.
Every tick: drain hints, rescan if asked (overflow, vanished root, full queue) or due
(``reconcile_interval``), check completeness, commit finished jobs, submit new ones,
heartbeat the ledger, supervise the observer and the pool, and ping systemd's watchdog
only when both are healthy.

Signals: SIGTERM/SIGINT stop taking work, let running jobs finish within
``stop_timeout`` (then abandon them cleanly: they go back to pending), flush, exit 0.
SIGHUP reloads the configuration.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path

from vampd.watch.notify import notify, watchdog_interval
from vampd.watch.observer import CompletenessTracker, Watcher

__all__ = ["Daemon"]

log = logging.getLogger(__name__)


class Daemon:
    """The watch daemon of one configuration and output directory.

    Parameters
    ----------
    config_path : path
        The TOML configuration (re-read on SIGHUP).
    inputs : list of paths or None
        Directories to watch (default: ``[watch].inputs``).
    outdir : path or None
        Output directory (default: ``[watch].outdir``, else the config's directory).
    jobs : int or None
        Worker processes (default ``[watch].workers``).
    poll : bool
        Poll instead of inotify (also switched on by ``[watch].poll``).
    """

    def __init__(self, config_path, inputs=None, outdir=None, jobs=None, poll=False, tick: float = 0.1):
        from vampd.engine.commands import open_engine

        self.config_path = str(config_path)
        self.cfg, self.outdir, self.ledger, self.pool, self.runner = open_engine(self.config_path, outdir, jobs)
        self.jobs = jobs
        s = self.runner.settings
        roots = [Path(p) for p in (inputs or s["inputs"])]
        if not roots:
            raise ValueError(f"{config_path}: no input directory (give -i DIR or set watch.inputs)")
        self.watcher = Watcher(
            roots, s["patterns"], s["recursive"], poll or s["poll"], s["poll_interval"],
            queue_size=16 * s["queue_size"],  # full → dropped events become a rescan
        )
        self.tracker = CompletenessTracker(s["settle_time"], s["complete_timeout"], s["expect_sidecar"])
        self.tick = tick
        self._stop = False
        self._reload = False
        self.started = time.time()

    @property
    def stop_requested(self) -> bool:
        return self._stop

    @stop_requested.setter
    def stop_requested(self, value: bool) -> None:
        self._stop = self._stop or bool(value)

    # -- signals ------------------------------------------------------------------------------
    def _on_stop(self, signum, frame) -> None:
        if not self._stop:
            log.info("received %s: stopping after the running jobs", signal.Signals(signum).name)
        self._stop = True

    def _on_hup(self, signum, frame) -> None:
        self._reload = True

    def install_signals(self) -> None:
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_hup)

    def reload(self) -> None:
        from vampd.config import load_config

        try:
            cfg = load_config(self.config_path)
        except (ValueError, OSError) as exc:
            log.error("SIGHUP: keeping the old configuration: %s", exc)
            self.ledger.event("error", f"config reload failed: {exc}")
            return
        n = self.runner.set_config(cfg)
        s = self.runner.settings
        self.tracker.settle_time = s["settle_time"]
        self.tracker.complete_timeout = s["complete_timeout"]
        self.tracker.expect_sidecar = s["expect_sidecar"]
        self.cfg = cfg
        log.info("SIGHUP: configuration reloaded (hash %s, %d file(s) requeued)", self.runner.config_hash, n)
        self.ledger.event("info", f"configuration reloaded (hash {self.runner.config_hash})")

    # -- the loop -------------------------------------------------------------------------------
    def rescan(self) -> int:
        """Compare the directories with the ledger; track every file not recorded as it is now."""
        known = self.ledger.known_stats()
        n = 0
        for path in self.watcher.scan():
            rec = known.get(path)
            if rec is not None:
                try:
                    st = os.stat(path)
                except FileNotFoundError:
                    continue
                if (st.st_size, st.st_mtime_ns) == (rec[0], rec[1]) and rec[2] != "failed":
                    continue  # unchanged and recorded (done, pending or parked)
            if path not in self.tracker:
                self.tracker.add(path)
                n += 1
        return n

    def _recorded(self, path: str) -> bool:
        """The ledger already holds this file as it is now (a late event for a known file)."""
        row = self.ledger.get(path)
        if row is None or row["state"] == "failed":
            return False
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return True
        return (st.st_size, st.st_mtime_ns) == (row["size"], row["mtime_ns"])

    def status_line(self) -> str:
        c = self.ledger.counts()
        pending = c["pending"] + c["queued"] + c["running"]
        return (f"{c['done']} done, {c['parked']} parked, {c['failed']} to retry, {pending} pending, "
                f"{len(self.tracker)} arriving, {len(self.pool.jobs)} running")

    def healthy(self) -> bool:
        return self.watcher.healthy() and self.pool.healthy()

    def run(self) -> int:
        """Run until SIGTERM/SIGINT; returns the exit status (0)."""
        self.install_signals()
        ledger, runner, watcher = self.ledger, self.runner, self.watcher
        ledger.daemon_start(os.getpid(), self.config_path, runner.config_hash)
        ledger.event("info", f"daemon started (pid {os.getpid()})")
        self.pool.start()
        watcher.start()
        n = self.rescan()  # catch up with what is already there
        runner.recheck_products()  # products lost with a power cut (or deleted) are redone
        # sets/sequences whose last file was recorded just before a kill (idempotent)
        runner.resume_triggers()
        log.info("watching %s → %s; %d file(s) to catch up", ", ".join(watcher.roots), self.outdir, n)
        wd = watchdog_interval()
        notify("READY=1", f"STATUS=started; {self.status_line()}")
        s = runner.settings
        next_beat = next_reconcile = 0.0
        last_ping = 0.0
        next_reconcile = time.time() + s["reconcile_interval"]
        from vampd.live.alerts import AlertMonitor  # alerts reach the journal as log records

        alerts, next_alerts = AlertMonitor(self.outdir, self.config_path), time.time() + 5.0
        while not self._stop:
            now = time.time()
            if self._reload:
                self._reload = False
                self.reload()
                s = runner.settings
            for path in watcher.drain():
                if path not in self.tracker and not self._recorded(path):
                    self.tracker.add(path, now)
            if watcher.take_rescan() or now >= next_reconcile:
                found = self.rescan() + runner.recheck_products()
                if found:
                    log.info("rescan: %d file(s) not in the ledger", found)
                from vampd.engine import leastsq_trigger

                leastsq_trigger.tick(ledger, runner.cfg, self.outdir)  # products lagging by time (issue 13)
                next_reconcile = now + s["reconcile_interval"]
            for v in self.tracker.check(now):
                if v.state == "complete":
                    runner.offer(v.path, nbytes=v.nbytes, t_complete=v.t_complete)
                elif v.state == "error":
                    runner.reject(v.path, v.reason)
            runner.collect(timeout=0)
            runner.pump()
            if now >= next_beat:
                next_beat = now + 1.0
                ok = watcher.supervise() & self.pool.healthy()
                status = self.status_line()
                ledger.heartbeat("running" if ok else "degraded")
                if ok and (wd is None or now - last_ping >= wd):
                    notify("WATCHDOG=1", f"STATUS={status}")
                    last_ping = now
                elif not ok:
                    notify(f"STATUS=degraded: {status}")
            if now >= next_alerts:
                next_alerts = now + 10.0
                try:
                    alerts.poll(now)
                except Exception as exc:  # alerts are advisory: they never stop the daemon
                    log.debug("alert check failed: %s", exc)
            # sleep, but wake early for finished jobs
            runner.collect(timeout=self.tick)
        return self.shutdown()

    def shutdown(self) -> int:
        notify("STOPPING=1", "STATUS=draining")
        self.watcher.stop()
        timeout = self.runner.settings["stop_timeout"]
        log.info("stopping: waiting up to %g s for %d running job(s)", timeout, len(self.pool.jobs))
        abandoned = self.runner.drain(timeout)
        self.ledger.event("info", f"daemon stopped ({len(abandoned)} job(s) abandoned)")
        self.ledger.daemon_stop()
        log.info("stopped: %s", self.status_line())
        self.ledger.close()
        return 0

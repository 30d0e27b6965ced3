"""The daemon's main loop: observer hints → completeness → ledger → pool → ledger.

One thread (the main one) owns the ledger; the watchdog observer thread only queues paths.
Every tick: drain hints, rescan if asked (overflow, vanished root, full queue) or due
(``reconcile_interval``), check completeness, commit finished jobs, submit new ones,
heartbeat the ledger, supervise the observer and the pool, and ping systemd's watchdog
only when both are healthy.

Set and sequence work (PDI, specphot) runs in a separate thread with its own ledger
connection (:mod:`vampd.engine.triggers`): the ping never waits on science. Every 2 s the
wall-clock set timeout is queued there too (:func:`vampd.engine.pdi_trigger.check_timeouts`):
HWP blocks and sets close ``polarimetry.set_timeout`` s after their last cube even when no
further file arrives.

Degrade, don't die: every step of a tick is guarded; an error about one file is recorded
for that file; a full or read-only output (a worker's product write or the ledger itself)
pauses intake with an alert and a probe every few seconds resumes it; a missing input
directory is an alert, not an exit.

Signals: SIGTERM/SIGINT stop taking work, let running jobs finish within
``stop_timeout`` (then abandon them cleanly: they go back to pending), flush, exit 0. The
whole stop is bounded: past ``stop_timeout`` + 10 s the process exits regardless.
SIGHUP reloads the configuration.
"""

from __future__ import annotations

import logging
import os
import signal
import sqlite3
import threading
import time
from pathlib import Path

from vampd.engine.ledger import stat_identity
from vampd.errors import EXIT_BUSY, EXIT_INPUT, EXIT_LEDGER, EXIT_OUTPUT, EXIT_USAGE, StartupError
from vampd.watch.notify import notify, watchdog_interval
from vampd.watch.observer import CompletenessTracker, Watcher

__all__ = ["Daemon"]

log = logging.getLogger(__name__)
_TIMEOUT_CHECK = 2.0  # s between wall-clock set-timeout checks


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
        check_startup(self.config_path, inputs, outdir)
        try:
            self.cfg, self.outdir, self.ledger, self.pool, self.runner = open_engine(self.config_path, outdir, jobs)
        except ValueError as exc:
            busy = "another vampd daemon" in str(exc)
            raise StartupError(str(exc), EXIT_BUSY if busy else EXIT_USAGE) from None
        self.jobs = jobs
        s = self.runner.settings
        roots = [Path(p) for p in (inputs or s["inputs"])]
        self.watcher = Watcher(
            roots,
            s["patterns"],
            s["recursive"],
            poll or s["poll"],
            s["poll_interval"],
            queue_size=16 * s["queue_size"],  # full → dropped events become a rescan
        )
        self.tracker = CompletenessTracker(s["settle_time"], s["complete_timeout"], s["expect_sidecar"])
        self.tick = tick
        self._stop = False
        self._reload = False
        self.started = time.time()
        self._missing_inputs: set[str] = set()
        self._step_errors: dict[str, str] = {}
        self.trigger_thread = None

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
        """Compare the directories with the ledger; track every file not recorded as it is now.

        A file whose identity (size, mtime, inode) matches its row, in whatever state (done,
        pending, waiting for a retry, parked, rejected), is not judged again.
        """
        from vampd.engine.ledger import ledger_key

        known = self.ledger.known_stats()
        n = 0
        for path in self.watcher.scan():
            rec = known.get(ledger_key(path))
            if rec is not None and _same(stat_identity(path), rec):
                continue
            if path not in self.tracker:
                self.tracker.add(path)
                n += 1
        gone = self.ledger.parked_gone()
        if gone:  # a deleted bad file leaves the status
            self.ledger.forget(gone)
        return n

    def _recorded(self, path: str) -> bool:
        """The ledger already holds this file as it is now (a late event for a known file,
        the echo of a read, a repeated event for a rejected file)."""
        row = self.ledger.get(path)
        if row is None:
            return False
        ident = stat_identity(path)
        return ident is None or _same(ident, (row["size"], row["mtime_ns"], row["state"], row["ino"]))

    def status_line(self) -> str:
        c = self.ledger.counts()
        pending = c["pending"] + c["queued"] + c["running"]
        line = (
            f"{c['done']} done, {c['parked']} parked, {c['failed']} to retry, {pending} pending, "
            f"{len(self.tracker)} arriving, {len(self.pool.jobs)} running"
        )
        if self.runner.output_blocked:
            line += "; PAUSED: output blocked"
        if self._missing_inputs:
            line += f"; input missing: {', '.join(sorted(self._missing_inputs))}"
        return line

    def _guard(self, name: str, fn, *args):
        """Run one step of the tick; an exception is logged (once per distinct message) and
        the loop goes on. A ledger that cannot be written pauses intake."""
        try:
            out = fn(*args)
        except sqlite3.OperationalError as exc:
            self.runner.block_output(f"{self.ledger.path}: ledger not writable ({exc})")
            return None
        except Exception as exc:  # noqa: BLE001 -- degrade, don't die
            msg = f"{type(exc).__name__}: {exc}"
            if self._step_errors.get(name) != msg:
                log.exception("%s failed (the daemon goes on): %s", name, msg)
                self._step_errors[name] = msg
            return None
        self._step_errors.pop(name, None)
        return out

    def check_inputs(self) -> None:
        """Alert (once per change) when a watched directory is missing."""
        missing = {r for r in self.watcher.roots if not os.path.isdir(r)}
        for r in sorted(missing - self._missing_inputs):
            log.error("ALERT: input directory %s does not exist (typo? not mounted?)", r)
            self.ledger.event("error", f"input directory missing: {r}")
        for r in sorted(self._missing_inputs - missing):
            log.warning("input directory %s is back", r)
            self.ledger.event("info", f"input directory back: {r}")
        self._missing_inputs = missing

    def _intake(self, now: float) -> None:
        """Events → tracker → completeness verdicts → ledger."""
        runner = self.runner
        for path in self.watcher.drain():
            if path not in self.tracker and not self._recorded(path):
                self.tracker.add(path, now)
        for v in self.tracker.check(now):
            if v.state == "complete":
                runner.offer(v.path, nbytes=v.nbytes, t_complete=v.t_complete)
            elif v.state == "error":
                runner.reject(v.path, v.reason)

    def healthy(self) -> bool:
        return self.watcher.healthy() and self.pool.healthy()

    def _start(self) -> int:
        """Start-up work after the checks: ledger rows, workers, observer, catch-up."""
        from vampd.engine.runner import trigger_work
        from vampd.engine.triggers import TriggerThread

        ledger, runner, watcher = self.ledger, self.runner, self.watcher
        try:
            ledger.daemon_start(os.getpid(), self.config_path, runner.config_hash)
            ledger.event("info", f"daemon started (pid {os.getpid()})")
        except sqlite3.OperationalError as exc:  # a full disk: start paused, not dead
            runner.block_output(f"{ledger.path}: ledger not writable ({exc})")
        self.trigger_thread = TriggerThread(self.outdir, trigger_work)
        self.trigger_thread.start()
        runner.trigger_thread = self.trigger_thread
        self.pool.start()
        watcher.start()
        self._guard("input check", self.check_inputs)
        # files parked after transient errors get one more chance per start (the cause may be gone)
        k = self._guard("retry", ledger.retry_parked, None, ["transient"])
        if k:
            log.info("start-up: %d file(s) parked after transient errors are retried", k)
        n = self._guard("rescan", self.rescan) or 0  # catch up with what is already there
        self._guard("product check", runner.recheck_products)  # products lost with a power cut are redone
        # sets/sequences whose last file was recorded just before a kill (idempotent, in the thread)
        runner.resume_triggers()
        return n

    def run(self) -> int:
        """Run until SIGTERM/SIGINT; returns the exit status (0)."""
        self.install_signals()
        runner, watcher = self.runner, self.watcher
        n = self._start()
        log.info("watching %s → %s; %d file(s) to catch up", ", ".join(watcher.roots), self.outdir, n)
        wd = watchdog_interval()
        notify("READY=1", f"STATUS=started; {self._guard('status', self.status_line)}")
        s = runner.settings
        next_beat = next_probe = paused_since = 0.0
        last_ping = 0.0
        next_reconcile = time.time() + s["reconcile_interval"]
        from vampd.live.alerts import AlertMonitor  # alerts reach the journal as log records

        alerts, next_alerts = AlertMonitor(self.outdir, self.config_path), time.time() + 5.0
        next_timeouts = time.time() + _TIMEOUT_CHECK
        while not self._stop:
            now = time.time()
            if self._reload:
                self._reload = False
                self._guard("reload", self.reload)
                s = runner.settings
            if watcher.take_rescan() or now >= next_reconcile:
                found = (self._guard("rescan", self.rescan) or 0) + (
                    self._guard("product check", runner.recheck_products) or 0
                )
                if found:
                    log.info("rescan: %d file(s) not in the ledger", found)
                if runner.cfg.polarimetry is not None and runner.cfg.polarimetry.method == "leastsq":
                    self.trigger_thread.put(("tick", None, runner.cfg))  # products lagging by time (issue 13)
                next_reconcile = now + s["reconcile_interval"]
            if runner.output_blocked and now >= next_probe:
                next_probe = now + 5.0
                paused_since = paused_since or now
                if self._guard("output probe", runner.probe_output):
                    self.tracker.postpone(now - paused_since)  # the pause is nobody's timeout
                    paused_since = 0.0
            if not runner.output_blocked:
                self._guard("intake", self._intake, now)
            self._guard("collect", runner.collect, 0)
            self._guard("submit", runner.pump)
            if now >= next_beat:
                next_beat = now + 1.0
                last_ping = self._beat(now, wd, last_ping)
            if now >= next_timeouts:
                next_timeouts = now + _TIMEOUT_CHECK
                self._queue_timeouts()
            if now >= next_alerts:
                next_alerts = now + 10.0
                try:
                    alerts.poll(now)
                except Exception as exc:  # alerts are advisory: they never stop the daemon
                    log.debug("alert check failed: %s", exc)
            # sleep, but wake early for finished jobs
            if self._guard("collect", runner.collect, self.tick) is None:
                time.sleep(self.tick)
        return self.shutdown()

    def _queue_timeouts(self) -> None:
        """Queue the wall-clock set-timeout check on the trigger thread (at most one waiting):
        a block or set closes ``polarimetry.set_timeout`` s after its last cube even when no
        further file arrives (:func:`vampd.engine.pdi_trigger.check_timeouts`)."""
        pc = self.runner.cfg.polarimetry
        trig = self.trigger_thread
        if pc is None or pc.method == "leastsq" or trig is None or trig.queue.qsize():
            return
        trig.put(("timeouts", None, self.runner.cfg))

    def _beat(self, now: float, wd: float | None, last_ping: float) -> float:
        """Once a second: retries due, input check, heartbeat, the systemd watchdog ping."""
        self._guard("retries", self.ledger.retry_due, now)
        self._guard("input check", self.check_inputs)
        ok = bool(self._guard("supervise", self.watcher.supervise)) & self.pool.healthy()
        trig = self.trigger_thread
        ok &= trig is None or trig.alive()
        status = self._guard("status", self.status_line) or "status unavailable"
        paused = self.runner.output_blocked is not None
        self._guard("heartbeat", self.ledger.heartbeat, "paused" if paused else "running" if ok else "degraded")
        if ok and (wd is None or now - last_ping >= wd):
            notify("WATCHDOG=1", f"STATUS={status}")
            return now
        if not ok:
            notify(f"STATUS=degraded: {status}")
        return last_ping

    def shutdown(self) -> int:
        """Drain within ``stop_timeout``; a hard deadline 10 s later ends the process anyway."""
        timeout = self.runner.settings["stop_timeout"]
        deadline = time.time() + timeout
        hard = threading.Timer(timeout + 10.0, _hard_exit)
        hard.daemon = True
        hard.start()
        notify("STOPPING=1", "STATUS=draining")
        self.watcher.stop()
        log.info("stopping: waiting up to %g s for %d running job(s)", timeout, len(self.pool.jobs))
        abandoned = self._guard("drain", self.runner.drain, timeout) or []
        if self.trigger_thread is not None:
            self.trigger_thread.stop(max(1.0, deadline - time.time()))
        self._guard("stop record", self.ledger.event, "info", f"daemon stopped ({len(abandoned)} job(s) abandoned)")
        self._guard("stop record", self.ledger.daemon_stop)
        log.info("stopped: %s", self._guard("status", self.status_line))
        self.ledger.close()
        hard.cancel()
        return 0


def _hard_exit() -> None:
    log.error("stop: shutdown exceeded stop_timeout + 10 s; exiting now (interrupted work is redone at start)")
    logging.shutdown()
    os._exit(0)


def _same(ident: tuple | None, rec: tuple) -> bool:
    """A file's ``(size, mtime_ns, inode)`` matches its ledger row ``(size, mtime_ns, state, inode)``."""
    if ident is None or rec[0] is None:
        return False
    size, mtime_ns, _state, ino = rec
    return (ident[0], ident[1]) == (size, mtime_ns) and (ino is None or ident[2] == ino)


def check_startup(config_path: str, inputs, outdir) -> None:
    """Refuse to start, with one line naming the path and the cause and a documented exit
    code (:mod:`vampd.errors`), when the configuration, output directory or ledger is unusable
    or no input directory is configured. A configured input that does not exist is only an
    alert (it may be mounted later)."""
    from vampd.config import load_config
    from vampd.engine.ledger import LEDGER_NAME, Ledger
    from vampd.engine.runner import resolve_outdir, watch_settings

    try:
        cfg = load_config(config_path)
    except (ValueError, OSError) as exc:
        raise StartupError(f"{config_path}: {exc}", EXIT_USAGE) from None
    if not (inputs or watch_settings(cfg)["inputs"]):
        raise StartupError(f"{config_path}: no input directory (give -i DIR or set watch.inputs)", EXIT_INPUT)
    out = resolve_outdir(cfg, config_path, outdir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StartupError(f"{out}: cannot create the output directory ({exc.strerror})", EXIT_OUTPUT) from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise StartupError(f"{out}: output directory not writable by uid {os.geteuid()}", EXIT_OUTPUT)
    try:
        Ledger(out).close()
    except sqlite3.OperationalError as exc:
        if "full" in str(exc):
            raise StartupError(f"{out / LEDGER_NAME}: cannot create the ledger ({exc})", 75) from None
        raise StartupError(f"{out / LEDGER_NAME}: ledger not usable ({exc})", EXIT_OUTPUT) from None
    except (sqlite3.DatabaseError, RuntimeError) as exc:
        raise StartupError(
            f"{out / LEDGER_NAME}: ledger corrupt or from a newer vampd ({exc}); move it aside to start a new one",
            EXIT_LEDGER,
        ) from None

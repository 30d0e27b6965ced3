"""The shared driver of ``vampd run`` and ``vampd watch``.

It takes candidate paths, registers them in the ledger, decides what needs work (new,
changed identity, changed config hash, failed with tries left, a recorded product gone),
feeds the worker pool from the ledger's pending rows and commits results. Only this
process writes the ledger.

Robustness rules (issue "all night, unattended"):

* every error about one file stays with that file: it is recorded (rejected/parked with the
  reason) and the loop goes on;
* errors are classified by vampd's own types (:mod:`vampd.errors`): permanent → parked,
  transient → retried with backoff, output (disk full, read-only) → the file goes back to
  pending *without* a try and intake pauses (:attr:`Runner.output_blocked`);
* a worker death is charged to a file only when that file ran alone; otherwise every job in
  flight is released and becomes a *suspect* that next runs alone;
* a ledger that cannot be written (disk full) keeps finished results in memory
  (:attr:`Runner.held`) until it can.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from collections import deque
from pathlib import Path
from typing import Any

from vampd.engine.ledger import Ledger, ledger_key, printable, stat_identity
from vampd.engine.pool import BLOCK_PREFIX, JobResult, WorkerPool
from vampd.errors import VampdError

# fitsbytes, not fitsio: no numpy or astropy in the parent process of a run without PDI
from vampd.fitsbytes import data_layout, decompressed_bytes, structure_complete

__all__ = ["Runner", "config_hash_of", "resolve_outdir", "watch_settings"]

log = logging.getLogger(__name__)


def watch_settings(cfg: Any) -> dict:
    """The ``[watch]`` section as a dict; the defaults are the config model's
    (:class:`vampd.config.models.WatchConfig`), defined there only."""
    from vampd.config.models import WatchConfig

    w = getattr(cfg, "watch", None)
    if not isinstance(w, WatchConfig):
        w = WatchConfig()
    out = w.model_dump()
    out["memory_limit_gb"] = w.effective_memory_limit_gb()
    return out


def config_hash_of(cfg: Any) -> str:
    """Hash of the settings the per-file products depend on (the chain up to coadd).

    A change of PDI-only or ``[watch]`` settings does not redo the per-file work.
    """
    if hasattr(cfg, "stage_hash"):
        return cfg.stage_hash("coadd")
    return cfg.config_hash()


def resolve_outdir(cfg: Any, config_path: os.PathLike | str, outdir: os.PathLike | str | None) -> Path:
    """``-o`` if given, else ``[watch].outdir``, else the config file's directory."""
    if outdir:
        return Path(outdir).resolve()
    w = watch_settings(cfg)
    if w["outdir"]:
        return Path(w["outdir"]).resolve()
    return Path(config_path).resolve().parent


class Runner:
    """Registers files, schedules pending work on the pool and records the results.

    Parameters
    ----------
    cfg : PipelineConfig
    outdir : path
        Output directory (holds the ledger).
    ledger : Ledger
    pool : WorkerPool
    force : bool
        Redo files even if their products are up to date (batch ``--force``).
    """

    def __init__(self, cfg: Any, outdir: os.PathLike | str, ledger: Ledger, pool: WorkerPool, force: bool = False):
        self.outdir = Path(outdir)
        self.ledger = ledger
        self.pool = pool
        self.force = force
        self.forced: set[str] = set()
        self.n_done = 0
        self.n_failed = 0
        self.latencies: deque[float] = deque(maxlen=10000)  # recent ones (bounded: all night)
        #: files in flight when a worker died: each next runs alone
        self.suspects: set[str] = set()
        #: the output side refused a write (message) → intake paused until it takes one again
        self.output_blocked: str | None = None
        #: finished results the ledger could not take yet (disk full)
        self.held: list[JobResult] = []
        #: set/sequence work runs here when set (the daemon's :class:`TriggerThread`), else inline
        self.trigger_thread = None
        self._startup_done = False
        self.cfg, self.settings, self.config_hash = cfg, watch_settings(cfg), config_hash_of(cfg)
        try:
            self._startup_writes()
        except sqlite3.OperationalError as exc:  # a full disk: start paused, redo them on resume
            self.block_output(f"{ledger.path}: ledger not writable ({exc})")

    def _startup_writes(self) -> None:
        n = self.ledger.reset_interrupted()  # left queued/running by a crash or kill
        if n:
            log.info("resuming %d interrupted file(s)", n)
        self.set_config(self.cfg)
        self._startup_done = True

    def set_config(self, cfg: Any) -> int:
        """Use ``cfg`` from now on; files processed with another config hash are requeued."""
        self.cfg = cfg
        self.settings = watch_settings(cfg)
        self.config_hash = config_hash_of(cfg)
        n = self.ledger.requeue_config(self.config_hash)
        if n:
            log.info("config hash %s: %d file(s) to redo", self.config_hash, n)
            self.ledger.event("info", f"configuration changed: {n} file(s) requeued")
        return n

    # -- intake -------------------------------------------------------------------------------
    def offer(self, path: os.PathLike | str, nbytes: int | None = None, t_complete: float | None = None) -> str:
        """Register a complete file; returns the ledger's decision (see :meth:`Ledger.register`).

        A file that cannot be read (it vanished, became a FIFO, lost its permissions) is
        rejected with the reason (``"rejected"``); nothing about one file raises.
        """
        path = os.path.abspath(path)
        if ledger_key(path) != path:
            from vampd.filenames import NOT_UTF8  # one wording with the watcher

            self.reject(path, NOT_UTF8)
            return "rejected"
        try:
            decision = self.ledger.register(
                path, self.config_hash, nbytes=nbytes, force=self.force, t_complete=t_complete
            )
        except FileNotFoundError:
            return "gone"
        except (OSError, VampdError) as exc:
            self.reject(path, f"cannot read: {exc.strerror if isinstance(exc, OSError) and exc.strerror else exc}")
            return "rejected"
        if self.force and decision in ("forced", "new"):
            self.forced.add(path)
        if decision not in ("done", "parked", "ignored", "pending"):
            log.debug("%s: %s", os.path.basename(path), decision)
        return decision

    def reject(self, path: str, reason: str) -> None:
        """A file that will never be usable as it is (odd path, incomplete after the timeout,
        not FITS): one parked row with its identity, so this version is judged once."""
        path = os.path.abspath(path)
        ident = stat_identity(path)
        self.ledger.record_failure(
            path, f"{printable(path)}: {reason}", max_tries=1, permanent=True, kind="rejected", identity=ident
        )
        self.n_failed += 1
        log.error("%s: %s", printable(os.path.basename(path)), reason)
        self.triggers(ledger_key(path))

    # -- triggers -----------------------------------------------------------------------------
    def triggers(self, path: str) -> None:
        """After a file is recorded (done or parked): HWP sets (PDI) and target sequences (specphot).

        In the daemon they run in the trigger thread (:mod:`vampd.engine.triggers`, its own
        ledger connection), so the main loop never waits on set science; in batch runs, here.
        A trigger failure is logged and recorded as an event; it never undoes or blocks the
        file's own products.
        """
        if self.trigger_thread is not None:
            self.trigger_thread.put(("file", path, self.cfg))
            return
        run_file_triggers(self.ledger, self.cfg, self.outdir, path)

    def recheck_products(self) -> int:
        """Requeue done files whose recorded products are no longer on disk.

        Products are fsynced before their rename but the directory entry is not (for speed),
        so a power cut can lose a product that the ledger already counts as done; a product
        deleted by hand is the same case. Runs at daemon start-up and at each reconciliation.
        Returns how many files were requeued.
        """
        missing = sorted({f for f, product in self.ledger.done_products() if not os.path.exists(product)})
        n = 0
        for path in missing:
            if os.path.exists(path) and self.offer(path) == "missing-product":
                n += 1
        if n:
            log.warning("%d done file(s) lost a product; redoing them", n)
            self.ledger.event("warning", f"{n} done file(s) lost a product: requeued")
        return n

    def resume_triggers(self) -> dict:
        """Start-up: run the set and sequence triggers once over what the ledger already holds.

        A kill between a file's record and its trigger (the 16th file of an HWP cycle recorded,
        its set not yet processed) leaves nothing else to wake them: the file is done and will
        not come back. Both triggers are idempotent (locked set rows, accumulator keys,
        sequence fingerprints), so on a clean ledger this only re-reads it.
        Returns ``{"pdi": summary, "specphot": [...]}``; failures are logged as events.
        """
        if self.trigger_thread is not None:
            self.trigger_thread.put(("resume", None, self.cfg))
            return {}
        return resume_all_triggers(self.ledger, self.cfg, self.outdir)

    # -- scheduling ---------------------------------------------------------------------------
    def _nbytes(self, row) -> int:
        """Memory a job will need: the decompressed image (float32) × ``memory_factor``."""
        nbytes = row["nbytes"]
        if not nbytes:
            try:
                nbytes = decompressed_bytes(data_layout(row["path"]))
            except VampdError:
                nbytes = 0  # the worker will name the problem
        return int(nbytes * self.settings["memory_factor"])

    def pump(self) -> int:
        """Submit pending files while the pool admits them; returns how many were submitted.

        Nothing is submitted while the output side is blocked; a suspect (in flight at a
        worker death) runs alone; a job larger than the whole memory budget is parked.
        """
        n = 0
        free = self.pool.workers - len(self.pool.jobs)
        if free <= 0 or self.output_blocked or any(p in self.suspects for p in self.pool.jobs):
            return 0
        limit = self.pool.memory_limit
        for row in self.ledger.next_pending(free, exclude=self.pool.jobs):
            path = row["path"]
            if not os.path.exists(path):
                # no identity kept: the file coming back (same content or not) is judged anew
                self.ledger.record_failure(
                    path,
                    f"{printable(path)}: file vanished before processing",
                    1,
                    permanent=True,
                    kind="rejected",
                    identity=(None, None, None),
                )
                continue
            nbytes = self._nbytes(row)
            if nbytes > limit:
                self.ledger.record_failure(
                    path,
                    f"{printable(path)}: needs {nbytes / 1024**3:.2f} GB (decompressed image x memory_factor), "
                    f"over the memory limit of {limit / 1024**3:.2f} GB ([watch].memory_limit_gb)",
                    1,
                    permanent=True,
                    kind="memory",
                )
                log.error("parked %s: over the memory limit", printable(os.path.basename(path)))
                continue
            if path in self.suspects and self.pool.jobs:
                break  # a suspect waits until it can run alone
            if not self.pool.admissible(nbytes):
                break  # keep arrival order: wait for memory rather than skipping ahead
            self.ledger.mark_running(path)
            # products recorded under another config hash are stale even if newer than the input
            force = self.force or path in self.forced or (row["config_hash"] or self.config_hash) != self.config_hash
            self.pool.submit(path, nbytes, self.cfg, self.outdir, force=force)
            n += 1
            if path in self.suspects:
                break
        return n + self._pump_blocks()

    def _pump_blocks(self) -> int:
        """Closed HWP blocks (``combine.method = "pdi"``) are coadded as pool jobs too."""
        if getattr(self.cfg, "polarimetry", None) is None:  # no blocks (nor their imports)
            return 0
        from vampd.engine.blocks import pump_blocks

        try:
            return pump_blocks(self)
        except Exception as exc:  # noqa: BLE001 -- reported, the daemon goes on
            log.exception("HWP block scheduling failed")
            self.ledger.event("error", f"HWP block scheduling failed: {exc}")
            return 0

    def collect(self, timeout: float = 0.0, refill: bool = False) -> int:
        """Record finished jobs; returns how many were recorded.

        Results the ledger cannot take now (disk full) are held and recorded by a later call.
        With ``refill`` (batch runs), the freed workers get their next files before the results
        are recorded, so no worker waits on a commit (see :meth:`_refill`).
        """
        results = self.held + self.pool.collect(timeout)
        self.held = []
        if refill:
            self._refill(results)
        for i, r in enumerate(results):
            try:
                self.record(r)
            except sqlite3.OperationalError as exc:  # full disk, I/O error: keep the rest for later
                self.held = results[i:]
                self.block_output(f"{self.ledger.path}: ledger not writable ({exc})")
                break
        return len(results) - len(self.held)

    def _refill(self, results: list[JobResult]) -> None:
        # only after input files that finished well: a failure may block the output side or
        # make a suspect, and a finished block must be recorded before blocks are pumped again
        # (its row still says running); the next pending file does not depend on these records
        if not results or self.output_blocked or not all(r.ok and not r.path.startswith(BLOCK_PREFIX) for r in results):
            return
        try:
            self.pump()
        except sqlite3.OperationalError as exc:  # the results are recorded (or held) below
            self.block_output(f"{self.ledger.path}: ledger not writable ({exc})")
        except KeyboardInterrupt:  # Ctrl-C: the drain records only what is still in the pool
            for r in results:
                self.record(r)
            raise

    def block_output(self, why: str) -> None:
        """Pause intake: the output side refused a write."""
        if self.output_blocked is None:
            log.error("output blocked, intake paused: %s", why)
        self.output_blocked = why

    def record(self, r: JobResult) -> None:
        if r.path.startswith(BLOCK_PREFIX):  # an HWP block coadd, not an input file
            from vampd.engine.blocks import record_block

            record_block(self, r)
            return
        name = printable(os.path.basename(r.path))
        if r.ok:
            try:
                latency = self.ledger.record_done(r.path, r.products, r.summary, r.metrics, self.config_hash)
            except FileNotFoundError as exc:
                r = JobResult(r.path, False, error=f"{r.path}: a product was not written ({exc.filename})")
            else:
                self.forced.discard(r.path)
                self.suspects.discard(r.path)
                self.n_done += 1
                self.latencies.append(latency)
                m = r.metrics or {}
                extra = " ".join(f"{k}={m[k]:.3g}" for k in ("strehl", "fwhm") if isinstance(m.get(k), (int, float)))
                log.info("done %s in %.2f s (latency %.2f s) %s", name, r.elapsed, latency, extra)
                self.triggers(r.path)
                return
        if r.kind == "output":  # not the file's fault: no try charged, intake pauses
            self.ledger.release(r.path)
            self.block_output(r.error)
            return
        if r.kind == "crash" and r.in_flight > 1 and r.path not in self.suspects:
            self.ledger.release(r.path)  # cannot tell whose fault: it runs alone next
            self.suspects.add(r.path)
            log.warning("%s was running when a worker died; it will run alone", name)
            return
        state = self.ledger.record_failure(
            r.path,
            r.error,
            self.settings["max_tries"],
            permanent=r.permanent,
            kind="permanent" if r.permanent else "transient",
        )
        self.suspects.discard(r.path)
        self.n_failed += state == "parked"
        (log.error if state == "parked" else log.warning)("%s %s: %s", state, name, printable(r.error))
        if state == "parked":
            self.triggers(r.path)

    def probe_output(self) -> bool:
        """While blocked: can the output directory (and ledger) take a write again? Clears the
        block and returns True if so."""
        if self.output_blocked is None:
            return True
        probe = self.outdir / f".vampd-probe-{os.getpid()}"
        try:
            with open(probe, "wb") as fh:
                fh.write(b"\0" * 65536)
                fh.flush()
                os.fsync(fh.fileno())
            probe.unlink()
            self.ledger.retry_due(0.0)  # a tiny write transaction: the ledger takes writes too
            if not self._startup_done:
                self._startup_writes()
        except (OSError, sqlite3.OperationalError):
            try:
                probe.unlink(missing_ok=True)
            except OSError:
                pass
            return False
        log.warning("output writable again: intake resumed (was: %s)", self.output_blocked)
        self.output_blocked = None
        try:
            self.ledger.event("info", "output writable again: intake resumed")
        except sqlite3.OperationalError:
            pass
        return True

    @property
    def in_flight(self) -> int:
        return len(self.pool.jobs)

    def idle(self) -> bool:
        """Nothing running, nothing pending in the ledger, no set work queued."""
        busy = self.trigger_thread is not None and self.trigger_thread.pending
        return not self.pool.jobs and not self.ledger.next_pending(1) and not busy

    # -- batch --------------------------------------------------------------------------------
    def run_batch(self, paths: list[str], poll: float = 0.2) -> dict:
        """Register ``paths``, process what needs it, wait until all is recorded.

        Incomplete files are rejected at once (nothing will complete them in batch mode).
        """
        t0 = time.time()
        self.resume_triggers()  # a previous run killed between a record and its set
        decisions: dict[str, str] = {}
        # one arrival time for the whole batch: HWP blocks and sets wait for all of it, so the
        # same files in any order give the same sets and products (issue 11 item 4)
        t_batch = time.time()
        for p in paths:
            p = os.path.abspath(p)
            ok, reason = structure_complete(p)
            if not ok:
                self.reject(p, reason)
                decisions[p] = "rejected"
                continue
            decisions[p] = self.offer(p, t_complete=t_batch)
        todo = sum(d not in ("done", "parked", "ignored", "gone", "rejected") for d in decisions.values())
        log.info("run: %d file(s) given, %d to process", len(paths), todo)
        while True:
            self.pump()
            if not self.pool.jobs:
                if self.output_blocked:  # nothing more can be written: report, keep them pending
                    log.error(
                        "run: output blocked, %d file(s) left pending: %s",
                        len(self.ledger.next_pending(10**6)),
                        self.output_blocked,
                    )
                    break
                if self.ledger.next_pending(1):
                    continue
                if self._end_of_batch() and self.pump():  # block coadds submitted: wait for them
                    continue
                break
            self.collect(timeout=poll, refill=True)
        if getattr(self.cfg, "polarimetry", None) is not None:  # else no least squares (nor its imports)
            from vampd.engine import leastsq_trigger

            leastsq_trigger.tick(self.ledger, self.cfg, self.outdir, idle=True)  # least-squares products up to date
        return {
            "given": len(paths),
            "processed": todo,
            "done": self.n_done,
            "failed": self.n_failed,
            "seconds": time.time() - t0,
        }

    def _end_of_batch(self) -> bool:
        """End of ``vampd run``: close the open HWP blocks; True if block coadds are left to run."""
        if getattr(self.cfg, "polarimetry", None) is None:  # no blocks (nor their imports)
            return False
        from vampd.engine.blocks import end_of_batch

        try:
            return end_of_batch(self)
        except Exception as exc:  # noqa: BLE001 -- reported, the run still ends
            log.exception("closing the HWP blocks failed")
            self.ledger.event("error", f"closing the HWP blocks failed: {exc}")
            return False

    def drain(self, timeout: float) -> list[str]:
        """Stop: wait up to ``timeout`` s for running jobs, record them, release the rest."""
        results, abandoned = self.pool.shutdown(timeout)
        for r in results:
            self.record(r)
        for p in abandoned:
            self.ledger.release(p)
        if abandoned:
            log.warning("stop: abandoned %d running file(s); they will be redone", len(abandoned))
        return abandoned


def run_file_triggers(ledger: Ledger, cfg: Any, outdir: os.PathLike | str, path: str) -> None:
    """The PDI and specphot hooks after one file was recorded (done or parked)."""
    from vampd.engine import specphot_trigger

    hooks = [("specphot", specphot_trigger.on_file_done)]
    if cfg.polarimetry is not None or cfg.diff_images.make_diff:  # else no PDI work (nor its imports)
        from vampd.engine import pdi_trigger

        hooks.insert(0, ("pdi", pdi_trigger.on_file_done))
    name = printable(os.path.basename(path))
    for what, hook in hooks:
        try:
            hook(ledger, cfg, Path(outdir), path)
        except Exception as exc:  # noqa: BLE001 -- reported, the daemon goes on
            log.exception("%s trigger failed after %s", what, name)
            ledger.event("error", f"{what} trigger failed after {name}: {exc}")


def resume_all_triggers(ledger: Ledger, cfg: Any, outdir: os.PathLike | str) -> dict:
    """Start-up pass of both triggers over what the ledger already holds (see
    :meth:`Runner.resume_triggers`)."""
    from vampd.engine import specphot_trigger

    outdir = Path(outdir)
    out: dict = {}
    if getattr(cfg, "polarimetry", None) is not None:  # else no PDI work (nor its imports)
        from vampd.engine import pdi_trigger

        try:
            out["pdi"] = pdi_trigger.update_sets(ledger, cfg, outdir, final=False)
        except Exception as exc:  # noqa: BLE001 -- reported, the daemon goes on
            log.exception("pdi trigger failed at start-up")
            ledger.event("error", f"pdi trigger failed at start-up: {exc}")
    if specphot_trigger.specphot_enabled(cfg):
        out["specphot"] = []
        # the latest done file of each camera stands for its camera's sequences
        for cam, path in ledger.latest_done_per_camera():
            try:
                out["specphot"].extend(specphot_trigger.on_file_done(ledger, cfg, outdir, path))
            except Exception as exc:  # noqa: BLE001
                log.exception("specphot trigger failed at start-up (camera %s)", cam)
                ledger.event("error", f"specphot trigger failed at start-up (camera {cam}): {exc}")
    return out


def trigger_work(ledger: Ledger, item: tuple) -> None:
    """The :class:`~vampd.engine.triggers.TriggerThread` work function: ``(what, path, cfg)``."""
    what, path, cfg = item
    outdir = ledger.outdir
    if what == "resume":
        resume_all_triggers(ledger, cfg, outdir)
    elif what == "tick":  # time-based refresh of the least-squares products (issue 13)
        from vampd.engine import leastsq_trigger

        leastsq_trigger.tick(ledger, cfg, outdir)
    elif what in ("timeouts", "sets"):  # wall-clock set timeout (issue 12); sets after an HWP block
        from vampd.engine import pdi_trigger

        if what == "timeouts":
            pdi_trigger.check_timeouts(ledger, cfg, outdir)
        else:
            pdi_trigger.update_sets(ledger, cfg, outdir)
    else:
        run_file_triggers(ledger, cfg, outdir, path)

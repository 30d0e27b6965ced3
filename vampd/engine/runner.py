"""The shared driver of ``vampd run`` and ``vampd watch``.

It takes candidate paths, registers them in the ledger, decides what needs work (new,
changed identity, changed config hash, failed with tries left, a recorded product gone),
feeds the worker pool from the ledger's pending rows and commits results. Only this
process writes the ledger.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from vampd.engine.ledger import Ledger
from vampd.engine.pool import JobResult, WorkerPool, estimate_bytes
from vampd.fitsio import fits_structure_complete

__all__ = ["Runner", "config_hash_of", "resolve_outdir", "watch_settings"]

log = logging.getLogger(__name__)

_WATCH_DEFAULTS = {
    "inputs": [], "outdir": None, "patterns": ["*.fits", "*.fits.fz"], "recursive": False, "poll": False,
    "poll_interval": 2.0, "complete_timeout": 120.0, "settle_time": 0.5, "workers": 2,
    "expect_sidecar": False, "max_tries": 3, "memory_factor": 6.0, "memory_limit_gb": None,
    "queue_size": 64, "reconcile_interval": 30.0, "stop_timeout": 60.0,
}


def watch_settings(cfg: Any) -> dict:
    """The ``[watch]`` section as a dict (defaults for anything missing)."""
    w = getattr(cfg, "watch", None)
    out = dict(_WATCH_DEFAULTS)
    for key in out:
        if w is not None and hasattr(w, key):
            out[key] = getattr(w, key)
    if w is not None and hasattr(w, "effective_memory_limit_gb"):
        out["memory_limit_gb"] = w.effective_memory_limit_gb()
    elif out["memory_limit_gb"] is None:
        out["memory_limit_gb"] = 0.5 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
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
        self.latencies: list[float] = []
        n = ledger.reset_interrupted()  # left queued/running by a crash or kill
        if n:
            log.info("resuming %d interrupted file(s)", n)
        self.set_config(cfg)

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
        """Register a complete file; returns the ledger's decision (see :meth:`Ledger.register`)."""
        path = os.path.abspath(path)
        try:
            decision = self.ledger.register(
                path, self.config_hash, nbytes=nbytes, force=self.force, t_complete=t_complete
            )
        except FileNotFoundError:
            return "gone"
        if self.force and decision in ("forced", "new"):
            self.forced.add(path)
        if decision not in ("done", "parked", "ignored", "pending"):
            log.debug("%s: %s", os.path.basename(path), decision)
        return decision

    def reject(self, path: str, reason: str) -> None:
        """A file that will never be usable (incomplete after the timeout, not FITS)."""
        path = os.path.abspath(path)
        self.ledger.record_failure(path, f"{path}: {reason}", max_tries=1, permanent=True)
        self.n_failed += 1
        log.error("%s: %s", os.path.basename(path), reason)
        self.triggers(path)

    # -- triggers -----------------------------------------------------------------------------
    def triggers(self, path: str) -> None:
        """After a file is recorded (done or parked): HWP sets (PDI) and target sequences (specphot).

        Runs in this (the ledger-owning) process. A trigger failure is logged and recorded as an
        event; it never undoes or blocks the file's own products.
        """
        from vampd.engine import specphot_trigger

        hooks = [("specphot", specphot_trigger.on_file_done)]
        if self.cfg.polarimetry is not None or self.cfg.diff_images.make_diff:  # else no PDI work (nor imports)
            from vampd.engine import pdi_trigger

            hooks.insert(0, ("pdi", pdi_trigger.on_file_done))
        for name, hook in hooks:
            try:
                hook(self.ledger, self.cfg, self.outdir, path)
            except Exception as exc:  # noqa: BLE001 -- reported, the daemon goes on
                log.exception("%s trigger failed after %s", name, os.path.basename(path))
                self.ledger.event("error", f"{name} trigger failed after {os.path.basename(path)}: {exc}")

    def recheck_products(self) -> int:
        """Requeue done files whose recorded products are no longer on disk.

        Products are fsynced before their rename but the directory entry is not (for speed),
        so a power cut can lose a product that the ledger already counts as done; a product
        deleted by hand is the same case. Runs at daemon start-up and at each reconciliation.
        Returns how many files were requeued.
        """
        rows = self.ledger.conn.execute(
            "SELECT f.path AS path, p.path AS product FROM files f JOIN products p ON p.file = f.path"
            " WHERE f.state = 'done'"
        ).fetchall()
        missing = sorted({r["path"] for r in rows if not os.path.exists(r["product"])})
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
        from vampd.engine import specphot_trigger

        out: dict = {}
        if getattr(self.cfg, "polarimetry", None) is not None:
            from vampd.engine import pdi_trigger

            try:
                out["pdi"] = pdi_trigger.update_sets(self.ledger, self.cfg, self.outdir, final=False)
            except Exception as exc:  # noqa: BLE001 -- reported, the daemon goes on
                log.exception("pdi trigger failed at start-up")
                self.ledger.event("error", f"pdi trigger failed at start-up: {exc}")
        if specphot_trigger.specphot_enabled(self.cfg):
            out["specphot"] = []
            # the latest done file of each camera stands for its camera's sequences
            last = self.ledger.conn.execute(
                "SELECT camera, path FROM files f WHERE state='done' AND camera IS NOT NULL AND t_done ="
                " (SELECT MAX(t_done) FROM files g WHERE g.state='done' AND g.camera=f.camera)"
            ).fetchall()
            for cam, path in last:
                try:
                    out["specphot"].extend(specphot_trigger.on_file_done(self.ledger, self.cfg, self.outdir, path))
                except Exception as exc:  # noqa: BLE001
                    log.exception("specphot trigger failed at start-up (camera %s)", cam)
                    self.ledger.event("error", f"specphot trigger failed at start-up (camera {cam}): {exc}")
        return out

    # -- scheduling ---------------------------------------------------------------------------
    def _nbytes(self, row) -> int:
        if row["nbytes"]:
            return int(row["nbytes"] * self.settings["memory_factor"])
        from vampd.watch.observer import header_ints

        try:
            k = header_ints(row["path"])
        except OSError:
            return 0
        return estimate_bytes(k.get("NAXIS1", 0), k.get("NAXIS2", 0), k.get("NAXIS3", 1), self.settings["memory_factor"])

    def pump(self) -> int:
        """Submit pending files while the pool admits them; returns how many were submitted."""
        n = 0
        free = self.pool.workers - len(self.pool.jobs)
        if free <= 0:
            return 0
        for row in self.ledger.next_pending(free, exclude=self.pool.jobs):
            path = row["path"]
            if not os.path.exists(path):
                self.ledger.record_failure(path, f"{path}: file vanished before processing", 1, permanent=True)
                continue
            nbytes = self._nbytes(row)
            if not self.pool.admissible(nbytes):
                break  # keep arrival order: wait for memory rather than skipping ahead
            self.ledger.mark_running(path)
            # products recorded under another config hash are stale even if newer than the input
            force = self.force or path in self.forced or (row["config_hash"] or self.config_hash) != self.config_hash
            self.pool.submit(path, nbytes, self.cfg, self.outdir, force=force)
            n += 1
        return n + self._pump_blocks()

    def _pump_blocks(self) -> int:
        """Closed HWP blocks (``combine.method = "pdi"``) are coadded as pool jobs too."""
        from vampd.engine.blocks import pump_blocks

        try:
            return pump_blocks(self)
        except Exception as exc:  # noqa: BLE001 -- reported, the daemon goes on
            log.exception("HWP block scheduling failed")
            self.ledger.event("error", f"HWP block scheduling failed: {exc}")
            return 0

    def collect(self, timeout: float = 0.0) -> int:
        """Record finished jobs; returns how many were recorded."""
        results = self.pool.collect(timeout)
        for r in results:
            self.record(r)
        return len(results)

    def record(self, r: JobResult) -> None:
        from vampd.engine.blocks import BLOCK_PREFIX, record_block

        if r.path.startswith(BLOCK_PREFIX):  # an HWP block coadd, not an input file
            record_block(self, r)
            return
        name = os.path.basename(r.path)
        if r.ok:
            try:
                latency = self.ledger.record_done(r.path, r.products, r.summary, r.metrics, self.config_hash)
            except FileNotFoundError as exc:
                r = JobResult(r.path, False, error=f"{r.path}: a product was not written ({exc.filename})")
            else:
                self.forced.discard(r.path)
                self.n_done += 1
                self.latencies.append(latency)
                m = r.metrics or {}
                extra = " ".join(f"{k}={m[k]:.3g}" for k in ("strehl", "fwhm") if isinstance(m.get(k), (int, float)))
                log.info("done %s in %.2f s (latency %.2f s) %s", name, r.elapsed, latency, extra)
                self.triggers(r.path)
                return
        state = self.ledger.record_failure(r.path, r.error, self.settings["max_tries"], permanent=r.permanent)
        self.n_failed += state == "parked"
        (log.error if state == "parked" else log.warning)("%s %s: %s", state, name, r.error)
        if state == "parked":
            self.triggers(r.path)

    @property
    def in_flight(self) -> int:
        return len(self.pool.jobs)

    def idle(self) -> bool:
        """Nothing running and nothing pending in the ledger."""
        return not self.pool.jobs and not self.ledger.next_pending(1)

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
            ok, reason = fits_structure_complete(p)
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
                if self.ledger.next_pending(1):
                    continue
                if self._end_of_batch() and self.pump():  # block coadds submitted: wait for them
                    continue
                break
            self.collect(timeout=poll)
        from vampd.engine import leastsq_trigger

        leastsq_trigger.tick(self.ledger, self.cfg, self.outdir, idle=True)  # least-squares products up to date
        return {"given": len(paths), "processed": todo, "done": self.n_done, "failed": self.n_failed,
                "seconds": time.time() - t0}

    def _end_of_batch(self) -> bool:
        """End of ``vampd run``: close the open HWP blocks; True if block coadds are left to run."""
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

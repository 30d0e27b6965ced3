"""``vampd reprocess``: archived nights through the engine, per-file work on Dask workers.

One output directory and one ledger per night (``OUTROOT/<night>``). For each night a
:class:`~vampd.engine.runner.Runner` — the one ``vampd run`` uses — registers the raw files
(identity, config hash, missing products: the ledger's own decisions), pumps pending files to
its :class:`~vampd.cluster.executor.NightPool` and records the results; HWP sets and target
sequences are triggered on the client as their members are recorded. A night whose files are
all recorded is finalized (``vampd finalize``'s flush, products and report) while the others go
on. The client process is the only writer of every ledger.

A rerun after anything (killed worker, lost node, killed client) re-registers the files: done
ones with their products on disk are skipped, interrupted ones (left ``running``) are redone.
"""

from __future__ import annotations

import logging
import os
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vampd.engine.ledger import Ledger, daemon_alive
from vampd.engine.runner import Runner, config_hash_of, watch_settings
from vampd.fitsio import fits_structure_complete

__all__ = ["Night", "check_labels", "night_label", "night_inputs", "open_nights", "reprocess"]

log = logging.getLogger(__name__)

HEARTBEAT_S = 2.0


@dataclass
class Night:
    """One night being reprocessed: its inputs, ledger, runner and counters."""

    label: str
    raw_dir: Path
    outdir: Path
    paths: list[str]
    ledger: Ledger
    pool: Any
    runner: Runner
    todo: int = 0
    finalized: bool = False
    #: raw files registered in the ledger (nights are taken in one by one while workers run)
    ingested: bool = False
    #: why the night stopped unfinished (its output side refused writes), else None
    stopped: str | None = None
    final: dict = field(default_factory=dict)
    counts: dict = field(default_factory=dict)
    sets: dict = field(default_factory=dict)
    t_start: float = field(default_factory=time.time)
    t_end: float | None = None

    @property
    def closed(self) -> bool:
        return self.finalized or self.stopped is not None

    def busy(self) -> bool:
        return bool(self.pool.jobs) or bool(self.ledger.next_pending(1))

    def update_counts(self) -> None:
        """File states and set states from the ledger (for the display and the summary)."""
        self.counts = self.ledger.counts()
        self.sets = self.ledger.set_counts()


def night_label(night_dir: os.PathLike | str) -> str:
    """Output sub-directory name of a night: the directory's name (its parent's for ``raw``)."""
    p = Path(night_dir).resolve()
    return p.parent.name if p.name.lower() == "raw" and p.parent.name else p.name


def check_labels(night_dirs: list[str]) -> list[str]:
    """The nights' output names; ``ValueError`` if two nights would share one."""
    labels = [night_label(d) for d in night_dirs]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise ValueError(f"several night directories map to the same output name {dup}: give distinct names")
    return labels


def night_inputs(night_dir: os.PathLike | str, cfg: Any) -> list[str]:
    """Regular files matching ``[watch].patterns`` in ``night_dir`` (recursive if configured), sorted."""
    w = watch_settings(cfg)
    root = Path(night_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: night directory does not exist")
    found: set[str] = set()
    for pat in w["patterns"]:
        for p in root.rglob(pat) if w["recursive"] else root.glob(pat):
            try:
                if stat.S_ISREG(p.stat().st_mode):  # FIFOs, sockets and directories are not raw files
                    found.add(str(p.resolve()))
            except OSError:
                continue
    return sorted(found)


def open_nights(
    cfg: Any, config_path: str, night_dirs: list[str], outroot: Path, shared, force: bool = False
) -> list[Night]:
    """A ledger, a night pool and a runner per night (refusing a ledger a live daemon owns)."""
    labels = check_labels(night_dirs)
    nights: list[Night] = []
    for d, label in zip(night_dirs, labels, strict=True):
        paths = night_inputs(d, cfg)
        outdir = (outroot / label).resolve()
        ledger = Ledger(outdir)
        info = ledger.daemon_info()
        if info is not None and info["pid"] != os.getpid() and daemon_alive(info):
            ledger.close()
            for n in nights:
                n.ledger.close()
            raise ValueError(f"another vampd process (pid {info['pid']}) owns {ledger.path}; stop it first")
        ledger.daemon_start(os.getpid(), str(config_path), config_hash_of(cfg))
        pool = shared.night(label)
        runner = Runner(cfg, outdir, ledger, pool, force=force)
        pool.config_hash = runner.config_hash
        nights.append(Night(label, Path(d).resolve(), outdir, paths, ledger, pool, runner))
    return nights


def _intake(night: Night) -> None:
    """Sets/sequences left by a killed run, then register every raw file (ledger decisions)."""
    r = night.runner
    r.resume_triggers()
    todo = 0
    beat = time.time()
    for p in night.paths:
        if time.time() - beat > HEARTBEAT_S:  # hashing thousands of files takes a while
            night.ledger.heartbeat("starting")
            beat = time.time()
        ok, reason = fits_structure_complete(p)
        if not ok:
            r.reject(p, reason)
            continue
        todo += r.offer(p) not in ("done", "parked", "ignored", "gone")
    night.todo = todo
    night.ingested = True
    night.ledger.heartbeat("running")
    log.info("%s: %d file(s), %d to process -> %s", night.label, len(night.paths), todo, night.outdir)


def _close_night(night: Night, cfg: Any, config_path: str, finalize: bool) -> None:
    """Retry transient failures once more, else finalize the night and release its ledger."""
    if night.ledger.retry_failed():  # a lost worker's file, tries left: in this run, not the next
        return
    if finalize:
        from vampd.finalize.commands import finalize as finalize_night

        night.ledger.heartbeat("finalizing")
        try:
            night.final = finalize_night(cfg, config_path, night.outdir)
        except Exception as exc:  # noqa: BLE001 -- one night's finalize must not stop the others
            log.exception("%s: finalize failed", night.label)
            night.ledger.event("error", f"finalize failed: {exc}")
            night.final = {"error": str(exc)}
    night.ledger.daemon_stop()
    night.update_counts()
    night.finalized = True
    night.t_end = time.time()


def _output_stuck(night: Night) -> bool:
    """The runner paused this night's intake (disk full, read-only output: engines that have
    ``output_blocked``) and, with nothing left running, its output still refuses a write."""
    blocked = getattr(night.runner, "output_blocked", None)
    if not blocked or night.pool.jobs or night.runner.probe_output():
        return False
    log.error("%s: output blocked, files left pending for the next run: %s", night.label, blocked)
    night.ledger.event("error", f"reprocess stopped: output blocked: {blocked}")
    night.ledger.daemon_stop()
    night.update_counts()
    night.stopped = str(blocked)
    night.t_end = time.time()
    return True


def reprocess(
    cfg: Any,
    config_path: str,
    night_dirs: list[str],
    outroot: Path,
    shared,
    *,
    force: bool = False,
    finalize: bool = True,
    poll: float = 0.2,
    progress=None,
) -> list[Night]:
    """Reprocess ``night_dirs`` on the cluster behind ``shared`` (a :class:`ClusterPool`).

    ``progress(nights)`` is called after every scheduling round (display). Returns the nights,
    closed (ledgers released, daemon rows stopped).
    """
    nights = open_nights(cfg, config_path, night_dirs, Path(outroot), shared, force=force)
    try:
        last_beat = time.time()
        while not all(n.closed for n in nights):
            shared.maybe_refresh()
            waiting = [n for n in nights if not n.ingested]
            if waiting:  # one night per round: the first night's files run while the next are hashed
                _intake(waiting[0])
            for n in nights:
                if n.ingested and not n.closed and not _output_stuck(n):
                    n.runner.pump()
            shared.wait(poll)
            for n in nights:
                if n.pool.jobs:
                    n.runner.collect(0)
            for n in nights:
                if n.ingested and not n.closed and not n.busy():
                    _close_night(n, cfg, config_path, finalize)
            if time.time() - last_beat > HEARTBEAT_S:
                for n in nights:
                    if not n.closed:
                        n.ledger.heartbeat("running")
                last_beat = time.time()
            if progress is not None:
                progress(nights)
    finally:
        for n in nights:
            if not n.closed:  # interrupted: leave the rows for the next run, release the ledger
                _res, abandoned = n.pool.shutdown(0)
                for p in abandoned:
                    n.ledger.release(p)
                n.ledger.daemon_stop()
            n.update_counts()
            n.ledger.close()
    return nights

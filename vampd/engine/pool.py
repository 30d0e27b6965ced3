"""A bounded pool of worker processes with memory admission.

* workers are forks of a *fork server* (a fresh interpreter started by the pool, never a fork
  of the parent: no forked SQLite handles or threads) that has imported the worker module
  once, so a worker starts without an interpreter start-up and imports of its own and exits at
  once (``spawn`` where there is no fork server); one BLAS thread per worker (set in the
  environment before the server starts *and* in the worker initializer), the parent's
  environment at pool start replayed in each worker;
* a job is admitted only while the summed memory estimate of the running jobs stays under
  the limit (a single job larger than the limit still runs, alone);
* at most ``workers`` jobs are in flight: the queue of work is the ledger, not RAM;
* workers never touch the ledger: a job returns a plain dict, the parent commits it;
* a worker that notices its parent died exits (no orphan keeps writing after a SIGKILL);
* warm start: every worker is started when the pool starts (from a thread: the caller scans
  its inputs meanwhile) and runs the pipeline's ``warm_up`` in its initializer, so the night's
  first files do not wait for start-up work; :func:`prestart` starts the fork server earlier
  still, before the parent's own imports.
"""

from __future__ import annotations

import concurrent.futures as cf
import importlib
import logging
import multiprocessing
import os
import threading
import time
import traceback
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "DEFAULT_PROCESS",
    "BLAS_ENV",
    "JobResult",
    "WorkerPool",
    "prestart",
    "run_job",
    "stop_fork_server",
    "estimate_bytes",
]

log = logging.getLogger(__name__)

DEFAULT_PROCESS = "vampd.engine.pipeline:process_file"
#: job key prefix of the HWP block coadds (:mod:`vampd.engine.blocks`), the pool's non-file jobs
BLOCK_PREFIX = "block:"
BLAS_ENV = (
    "OPENBLAS_NUM_THREADS",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "NUMEXPR_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "BLIS_NUM_THREADS",
)


def estimate_bytes(naxis1: int, naxis2: int, naxis3: int, factor: float) -> int:
    """Memory reserved for one job: the cube as float32 times ``factor``."""
    return int(naxis1 * naxis2 * max(naxis3, 1) * 4 * factor)


def _single_thread_env() -> None:
    for key in BLAS_ENV:
        os.environ[key] = "1"


def _watch_parent(ppid: int | None) -> None:
    # a fork server's worker is the server's child: the parent's death shows on the sentinel
    # pipe multiprocessing keeps to it (the server itself lives on while any worker does)
    parent = multiprocessing.parent_process()
    while True:
        time.sleep(0.5)
        if (ppid is not None and os.getppid() != ppid) or (parent is not None and not parent.is_alive()):
            os._exit(70)  # parent gone: abandon the job, the restarted daemon redoes it


def _worker_init(ppid: int, process: str | None = None, env: dict | None = None) -> None:
    import signal

    if env is not None and env != os.environ:  # a fork server's environment is from its start
        os.environ.clear()
        os.environ.update(env)
    _single_thread_env()
    from vampd.logs import setup_worker_logging

    setup_worker_logging(logging.WARNING)  # "LEVEL logger [worker pid]: message" lines
    # Ctrl-C and a terminal hang-up are for the parent, which decides when workers stop
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    watch_ppid = ppid if os.getppid() == ppid else None  # else a fork server's child
    threading.Thread(target=_watch_parent, args=(watch_ppid,), daemon=True, name="vampd-parent-watch").start()
    if process:
        # warm start: pay the imports (numpy, astropy, scipy, the stages) now, not on the
        # night's first file; nothing file- or config-specific is computed here
        try:
            warm = getattr(importlib.import_module(_resolve(process).__module__), "warm_up", None)
            if callable(warm):  # e.g. pipeline.warm_up: IERS table and astropy config, once
                warm()
        except Exception as exc:  # noqa: BLE001 -- the first real job reports it specifically
            log.warning("worker warm-up: cannot import %s: %s", process, exc)


def _context(process: str):
    """The workers' start method: a fork server that imports ``process``'s module once, else spawn."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    # one server per parent process: the first pool's module stays the preloaded one
    ctx.set_forkserver_preload([process.partition(":")[0]])
    return ctx


def prestart(process: str = DEFAULT_PROCESS) -> None:
    """Start the workers' fork server now, importing ``process``'s module in the background.

    ``vampd run`` calls it first thing, so the server's imports overlap the parent's own
    (config, ledger) instead of following them; the pool started later forks its workers from
    it. Returns at once; a no-op where workers are spawned.
    """
    _single_thread_env()  # inherited by the server before numpy loads
    if _context(process).get_start_method() == "forkserver":
        _start_server()


def _start_server() -> None:
    import signal
    from multiprocessing import forkserver

    # the server inherits ignored SIGHUP and SIGINT (it ignores Ctrl-C itself only once its
    # imports are done): a terminal's hang-up (the daemon's reload signal) or Ctrl-C is for the
    # parent, which decides when workers stop; handlers can only be set in the main thread
    sigs = (signal.SIGHUP, signal.SIGINT) if threading.current_thread() is threading.main_thread() else ()
    old = {sig: signal.signal(sig, signal.SIG_IGN) for sig in sigs}
    try:
        forkserver.ensure_running()
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


#: started pools whose workers are forks of the fork server
_server_pools = [0]


def _server_users(delta: int) -> None:
    _server_pools[0] += delta


def stop_fork_server() -> None:
    """Stop the fork server if one runs and no started pool uses it.

    It holds no state, so SIGTERM ends it at once; reaping it here puts its CPU time and its
    workers' (which it reaped) in this process's children's usage, and leaves no process
    behind the command. The next pool starts a new one.
    """
    import signal
    from multiprocessing import forkserver

    # the stdlib's per-process singleton (private names: missing ones leave the server to end
    # by itself once this process exits)
    server = getattr(forkserver, "_forkserver", None)
    pid, stop = getattr(server, "_forkserver_pid", None), getattr(server, "_stop", None)
    if pid is None or stop is None or _server_pools[0]:
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        stop()  # closes its "alive" pipe, waits for it, forgets it
    except OSError as exc:
        log.debug("fork server stop: %s", exc)


def _warm_up() -> float:
    """A no-op job: returns when a worker has started (initializer done)."""
    return time.time()


def _resolve(spec: str):
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def run_job(process: str, path: str, cfg: Any, outdir: str, force: bool) -> dict:
    """Run one file in a worker; never raises (errors come back as data).

    The error's ``kind`` comes from :func:`vampd.errors.classify` (vampd's own exception
    types): ``permanent`` (the input is unusable: park), ``output`` (the output side is full
    or read-only: pause, no try charged) or ``transient`` (retry with backoff).
    """
    from vampd.errors import PermanentError, classify

    t0 = time.time()
    try:
        res = _resolve(process)(path, cfg, Path(outdir), force)
    except Exception as exc:
        kind = classify(exc)
        own = isinstance(exc, PermanentError) or kind == "output"
        msg = str(exc) if own else f"{type(exc).__name__}: {exc}"
        if path not in msg:
            msg = f"{path}: {msg}"
        out = {"ok": False, "permanent": kind == "permanent", "kind": kind, "error": msg, "elapsed": time.time() - t0}
        if kind != "permanent":
            out["trace"] = traceback.format_exc(limit=6)
        return out
    return {
        "ok": True,
        "products": [(str(k), str(p)) for k, p in res.products],
        "summary": dict(res.summary),
        "metrics": dict(res.metrics),
        "elapsed": time.time() - t0,
    }


@dataclass
class JobResult:
    """What the parent gets back for one file."""

    path: str
    ok: bool
    products: list[tuple[str, str]] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    error: str = ""
    permanent: bool = False
    elapsed: float = 0.0
    #: ``permanent``, ``transient``, ``output`` or ``crash`` (the worker died; ``in_flight``
    #: jobs were running then, so the death cannot be pinned on this file unless it ran alone)
    kind: str = "transient"
    in_flight: int = 1


@dataclass
class _Job:
    path: str
    nbytes: int
    future: cf.Future
    t_submit: float


class WorkerPool:
    """Bounded, memory-admitting process pool.

    Parameters
    ----------
    workers : int
        Worker processes (and maximum jobs in flight).
    memory_limit : int
        Byte budget of all running jobs.
    process : str
        ``"module:function"`` called as ``function(path, cfg, outdir, force)`` in the worker
        and returning an object with ``products``, ``summary`` and ``metrics``.
    """

    def __init__(self, workers: int = 2, memory_limit: int = 8 * 1024**3, process: str = DEFAULT_PROCESS):
        self.workers = max(1, int(workers))
        self.memory_limit = int(memory_limit)
        self.process = process
        self.jobs: dict[str, _Job] = {}
        self.crashes = 0
        self.warming: list[cf.Future] = []
        self._warmer: threading.Thread | None = None
        self._uses_server = False
        self._executor: cf.ProcessPoolExecutor | None = None
        self._broken = False

    def start(self, warm: bool = True) -> None:
        """Create the executor; with ``warm``, start every worker now and let it warm up
        (in the background: this returns at once)."""
        _single_thread_env()  # inherited by the workers' interpreters before numpy loads
        ctx = _context(self.process)
        self._executor = cf.ProcessPoolExecutor(
            max_workers=self.workers,
            mp_context=ctx,
            initializer=_worker_init,
            initargs=(os.getpid(), self.process, dict(os.environ)),
        )
        self._broken = False
        if ctx.get_start_method() == "forkserver":
            _start_server()  # here, in the caller's (main) thread: see _start_server
            if not self._uses_server:
                self._uses_server = True
                _server_users(+1)
        self.warming = []
        self._warmer = None
        if warm:
            # starting a worker waits for the fork server's imports: done from a thread
            self._warmer = threading.Thread(
                target=self._warm, args=(self._executor, self.warming), daemon=True, name="vampd-warm"
            )
            self._warmer.start()

    def _warm(self, executor: cf.ProcessPoolExecutor, futures: list[cf.Future]) -> None:
        # the executor starts lazily, one process per submit that finds no idle worker:
        # one no-op per worker starts them all at once
        try:
            for _ in range(self.workers):
                futures.append(executor.submit(_warm_up))
        except Exception as exc:  # noqa: BLE001 -- shut down or broken meanwhile; a real submit reports it
            log.debug("pool warm-up stopped: %s", exc)

    def wait_warm(self, timeout: float | None = None) -> bool:
        """Wait until every warm-up no-op has run (all workers started); True if they have."""
        t0 = time.monotonic()
        if self._warmer is not None:
            self._warmer.join(timeout)
            if self._warmer.is_alive():
                return False
        if not self.warming:
            return True
        left = None if timeout is None else max(0.0, timeout - (time.monotonic() - t0))
        done, _ = cf.wait(self.warming, timeout=left)
        return len(done) == len(self.warming)

    # -- admission ----------------------------------------------------------------------------
    @property
    def running_bytes(self) -> int:
        return sum(j.nbytes for j in self.jobs.values())

    def admissible(self, nbytes: int) -> bool:
        """A job of ``nbytes`` may start now."""
        if len(self.jobs) >= self.workers:
            return False
        return not self.jobs or self.running_bytes + nbytes <= self.memory_limit

    def submit(
        self,
        path: str,
        nbytes: int,
        cfg: Any,
        outdir: os.PathLike | str,
        force: bool = False,
        process: str | None = None,
    ) -> None:
        """Run ``process`` (default: the pool's) on ``path`` in a worker (``path`` keys the job)."""
        if self._executor is None:
            self.start()
        try:
            fut = self._executor.submit(run_job, process or self.process, path, cfg, str(outdir), force)
        except BrokenProcessPool:  # a worker died since the last collect
            self._restart()
            fut = self._executor.submit(run_job, process or self.process, path, cfg, str(outdir), force)
        self.jobs[path] = _Job(path, int(nbytes), fut, time.time())

    def healthy(self) -> bool:
        """The executor is usable and no worker has died since it started.

        Public APIs only: a dead worker is seen as a missing child process
        (:func:`multiprocessing.active_children`, which also reaps it) once the workers are
        up, and a broken executor through its futures (:meth:`collect` restarts it).
        """
        if self._executor is None or self._broken:
            return False
        if not self.wait_warm(0):
            return True  # still spawning
        return len(multiprocessing.active_children()) >= self.workers

    # -- results ------------------------------------------------------------------------------
    def collect(self, timeout: float = 0.0) -> list[JobResult]:
        """Results of the jobs that finished (waiting up to ``timeout`` s for the first)."""
        if not self.jobs:
            if timeout:
                time.sleep(min(timeout, 0.05))
            return []
        done, _ = cf.wait([j.future for j in self.jobs.values()], timeout=timeout, return_when=cf.FIRST_COMPLETED)
        out: list[JobResult] = []
        broken = False
        in_flight = len(self.jobs)
        for path, job in list(self.jobs.items()):
            if job.future not in done:
                continue
            del self.jobs[path]
            try:
                r = job.future.result()
            except BrokenProcessPool:
                broken = True
                out.append(
                    JobResult(
                        path,
                        False,
                        error=f"{path}: worker process died (killed or out of memory)",
                        kind="crash",
                        in_flight=in_flight,
                    )
                )
                continue
            except Exception as exc:  # pickling errors and the like
                out.append(JobResult(path, False, error=f"{type(exc).__name__}: {exc}"))
                continue
            if r["ok"]:
                out.append(JobResult(path, True, r["products"], r["summary"], r["metrics"], elapsed=r["elapsed"]))
            else:
                if r.get("trace"):
                    log.debug("worker traceback for %s:\n%s", path, r["trace"])
                out.append(
                    JobResult(
                        path,
                        False,
                        error=r["error"],
                        permanent=r["permanent"],
                        elapsed=r["elapsed"],
                        kind=r.get("kind", "permanent" if r["permanent"] else "transient"),
                    )
                )
        if broken:
            self._broken = True
            self.crashes += 1
            log.error("pool: a worker process died; restarting the pool")
            self._restart()
        return out

    def _restart(self) -> None:
        ex = self._executor
        self._executor = None
        if ex is not None:
            ex.shutdown(wait=False, cancel_futures=True)
        self.start()

    # -- shutdown -----------------------------------------------------------------------------
    def shutdown(self, timeout: float) -> tuple[list[JobResult], list[str]]:
        """Let running jobs finish for up to ``timeout`` s, then terminate the workers.

        Returns ``(results of the jobs that finished, paths abandoned)``.
        """
        results: list[JobResult] = []
        deadline = time.time() + timeout
        while self.jobs and time.time() < deadline:
            results.extend(self.collect(timeout=min(0.2, max(0.0, deadline - time.time()))))
        abandoned = list(self.jobs)
        if self._warmer is not None:
            self._warmer.join()  # no warm-up submit after the executor's shutdown
        ex = self._executor
        self._executor = None
        if ex is not None:
            if abandoned:
                _stop_children(grace=2.0)
            ex.shutdown(wait=not abandoned, cancel_futures=True)
        self.jobs.clear()
        if self._uses_server:  # the workers are reaped (joined): the server can go
            self._uses_server = False
            _server_users(-1)
            stop_fork_server()
        return results, abandoned


def _stop_children(grace: float) -> None:
    """SIGTERM every worker process, SIGKILL what is left after ``grace`` s (a worker stuck in a
    system call must not hold the shutdown)."""
    procs = multiprocessing.active_children()
    for p in procs:
        p.terminate()
    deadline = time.time() + grace
    for p in procs:
        p.join(max(0.0, deadline - time.time()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(1.0)

"""Dask as the engine's worker pool.

:class:`ClusterPool` holds the client and the cluster-wide admission state (slots, memory);
:class:`NightPool` is one night's view of it with the interface of
:class:`vampd.engine.pool.WorkerPool` (``workers``, ``jobs``, ``admissible``, ``submit``,
``collect``, ``shutdown``), so each night's :class:`~vampd.engine.runner.Runner` — ledger
decisions, recording, PDI and specphot triggers — runs unchanged on the client.

Exactly-once: workers never see a ledger; a task returns a small dict and the client records it.
A task lost with its worker is re-run by the scheduler (up to
``distributed.scheduler.allowed-failures``), then comes back as a failed try; either way the
ledger row is committed once, by the client, after the products exist. Task keys are
deterministic (night, file, identity, config hash, attempt), so a restarted client on a
long-lived scheduler resubmits the same keys and a worker still running an abandoned task can
take it up again (Dask's "resumed" task state) rather than running it twice.

Memory: a task's estimate (cube bytes × ``watch.memory_factor``, as in the local pool) is
requested as the worker resource ``MEMORY`` when every worker declares one (the scheduler then
places it on a worker with room); the client also keeps the sum of the estimates in flight
under the cluster's budget (a single task larger than the budget still runs, alone).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

from vampd.engine.pool import BLAS_ENV, DEFAULT_PROCESS, JobResult

__all__ = ["MissingDistributed", "require_distributed", "connect", "ClusterPool", "NightPool"]

log = logging.getLogger(__name__)

RESOURCE = "MEMORY"
_RESULT_FIELDS = {f.name for f in dataclasses.fields(JobResult)}


def _job_result(path: str, ok: bool, **fields) -> JobResult:
    """A :class:`JobResult` with the fields this engine version has (``kind`` is newer)."""
    return JobResult(path, ok, **{k: v for k, v in fields.items() if k in _RESULT_FIELDS})


class MissingDistributed(RuntimeError):
    """``distributed`` is not installed."""


def require_distributed():
    """Import and return :mod:`distributed`, or raise :class:`MissingDistributed` saying how to get it."""
    try:
        import distributed
    except ImportError as exc:
        raise MissingDistributed(
            "vampd reprocess needs Dask distributed, an optional extra: pip install 'vampd[cluster]' "
            f"(or pip install distributed) — {exc}"
        ) from None
    return distributed


def connect(scheduler: str | None, n_local: int, memory_per_worker: int, dashboard_address: str = ":8787"):
    """A client on ``scheduler`` or, without one, on a new ``LocalCluster`` of processes.

    The local cluster has ``n_local`` worker processes of one thread each, BLAS pools of one
    thread, and each worker declares ``MEMORY=memory_per_worker`` (bytes) for task admission.
    Returns ``(client, cluster)``; ``cluster`` is None when joining an existing scheduler.
    """
    distributed = require_distributed()
    if scheduler:
        client = distributed.Client(scheduler, timeout="30s")
        return client, None
    env = dict.fromkeys(BLAS_ENV, "1")
    os.environ.update(env)  # inherited by the spawned worker interpreters before numpy loads
    cluster = distributed.LocalCluster(
        n_workers=max(1, int(n_local)),
        threads_per_worker=1,
        processes=True,
        resources={RESOURCE: max(1, int(memory_per_worker))},
        dashboard_address=dashboard_address,
        env=env,
        silence_logs=logging.ERROR,
    )
    return distributed.Client(cluster), cluster


def task_key(outdir: str, path: str, config_hash: str, attempt: int) -> str:
    """Deterministic task key of one file's attempt (see the module docstring)."""
    try:
        st = os.stat(path)
        ident = f"{st.st_size}:{st.st_mtime_ns}"
    except OSError:
        ident = "?"
    h = hashlib.sha1(f"{outdir}\0{path}\0{ident}\0{config_hash}".encode()).hexdigest()[:16]
    return f"vampd-file-{os.path.basename(path)}-{h}-{attempt}"


class ClusterPool:
    """The client and what all nights share: task slots and the memory budget.

    Parameters
    ----------
    client : distributed.Client
    oversubscribe : int
        Tasks in flight per worker thread (2: the next file is already on the worker when one
        finishes, hiding the scheduler's round trip).
    memory_fraction : float
        Share of a worker's ``memory_limit`` counted as task budget when workers declare no
        ``MEMORY`` resource.
    process : str
        The per-file entry point (``module:function``), as for the local pool.
    """

    def __init__(self, client, oversubscribe: int = 2, memory_fraction: float = 0.5, process: str = DEFAULT_PROCESS):
        self.client = client
        self.oversubscribe = max(1, int(oversubscribe))
        self.memory_fraction = float(memory_fraction)
        self.process = process
        self.nights: list[NightPool] = []
        self.slots = 1
        self.budget = 0
        self.max_capacity = 0
        self.use_resources = False
        self.n_workers = 0
        self._refreshed = 0.0
        self.refresh()

    def refresh(self, wait_for_workers: float = 0.0) -> None:
        """Re-read the workers (they may join and leave: adaptive clusters, lost nodes)."""
        if wait_for_workers and not self.client.scheduler_info()["workers"]:
            self.client.wait_for_workers(1, timeout=wait_for_workers)
        try:  # recent distributed lists only 5 workers unless asked for all
            info = self.client.scheduler_info(n_workers=-1)
        except TypeError:
            info = self.client.scheduler_info()
        workers = list(info["workers"].values())
        self.n_workers = len(workers)
        self.slots = max(1, sum(int(w.get("nthreads", 1)) for w in workers)) * self.oversubscribe
        caps = [float((w.get("resources") or {}).get(RESOURCE, 0)) for w in workers]
        self.use_resources = bool(caps) and all(c > 0 for c in caps)
        if self.use_resources:
            self.budget = int(sum(caps))
            self.max_capacity = int(max(caps))
        else:
            self.budget = int(sum(float(w.get("memory_limit") or 0) for w in workers) * self.memory_fraction)
            self.max_capacity = 0
        self._refreshed = time.time()

    def maybe_refresh(self, every: float = 5.0) -> None:
        if time.time() - self._refreshed > every:
            self.refresh()

    def night(self, label: str) -> NightPool:
        pool = NightPool(self, label)
        self.nights.append(pool)
        return pool

    @property
    def in_flight(self) -> int:
        return sum(len(n.jobs) for n in self.nights)

    @property
    def running_bytes(self) -> int:
        return sum(j.nbytes for n in self.nights for j in n.jobs.values())

    def futures(self) -> list:
        return [j.future for n in self.nights for j in n.jobs.values()]

    def wait(self, timeout: float) -> None:
        """Return when a task finished or after ``timeout`` s."""
        import distributed

        futs = self.futures()
        if not futs:
            time.sleep(min(timeout, 0.05))
            return
        try:
            distributed.wait(futs, timeout=timeout, return_when="FIRST_COMPLETED")
        except TimeoutError:  # distributed's TimeoutError is the builtin one
            pass

    def dashboard(self) -> str | None:
        return getattr(self.client, "dashboard_link", None)


@dataclass
class _Job:
    path: str
    nbytes: int
    future: Any
    t_submit: float


class NightPool:
    """One night's pool: the :class:`~vampd.engine.pool.WorkerPool` interface on a shared client."""

    def __init__(self, shared: ClusterPool, label: str):
        self.shared = shared
        self.label = label
        self.jobs: dict[str, _Job] = {}
        self.attempts: dict[str, int] = {}
        self.config_hash = ""
        self.crashes = 0
        self.cpu: list[float] = []
        self.elapsed: list[float] = []

    @property
    def workers(self) -> int:
        """Jobs this night may have in flight now: its own plus the cluster's free slots."""
        return len(self.jobs) + max(0, self.shared.slots - self.shared.in_flight)

    @property
    def running_bytes(self) -> int:
        return sum(j.nbytes for j in self.jobs.values())

    @property
    def memory_limit(self) -> int:
        """The cluster's task memory budget (bytes; the runner parks a file larger than this)."""
        return self.shared.budget if self.shared.budget > 0 else 2**62

    def admissible(self, nbytes: int) -> bool:
        """The local pool's rule, cluster-wide: a slot is free and the estimates fit the budget
        (or nothing runs at all)."""
        if self.shared.in_flight >= self.shared.slots:
            return False
        return not self.shared.in_flight or self.shared.running_bytes + nbytes <= self.shared.budget

    def submit(self, path: str, nbytes: int, cfg: Any, outdir, force: bool = False) -> None:
        from vampd.cluster.tasks import run_file

        sh = self.shared
        attempt = self.attempts.get(path, 0)
        self.attempts[path] = attempt + 1
        kwargs: dict = {"key": task_key(str(outdir), path, self.config_hash, attempt), "pure": False}
        if sh.use_resources and nbytes > 0:
            kwargs["resources"] = {RESOURCE: min(int(nbytes), sh.max_capacity)}
        fut = sh.client.submit(run_file, sh.process, path, cfg, str(outdir), force, **kwargs)
        self.jobs[path] = _Job(path, int(nbytes), fut, time.time())

    def collect(self, timeout: float = 0.0) -> list[JobResult]:
        """Results of this night's finished tasks (``timeout`` is only honoured when nothing runs)."""
        if not self.jobs and timeout:
            time.sleep(min(timeout, 0.05))
        out: list[JobResult] = []
        for path, job in list(self.jobs.items()):
            if not job.future.done():
                continue
            del self.jobs[path]
            out.append(self._result(path, job.future))
            job.future.release()
        return out

    def _result(self, path: str, fut) -> JobResult:
        if fut.status != "finished":
            try:
                exc = fut.exception(timeout=5)
            except Exception as e:  # noqa: BLE001 -- cancelled futures raise here
                exc = e
            self.crashes += 1
            name = type(exc).__name__
            what = "worker lost (killed, out of memory or node gone)" if name == "KilledWorker" else name
            # the scheduler pins a KilledWorker on this task (it re-ran it elsewhere first):
            # an ordinary failed try, not the local pool's "crash" of unknown culprit
            return _job_result(path, False, error=f"{path}: {what}: {exc}", kind="transient")
        r = fut.result()
        self.cpu.append(float(r.get("cpu", 0.0)))
        self.elapsed.append(float(r.get("elapsed", 0.0)))
        if r["ok"]:
            return _job_result(
                path, True, products=r["products"], summary=r["summary"], metrics=r["metrics"], elapsed=r["elapsed"]
            )
        if r.get("trace"):
            log.debug("worker traceback for %s:\n%s", path, r["trace"])
        kind = r.get("kind", "permanent" if r["permanent"] else "transient")
        return _job_result(path, False, error=r["error"], permanent=r["permanent"], elapsed=r["elapsed"], kind=kind)

    def healthy(self) -> bool:
        return self.shared.n_workers > 0

    def shutdown(self, timeout: float) -> tuple[list[JobResult], list[str]]:
        """Wait up to ``timeout`` s for this night's tasks, then cancel the rest."""
        results: list[JobResult] = []
        deadline = time.time() + timeout
        while self.jobs and time.time() < deadline:
            self.shared.wait(min(0.2, max(0.0, deadline - time.time())))
            results.extend(self.collect())
        abandoned = list(self.jobs)
        for job in self.jobs.values():
            job.future.cancel()
        self.jobs.clear()
        return results, abandoned

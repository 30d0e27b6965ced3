"""What runs on a Dask worker: the local pool's per-file entry point, nothing else.

A task gets a raw file's *path* (never its data): the worker reads the cube from the shared
filesystem itself, writes its products atomically next to the night's ledger and returns a
small dict (product paths, header summary, metric summary; a few kB). The ledger is never
opened here: the client is its only writer.
"""

from __future__ import annotations

import os
import time
from typing import Any

__all__ = ["run_file", "probe"]


def run_file(process: str, path: str, cfg: Any, outdir: str, force: bool) -> dict:
    """Process one file on a worker; never raises (errors come back as data).

    Same contract as :func:`vampd.engine.pool.run_job`, plus where and at what CPU cost it ran
    (``host``, ``pid``, ``cpu`` seconds of this process during the task) for the benchmark and
    the logs.
    """
    from vampd.engine.pool import _single_thread_env, run_job

    _single_thread_env()  # workers we did not start (jobqueue, dask-worker): later BLAS pools
    t = os.times()
    out = run_job(process, path, cfg, outdir, force)
    t2 = os.times()
    out["cpu"] = (t2.user - t.user) + (t2.system - t.system)
    out["host"] = os.uname().nodename
    out["pid"] = os.getpid()
    out["t_end"] = time.time()
    return out


def probe(process: str, paths: list[str], outroots: list[str]) -> dict:
    """Run on every worker at start: import the chain (warm start) and check the shared filesystem.

    Returns ``{"vampd": version, "missing": [paths not visible], "unwritable": [dirs],
    "error": import error or "", "blas": $OPENBLAS_NUM_THREADS of the worker}``.
    """
    import importlib

    out: dict = {
        "vampd": None,
        "missing": [],
        "unwritable": [],
        "error": "",
        "blas": os.environ.get("OPENBLAS_NUM_THREADS"),
    }
    try:
        import vampd

        out["vampd"] = vampd.__version__
        module, _, name = process.partition(":")
        getattr(importlib.import_module(module), name)
    except Exception as exc:  # noqa: BLE001 -- reported to the client, which stops with it
        out["error"] = f"{type(exc).__name__}: {exc}"
    out["missing"] = [p for p in paths if not os.path.exists(p)]
    out["unwritable"] = [d for d in outroots if not os.access(d, os.W_OK)]
    return out

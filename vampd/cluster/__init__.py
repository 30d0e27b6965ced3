"""Reprocessing archived nights on a Dask distributed cluster (``vampd reprocess``).

The per-file chain, the ledger decisions and the set/sequence triggers are the engine's own;
this package only swaps the local worker pool for Dask workers:

* :mod:`vampd.cluster.executor` — connect to (or start) a cluster and a pool adapter with the
  local pool's interface, so :class:`~vampd.engine.runner.Runner` drives Dask unchanged;
* :mod:`vampd.cluster.tasks` — what runs on a worker (the local pool's ``run_job``);
* :mod:`vampd.cluster.reprocess` — one runner and one ledger per night, the client-side loop,
  finalize per night;
* :mod:`vampd.cluster.progress` — the per-night progress display.

``distributed`` is an optional dependency (``pip install 'vampd[cluster]'``); nothing here
imports it at module import time.
"""

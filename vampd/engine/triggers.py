"""Set and sequence work off the ledger thread.

PDI sets (16 members loaded, derotated, combined) and specphot sequences are science that
takes seconds; the daemon's main thread owns the ledger, the pool and the systemd watchdog
ping and must never wait on it. :class:`TriggerThread` runs the engine's trigger hooks in
one dedicated thread with its own ledger connection (SQLite WAL: the two connections
serialise their short write transactions), in order, one file at a time.

Both triggers are idempotent (locked set rows, accumulator keys, sequence fingerprints),
so work the thread has not reached when the daemon stops is simply redone by
``resume_triggers`` at the next start.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path

__all__ = ["TriggerThread"]

log = logging.getLogger(__name__)

_STOP = object()


class TriggerThread:
    """Runs ``work(ledger, item)`` for queued items in a background thread.

    Parameters
    ----------
    outdir : path
        Output directory (the thread opens its own :class:`~vampd.engine.ledger.Ledger` there).
    work : callable
        ``work(ledger, item)``; exceptions are logged and recorded as events, never raised.
    """

    def __init__(self, outdir: os.PathLike | str, work: Callable):
        self.outdir = Path(outdir)
        self.work = work
        self.queue: queue.Queue = queue.Queue()
        self.busy_since: float | None = None
        self.done = 0
        self._thread = threading.Thread(target=self._run, name="vampd-triggers", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def put(self, item) -> None:
        self.queue.put(item)

    @property
    def pending(self) -> int:
        return self.queue.qsize() + (self.busy_since is not None)

    def alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        from vampd.engine.ledger import Ledger

        ledger = Ledger(self.outdir)
        try:
            while True:
                item = self.queue.get()
                if item is _STOP:
                    return
                self.busy_since = time.time()
                try:
                    self.work(ledger, item)
                except Exception as exc:  # noqa: BLE001 -- a trigger never stops the daemon
                    log.exception("trigger failed for %s", item)
                    try:
                        ledger.event("error", f"trigger failed for {item}: {exc}")
                    except Exception:  # noqa: BLE001 -- the ledger may be full: the log has it
                        pass
                finally:
                    self.busy_since = None
                    self.done += 1
        finally:
            ledger.close()

    def stop(self, timeout: float) -> bool:
        """Finish the queued work for up to ``timeout`` s; True if the thread ended.

        Work still queued after the timeout is left (the next start redoes it idempotently).
        """
        deadline = time.time() + timeout
        self.queue.put(_STOP)
        self._thread.join(max(0.0, deadline - time.time()))
        if self._thread.is_alive():
            log.warning("stop: set/sequence work still running after %.0f s; it resumes at the next start", timeout)
            return False
        return True

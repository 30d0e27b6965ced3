"""The night's ledger: one SQLite database (WAL) in the output directory.

It is the single source of truth for what has been seen, what is done and what failed.
Only the daemon/runner process writes it (workers hand their results back to the parent,
so a killed worker cannot leave a half-written row); ``status`` and ``live`` open it
read-only.

Exactly-once rests on three rules:

* a file is ``done`` only after all of its products exist on disk (they are written
  atomically by the pipeline) and the row and its products are committed in one
  transaction with ``synchronous=FULL``;
* on start, rows left ``queued``/``running`` go back to ``pending`` (they were interrupted);
* a ``done`` row whose recorded product is missing on disk is not done.

File identity is ``(size, mtime_ns, inode)`` plus a content hash (SHA-1 of the FITS
structure's length and of its first and last MiB: bytes appended after a whole FITS
structure are not content). Size, mtime and inode unchanged → the hash is not recomputed;
a touched file whose hash is unchanged is not reprocessed. Rejected files (odd paths,
never complete, not FITS) are recorded with their identity too, so the same version is
judged once.

Retries: a failed attempt is charged to its file only; ``failed`` rows wait until
``t_retry`` (exponential backoff) and :meth:`Ledger.retry_due` puts them back to pending;
``max_tries`` failures park the file. A success resets the count. ``vampd retry``
(:meth:`Ledger.retry_parked`) and a changed file un-park it.
"""

from __future__ import annotations

from vampd.engine.ledger.core import LEDGER_NAME, SCHEMA_VERSION, STATES, LedgerCore
from vampd.engine.ledger.daemon import DaemonMixin, daemon_alive, pid_alive
from vampd.engine.ledger.identity import (
    FileIdentity,
    content_extent,
    content_hash,
    file_identity,
    ledger_key,
    path_of_key,
    printable,
    stat_identity,
)
from vampd.engine.ledger.leastsq import LeastSquaresMixin
from vampd.engine.ledger.queries import QueriesMixin
from vampd.engine.ledger.sets import SetsMixin
from vampd.engine.ledger.specphot import SpecphotMixin

__all__ = [
    "SCHEMA_VERSION",
    "LEDGER_NAME",
    "STATES",
    "FileIdentity",
    "file_identity",
    "content_hash",
    "Ledger",
    "pid_alive",
    "daemon_alive",
    "content_extent",
    "stat_identity",
    "ledger_key",
    "path_of_key",
    "printable",
]


class Ledger(QueriesMixin, SetsMixin, SpecphotMixin, LeastSquaresMixin, DaemonMixin, LedgerCore):
    """The SQLite ledger of one output directory.

    Parameters
    ----------
    outdir : path
        Directory holding ``vampd.sqlite`` (created if needed unless ``readonly``).
    readonly : bool
        Open read-only (``status``/``live``); writing methods then raise ``sqlite3.OperationalError``.

    The methods live in one mixin per concern: :class:`~vampd.engine.ledger.core.LedgerCore`
    (connection, schema, files, products, events), :mod:`~vampd.engine.ledger.sets`,
    :mod:`~vampd.engine.ledger.specphot`, :mod:`~vampd.engine.ledger.leastsq`,
    :mod:`~vampd.engine.ledger.daemon` and
    :mod:`~vampd.engine.ledger.queries`.
    """

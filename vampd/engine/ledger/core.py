"""The ledger's core: the SQLite connection, the schema and its in-place migrations,
transactions, and the ``files``, ``products``, ``events`` and ``specphot`` tables (registering
input files, recording results and failures, retries). See :mod:`vampd.engine.ledger` for the
exactly-once rules they implement."""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from vampd.engine.ledger.identity import FileIdentity, file_identity, ledger_key, path_of_key

if TYPE_CHECKING:
    from vampd.engine.ledger import Ledger

SCHEMA_VERSION = 1
LEDGER_NAME = "vampd.sqlite"
#: pending → queued → running → done | failed (retried) | parked (given up); ignored: never processed
STATES = ("pending", "queued", "running", "done", "failed", "parked", "ignored")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS files (
    path TEXT PRIMARY KEY,
    size INTEGER, mtime_ns INTEGER, chash TEXT,
    state TEXT NOT NULL DEFAULT 'pending',
    stage TEXT,
    tries INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    config_hash TEXT,
    nbytes INTEGER,
    target TEXT, filter TEXT, camera INTEGER, flc TEXT, hwp REAL, exptime REAL, mjd REAL,
    nframes INTEGER, obs_mod TEXT,
    metrics TEXT,
    t_seen REAL, t_complete REAL, t_started REAL, t_done REAL, latency REAL,
    nprocessed INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS files_state ON files(state);
CREATE TABLE IF NOT EXISTS products (
    file TEXT NOT NULL, kind TEXT NOT NULL, path TEXT NOT NULL,
    mtime_ns INTEGER, size INTEGER, t_recorded REAL,
    PRIMARY KEY (file, kind, path)
);
CREATE INDEX IF NOT EXISTS products_file ON products(file);
CREATE TABLE IF NOT EXISTS sets (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT UNIQUE, mode TEXT,
    state TEXT NOT NULL DEFAULT 'open',
    reason TEXT, members TEXT,
    created REAL, updated REAL
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time REAL NOT NULL, level TEXT NOT NULL, message TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS specphot (
    key TEXT PRIMARY KEY, camera INTEGER, target TEXT, filter TEXT,
    unit TEXT, source TEXT, state TEXT NOT NULL, fingerprint TEXT,
    members TEXT, factors TEXT, products TEXT, mjd REAL, error TEXT, updated REAL
);
CREATE INDEX IF NOT EXISTS files_mjd ON files(mjd);
CREATE TABLE IF NOT EXISTS daemon (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    pid INTEGER, started REAL, heartbeat REAL, stopped REAL,
    host TEXT, config TEXT, config_hash TEXT, status TEXT
);
"""

# columns added after schema 1 was released (added in place: older ledgers keep working)
_ADDED_COLUMNS = {
    "ino": "INTEGER",
    "error_kind": "TEXT",
    "t_retry": "REAL",
    "mjd_str": "REAL",
    "mjd_end": "REAL",
    "taken": "INTEGER",  # 1 once in ``pdi_taken`` (kept by triggers): indexes the free done files
}

# ``files.taken`` mirrors ``pdi_taken`` so that the oldest free done file is one index lookup:
# the PDI trigger's window (``pdi_files``) then costs the same at file 50 and file 5000.
_TAKEN_SCHEMA = """
CREATE TABLE IF NOT EXISTS pdi_taken (path TEXT PRIMARY KEY, owner TEXT NOT NULL);
CREATE TRIGGER IF NOT EXISTS pdi_taken_mark AFTER INSERT ON pdi_taken
    BEGIN UPDATE files SET taken = 1 WHERE path = NEW.path; END;
CREATE TRIGGER IF NOT EXISTS pdi_taken_unmark AFTER DELETE ON pdi_taken
    BEGIN UPDATE files SET taken = NULL WHERE path = OLD.path; END;
CREATE INDEX IF NOT EXISTS files_free ON files(mjd) WHERE state = 'done' AND taken IS NULL;
"""

_SUMMARY_KEYS = ("target", "filter", "camera", "flc", "hwp", "exptime", "mjd", "nframes", "obs_mod")


class LedgerCore:
    """Connection, schema, transactions; files, products, events and sequence calibrations
    (the base of :class:`~vampd.engine.ledger.Ledger`)."""

    def __init__(self, outdir: os.PathLike | str, readonly: bool = False):
        self.outdir = Path(outdir).resolve()
        self.path = self.outdir / LEDGER_NAME
        self.readonly = readonly
        if readonly:
            if not self.path.exists():
                raise FileNotFoundError(f"{self.path}: no ledger here (has vampd run in this directory?)")
            self.conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=10.0)
            if self.conn.execute("SELECT 1 FROM sqlite_master WHERE name='files'").fetchone() is None:
                self.conn.close()
                raise FileNotFoundError(f"{self.path}: ledger not initialised yet")
        else:
            self.outdir.mkdir(parents=True, exist_ok=True)
            self.conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
            self.conn.execute("PRAGMA journal_mode=WAL")
            # FULL: a commit of a finished file survives power loss, not only a process crash
            self.conn.execute("PRAGMA synchronous=FULL")
            self._migrate()
        self.conn.row_factory = sqlite3.Row

    # -- set-up -----------------------------------------------------------------------------
    def _migrate(self) -> None:
        self.conn.executescript(_SCHEMA)  # idempotent (IF NOT EXISTS)
        have = {r[1] for r in self.conn.execute("PRAGMA table_info(files)")}
        for col, typ in _ADDED_COLUMNS.items():
            if col not in have:
                self.conn.execute(f"ALTER TABLE files ADD COLUMN {col} {typ}")
        self.conn.executescript(_TAKEN_SCHEMA)
        if "taken" not in have:  # a ledger from before the column: mark what it took
            self.conn.execute("UPDATE files SET taken = 1 WHERE path IN (SELECT path FROM pdi_taken)")
        row = self.conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        if row is None:
            self.conn.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
        elif int(row[0]) > SCHEMA_VERSION:
            raise RuntimeError(
                f"{self.path}: ledger schema version {row[0]} is newer than this vampd ({SCHEMA_VERSION})"
            )

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` … ``COMMIT`` (rolled back on error)."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        try:
            self.conn.execute("COMMIT")
        except sqlite3.Error:  # a full disk fails the COMMIT: leave no transaction open
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
            raise

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def schema_version(self) -> int:
        row = self.conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        return int(row[0]) if row else 0

    # -- files ------------------------------------------------------------------------------
    def get(self, path: str) -> sqlite3.Row | None:
        """The ``files`` row of ``path`` (absolute) or None."""
        return self.conn.execute("SELECT * FROM files WHERE path=?", (ledger_key(path),)).fetchone()

    def known_stats(self) -> dict[str, tuple[int, int, str, int | None]]:
        """``{path: (size, mtime_ns, state, inode)}`` of every known file (for cheap rescans)."""
        return {
            r[0]: (r[1], r[2], r[3], r[4])
            for r in self.conn.execute("SELECT path, size, mtime_ns, state, ino FROM files")
        }

    def register(
        self,
        path: os.PathLike | str,
        config_hash: str,
        *,
        identity: FileIdentity | None = None,
        nbytes: int | None = None,
        force: bool = False,
        t_complete: float | None = None,
    ) -> str:
        """Record a complete input file and decide whether it needs work.

        Returns one of ``"new"``, ``"changed"`` (identity differs), ``"config"`` (config hash
        differs), ``"missing-product"``, ``"retry"`` (failed with tries left), ``"pending"``
        (still to do), ``"forced"`` → the file is (now) ``pending``; or ``"done"``,
        ``"parked"``, ``"ignored"`` → nothing to do.
        """
        path = str(path)
        now = time.time()
        row = self.get(path)
        if row is not None and identity is None:
            st = os.stat(path)
            if (st.st_size, st.st_mtime_ns) == (row["size"], row["mtime_ns"]) and row["chash"]:
                identity = FileIdentity(row["size"], row["mtime_ns"], row["chash"], row["ino"])
        if identity is None:
            identity = file_identity(path)
        t_complete = now if t_complete is None else t_complete
        if row is None:
            self._insert_file(path, identity, config_hash, nbytes, now, t_complete)
            return "new"
        reason = self._redo_reason(row, path, identity, config_hash, force, now)
        if reason is None:
            if (identity.size, identity.mtime_ns, identity.ino) != (row["size"], row["mtime_ns"], row["ino"]):
                # touched, or grown past its FITS structure: same content, new identity
                with self.transaction():
                    self.conn.execute(
                        "UPDATE files SET size=?, mtime_ns=?, ino=? WHERE path=?",
                        (identity.size, identity.mtime_ns, identity.ino, path),
                    )
            return row["state"]
        reset_tries = reason in ("changed", "config", "forced")
        with self.transaction():
            self.conn.execute(
                # config_hash stays the one of the recorded products until record_done: a
                # differing hash tells the runner to force the redo, even after a restart
                "UPDATE files SET size=?, mtime_ns=?, chash=?, ino=?, state='pending',"
                " nbytes=COALESCE(?, nbytes), t_complete=?, error=CASE WHEN ? THEN NULL ELSE error END,"
                " tries=CASE WHEN ? THEN 0 ELSE tries END, t_retry=NULL WHERE path=?",
                (
                    identity.size,
                    identity.mtime_ns,
                    identity.chash,
                    identity.ino,
                    nbytes,
                    t_complete,
                    reset_tries,
                    reset_tries,
                    path,
                ),
            )
        return reason

    def _insert_file(
        self,
        path: str,
        identity: FileIdentity,
        config_hash: str,
        nbytes: int | None,
        now: float,
        t_complete: float,
    ) -> None:
        """Insert a first-seen file as ``pending``."""
        with self.transaction():
            self.conn.execute(
                "INSERT INTO files (path, size, mtime_ns, chash, state, config_hash, nbytes, t_seen, t_complete,"
                " ino)"
                " VALUES (?,?,?,?, 'pending', ?,?,?,?,?)",
                (
                    path,
                    identity.size,
                    identity.mtime_ns,
                    identity.chash,
                    config_hash,
                    nbytes,
                    now,
                    t_complete,
                    identity.ino,
                ),
            )

    def _redo_reason(
        self,
        row: sqlite3.Row,
        path: str,
        identity: FileIdentity,
        config_hash: str,
        force: bool,
        now: float,
    ) -> str | None:
        """Why a known file needs (re)work (see :meth:`register`), or None if it does not."""
        if identity.chash != row["chash"]:  # the hash covers the content's length
            return "changed"
        if force:
            return "forced"
        if row["state"] in ("done", "failed", "parked") and row["config_hash"] != config_hash:
            return "config"
        if row["state"] == "done":
            return None if self.products_exist(path) else "missing-product"
        if row["state"] == "failed":
            return "retry" if (row["t_retry"] or 0.0) <= now else None  # backoff not over: wait
        if row["state"] in ("pending", "queued", "running"):
            return "pending"
        return None

    def next_pending(self, limit: int, exclude: Iterable[str] = ()) -> list[sqlite3.Row]:
        """Up to ``limit`` pending/failed-with-retry rows, oldest completion first."""
        excl = set(exclude)
        out = []
        for row in self.conn.execute(
            "SELECT * FROM files WHERE state IN ('pending', 'queued') ORDER BY t_complete, path"
        ):
            if row["path"] in excl:
                continue
            out.append(row)
            if len(out) >= limit:
                break
        return out

    def mark_running(self, path: str, stage: str = "pipeline") -> None:
        with self.transaction():
            self.conn.execute(
                "UPDATE files SET state='running', stage=?, t_started=? WHERE path=?", (stage, time.time(), path)
            )

    def record_done(
        self,
        path: str,
        products: Iterable[tuple[str, str]],
        summary: dict | None = None,
        metrics: dict | None = None,
        config_hash: str | None = None,
    ) -> float:
        """Commit a finished file: its products (which must exist) and its row, in one transaction.

        Returns the latency (seconds from the file being complete to this commit).
        Raises ``FileNotFoundError`` if a product is missing (nothing is then recorded).
        """
        now = time.time()
        prods = []
        for kind, ppath in products:
            st = os.stat(ppath)  # raises if the product is not there
            prods.append((path, kind, str(ppath), st.st_mtime_ns, st.st_size, now))
        summary = summary or {}
        cols = {k: _plain(summary.get(k)) for k in _SUMMARY_KEYS}
        with self.transaction():
            row = self.conn.execute("SELECT t_complete FROM files WHERE path=?", (path,)).fetchone()
            t_complete = row[0] if row and row[0] else now
            latency = now - t_complete
            self.conn.execute("DELETE FROM products WHERE file=?", (path,))
            self.conn.executemany("INSERT OR REPLACE INTO products VALUES (?,?,?,?,?,?)", prods)
            sets = ", ".join(f"{k}=COALESCE(?, {k})" for k in _SUMMARY_KEYS)
            self.conn.execute(
                f"UPDATE files SET state='done', stage='done', error=NULL, tries=0, error_kind=NULL, t_done=?,"
                f" latency=?,"
                f" metrics=?, config_hash=COALESCE(?, config_hash), nprocessed=nprocessed+1, {sets} WHERE path=?",
                (now, latency, json.dumps(_plain(metrics or {})), config_hash, *cols.values(), path),
            )
        return latency

    def record_failure(
        self,
        path: str,
        error: str,
        max_tries: int,
        permanent: bool = False,
        *,
        kind: str | None = None,
        identity: tuple[int, int, int] | None = None,
        backoff: float = 5.0,
    ) -> str:
        """Count a failed attempt of ``path`` (only of this file); it is ``failed`` (retried
        after ``backoff · 4^(tries-1)`` s, at most 10 min) or ``parked``.

        ``permanent`` errors (bad input: the file itself is unusable) are parked at once.
        ``kind`` (``permanent``/``transient``/``rejected``) is kept for ``vampd retry`` and the
        status; ``identity`` ``(size, mtime_ns, inode)`` records the version judged (rows of
        files that were never registered). Returns the new state.
        """
        path = ledger_key(path)
        now = time.time()
        with self.transaction():
            row = self.conn.execute("SELECT tries FROM files WHERE path=?", (path,)).fetchone()
            tries = (row[0] if row else 0) + 1
            state = "parked" if permanent or tries >= max_tries else "failed"
            kind = kind or ("permanent" if permanent else "transient")
            t_retry = None if state == "parked" else now + min(600.0, backoff * 4.0 ** (tries - 1))
            if row is None:
                size, mtime_ns, ino = identity or (None, None, None)
                self.conn.execute(
                    "INSERT INTO files (path, state, tries, error, t_seen, error_kind, t_retry, size, mtime_ns, ino)"
                    " VALUES (?,?,?,?,?,?,?,?,?,?)",
                    (path, state, tries, error, now, kind, t_retry, size, mtime_ns, ino),
                )
            else:
                self.conn.execute(
                    "UPDATE files SET state=?, tries=?, error=?, stage='error', error_kind=?, t_retry=? WHERE path=?",
                    (state, tries, error, kind, t_retry, path),
                )
                if identity is not None:
                    self.conn.execute(
                        "UPDATE files SET size=?, mtime_ns=?, ino=?, chash=NULL WHERE path=?", (*identity, path)
                    )
            self.conn.execute(
                "INSERT INTO events (time, level, message) VALUES (?,?,?)",
                (now, "error" if state == "parked" else "warning", _named(path, error)),
            )
        return state

    # -- harden: retries, rejections, identity ------------------------------------------------
    def retry_due(self, now: float | None = None) -> int:
        """``failed`` rows whose backoff is over go back to ``pending``; returns how many."""
        now = time.time() if now is None else now
        with self.transaction():
            return self.conn.execute(
                "UPDATE files SET state='pending', t_retry=NULL WHERE state='failed' AND COALESCE(t_retry, 0) <= ?",
                (now,),
            ).rowcount

    def next_retry(self) -> float | None:
        """When the next ``failed`` row is due (None if there is none)."""
        row = self.conn.execute("SELECT MIN(COALESCE(t_retry, 0)) FROM files WHERE state='failed'").fetchone()
        return row[0] if row else None

    def retry_parked(self, paths: Iterable[str] | None = None, kinds: Iterable[str] | None = None) -> int:
        """Un-park files (all, the given ``paths``, or those whose ``error_kind`` is in
        ``kinds``): back to ``pending`` with their tries reset. Returns how many."""
        return len(self.requeue_parked(paths, kinds))

    def requeue_parked(self, paths: Iterable[str] | None = None, kinds: Iterable[str] | None = None) -> list[str]:
        """:meth:`retry_parked`, returning the ledger keys (paths) of the files re-queued, sorted."""
        where, args = "state IN ('parked', 'failed')", []
        if paths is not None:
            keys = [ledger_key(p) for p in paths]
            where += f" AND path IN ({','.join('?' * len(keys))})"
            args += keys
        if kinds is not None:
            kinds = list(kinds)
            where += f" AND COALESCE(error_kind, 'permanent') IN ({','.join('?' * len(kinds))})"
            args += kinds
        with self.transaction():  # one transaction: the list is exactly what was re-queued
            queued = [r[0] for r in self.conn.execute(f"SELECT path FROM files WHERE {where} ORDER BY path", args)]
            n = self.conn.execute(
                f"UPDATE files SET state='pending', tries=0, t_retry=NULL, chash=CASE WHEN error_kind='rejected'"
                f" THEN NULL ELSE chash END WHERE {where}",
                args,
            ).rowcount
            if n:
                self.conn.execute(
                    "INSERT INTO events (time, level, message) VALUES (?,?,?)",
                    (time.time(), "info", f"retry: {n} parked file(s) back to pending"),
                )
        return queued

    def parked_gone(self) -> list[str]:
        """Parked/failed rows whose file no longer exists (for clean-up)."""
        rows = self.conn.execute("SELECT path FROM files WHERE state IN ('parked', 'failed')").fetchall()
        return [r[0] for r in rows if not os.path.lexists(path_of_key(r[0]))]

    def forget(self, paths: Iterable[str]) -> int:
        """Delete the rows of files that are gone and were never done (no products)."""
        keys = [(ledger_key(p),) for p in paths]
        with self.transaction():
            return self.conn.executemany(
                "DELETE FROM files WHERE path=? AND state IN ('parked', 'failed')", keys
            ).rowcount

    def done_products(self) -> list[tuple[str, str]]:
        """``(file, product path)`` of every done file."""
        return [
            (r[0], r[1])
            for r in self.conn.execute(
                "SELECT f.path, p.path FROM files f JOIN products p ON p.file = f.path WHERE f.state = 'done'"
            )
        ]

    def latest_done_per_camera(self) -> list[tuple[int, str]]:
        """``(camera, path)`` of the most recently done file of each camera."""
        return [
            (r[0], r[1])
            for r in self.conn.execute(
                "SELECT camera, path FROM files f WHERE state='done' AND camera IS NOT NULL AND t_done ="
                " (SELECT MAX(t_done) FROM files g WHERE g.state='done' AND g.camera=f.camera)"
            )
        ]

    def record_span(self, path: str, mjd_str: float | None, mjd_end: float | None) -> None:
        """Remember a done file's exposure span (read once from its coadded product)."""
        with self.transaction():
            self.conn.execute("UPDATE files SET mjd_str=?, mjd_end=? WHERE path=?", (mjd_str, mjd_end, path))

    def diff_candidates(self, path: str, window: float) -> list[dict]:
        """Done files with a coadded product of the same target and filter as ``path`` whose
        MJD is within ``window`` days of it (indexed: independent of the night's length).

        Each record: ``path, product, state, target, filter, camera, flc, hwp, mjd, mjd_str, mjd_end``.
        """
        this = self.conn.execute("SELECT target, filter, mjd FROM files WHERE path=?", (str(path),)).fetchone()
        if this is None or this["mjd"] is None:
            return []
        rows = self.conn.execute(
            "SELECT f.path, p.path AS product, f.state, f.target, f.filter, f.camera, f.flc, f.hwp, f.mjd,"
            " f.mjd_str, f.mjd_end FROM files f JOIN products p ON p.file = f.path AND p.kind = 'coadded'"
            # +f.state: the MJD index, not the state index (which would scan every done file)
            " WHERE +f.state = 'done' AND f.mjd BETWEEN ? AND ? AND f.target IS ? AND f.filter IS ?"
            " ORDER BY f.mjd",
            (this["mjd"] - window, this["mjd"] + window, this["target"], this["filter"]),
        ).fetchall()
        return [dict(r) for r in rows]

    def retry_failed(self) -> int:
        """Put ``failed`` rows (tries left) back to ``pending``; returns how many."""
        with self.transaction():
            return self.conn.execute("UPDATE files SET state='pending' WHERE state='failed'").rowcount

    def release(self, path: str) -> None:
        """A job was abandoned (shutdown): back to ``pending`` without counting a try."""
        with self.transaction():
            self.conn.execute(
                "UPDATE files SET state='pending' WHERE path=? AND state IN ('queued','running')", (path,)
            )

    def reset_interrupted(self) -> int:
        """Rows left ``queued``/``running`` by a crash go back to ``pending``; returns how many."""
        with self.transaction():
            return self.conn.execute("UPDATE files SET state='pending' WHERE state IN ('queued', 'running')").rowcount

    def requeue_config(self, config_hash: str) -> int:
        """Finished or failed files processed with another config hash go back to ``pending``."""
        with self.transaction():
            return self.conn.execute(
                "UPDATE files SET state='pending', tries=0, error=NULL"
                " WHERE state IN ('done','failed','parked') AND size IS NOT NULL AND config_hash IS NOT ?"
                " AND COALESCE(error_kind, '') != 'rejected'",  # rejected paths were never processed
                (config_hash,),
            ).rowcount

    # -- products ---------------------------------------------------------------------------
    def saturated_files(self) -> list[tuple[str, int]]:
        """Done files with saturated PSF-core frames: (path, frame count) from the metrics ``nsat``."""
        rows = self.conn.execute(
            "SELECT path, CAST(json_extract(metrics, '$.nsat') AS INTEGER) AS nsat FROM files"
            " WHERE state='done' AND json_extract(metrics, '$.nsat') > 0 ORDER BY path"
        ).fetchall()
        return [(r["path"], int(r["nsat"])) for r in rows]

    def products(self, path: str | None = None) -> list[sqlite3.Row]:
        if path is None:
            return self.conn.execute("SELECT * FROM products ORDER BY file, kind").fetchall()
        return self.conn.execute("SELECT * FROM products WHERE file=? ORDER BY kind", (str(path),)).fetchall()

    def products_exist(self, path: str) -> bool:
        """Every recorded product of ``path`` is on disk."""
        return all(os.path.exists(r["path"]) for r in self.products(path))

    # -- events, sequence calibrations ----------------------------------------------------------
    def event(self, level: str, message: str) -> None:
        with self.transaction():
            self.conn.execute("INSERT INTO events (time, level, message) VALUES (?,?,?)", (time.time(), level, message))

    def events(self, limit: int = 20) -> list[sqlite3.Row]:
        return self.conn.execute("SELECT * FROM events ORDER BY id DESC LIMIT ?", (limit,)).fetchall()[::-1]


def _named(path: str, message: str) -> str:
    """``message`` prefixed with the file name unless it already names the file."""
    name = Path(path).name
    return message if name in message else f"{name}: {message}"


def _plain(value):
    """JSON/SQLite-friendly value (numpy scalars/arrays → Python)."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)

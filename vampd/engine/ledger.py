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

import hashlib
import json
import os
import re
import sqlite3
import stat as _stat
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

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
]

SCHEMA_VERSION = 1
LEDGER_NAME = "vampd.sqlite"
#: pending → queued → running → done | failed (retried) | parked (given up); ignored: never processed
STATES = ("pending", "queued", "running", "done", "failed", "parked", "ignored")
_MIB = 1024 * 1024

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
_ADDED_COLUMNS = {"ino": "INTEGER", "error_kind": "TEXT", "t_retry": "REAL", "mjd_str": "REAL", "mjd_end": "REAL"}

_SUMMARY_KEYS = ("target", "filter", "camera", "flc", "hwp", "exptime", "mjd", "nframes", "obs_mod")


@dataclass(frozen=True)
class FileIdentity:
    """What makes an input file "the same file": size, modification time and content hash."""

    size: int
    mtime_ns: int
    chash: str
    ino: int | None = None


def content_hash(path: os.PathLike | str, size: int | None = None) -> str:
    """SHA-1 of the file size and its first and last MiB (fast on multi-GB cubes)."""
    path = Path(path)
    if size is None:
        size = path.stat().st_size
    h = hashlib.sha1(str(size).encode())
    with open(path, "rb") as fh:  # only the first ``size`` bytes: what follows is not content
        h.update(fh.read(min(size, _MIB)))
        if size > 2 * _MIB:
            fh.seek(size - _MIB)
            h.update(fh.read(_MIB))
        elif size > _MIB:
            h.update(fh.read(size - _MIB))
    return h.hexdigest()


def content_extent(path: os.PathLike | str, size: int) -> int:
    """Bytes that are the file's content: its FITS structure up to the data HDU's padded end
    (bytes appended after it are not), or the whole file if it is not (yet) FITS."""
    from vampd.errors import VampdError
    from vampd.fitsbytes import data_hdu_index, file_layouts

    try:
        lays, _ = file_layouts(path, data_hdu_index(path))
    except VampdError:
        return size
    return min(size, lays[-1].padded_end)


def file_identity(path: os.PathLike | str) -> FileIdentity:
    """Stat and hash ``path`` (raises ``FileNotFoundError`` if it vanished)."""
    st = os.stat(path)
    if not _stat.S_ISREG(st.st_mode):
        raise IsADirectoryError(f"{path}: not a regular file")
    return FileIdentity(st.st_size, st.st_mtime_ns, content_hash(path, content_extent(path, st.st_size)), st.st_ino)


def stat_identity(path: str) -> tuple[int, int, int] | None:
    """``(size, mtime_ns, inode)`` of ``path`` (of the link itself if it cannot be followed), None if gone."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        try:
            st = os.lstat(path)  # a dangling symlink
        except OSError:
            return None
    except OSError:  # a loop, a component not searchable, a name too long
        try:
            st = os.lstat(path)
        except OSError:
            return None
    return st.st_size, st.st_mtime_ns, st.st_ino


def ledger_key(path: os.PathLike | str) -> str:
    """The ``files.path`` key of a path: itself, or for a name that is not valid UTF-8 its
    bytes with the invalid ones escaped (``\\xNN``: SQLite text must be UTF-8)."""
    path = os.fspath(path)
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return os.fsencode(path).decode("utf-8", "backslashreplace")
    return path


def path_of_key(key: str) -> str:
    """The file-system path of a ``files.path`` key (inverse of :func:`ledger_key`)."""
    if "\\x" not in key:
        return key
    raw = re.sub(rb"\\x([0-9a-f]{2})", lambda m: bytes([int(m.group(1), 16)]), key.encode("utf-8"))
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return os.fsdecode(raw)  # it was an escaped name
    return key  # a real backslash in a valid name


def printable(text: str) -> str:
    """``text`` safe for one log line: control characters (newlines) and invalid bytes escaped."""
    text = ledger_key(text)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def pid_alive(pid: int | None) -> bool:
    """True if a process with this pid exists (zombies count as dead)."""
    if not pid or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (killed, not yet reaped) is not alive
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def daemon_alive(info, stale: float = 30.0, now: float | None = None) -> bool:
    """A ``daemon`` row describes a live daemon: not stopped, pid alive, heartbeat fresh."""
    if info is None or info["stopped"] is not None or not pid_alive(info["pid"]):
        return False
    now = time.time() if now is None else now
    return info["heartbeat"] is not None and now - info["heartbeat"] < stale


class Ledger:
    """The SQLite ledger of one output directory.

    Parameters
    ----------
    outdir : path
        Directory holding ``vampd.sqlite`` (created if needed unless ``readonly``).
    readonly : bool
        Open read-only (``status``/``live``); writing methods then raise ``sqlite3.OperationalError``.
    """

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
            with self.transaction():
                self.conn.execute(
                    "INSERT INTO files (path, size, mtime_ns, chash, state, config_hash, nbytes, t_seen, t_complete, ino)"
                    " VALUES (?,?,?,?, 'pending', ?,?,?,?,?)",
                    (path, identity.size, identity.mtime_ns, identity.chash, config_hash, nbytes, now, t_complete,
                     identity.ino),
                )
            return "new"
        reason = None
        if identity.chash != row["chash"]:  # the hash covers the content's length
            reason = "changed"
        elif force:
            reason = "forced"
        elif row["state"] in ("done", "failed", "parked") and row["config_hash"] != config_hash:
            reason = "config"
        elif row["state"] == "done":
            if not self.products_exist(path):
                reason = "missing-product"
        elif row["state"] == "failed":
            reason = "retry" if (row["t_retry"] or 0.0) <= now else None  # backoff not over: wait
        elif row["state"] in ("pending", "queued", "running"):
            reason = "pending"
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
                (identity.size, identity.mtime_ns, identity.chash, identity.ino, nbytes, t_complete,
                 reset_tries, reset_tries, path),
            )
        return reason

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
                f"UPDATE files SET state='done', stage='done', error=NULL, tries=0, error_kind=NULL, t_done=?, latency=?,"
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
        where, args = "state IN ('parked', 'failed')", []
        if paths is not None:
            keys = [ledger_key(p) for p in paths]
            where += f" AND path IN ({','.join('?' * len(keys))})"
            args += keys
        if kinds is not None:
            kinds = list(kinds)
            where += f" AND COALESCE(error_kind, 'permanent') IN ({','.join('?' * len(kinds))})"
            args += kinds
        with self.transaction():
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
        return n

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
            " WHERE f.state = 'done' AND f.mjd BETWEEN ? AND ? AND f.target IS ? AND f.filter IS ?"
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
            self.conn.execute("UPDATE files SET state='pending' WHERE path=? AND state IN ('queued','running')", (path,))

    def reset_interrupted(self) -> int:
        """Rows left ``queued``/``running`` by a crash go back to ``pending``; returns how many."""
        with self.transaction():
            return self.conn.execute(
                "UPDATE files SET state='pending' WHERE state IN ('queued', 'running')"
            ).rowcount

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

    # -- events, sets, daemon -------------------------------------------------------------------
    def event(self, level: str, message: str) -> None:
        with self.transaction():
            self.conn.execute("INSERT INTO events (time, level, message) VALUES (?,?,?)", (time.time(), level, message))

    def events(self, limit: int = 20) -> list[sqlite3.Row]:
        return self.conn.execute("SELECT * FROM events ORDER BY id DESC LIMIT ?", (limit,)).fetchall()[::-1]

    def upsert_set(self, key: str, mode: str, state: str, members: list, reason: str | None = None) -> None:
        """Create or update an HWP set (``state``: open, complete or broken)."""
        now = time.time()
        with self.transaction():
            self.conn.execute(
                "INSERT INTO sets (key, mode, state, reason, members, created, updated) VALUES (?,?,?,?,?,?,?)"
                " ON CONFLICT(key) DO UPDATE SET mode=excluded.mode, state=excluded.state,"
                " reason=excluded.reason, members=excluded.members, updated=excluded.updated",
                (key, mode, state, reason, json.dumps(members), now, now),
            )

    def record_specphot(self, key: str, row: dict, products: Iterable[tuple[str, str, str]] = ()) -> None:
        """Record a sequence calibration (``row``: columns of ``specphot``) and, in the same
        transaction, its calibrated products as ``(file, kind, path)`` (replacing that kind's rows)."""
        now = time.time()
        cols = ("camera", "target", "filter", "unit", "source", "state", "fingerprint", "members",
                "factors", "products", "mjd", "error")
        vals = [json.dumps(_plain(row.get(c))) if isinstance(row.get(c), (list, dict)) else _plain(row.get(c)) for c in cols]
        prods = []
        for file, kind, ppath in products:
            st = os.stat(ppath)
            prods.append((file, kind, str(ppath), st.st_mtime_ns, st.st_size, now))
        with self.transaction():
            self.conn.execute(
                f"INSERT OR REPLACE INTO specphot (key, {', '.join(cols)}, updated) VALUES (?{',?' * len(cols)},?)",
                (key, *vals, now),
            )
            for file, kind in {(p[0], p[1]) for p in prods}:
                self.conn.execute("DELETE FROM products WHERE file=? AND kind=?", (file, kind))
            self.conn.executemany("INSERT OR REPLACE INTO products VALUES (?,?,?,?,?,?)", prods)

    def specphot_rows(self, state: str | None = None) -> list[sqlite3.Row]:
        """Sequence calibrations (all, or those in ``state``), oldest sequence first."""
        q = "SELECT * FROM specphot" + (" WHERE state=?" if state else "") + " ORDER BY mjd, key"
        return self.conn.execute(q, (state,) if state else ()).fetchall()

    def daemon_start(self, pid: int, config: str = "", config_hash: str = "") -> None:
        now = time.time()
        with self.transaction():
            self.conn.execute(
                "INSERT OR REPLACE INTO daemon (id, pid, started, heartbeat, stopped, host, config, config_hash, status)"
                " VALUES (1,?,?,?,NULL,?,?,?, 'starting')",
                (pid, now, now, os.uname().nodename, str(config), config_hash),
            )

    def heartbeat(self, status: str = "running") -> None:
        with self.transaction():
            self.conn.execute("UPDATE daemon SET heartbeat=?, status=? WHERE id=1", (time.time(), status))

    def daemon_stop(self) -> None:
        with self.transaction():
            self.conn.execute("UPDATE daemon SET stopped=?, status='stopped' WHERE id=1", (time.time(),))

    def daemon_info(self) -> sqlite3.Row | None:
        return self.conn.execute("SELECT * FROM daemon WHERE id=1").fetchone()

    # --- least-squares accumulators ---
    # Shadow paging (vampd.engine.leastsq_trigger): an accumulator generation is an immutable NPZ;
    # ``lsq_acc`` names the generation that holds exactly the cubes listed in ``lsq_members``
    # (error IS NULL), and both change in one transaction (:meth:`lsq_commit`).
    _LSQ_SCHEMA = """
    CREATE TABLE IF NOT EXISTS lsq_acc (
        key TEXT PRIMARY KEY, name TEXT, target TEXT, filter TEXT, gen INTEGER NOT NULL,
        path TEXT, digest TEXT, ncubes INTEGER, fields TEXT, shape TEXT, updated REAL,
        solved_ncubes INTEGER, solved_at REAL, snr REAL, stats TEXT
    );
    CREATE TABLE IF NOT EXISTS lsq_members (
        key TEXT NOT NULL, file TEXT NOT NULL, token TEXT NOT NULL, contrib TEXT, gen INTEGER,
        camera INTEGER, flc TEXT, hwp REAL, mjd REAL, error TEXT, PRIMARY KEY (key, file)
    );
    """

    def lsq_schema(self) -> None:
        """Create the least-squares tables (idempotent; the writer calls it before use)."""
        self.conn.executescript(self._LSQ_SCHEMA)

    def _lsq_rows(self, sql: str, args=()) -> list[sqlite3.Row]:
        try:
            return self.conn.execute(sql, args).fetchall()
        except sqlite3.OperationalError:  # read-only ledger of a night without least squares
            return []

    def lsq_inputs(self) -> list[sqlite3.Row]:
        """Done files with a coadded product: file, product, its recorded mtime/size and the slot."""
        return self.conn.execute(
            "SELECT f.path AS file, p.path AS product, p.mtime_ns AS mtime_ns, p.size AS size, f.target AS target,"
            " f.filter AS filter, f.camera AS camera, f.flc AS flc, f.hwp AS hwp, f.mjd AS mjd"
            " FROM files f JOIN products p ON p.file = f.path WHERE f.state = 'done' AND p.kind = 'coadded'"
            " ORDER BY f.mjd, f.path"
        ).fetchall()

    def lsq_accumulators(self, name: str | None = None) -> list[sqlite3.Row]:
        """Accumulator rows (of one run ``name``, or all)."""
        if name is None:
            return self._lsq_rows("SELECT * FROM lsq_acc ORDER BY key")
        return self._lsq_rows("SELECT * FROM lsq_acc WHERE name=? ORDER BY key", (name,))

    def lsq_members(self, key: str | None = None) -> list[sqlite3.Row]:
        """Member rows (``error`` set: rejected, not in the accumulator)."""
        if key is None:
            return self._lsq_rows("SELECT * FROM lsq_members ORDER BY key, mjd, file")
        return self._lsq_rows("SELECT * FROM lsq_members WHERE key=? ORDER BY mjd, file", (key,))

    def lsq_commit(self, key: str, acc: dict, add: Iterable[dict], remove: Iterable[str]) -> None:
        """Point ``key`` at a new accumulator generation and update its member list, atomically.

        ``acc``: lsq_acc columns (gen, path, digest, ...); ``add``: member rows (replacing the
        file's row); ``remove``: files whose rows go.
        """
        cols = ("name", "target", "filter", "gen", "path", "digest", "ncubes", "fields", "shape")
        mcols = ("token", "contrib", "gen", "camera", "flc", "hwp", "mjd", "error")
        with self.transaction():
            self.conn.execute(
                f"INSERT INTO lsq_acc (key, {', '.join(cols)}, updated) VALUES (?{',?' * len(cols)},?)"
                f" ON CONFLICT(key) DO UPDATE SET {', '.join(f'{c}=excluded.{c}' for c in cols)}, updated=excluded.updated",
                (key, *(_plain(acc.get(c)) for c in cols), time.time()),
            )
            self.conn.executemany("DELETE FROM lsq_members WHERE key=? AND file=?", [(key, f) for f in remove])
            self.conn.executemany(
                f"INSERT OR REPLACE INTO lsq_members (key, file, {', '.join(mcols)}) VALUES (?,?{',?' * len(mcols)})",
                [(key, r["file"], *(_plain(r.get(c)) for c in mcols)) for r in add],
            )

    def lsq_solved(self, key: str, ncubes: int, snr: float | None, stats: dict) -> None:
        """Record a solve of ``key`` (cubes in it, Q_phi S/N, degenerate pixels, products)."""
        with self.transaction():
            self.conn.execute(
                "UPDATE lsq_acc SET solved_ncubes=?, solved_at=?, snr=?, stats=? WHERE key=?",
                (ncubes, time.time(), _plain(snr), json.dumps(_plain(stats)), key),
            )

    def lsq_snr(self, key: str, snr: float | None) -> None:
        """Record the Q_phi S/N of the latest solve (products not rewritten)."""
        with self.transaction():
            self.conn.execute("UPDATE lsq_acc SET snr=? WHERE key=?", (_plain(snr), key))

    def lsq_coverage(self, key: str) -> dict[str, int]:
        """Cubes in the accumulator per HWP angle (``{"0": n, "22.5": n, ...}``)."""
        rows = self._lsq_rows(
            "SELECT ROUND(hwp, 1) AS h, COUNT(*) FROM lsq_members WHERE key=? AND error IS NULL GROUP BY h ORDER BY h",
            (key,),
        )
        return {f"{r[0]:g}" if r[0] is not None else "?": int(r[1]) for r in rows}

    def lsq_status(self) -> list[dict]:
        """Per accumulator: target, filter, cubes, rejected cubes, last Q_phi S/N, coverage per HWP."""
        out = []
        for r in self.lsq_accumulators():
            nrej = self._lsq_rows("SELECT COUNT(*) FROM lsq_members WHERE key=? AND error IS NOT NULL", (r["key"],))
            out.append({"key": r["key"], "name": r["name"], "target": r["target"], "filter": r["filter"],
                        "ncubes": r["ncubes"], "rejected": int(nrej[0][0]) if nrej else 0, "snr": r["snr"],
                        "solved_ncubes": r["solved_ncubes"], "coverage": self.lsq_coverage(r["key"]), "updated": r["updated"],
                        "stats": json.loads(r["stats"] or "{}")})
        return out
    # --- end least-squares accumulators ---
    # --- HWP sets and blocks ---------------------------------------------------------------
    _BLOCKS_SQL = (
        "CREATE TABLE IF NOT EXISTS blocks (key TEXT PRIMARY KEY, camera INTEGER, flc TEXT, hwp REAL,"
        " target TEXT, filter TEXT, run INTEGER, state TEXT NOT NULL, reason TEXT, members TEXT,"
        " product TEXT, nframes INTEGER, mjd REAL, t_complete REAL, mtime_ns INTEGER, error TEXT, updated REAL)"
    )

    def _blocks_table(self) -> bool:
        """The ``blocks`` table exists (created on first write; absent in older ledgers)."""
        return self.conn.execute("SELECT 1 FROM sqlite_master WHERE name='blocks'").fetchone() is not None

    _TAKEN_SQL = "CREATE TABLE IF NOT EXISTS pdi_taken (path TEXT PRIMARY KEY, owner TEXT NOT NULL)"

    def _taken_table(self) -> bool:
        return self.conn.execute("SELECT 1 FROM sqlite_master WHERE name='pdi_taken'").fetchone() is not None

    def take(self, owner: str, paths: Iterable[str]) -> None:
        """Record that ``paths`` belong to a permanent set or closed HWP block (``owner``), so the
        per-file trigger reads only the free rows and their neighbours."""
        rows = [(str(p), owner) for p in paths]
        with self.transaction():
            self.conn.execute(self._TAKEN_SQL)
            self.conn.executemany("INSERT OR REPLACE INTO pdi_taken VALUES (?,?)", rows)

    def taken_count(self) -> int:
        if not self._taken_table():
            return 0
        return int(self.conn.execute("SELECT COUNT(*) FROM pdi_taken").fetchone()[0])

    def pdi_files(self, window_days: float | None = None) -> list[dict]:
        """Set/block candidates from what the ledger recorded (no header is read): done files with
        their coadded product, and parked files. Each row has ``taken`` (owner or None). With
        ``window_days``, taken rows older than the oldest free done file by more than that are
        left out: the trigger's work then depends on the open part of the night only."""
        if not self._taken_table():
            with self.transaction():
                self.conn.execute(self._TAKEN_SQL)
        q = (
            "SELECT f.path, f.state, f.target, f.filter, f.camera, f.flc, f.hwp, f.mjd, f.nframes,"
            " f.t_complete, f.mtime_ns, f.error, p.path AS product, t.owner AS taken FROM files f"
            " LEFT JOIN products p ON p.file = f.path AND p.kind = 'coadded'"
            " LEFT JOIN pdi_taken t ON t.path = f.path"
            " WHERE f.state IN ('done', 'parked')"
        )
        args: tuple = ()
        if window_days is not None:
            q += (" AND (t.owner IS NULL OR f.mjd >= (SELECT MIN(g.mjd) FROM files g LEFT JOIN pdi_taken u"
                  " ON u.path = g.path WHERE g.state = 'done' AND u.owner IS NULL) - ?)")
            args = (float(window_days),)
        rows = self.conn.execute(q, args).fetchall()
        return [dict(r) for r in rows if r["state"] == "parked" or r["product"] is not None]

    def done_near(self, mjd: float, half_window_days: float) -> list[dict]:
        """Done files with a coadded product within ``half_window_days`` of ``mjd`` (diff images)."""
        rows = self.conn.execute(
            "SELECT f.path, f.state, f.target, f.filter, f.camera, f.flc, f.hwp, f.mjd, f.nframes, f.exptime,"
            " p.path AS product FROM files f JOIN products p ON p.file = f.path AND p.kind = 'coadded'"
            " WHERE f.state = 'done' AND f.mjd BETWEEN ? AND ?",
            (float(mjd) - half_window_days, float(mjd) + half_window_days),
        ).fetchall()
        return [dict(r) for r in rows]

    def unfinished_horizon(self) -> float:
        """Arrival time of the earliest file still to be reduced (inf if none): set and block
        decisions wait for every file that arrived before the facts they rest on."""
        row = self.conn.execute(
            "SELECT MIN(COALESCE(t_complete, t_seen, 0)) FROM files WHERE state IN ('pending','queued','running','failed')"
        ).fetchone()
        return float("inf") if row is None or row[0] is None else float(row[0])

    def set_rows(self) -> list[sqlite3.Row]:
        """HWP set rows, oldest first."""
        return self.conn.execute("SELECT * FROM sets ORDER BY id").fetchall()

    def delete_sets(self, keys: Iterable[str]) -> None:
        """Remove set rows (open/broken rows a rebuild no longer produces)."""
        keys = list(keys)
        if keys:
            with self.transaction():
                self.conn.executemany("DELETE FROM sets WHERE key=?", [(k,) for k in keys])

    def block_rows(self, state: str | tuple | None = None) -> list[sqlite3.Row]:
        """HWP block rows (all, or those in ``state``: one or a tuple of states), in time order."""
        if not self._blocks_table():
            return []
        states = (state,) if isinstance(state, str) else tuple(state or ())
        q = "SELECT * FROM blocks" + (f" WHERE state IN ({','.join('?' * len(states))})" if states else "")
        return self.conn.execute(q + " ORDER BY mjd, key", states).fetchall()

    def block_members_rows(self, window_days: float) -> list[sqlite3.Row]:
        """Done/failed blocks whose product is free, or within ``window_days`` of the oldest free one."""
        if not self._blocks_table():
            return []
        if not self._taken_table():
            with self.transaction():
                self.conn.execute(self._TAKEN_SQL)
        return self.conn.execute(
            "SELECT b.*, t.owner AS taken FROM blocks b LEFT JOIN pdi_taken t ON t.path = b.product WHERE b.state IN ('done','failed')"
            " AND (t.owner IS NULL OR b.mjd >= (SELECT MIN(c.mjd) FROM blocks c LEFT JOIN pdi_taken u"
            " ON u.path = c.product WHERE c.state IN ('done','failed') AND u.owner IS NULL) - ?) ORDER BY b.mjd, b.key",
            (float(window_days),),
        ).fetchall()

    def upsert_block(self, key: str, row: dict, take: Iterable[str] | None = None) -> None:
        """Create or update an HWP block (``row``: columns of ``blocks``; absent ones kept); with
        ``take``, record those member paths as taken by the block in the same transaction."""
        cols = [c for c in ("camera", "flc", "hwp", "target", "filter", "run", "state", "reason", "members",
                            "product", "nframes", "mjd", "t_complete", "mtime_ns", "error") if c in row]
        vals = [json.dumps(row[c]) if isinstance(row[c], (list, dict)) else _plain(row[c]) for c in cols]
        with self.transaction():
            self.conn.execute(self._BLOCKS_SQL)
            self.conn.execute(
                f"INSERT INTO blocks (key, {', '.join(cols)}, updated) VALUES (?{',?' * len(cols)},?)"
                f" ON CONFLICT(key) DO UPDATE SET {', '.join(f'{c}=excluded.{c}' for c in cols)}, updated=excluded.updated",
                (key, *vals, time.time()),
            )
            if take is not None:
                self.conn.execute(self._TAKEN_SQL)
                self.conn.executemany("INSERT OR REPLACE INTO pdi_taken VALUES (?,?)",
                                      [(str(p), "block:" + key) for p in take])

    def delete_blocks(self, keys: Iterable[str]) -> None:
        """Remove open block rows that a rebuild no longer produces."""
        keys = list(keys)
        if keys and self._blocks_table():
            with self.transaction():
                self.conn.executemany("DELETE FROM blocks WHERE key=? AND state='open'", [(k,) for k in keys])

    def next_block_run(self, camera: int, flc: str) -> int:
        """Run index (docs/instrument.md §7.1 group key) of the next closed block of a (camera, FLC) stream."""
        if not self._blocks_table():
            return 0
        row = self.conn.execute(
            "SELECT COUNT(*) FROM blocks WHERE camera=? AND flc=? AND run IS NOT NULL", (int(camera), str(flc))
        ).fetchone()
        return int(row[0])

    def block_counts(self) -> dict[str, int]:
        """Number of HWP blocks in each state (open, ready, running, done, failed)."""
        out = dict.fromkeys(("open", "ready", "running", "done", "failed"), 0)
        if self._blocks_table():
            for state, n in self.conn.execute("SELECT state, COUNT(*) FROM blocks GROUP BY state"):
                out[state] = n
        return out

    # -- summaries ----------------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        """Number of files in each state (every state present, zeros included)."""
        out = dict.fromkeys(STATES, 0)
        for state, n in self.conn.execute("SELECT state, COUNT(*) FROM files GROUP BY state"):
            out[state] = n
        return out

    def set_counts(self) -> dict[str, int]:
        out = {"open": 0, "complete": 0, "broken": 0}
        for state, n in self.conn.execute("SELECT state, COUNT(*) FROM sets GROUP BY state"):
            out[state] = n
        return out

    # --- read-only queries: live, status, finalize -------------------------------------------
    # Readers (``vampd status``, ``vampd live``, ``vampd finalize``, the specphot trigger) go
    # through these named methods only; none of them writes.
    @classmethod
    def snapshot(cls, outdir: os.PathLike | str) -> Ledger:
        """An in-memory copy of ``outdir/vampd.sqlite`` taken in one read transaction (SQLite
        backup API), so a running daemon's later commits do not change what the reader sees."""
        path = Path(outdir).resolve() / LEDGER_NAME
        if not path.exists():
            raise FileNotFoundError(f"{path}: no ledger here (has vampd run or watch reduced this night?)")
        src = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30.0)
        mem = sqlite3.connect(":memory:")
        try:
            src.backup(mem)
        finally:
            src.close()
        mem.row_factory = sqlite3.Row
        led = cls.__new__(cls)
        led.outdir, led.path, led.readonly, led.conn = Path(outdir).resolve(), path, True, mem
        return led

    def begin_read(self) -> None:
        """Start one read transaction (a consistent view while a daemon commits)."""
        self.conn.execute("BEGIN")

    def end_read(self) -> None:
        try:
            self.conn.execute("COMMIT")
        except sqlite3.Error:
            pass

    def all_files(self) -> list[sqlite3.Row]:
        """Every ``files`` row, by observation time (rows without MJD last), then path."""
        return self.conn.execute("SELECT * FROM files ORDER BY mjd IS NULL, mjd, path").fetchall()

    def paths_in_states(self, states: Iterable[str], by_time: bool = False) -> list[str]:
        """Paths of the files in any of ``states``, by path (or by MJD then path)."""
        states = tuple(states)
        order = "mjd, path" if by_time else "path"
        q = f"SELECT path FROM files WHERE state IN ({','.join('?' * len(states))}) ORDER BY {order}"
        return [r[0] for r in self.conn.execute(q, states)]

    def done_products_complete(self) -> tuple[int, int]:
        """``(done, missing)``: done files whose recorded products all exist on disk, and the
        others (one query)."""
        rows = self.conn.execute(
            "SELECT f.path, p.path FROM files f LEFT JOIN products p ON p.file = f.path WHERE f.state='done'"
        ).fetchall()
        ok: dict[str, bool] = {}
        for fpath, ppath in rows:
            ok[fpath] = ok.get(fpath, True) and ppath is not None and os.path.exists(ppath)
        n = sum(ok.values())
        return n, len(ok) - n

    def last_done(self) -> sqlite3.Row | None:
        """The most recently finished file."""
        return self.conn.execute(
            "SELECT path, t_done, latency, target, filter, camera, flc, hwp, mjd, metrics FROM files"
            " WHERE state='done' ORDER BY t_done DESC LIMIT 1"
        ).fetchone()

    def problem_files(self) -> list[sqlite3.Row]:
        """Failed (will retry) and parked (given up) files, by path."""
        return self.conn.execute(
            "SELECT path, state, tries, error FROM files WHERE state IN ('failed','parked') ORDER BY path"
        ).fetchall()

    def done_latencies(self) -> list[float]:
        """Latencies of the done files, sorted."""
        return [r[0] for r in self.conn.execute(
            "SELECT latency FROM files WHERE state='done' AND latency IS NOT NULL ORDER BY latency")]

    def set_rows(self, state: str | None = None) -> list[sqlite3.Row]:
        """HWP sets (all, or those in ``state``) in creation order."""
        q = "SELECT * FROM sets" + (" WHERE state=?" if state else "") + " ORDER BY created, id"
        return self.conn.execute(q, (state,) if state else ()).fetchall()

    def product_rows(self) -> list[sqlite3.Row]:
        """``(file, kind, path)`` of every recorded product, sorted."""
        return self.conn.execute("SELECT file, kind, path FROM products ORDER BY file, kind, path").fetchall()

    def product_path(self, file: str, kind: str) -> str | None:
        """Path of ``file``'s product of ``kind`` (the first, if several)."""
        row = self.conn.execute("SELECT path FROM products WHERE file=? AND kind=? ORDER BY path LIMIT 1",
                                (str(file), kind)).fetchone()
        return row[0] if row else None

    def done_cameras(self) -> list[int]:
        """Cameras that have done files."""
        return [int(r[0]) for r in self.conn.execute(
            "SELECT DISTINCT camera FROM files WHERE state='done' AND camera IS NOT NULL ORDER BY camera")]

    def camera_stream(self, camera: int) -> list[tuple[sqlite3.Row, dict[str, str]]]:
        """Done files of ``camera`` by MJD with their products ``{kind: path}`` (one query)."""
        out: dict[str, tuple[sqlite3.Row, dict[str, str]]] = {}
        for r in self.conn.execute(
            "SELECT f.path, f.target, f.filter, f.camera, f.mjd, f.t_done, p.kind, p.path AS product"
            " FROM files f LEFT JOIN products p ON p.file = f.path"
            " WHERE f.state='done' AND f.camera=? ORDER BY f.mjd, f.path, p.kind", (int(camera),)):
            rec = out.setdefault(r["path"], (r, {}))
            if r["kind"] is not None:
                rec[1][r["kind"]] = r["product"]
        return list(out.values())

    def state_table(self) -> list[tuple[str, int]]:
        """``(state, files)`` for every state present, in lifecycle order (report: Counts)."""
        order = {s: i for i, s in enumerate(STATES)}
        rows = self.conn.execute("SELECT state, COUNT(*) FROM files GROUP BY state").fetchall()
        return sorted(((r[0], int(r[1])) for r in rows), key=lambda r: (order.get(r[0], len(order)), r[0]))

    def target_table(self) -> list[dict]:
        """One row per (target, filter, camera) with files done/parked/other, open-shutter time,
        frames and MJD span (report: Targets), in one query.

        A file parked before its header was read has no target, filter or camera: it is
        attributed to the file that arrived nearest to it in time (``t_seen``) with a known
        header, which is the sequence it belonged to.
        """
        q = """
        WITH near AS (
            SELECT x.path, k.target, k.filter, k.camera, ROW_NUMBER() OVER (
                PARTITION BY x.path ORDER BY abs(COALESCE(k.t_seen, 0) - COALESCE(x.t_seen, 0)), k.path) AS rn
            FROM files x JOIN files k ON k.target IS NOT NULL WHERE x.target IS NULL),
        f AS (
            SELECT x.*, COALESCE(x.target, n.target) AS t_, COALESCE(x.filter, n.filter) AS f_,
                   COALESCE(x.camera, n.camera) AS c_
            FROM files x LEFT JOIN near n ON n.path = x.path AND n.rn = 1)
        SELECT COALESCE(t_, '(unknown)') AS target, COALESCE(f_, '(unknown)') AS filter, COALESCE(c_, 0) AS camera,
               SUM(state='done') AS done, SUM(state='parked') AS parked,
               SUM(state NOT IN ('done', 'parked', 'ignored')) AS unfinished,
               SUM(CASE WHEN state='done' THEN COALESCE(nframes, 0) * COALESCE(exptime, 0.0) ELSE 0 END) AS shutter,
               SUM(CASE WHEN state='done' THEN COALESCE(json_extract(metrics, '$.nframes'), nframes, 0) ELSE 0 END) AS nframes,
               SUM(CASE WHEN state='done' THEN COALESCE(json_extract(metrics, '$.nkept'),
                   json_extract(metrics, '$.nframes'), nframes, 0) ELSE 0 END) AS nkept,
               MIN(mjd) AS mjd0, MAX(mjd) AS mjd1
        FROM f GROUP BY 1, 2, 3 ORDER BY 1, 2, 3
        """
        return [dict(r) for r in self.conn.execute(q)]


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

"""Read-only queries of the ledger: live, status, finalize.

Readers (``vampd status``, ``vampd live``, ``vampd finalize``, the specphot trigger) go
through these named methods only; none of them writes.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from vampd.engine.ledger.core import LEDGER_NAME, STATES

if TYPE_CHECKING:
    from vampd.engine.ledger import Ledger


class QueriesMixin:
    """Summaries and read-only queries (mixed into :class:`~vampd.engine.ledger.Ledger`)."""

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
        """Failed (will retry) and parked (given up) files, by path: ``path, state, tries,
        error, error_kind, t_retry`` (``t_retry``: when a failed file is due again, epoch s)."""
        return self.conn.execute(
            "SELECT path, state, tries, error, error_kind, t_retry FROM files"
            " WHERE state IN ('failed','parked') ORDER BY path"
        ).fetchall()

    def done_latencies(self) -> list[float]:
        """Latencies of the done files, sorted."""
        return [
            r[0]
            for r in self.conn.execute(
                "SELECT latency FROM files WHERE state='done' AND latency IS NOT NULL ORDER BY latency"
            )
        ]

    def set_rows(self, state: str | None = None) -> list[sqlite3.Row]:
        """HWP sets (all, or those in ``state``) in creation order."""
        q = "SELECT * FROM sets" + (" WHERE state=?" if state else "") + " ORDER BY created, id"
        return self.conn.execute(q, (state,) if state else ()).fetchall()

    def product_rows(self) -> list[sqlite3.Row]:
        """``(file, kind, path)`` of every recorded product, sorted."""
        return self.conn.execute("SELECT file, kind, path FROM products ORDER BY file, kind, path").fetchall()

    def product_path(self, file: str, kind: str) -> str | None:
        """Path of ``file``'s product of ``kind`` (the first, if several)."""
        row = self.conn.execute(
            "SELECT path FROM products WHERE file=? AND kind=? ORDER BY path LIMIT 1", (str(file), kind)
        ).fetchone()
        return row[0] if row else None

    def done_cameras(self) -> list[int]:
        """Cameras that have done files."""
        return [
            int(r[0])
            for r in self.conn.execute(
                "SELECT DISTINCT camera FROM files WHERE state='done' AND camera IS NOT NULL ORDER BY camera"
            )
        ]

    def camera_stream(self, camera: int) -> list[tuple[sqlite3.Row, dict[str, str]]]:
        """Done files of ``camera`` by MJD with their products ``{kind: path}`` (one query)."""
        out: dict[str, tuple[sqlite3.Row, dict[str, str]]] = {}
        for r in self.conn.execute(
            "SELECT f.path, f.target, f.filter, f.camera, f.mjd, f.t_done, p.kind, p.path AS product"
            " FROM files f LEFT JOIN products p ON p.file = f.path"
            " WHERE f.state='done' AND f.camera=? ORDER BY f.mjd, f.path, p.kind",
            (int(camera),),
        ):
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
               SUM(CASE WHEN state='done' THEN COALESCE(json_extract(metrics, '$.nframes'), nframes, 0) ELSE 0 END)
                   AS nframes,
               SUM(CASE WHEN state='done' THEN COALESCE(json_extract(metrics, '$.nkept'),
                   json_extract(metrics, '$.nframes'), nframes, 0) ELSE 0 END) AS nkept,
               MIN(mjd) AS mjd0, MAX(mjd) AS mjd1
        FROM f GROUP BY 1, 2, 3 ORDER BY 1, 2, 3
        """
        return [dict(r) for r in self.conn.execute(q)]

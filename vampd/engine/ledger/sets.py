"""HWP sets and blocks in the ledger (``sets``, ``blocks``, ``pdi_taken``): the polarimetric
triggers' candidates, their set/block rows and which files a permanent set or closed block took."""

from __future__ import annotations

import json
import math
import sqlite3
import time
from collections.abc import Iterable

from vampd.engine.ledger.core import _plain


class SetsMixin:
    """HWP sets and blocks (mixed into :class:`~vampd.engine.ledger.Ledger`)."""

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

    _BLOCKS_SQL = (
        "CREATE TABLE IF NOT EXISTS blocks (key TEXT PRIMARY KEY, camera INTEGER, flc TEXT, hwp REAL,"
        " target TEXT, filter TEXT, run INTEGER, state TEXT NOT NULL, reason TEXT, members TEXT,"
        " product TEXT, nframes INTEGER, mjd REAL, t_complete REAL, mtime_ns INTEGER, error TEXT, updated REAL)"
    )

    def _blocks_table(self) -> bool:
        """The ``blocks`` table exists (created on first write; absent in older ledgers)."""
        return self.conn.execute("SELECT 1 FROM sqlite_master WHERE name='blocks'").fetchone() is not None

    # ``pdi_taken`` is created with the schema (``core._TAKEN_SCHEMA``): a ledger opened for
    # writing has it; only a read-only ledger of an older vampd may lack it

    def _taken_table(self) -> bool:
        return self.conn.execute("SELECT 1 FROM sqlite_master WHERE name='pdi_taken'").fetchone() is not None

    def take(self, owner: str, paths: Iterable[str]) -> None:
        """Record that ``paths`` belong to a permanent set or closed HWP block (``owner``), so the
        per-file trigger reads only the free rows and their neighbours."""
        rows = [(str(p), owner) for p in paths]
        with self.transaction():
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
        q = (
            "SELECT f.rowid AS _rid, f.path, f.state, f.target, f.filter, f.camera, f.flc, f.hwp, f.mjd,"
            " f.nframes, f.t_complete, f.mtime_ns, f.error, p.path AS product, t.owner AS taken FROM files f"
            " LEFT JOIN products p ON p.file = f.path AND p.kind = 'coadded'"
            " LEFT JOIN pdi_taken t ON t.path = f.path WHERE "
        )
        free = " AND t.owner IS NULL"
        if window_days is None:
            rows = self.conn.execute(q + "f.state IN ('done', 'parked')").fetchall()
        else:
            # every query below is an index range, so the cost follows the open part of the night
            floor = self.conn.execute(
                "SELECT MIN(mjd) FROM files INDEXED BY files_free WHERE state = 'done' AND taken IS NULL"
            ).fetchone()
            rows = self.conn.execute(
                q + "f.state = 'parked' AND (f.mjd < ? OR f.mjd IS NULL)" + free,
                (math.inf if floor[0] is None else floor[0] - window_days,),
            ).fetchall()
            rows += self.conn.execute(q + "+f.state = 'done' AND f.mjd IS NULL" + free).fetchall()
            if floor[0] is not None:
                lo = float(floor[0]) - float(window_days)
                rows += self.conn.execute(q + "f.mjd >= ? AND +f.state IN ('done', 'parked')", (lo,)).fetchall()
            rows.sort(key=lambda r: (r["state"], r["_rid"]))  # the order of a scan of the state index
        out = []
        for r in rows:
            if r["state"] == "parked" or r["product"] is not None:
                d = dict(r)
                del d["_rid"]
                out.append(d)
        return out

    def unfinished_horizon(self) -> float:
        """Arrival time of the earliest file still to be reduced (inf if none): set and block
        decisions wait for every file that arrived before the facts they rest on."""
        row = self.conn.execute(
            "SELECT MIN(COALESCE(t_complete, t_seen, 0)) FROM files"
            " WHERE state IN ('pending','queued','running','failed')"
        ).fetchone()
        return float("inf") if row is None or row[0] is None else float(row[0])

    def last_arrival(self) -> float | None:
        """When the newest file arrived (complete on disk, else first seen); None without files."""
        row = self.conn.execute("SELECT MAX(COALESCE(t_complete, t_seen)) FROM files").fetchone()
        return None if row is None or row[0] is None else float(row[0])

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
        return self.conn.execute(
            "SELECT b.*, t.owner AS taken FROM blocks b LEFT JOIN pdi_taken t ON t.path = b.product"
            " WHERE b.state IN ('done','failed')"
            " AND (t.owner IS NULL OR b.mjd >= (SELECT MIN(c.mjd) FROM blocks c LEFT JOIN pdi_taken u"
            " ON u.path = c.product WHERE c.state IN ('done','failed') AND u.owner IS NULL) - ?) ORDER BY b.mjd, b.key",
            (float(window_days),),
        ).fetchall()

    def upsert_block(self, key: str, row: dict, take: Iterable[str] | None = None) -> None:
        """Create or update an HWP block (``row``: columns of ``blocks``; absent ones kept); with
        ``take``, record those member paths as taken by the block in the same transaction."""
        cols = [
            c
            for c in (
                "camera",
                "flc",
                "hwp",
                "target",
                "filter",
                "run",
                "state",
                "reason",
                "members",
                "product",
                "nframes",
                "mjd",
                "t_complete",
                "mtime_ns",
                "error",
            )
            if c in row
        ]
        vals = [json.dumps(row[c]) if isinstance(row[c], (list, dict)) else _plain(row[c]) for c in cols]
        # an open block's row never overwrites a closed one (another connection may have closed
        # it since this one read it: closed blocks are permanent)
        only_open = " WHERE blocks.state = 'open'" if row.get("state") == "open" else ""
        with self.transaction():
            self.conn.execute(self._BLOCKS_SQL)
            self.conn.execute(
                f"INSERT INTO blocks (key, {', '.join(cols)}, updated) VALUES (?{',?' * len(cols)},?)"
                f" ON CONFLICT(key) DO UPDATE SET {', '.join(f'{c}=excluded.{c}' for c in cols)},"
                f" updated=excluded.updated{only_open}",
                (key, *vals, time.time()),
            )
            if take is not None:
                self.conn.executemany(
                    "INSERT OR REPLACE INTO pdi_taken VALUES (?,?)", [(str(p), "block:" + key) for p in take]
                )

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

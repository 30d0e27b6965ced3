"""Least-squares accumulators in the ledger (``lsq_acc``, ``lsq_members``).

Shadow paging (vampd.engine.leastsq_trigger): an accumulator generation is an immutable NPZ;
``lsq_acc`` names the generation that holds exactly the cubes listed in ``lsq_members``
(error IS NULL), and both change in one transaction (:meth:`LeastSquaresMixin.lsq_commit`).
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable

from vampd.engine.ledger.core import _plain


class LeastSquaresMixin:
    """The least-squares accumulator tables (mixed into :class:`~vampd.engine.ledger.Ledger`)."""

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
                f" ON CONFLICT(key) DO UPDATE SET {', '.join(f'{c}=excluded.{c}' for c in cols)},"
                f" updated=excluded.updated",
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
            out.append(
                {
                    "key": r["key"],
                    "name": r["name"],
                    "target": r["target"],
                    "filter": r["filter"],
                    "ncubes": r["ncubes"],
                    "rejected": int(nrej[0][0]) if nrej else 0,
                    "snr": r["snr"],
                    "solved_ncubes": r["solved_ncubes"],
                    "coverage": self.lsq_coverage(r["key"]),
                    "updated": r["updated"],
                    "stats": json.loads(r["stats"] or "{}"),
                }
            )
        return out

"""Sequence calibrations (spectrophotometry) in the ledger: the ``specphot`` table and the
calibrated products recorded with each."""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterable

from vampd.engine.ledger.core import _plain


class SpecphotMixin:
    """Sequence calibrations (mixed into :class:`~vampd.engine.ledger.Ledger`)."""

    def record_specphot(self, key: str, row: dict, products: Iterable[tuple[str, str, str]] = ()) -> None:
        """Record a sequence calibration (``row``: columns of ``specphot``) and, in the same
        transaction, its calibrated products as ``(file, kind, path)`` (replacing that kind's rows)."""
        now = time.time()
        cols = (
            "camera",
            "target",
            "filter",
            "unit",
            "source",
            "state",
            "fingerprint",
            "members",
            "factors",
            "products",
            "mjd",
            "error",
        )
        vals = [
            json.dumps(_plain(row.get(c))) if isinstance(row.get(c), (list, dict)) else _plain(row.get(c)) for c in cols
        ]
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

"""The ``daemon`` row of the ledger (pid, heartbeat, stop) and whether it describes a live daemon."""

from __future__ import annotations

import os
import sqlite3
import time


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


class DaemonMixin:
    """Writing and reading the ``daemon`` row (mixed into :class:`~vampd.engine.ledger.Ledger`)."""

    def daemon_start(self, pid: int, config: str = "", config_hash: str = "") -> None:
        now = time.time()
        with self.transaction():
            self.conn.execute(
                "INSERT OR REPLACE INTO daemon (id, pid, started, heartbeat, stopped, host, config, config_hash,"
                " status)"
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

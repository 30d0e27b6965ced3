"""systemd's sd_notify protocol in a few lines of stdlib (no extra dependency).

``READY=1`` once the daemon is up, ``STATUS=...`` with the counts, ``WATCHDOG=1`` pings
(only while the observer and the workers are healthy) and ``STOPPING=1``. Outside systemd
(no ``NOTIFY_SOCKET``) every call is a no-op.
"""

from __future__ import annotations

import os
import socket

__all__ = ["notify", "watchdog_interval"]


def notify(*messages: str, env: dict | None = None) -> bool:
    """Send ``messages`` (e.g. ``"READY=1"``) to ``$NOTIFY_SOCKET``; True if sent."""
    addr = (env if env is not None else os.environ).get("NOTIFY_SOCKET")
    if not addr or not messages:
        return False
    if addr.startswith("@"):  # abstract namespace
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(addr)
            # never block: a receiver that does not read (its queue full) must not stall the
            # daemon's loop; a dropped STATUS/WATCHDOG datagram is harmless, a hung loop is not
            sock.send("\n".join(messages).encode(), socket.MSG_DONTWAIT)
        return True
    except OSError:  # includes BlockingIOError (queue full)
        return False


def watchdog_interval(env: dict | None = None) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings (half of ``$WATCHDOG_USEC``), or None if not asked."""
    env = env if env is not None else os.environ
    usec = env.get("WATCHDOG_USEC")
    pid = env.get("WATCHDOG_PID")
    if not usec or (pid and pid.isdigit() and int(pid) != os.getpid()):
        return None
    try:
        return int(usec) / 2e6
    except ValueError:
        return None

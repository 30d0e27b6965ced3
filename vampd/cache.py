"""The per-user on-disk cache (PSF models, the parsed IERS table): location and atomic writes.

``$VAMPD_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/vampd`` (default ``~/.cache/vampd``): one
cache per user, shared by every night, command and worker process. Entries are immutable files
whose names carry every input of their content (vampd version, model source, parameters), so
they never go stale; deleting the directory is always safe (it only costs the next start-up).
When the cache cannot be created, a caller-given fallback (e.g. the night's ``aux/cache``) is
used, and without one nothing is cached (slower, never wrong).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["cache_dir", "write_atomic"]


def cache_dir(kind: str, fallback: str | os.PathLike | None = None) -> Path | None:
    """``<cache root>/<kind>``, created if needed; ``None`` when no candidate is writable."""
    env = os.environ.get("VAMPD_CACHE_DIR", "").strip()
    if env:
        roots = [Path(env).expanduser()]
    else:
        xdg = os.environ.get("XDG_CACHE_HOME", "").strip() or os.path.join(os.path.expanduser("~"), ".cache")
        roots = [Path(xdg) / "vampd"]
    if fallback is not None:
        roots.append(Path(fallback))
    for root in roots:
        d = root / kind
        try:
            d.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(d, os.W_OK | os.X_OK):
            return d
    return None


def write_atomic(path: Path, write: Callable) -> bool:
    """Write ``path`` through ``write(fileobj)`` into a temporary file, then rename (atomic).

    Concurrent writers of the same entry are harmless: each renames a complete file. Returns
    False (after removing the temporary file) when the disk refuses: a cache never fails a job.
    """
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
        with os.fdopen(fd, "wb") as fh:
            write(fh)
        os.replace(tmp, path)
        return True
    except OSError:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        return False

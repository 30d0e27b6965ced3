"""File identity for the ledger: what makes an input file "the same file" (size, mtime_ns,
inode and a content hash of its FITS structure), and how a path becomes a ``files.path`` key
(``ledger_key``/``path_of_key``) and a printable log text."""

from __future__ import annotations

import hashlib
import os
import re
import stat as _stat
from dataclasses import dataclass
from pathlib import Path

_MIB = 1024 * 1024


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

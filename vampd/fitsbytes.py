"""The FITS byte layer: one parser of header cards and HDU structure, from bytes alone.

Used for everything vampd decides about an input before science reads it: is the file a
regular file, is it FITS, is it whole (completeness), where is its data and what shape and
type (memory admission, the memory-mapped fast read). Nothing here imports astropy; the
property tests compare it with astropy on random headers (``tests/test_fitsbytes.py``).

Rules (FITS standard 4.0, docs/instrument.md §4.4):

* a header is a sequence of 80-byte cards in 2880-byte blocks ending with the card whose
  keyword field (columns 1-8) is exactly ``END`` followed by blanks (``ENDTIME`` is *not*
  the end);
* the first card of the file is ``SIMPLE``, of an extension ``XTENSION``;
* the data of an HDU take ``|BITPIX|/8 · GCOUNT · (PCOUNT + NAXIS1 · … · NAXISn)`` bytes
  (0 if ``NAXIS = 0``), padded to a whole block; the next HDU starts after the padding.
  A file is whole when every HDU up to the data HDU is there *with* its padding: a cut
  anywhere, even in the last block's padding, is incomplete.

Errors are vampd's own: :class:`IncompleteFits` (transient: the file may still grow),
:class:`NotFitsError` and :class:`UnreadableError` (permanent for this version of the file).
"""

from __future__ import annotations

import errno
import math
import os
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from vampd.errors import PermanentError, TransientError

__all__ = [
    "BLOCK",
    "CARD",
    "IncompleteFits",
    "NotFitsError",
    "UnreadableError",
    "VanishedError",
    "HDULayout",
    "parse_cards",
    "layouts_from_reader",
    "layouts_of_bytes",
    "open_regular",
    "file_layouts",
    "data_layout",
    "structure_complete",
    "decompressed_bytes",
]

BLOCK = 2880
CARD = 80
_END = b"END" + b" " * 5
_KEEP = frozenset(
    {
        "SIMPLE",
        "XTENSION",
        "BITPIX",
        "NAXIS",
        "PCOUNT",
        "GCOUNT",
        "BZERO",
        "BSCALE",
        "BLANK",
        "ZIMAGE",
        "ZBITPIX",
        "ZNAXIS",
        "EXTEND",
        "GROUPS",
        "EXTNAME",
    }
)
_BITPIX = {8: "u1", 16: "i2", 32: "i4", 64: "i8", -32: "f4", -64: "f8"}


class IncompleteFits(TransientError):
    """The file is FITS so far but not whole yet (may still be growing)."""


class NotFitsError(PermanentError):
    """The bytes are not a FITS structure (or a structure vampd cannot use)."""


class UnreadableError(PermanentError):
    """The path cannot be read as a regular file (FIFO, device, directory, loop, no permission)."""


class VanishedError(TransientError):
    """The path disappeared while it was being looked at."""


@dataclass(frozen=True)
class HDULayout:
    """Where one HDU lies in the file and what its data are."""

    index: int
    header_start: int
    data_start: int
    data_bytes: int
    cards: Mapping[str, str]

    @property
    def data_end(self) -> int:
        return self.data_start + self.data_bytes

    @property
    def padded_end(self) -> int:
        return self.data_start + BLOCK * math.ceil(self.data_bytes / BLOCK)

    def int(self, key: str, default: int | None = None) -> int:
        """An integer keyword (raises :class:`NotFitsError` if present but not an integer)."""
        raw = self.cards.get(key)
        if raw is None:
            if default is None:
                raise NotFitsError(f"HDU {self.index}: keyword {key} missing")
            return default
        try:
            return int(raw)
        except ValueError:
            raise NotFitsError(f"HDU {self.index}: {key} = {raw!r} is not an integer") from None

    def float(self, key: str, default: float) -> float:
        raw = self.cards.get(key)
        if raw is None:
            return default
        try:
            return float(raw.replace("D", "E"))
        except ValueError:
            raise NotFitsError(f"HDU {self.index}: {key} = {raw!r} is not a number") from None

    @property
    def bitpix(self) -> int:
        return self.int("BITPIX")

    @property
    def shape(self) -> tuple[int, ...]:
        """NAXISn in numpy order (slowest first)."""
        n = self.int("NAXIS")
        return tuple(self.int(f"NAXIS{i}") for i in range(n, 0, -1))

    @property
    def image_shape(self) -> tuple[int, ...]:
        """The image shape: ZNAXISn of a tile-compressed image, else NAXISn (numpy order)."""
        if self.cards.get("ZIMAGE") == "T":
            n = self.int("ZNAXIS")
            return tuple(self.int(f"ZNAXIS{i}") for i in range(n, 0, -1))
        return self.shape

    @property
    def dtype(self) -> str:
        """Big-endian numpy dtype string of the stored data (``>i2``...)."""
        return ">" + _BITPIX[self.bitpix]


def _value(card: bytes) -> str | None:
    """The value text of a ``KEY     = value / comment`` card (strings unquoted)."""
    if card[8:10] != b"= ":
        return None
    raw = card[10:].decode("ascii", "replace").strip()
    if raw.startswith("'"):
        out, i = [], 1
        while i < len(raw):
            if raw[i] == "'":
                if raw[i + 1 : i + 2] == "'":
                    out.append("'")
                    i += 2
                    continue
                break
            out.append(raw[i])
            i += 1
        return "".join(out).rstrip()
    return raw.split("/", 1)[0].strip()


def parse_cards(buf: bytes, start: int = 0) -> tuple[dict[str, str], int] | None:
    """Parse one header starting at ``buf[start]``.

    Returns ``(structural values, data offset)`` or None if ``buf`` ends before the END card.
    Only structural keywords (and ``EXTNAME``) are kept, first occurrence wins.
    """
    cards: dict[str, str] = {}
    pos = start
    while pos + BLOCK <= len(buf):
        block = buf[pos : pos + BLOCK]
        pos += BLOCK
        for i in range(0, BLOCK, CARD):
            card = block[i : i + CARD]
            key = card[:8]
            if key == _END:
                return cards, pos
            name = key.rstrip().decode("ascii", "replace")
            if name in cards:
                continue
            if name in _KEEP or name.startswith(("NAXIS", "ZNAXIS")):
                v = _value(card)
                if v is not None:
                    cards[name] = v
    return None


def _data_bytes(cards: dict[str, str], index: int) -> int:
    lay = HDULayout(index, 0, 0, 0, cards)
    bitpix = lay.int("BITPIX")
    if bitpix not in _BITPIX:
        raise NotFitsError(f"HDU {index}: BITPIX = {bitpix} is not a FITS data type")
    naxis = lay.int("NAXIS")
    if not 0 <= naxis <= 999:
        raise NotFitsError(f"HDU {index}: NAXIS = {naxis} out of range")
    if naxis == 0:
        return 0
    dims = [lay.int(f"NAXIS{i}") for i in range(1, naxis + 1)]
    if any(d < 0 for d in dims):
        raise NotFitsError(f"HDU {index}: negative NAXISn {dims}")
    if index == 0 and cards.get("GROUPS") == "T" and dims[0] == 0:
        dims = dims[1:]  # random groups: NAXIS1 = 0 is not a dimension
    return abs(bitpix) // 8 * lay.int("GCOUNT", 1) * (lay.int("PCOUNT", 0) + math.prod(dims))


#: ``read(offset, n) -> bytes`` (fewer bytes at the end of the file)
Reader = Callable[[int, int], bytes]


def layouts_from_reader(read: Reader, size: int, upto: int) -> list[HDULayout]:
    """Layouts of HDUs ``0..upto`` of a file of ``size`` bytes.

    Raises :class:`NotFitsError` if the structure is not FITS and :class:`IncompleteFits` if
    the bytes end before the header of HDU ``upto`` is whole (its data may be short: compare
    :attr:`HDULayout.data_end` with the size).
    """
    out: list[HDULayout] = []
    pos = 0
    for index in range(upto + 1):
        first = read(pos, CARD)
        want = b"SIMPLE  =" if index == 0 else b"XTENSION="
        if len(first) < 9:
            if size == 0:
                raise IncompleteFits("zero-byte file")
            if index == 0 and not want.startswith(first[: len(want)]):
                raise NotFitsError("not a FITS file (no SIMPLE card)")
            raise IncompleteFits(f"HDU {index} header missing ({size} bytes on disk)")
        if not first.startswith(want):
            raise NotFitsError(
                "not a FITS file (no SIMPLE card)"
                if index == 0
                else f"no XTENSION card where HDU {index} should start (byte {pos})"
            )
        buf, parsed = b"", None
        while parsed is None:
            chunk = read(pos + len(buf), 4 * BLOCK)
            buf += chunk
            parsed = parse_cards(buf)
            if parsed is None and (len(chunk) < 4 * BLOCK or len(buf) > 4096 * BLOCK):
                if len(buf) > 4096 * BLOCK:
                    raise NotFitsError(f"HDU {index}: no END card in the first {len(buf)} header bytes")
                raise IncompleteFits(f"header incomplete: no END card in the first {pos + len(buf)} bytes")
        cards, end = parsed
        lay = HDULayout(index, pos, pos + end, _data_bytes(cards, index), cards)
        out.append(lay)
        pos = lay.padded_end
    return out


def layouts_of_bytes(buf: bytes, upto: int = 0) -> list[HDULayout]:
    """:func:`layouts_from_reader` over bytes in memory."""
    return layouts_from_reader(lambda off, n: buf[off : off + n], len(buf), upto)


def open_regular(path: os.PathLike | str) -> int:
    """Open ``path`` for reading without ever blocking; returns a file descriptor.

    ``O_NONBLOCK`` keeps a FIFO from blocking the open; the ``fstat`` after it refuses
    anything but a regular file (FIFO, ``/dev/zero`` behind a symlink, a directory).
    Raises :class:`UnreadableError` (permanent), :class:`VanishedError` (gone).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | getattr(os, "O_NOCTTY", 0))
    except FileNotFoundError:
        raise VanishedError(f"{os.fsdecode(path)}: file vanished") from None
    except OSError as exc:
        raise UnreadableError(f"{os.fsdecode(path)}: {_why(exc)}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise UnreadableError(f"{os.fsdecode(path)}: not a regular file ({kind_of(st.st_mode)})")
    return fd


def kind_of(mode: int) -> str:
    """A word for a file type (``FIFO``, ``directory``, ``character device``...)."""
    for test, word in (
        (stat.S_ISDIR, "directory"),
        (stat.S_ISFIFO, "FIFO"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
        (stat.S_ISSOCK, "socket"),
        (stat.S_ISLNK, "symlink"),
        (stat.S_ISREG, "regular file"),
    ):
        if test(mode):
            return word
    return "unknown file type"


def _why(exc: OSError) -> str:
    if exc.errno == errno.ELOOP:
        return "symlink loop"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "permission denied (unreadable)"
    if exc.errno == errno.EISDIR:
        return "is a directory"
    return f"{errno.errorcode.get(exc.errno, 'error')}: {exc.strerror}"


def file_layouts(path: os.PathLike | str, upto: int = 0) -> tuple[list[HDULayout], int]:
    """Layouts of HDUs ``0..upto`` of a file and its size (see :func:`layouts_from_reader`)."""
    fd = open_regular(path)
    try:
        size = os.fstat(fd).st_size
        try:
            return layouts_from_reader(lambda off, n: os.pread(fd, n, off), size, upto), size
        except OSError as exc:
            raise UnreadableError(f"{os.fsdecode(path)}: {_why(exc)}") from None
    finally:
        os.close(fd)


def data_hdu_index(path: os.PathLike | str) -> int:
    """Tile-compressed files (``.fits.fz``) keep data and header in extension 1."""
    return 1 if ".fits.fz" in os.path.basename(os.fsdecode(path)) else 0


def data_layout(path: os.PathLike | str) -> HDULayout:
    """The layout of the data HDU of a raw file, which must be whole.

    Raises :class:`IncompleteFits`, :class:`NotFitsError`, :class:`UnreadableError`, :class:`VanishedError`.
    """
    name = os.fsdecode(path)
    idx = data_hdu_index(path)
    try:
        lays, size = file_layouts(path, idx)
    except (IncompleteFits, NotFitsError) as exc:
        raise type(exc)(f"{name}: {exc}") from None
    if size == 0:
        raise IncompleteFits(f"{name}: zero-byte file")
    for lay in lays:
        if size < lay.data_end:
            raise IncompleteFits(f"{name}: data truncated: {size} bytes on disk, {lay.data_end} expected from NAXISn")
        if size < lay.padded_end:  # byte-exact: a writer pads the last block last
            raise IncompleteFits(f"{name}: data padding incomplete: {size} bytes on disk, {lay.padded_end} expected")
    return lays[-1]


def structure_complete(path: os.PathLike | str) -> tuple[bool, str]:
    """``(True, "complete")`` or ``(False, reason)``; never raises for a single file."""
    try:
        data_layout(path)
    except (IncompleteFits, NotFitsError, UnreadableError, VanishedError) as exc:
        msg = str(exc)
        prefix = os.fsdecode(path) + ": "
        return False, msg[len(prefix) :] if msg.startswith(prefix) else msg
    return True, "complete"


def decompressed_bytes(lay: HDULayout) -> int:
    """Bytes of the image as float32 (memory admission; ZNAXISn for ``.fits.fz``)."""
    shape = lay.image_shape
    return 4 * math.prod(shape) if shape else 0

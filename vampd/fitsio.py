"""FITS and file I/O at the edges of the pipeline: atomic writes, raw-cube loading,
and the structural completeness test the watcher uses.

Science code never opens files itself; it receives arrays and headers from here.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from astropy.io import fits

__all__ = [
    "InputError",
    "atomic_write",
    "write_fits_atomic",
    "save_npz_atomic",
    "data_hdu_index",
    "read_header",
    "read_cube",
    "fits_structure_complete",
    "output_stem",
]

BLOCK = 2880


class InputError(ValueError):
    """A raw input file cannot be used; the message names the file and the problem."""

    def __init__(self, path: os.PathLike | str, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


def atomic_write(path: os.PathLike | str, write: Callable[[Path], None]) -> Path:
    """Write ``path`` by calling ``write(tmp)`` on a temporary file in the same
    directory, fsync it, then rename over ``path``.

    A crash at any moment leaves either the old file or the new one, never a torn one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass
    return path


def write_fits_atomic(path: os.PathLike | str, hdul: fits.HDUList, verify: str = "silentfix") -> Path:
    """Atomically write an HDUList (see :func:`atomic_write`); ``verify`` is astropy's output_verify."""
    return atomic_write(path, lambda tmp: hdul.writeto(tmp, overwrite=True, output_verify=verify))


def save_npz_atomic(path: os.PathLike | str, **arrays: np.ndarray) -> Path:
    """Atomically write a compressed NPZ file."""

    def _write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, **arrays)

    return atomic_write(path, _write)


def data_hdu_index(path: os.PathLike | str) -> int:
    """Tile-compressed files (``.fits.fz``) keep data and header in extension 1."""
    return 1 if ".fits.fz" in Path(path).name else 0


def read_header(path: os.PathLike | str) -> fits.Header:
    """Read the data header of a raw file, with a clear error if it is not FITS."""
    try:
        return fits.getheader(path, data_hdu_index(path))
    except (OSError, IndexError, KeyError, TypeError, ValueError) as exc:
        raise InputError(path, f"not a readable FITS file ({exc})") from exc


def _unscale(data: np.ndarray, header: fits.Header) -> np.ndarray:
    """Apply BZERO/BSCALE; the instrument's uint16-as-int16 (BZERO 32768) becomes uint16 exactly."""
    bzero, bscale = header.get("BZERO", 0), header.get("BSCALE", 1)
    if bscale == 1 and bzero == 32768 and data.dtype.kind == "i" and data.dtype.itemsize == 2:
        return (data.astype(np.int16, copy=False).view(np.uint16) ^ np.uint16(0x8000)).astype(np.uint16, copy=False)
    if bscale == 1 and bzero == 0:
        return np.array(data, dtype=data.dtype.newbyteorder("="))
    return data.astype(np.float32) * np.float32(bscale) + np.float32(bzero)


def read_cube(path: os.PathLike | str, frames: slice | None = None) -> tuple[np.ndarray, fits.Header]:
    """Read a raw cube (or a slice of its frames) and its header.

    The file is memory-mapped and only the requested frames are read and unscaled, so a
    chunk of a 25 GB cube costs chunk-sized memory. Raw uint16 data (BITPIX 16, BZERO
    32768) come back as native uint16; a 2-D image is returned as a one-frame cube.

    Raises
    ------
    InputError
        Not FITS, truncated, empty, or not a 2-/3-D image; the message says which.
    """
    idx = data_hdu_index(path)
    if idx == 0:
        ok, reason = fits_structure_complete(path)
        if not ok:
            raise InputError(path, reason)
    try:
        with fits.open(path, memmap=True, lazy_load_hdus=True, do_not_scale_image_data=True) as hdul:
            hdu = hdul[idx]
            header = hdu.header.copy()
            naxis = int(header.get("NAXIS", 0)) if idx == 0 else len(hdu.shape or ())
            if naxis == 0:
                raise InputError(path, "the data HDU is empty (NAXIS = 0)")
            if naxis == 3 and frames is not None:
                data = hdu.section[frames]
            else:
                data = hdu.data
            data = _unscale(np.asarray(data), header)  # copies: detached from the memmap
    except InputError:
        raise
    except (OSError, IndexError, KeyError, TypeError, ValueError) as exc:
        raise InputError(path, f"cannot read FITS data ({exc})") from exc
    if data.ndim == 2:
        data = data[None]
    if data.ndim != 3:
        raise InputError(path, f"expected a 3-D cube (NAXIS3, NAXIS2, NAXIS1), found {data.ndim}-D data")
    return data, header


_CARD = re.compile(rb"^(NAXIS\d*|BITPIX|END)\s*(?:=\s*([-+]?\d+))?")


def fits_structure_complete(path: os.PathLike | str) -> tuple[bool, str]:
    """Decide from the bytes alone whether a (primary-HDU) FITS file is whole.

    The header must reach its END card and the file must hold at least the data size
    implied by BITPIX and NAXISn. Returns ``(complete, reason)``; reason says what
    is missing when it is not. Only plain (uncompressed) primary HDUs are checked;
    ``.fz`` files are accepted once their first HDU's header is whole.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return False, "file vanished"
    if size == 0:
        return False, "zero-byte file"
    keys: dict[str, int] = {}
    offset = 0
    with open(path, "rb") as fh:
        first = fh.read(80)
        if not first.startswith(b"SIMPLE  ="):
            return False, "not a FITS file (no SIMPLE card)"
        fh.seek(0)
        while True:
            block = fh.read(BLOCK)
            if len(block) < BLOCK:
                return False, f"header incomplete: no END card in the first {offset + len(block)} bytes"
            offset += BLOCK
            for i in range(0, BLOCK, 80):
                card = block[i : i + 80]
                m = _CARD.match(card)
                if not m:
                    continue
                if m.group(1) == b"END":
                    break
                if m.group(2) is not None:
                    keys[m.group(1).decode()] = int(m.group(2))
            else:
                continue
            break
    naxis = keys.get("NAXIS", 0)
    bitpix = keys.get("BITPIX")
    if bitpix is None:
        return False, "header has no BITPIX"
    nbytes = abs(bitpix) // 8
    for i in range(1, naxis + 1):
        if f"NAXIS{i}" not in keys:
            return False, f"header has NAXIS = {naxis} but no NAXIS{i}"
        nbytes *= keys[f"NAXIS{i}"]
    if naxis == 0:
        nbytes = 0
    expected = offset + nbytes
    if size < expected:
        return False, f"data truncated: {size} bytes on disk, {expected} expected from NAXISn"
    return True, "complete"


def output_stem(path: os.PathLike | str) -> str:
    """The file name with ``.fits`` and anything after it (``.fz``, ``.gz``) removed."""
    name = Path(path).name
    i = name.find(".fits")
    return name[:i] if i >= 0 else Path(name).stem

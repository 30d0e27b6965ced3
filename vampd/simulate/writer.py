"""Chunked FITS cube writer and the logger's ``.txt`` sidecar.

A raw cube is written as header bytes followed by its frames chunk by chunk (big-endian,
uint16 stored as int16 with BZERO 32768, or float32), then padded to the 2880-byte block:
a production cube (536² × 2000 frames, 1.1 GB) is never held in memory, let alone twice.
Files go to a temporary name first and are renamed when complete, as the instrument's
logger does (``NAME.fits.<pid>.<tid>.tmp``).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from astropy.io import fits

__all__ = ["BLOCK", "tmp_name", "encode_frames", "write_cube", "sidecar_lines", "write_sidecar"]

BLOCK = 2880


def tmp_name(path: os.PathLike | str) -> Path:
    """The logger's temporary name ``NAME.fits.<pid>.<tid>.tmp`` next to ``path``."""
    path = Path(path)
    return path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")


def encode_frames(frames: np.ndarray) -> bytes:
    """FITS bytes of a frame chunk: uint16 → big-endian int16 (value − 32768), float → >f4."""
    frames = np.asarray(frames)
    if frames.dtype == np.uint16:
        # u − 32768 in two's complement is u XOR 0x8000; the bytes are then big-endian
        return (frames ^ np.uint16(0x8000)).astype(">u2").tobytes()
    return frames.astype(">f4").tobytes()


def write_cube(
    path: os.PathLike | str,
    header: fits.Header,
    chunks: Iterable[np.ndarray],
    *,
    tmp: os.PathLike | str | None = None,
    finalize=None,
) -> Path:
    """Write a primary-HDU cube from frame chunks, via a temporary file then rename.

    Parameters
    ----------
    path : path-like
        Final file name.
    header : astropy.io.fits.Header
        Complete primary header (BITPIX/NAXISn must match the chunks).
    chunks : iterable of ndarray
        ``(n, ny, nx)`` uint16 or float32 frame blocks, in order, totalling ``NAXIS3``.
    tmp : path-like, optional
        Temporary name (default :func:`tmp_name`).
    finalize : callable, optional
        ``finalize(tmp_path, header_bytes, data_bytes)`` called before the rename (fault
        injection hooks edit the temporary file here).

    Returns
    -------
    Path
        The final path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(path) if tmp is None else Path(tmp)
    head = header.tostring(padding=True).encode("ascii")
    expected = (
        int(header["NAXIS1"]) * int(header["NAXIS2"]) * int(header.get("NAXIS3", 1)) * abs(int(header["BITPIX"])) // 8
    )
    written = 0
    try:
        with open(tmp, "wb") as fh:
            fh.write(head)
            for chunk in chunks:
                data = encode_frames(chunk)
                fh.write(data)
                written += len(data)
            if written != expected:
                raise ValueError(f"{path}: wrote {written} data bytes, header NAXISn imply {expected}")
            pad = (-written) % BLOCK
            if pad:
                fh.write(b"\0" * pad)
            fh.flush()
            os.fsync(fh.fileno())
        if finalize is not None:
            finalize(tmp, len(head), written)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def sidecar_lines(frame_mjd: np.ndarray, exptime: float) -> list[str]:
    """One line per frame: index, frame-start MJD (UTC), Unix time, exposure [s]."""
    unix = (np.asarray(frame_mjd, dtype=float) - 40587.0) * 86400.0
    return [f"{i:6d} {m:.10f} {t:.6f} {exptime:.6f}\n" for i, (m, t) in enumerate(zip(frame_mjd, unix, strict=True))]


def write_sidecar(path: os.PathLike | str, lines: list[str]) -> Path:
    """Write ``NAME.txt`` (via a temporary name and rename, so it appears whole)."""
    path = Path(path)
    tmp = tmp_name(path)
    with open(tmp, "w") as fh:
        fh.writelines(lines)
    os.replace(tmp, path)
    return path

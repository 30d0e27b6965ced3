"""The FITS byte layer against astropy: random headers (long strings → CONTINUE, ENDTIME-like
keywords, BZERO/BSCALE, blank cards, several blocks), padding, compressed files, truncation at
every byte. Truth comes from astropy (its data offsets, shapes and verdict on truncated files)."""

from __future__ import annotations

import io
import os
import string

import numpy as np
import pytest
from astropy.io import fits

from vampd.errors import PermanentError, TransientError, classify
from vampd.fitsbytes import (
    IncompleteFits,
    NotFitsError,
    UnreadableError,
    data_layout,
    layouts_of_bytes,
    structure_complete,
)
from vampd.fitsio import InputError, read_cube, read_frames


def _random_header(rng: np.random.Generator) -> fits.Header:
    h = fits.Header()
    letters = string.ascii_uppercase
    for _ in range(int(rng.integers(0, 90))):
        kind = rng.integers(0, 5)
        key = "".join(rng.choice(list(letters), size=int(rng.integers(3, 8))))
        if key in ("END", "SIMPLE", "BITPIX", "EXTEND") or key.startswith(("NAXIS", "BZERO", "BSCALE", "BLANK")):
            continue
        if kind == 0:
            h[key] = int(rng.integers(-(10**9), 10**9))
        elif kind == 1:
            h[key] = float(rng.normal()) * 10 ** float(rng.integers(-5, 5))
        elif kind == 2:  # long strings become CONTINUE cards
            h[key] = "".join(rng.choice(list(letters + " /='"), size=int(rng.integers(0, 200))))
        elif kind == 3:
            h.append(("COMMENT", "END of nothing / NAXIS1 = 99"), bottom=True)
        else:
            h[key] = bool(rng.integers(0, 2))
    h["ENDTIME"] = "12:00:00"  # begins with END: must not end the header
    h["ENDX"] = 1
    return h


def _random_file(rng: np.random.Generator) -> tuple[bytes, np.ndarray, fits.Header]:
    ndim = int(rng.integers(2, 4))
    shape = tuple(int(n) for n in rng.integers(1, 9, size=ndim))
    dtype = rng.choice(["int16", "float32", "uint8", "int32", "float64"])
    data = (rng.normal(size=shape) * 100).astype(dtype)
    hdu = fits.PrimaryHDU(data, header=_random_header(rng))
    if dtype == "int16" and rng.integers(0, 2):
        hdu.header["BZERO"] = 32768
    if dtype == "float32" and rng.integers(0, 2):
        hdu.header["BSCALE"] = 1.0
    buf = io.BytesIO()
    fits.HDUList([hdu]).writeto(buf, output_verify="silentfix")
    return buf.getvalue(), data, hdu.header


@pytest.mark.parametrize("seed", range(25))
def test_layout_matches_astropy(seed):
    rng = np.random.default_rng(seed)
    raw, data, _ = _random_file(rng)
    (lay,) = layouts_of_bytes(raw)
    with fits.open(io.BytesIO(raw), do_not_scale_image_data=True) as hdul:
        info = hdul.fileinfo(0)
        assert lay.data_start == info["datLoc"]
        assert lay.data_bytes == info["datSpan"] or lay.padded_end == info["datLoc"] + info["datSpan"]
        assert lay.shape == hdul[0].data.shape
        assert lay.bitpix == hdul[0].header["BITPIX"]
        assert lay.float("BZERO", 0.0) == hdul[0].header.get("BZERO", 0)
    assert lay.padded_end == len(raw)


@pytest.mark.parametrize("seed", range(6))
def test_truncation_at_every_byte_is_never_complete(seed):
    rng = np.random.default_rng(100 + seed)
    raw, _, _ = _random_file(rng)
    (full,) = layouts_of_bytes(raw)
    for n in range(len(raw)):
        cut = raw[:n]
        try:
            (lay,) = layouts_of_bytes(cut)
        except IncompleteFits:
            assert n < full.data_start
            continue
        # header whole: the data must be judged short exactly while it is short
        assert lay.data_start == full.data_start
        assert (n >= lay.data_end) == (n >= full.data_end)
    with pytest.raises(NotFitsError):
        layouts_of_bytes(b"GARBAGE " * 400)


def test_endtime_file_cut_at_every_card_is_incomplete(tmp_path):
    """A header whose cards include ENDTIME (and whose last block is cut) never looks whole."""
    h = fits.Header([("ENDTIME", "10:00:00"), ("END_X", 1)] + [(f"K{i:05d}", i) for i in range(40)])
    raw_buf = io.BytesIO()
    fits.PrimaryHDU(np.arange(3 * 8 * 8, dtype=np.int16).reshape(3, 8, 8), header=h).writeto(raw_buf)
    raw = raw_buf.getvalue()
    path = tmp_path / "cut.fits"
    for n in range(80, len(raw), 80):
        path.write_bytes(raw[:n])
        ok, why = structure_complete(path)
        assert not ok, (n, why)
    path.write_bytes(raw)
    assert structure_complete(path) == (True, "complete")
    np.testing.assert_array_equal(read_frames(path), read_cube(path)[0])


def test_compressed_file_layout(tmp_path):
    data = (np.arange(4 * 32 * 32) % 5000).astype(np.int16).reshape(4, 32, 32)
    path = tmp_path / "c.fits.fz"
    fits.HDUList([fits.PrimaryHDU(), fits.CompImageHDU(data)]).writeto(path)
    lay = data_layout(path)
    assert lay.image_shape == (4, 32, 32)
    raw = path.read_bytes()
    with fits.open(path) as hdul:
        assert lay.data_start == hdul.fileinfo(1)["datLoc"]
    for n in range(0, lay.data_end, 97):
        path.write_bytes(raw[:n])
        assert not structure_complete(path)[0]


def test_odd_paths_are_refused_without_blocking(tmp_path):
    fifo = tmp_path / "fifo.fits"
    os.mkfifo(fifo)
    (tmp_path / "dir.fits").mkdir()
    (tmp_path / "zero.fits").symlink_to("/dev/zero")
    (tmp_path / "loop.fits").symlink_to(tmp_path / "loop.fits")
    for name, word in (
        ("fifo.fits", "FIFO"),
        ("dir.fits", "directory"),
        ("zero.fits", "character device"),
        ("loop.fits", "symlink loop"),
    ):
        with pytest.raises(UnreadableError, match=word):
            data_layout(tmp_path / name)
        assert structure_complete(tmp_path / name)[0] is False
        with pytest.raises(InputError):
            read_frames(tmp_path / name)


def test_classification_by_own_types():
    assert classify(IncompleteFits("x")) == "transient"
    assert classify(NotFitsError("x")) == "permanent"
    assert classify(InputError("a.fits", "bad")) == "permanent"
    assert classify(ValueError("numpy said no")) == "transient"  # builtin: not a verdict on the file
    assert classify(OSError(28, "No space left on device")) == "output"
    assert isinstance(InputError("a", "b"), PermanentError) and not isinstance(InputError("a", "b"), TransientError)

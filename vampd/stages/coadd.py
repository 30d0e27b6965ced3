"""Coadd aligned cubes along time, with errors; recenter the coadded image (docs/instrument.md §6, §5.4).

Aligned data are ``(nframes, nfields, N, N)``; a coadd is ``(nfields, N, N)``. Errors:

* ``mean``     σ = sqrt(Σ σ_t²) / n
* ``varmean``  σ = sqrt(Σ w_t² σ_t²) / Σ w_t, with w = 1 / nanvar(frame t, field k) (docs/instrument.md §13.12 fixed)
* ``median``   σ = sqrt(π/2) · (mean error) — the asymptotic efficiency of the median
* ``biweight`` σ ≈ mean error (the biweight location's efficiency is ~98 % for Gaussian
  data, so the mean propagation is within a few per cent; documented approximation)

``n`` is the number of frames with finite data at that pixel (NaN padding and cut-off
cutout edges do not count). :class:`Coadder` accumulates chunks so a long cube never has
to be in memory: exact running sums for mean/varmean, a disk-backed ``numpy.memmap`` for
median/biweight, collapsed in row blocks.
"""

from __future__ import annotations

import math
import os
import tempfile

import numpy as np
from astropy.io import fits

from vampd.stages.recenter import _shift_finite, measure_center, recenter  # noqa: F401  (re-exported)

__all__ = [
    "COADD_METHODS",
    "MEDIAN_ERROR_FACTOR",
    "Coadder",
    "coadd_cube",
    "frame_weights",
    "nanmedian0",
    "biweight0",
    "measure_center",
    "recenter",
    "coadd_header",
    "recenter_header",
]

COADD_METHODS = ("median", "mean", "varmean", "biweight")
MEDIAN_ERROR_FACTOR = math.sqrt(math.pi / 2)  # 1.2533
_BIWEIGHT_C = 6.0


def _check_method(method: str) -> str:
    if method not in COADD_METHODS:
        raise ValueError(f"coadd.method: {method!r} not one of {COADD_METHODS}")
    return method


def frame_weights(data4) -> np.ndarray:
    """``varmean`` weights ``1 / nanvar`` per frame **and** field, shape (nframes, nfields).

    Two-pass population variance over the finite pixels (float64 accumulation). Frames
    with zero, non-finite or undefined variance get weight 0.
    """
    data4 = np.asarray(data4)
    flat = data4.reshape(data4.shape[:2] + (-1,))
    finite = np.isfinite(flat)
    x0 = np.where(finite, flat, np.float32(0)).astype(np.float32, copy=False)
    cnt = finite.sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = x0.sum(axis=-1, dtype=np.float64) / cnt
        dev = x0 - mean[..., None].astype(np.float32)
        dev *= finite
        var = np.einsum("ijk,ijk->ij", dev, dev, dtype=np.float64) / cnt
        w = 1.0 / var
    return np.where(np.isfinite(w) & (var > 0), w, 0.0)


#: bytes of one pixel-major block of the median (sorted in L2 cache)
_SORT_BLOCK_BYTES = 256 << 10


def _nanmedian_count(flat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Median over axis 0 of ``flat`` (n, P), ignoring non-finite values, and the finite count.

    Pixel-major blocks that fit in cache are copied out (a blocked transpose) and sorted
    along their contiguous axis: numpy's vectorised sort of short float rows is faster than
    a strided ``np.partition`` over axis 0 (3-4x for 40 frames). A column with a non-finite
    value (NaN padding, cutout edges, saturation) sorts it last after mapping it to +inf,
    and its median is taken over its finite values; an all-NaN column gives NaN.
    """
    n, npix = flat.shape
    med, cnt, buf = _median_outputs(npix, n, flat.dtype)
    if n == 0:
        return med, cnt
    step = len(buf)
    for p0 in range(0, npix, step):
        p1 = min(npix, p0 + step)
        b = buf[: p1 - p0]
        np.copyto(b, flat[:, p0:p1].T)
        _median_sorted(b, med[p0:p1], cnt[p0:p1])
    return med, cnt


def _nanmedian_slabs(slabs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_nanmedian_count` of frame-interleaved rows: ``slabs`` (R, n, w) → median, count (R, w).

    Each row's ``(n, w)`` slab is contiguous (see :class:`Coadder`'s row-interleaved store),
    so the transpose into the sort buffer reads a few contiguous kB per frame.
    """
    nrows, n, w = slabs.shape
    med, cnt, buf = _median_outputs(nrows * w, n, slabs.dtype, unit=w)
    if n == 0:
        return med.reshape(nrows, w), cnt.reshape(nrows, w)
    rows = max(1, len(buf) // w)
    for r0 in range(0, nrows, rows):
        r1 = min(nrows, r0 + rows)
        m = (r1 - r0) * w
        b = buf[:m]
        np.copyto(b.reshape(r1 - r0, w, n), slabs[r0:r1].transpose(0, 2, 1))
        _median_sorted(b, med[r0 * w : r0 * w + m], cnt[r0 * w : r0 * w + m])
    return med.reshape(nrows, w), cnt.reshape(nrows, w)


def _median_outputs(npix: int, n: int, dtype, unit: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Median and count arrays (NaN / 0 when ``n == 0``) and a sort buffer of about ``_SORT_BLOCK_BYTES``
    (a multiple of ``unit`` pixels, at least one)."""
    med = np.empty(npix, np.result_type(dtype, np.float32))
    cnt = np.empty(npix, np.int64)
    if n == 0:
        med.fill(np.nan)
        cnt.fill(0)
    step = max(1, min(npix, _SORT_BLOCK_BYTES // max(1, n * np.dtype(dtype).itemsize)) // unit) * unit
    return med, cnt, np.empty((step, max(n, 1)), dtype)


def _median_sorted(b: np.ndarray, m: np.ndarray, cnt: np.ndarray) -> None:
    """Sort the pixel-major block ``b`` (pixels, n) in place; its medians into ``m``, finite counts into ``cnt``."""
    n = b.shape[1]
    k = n // 2
    dtype = m.dtype
    b.sort(axis=-1)  # NaN sorts last, -inf first, +inf before NaN
    if n % 2:
        m[:] = b[:, k]
    else:
        np.add(b[:, k - 1], b[:, k], out=m, dtype=dtype)
        m *= 0.5
    cnt[:] = n
    bad = ~(np.isfinite(b[:, 0]) & np.isfinite(b[:, -1]))
    if bad.any():
        rows = np.flatnonzero(bad)
        sub = b[rows]
        fin = np.isfinite(sub)
        c = fin.sum(axis=1)
        sub = np.where(fin, sub, np.inf)
        sub.sort(axis=-1)
        r = np.arange(len(rows))
        lo, hi = np.maximum((c - 1) // 2, 0), c // 2
        hi = np.minimum(hi, n - 1)
        with np.errstate(invalid="ignore"):
            v = 0.5 * (sub[r, lo].astype(dtype) + sub[r, hi].astype(dtype))
        m[rows] = np.where(c > 0, v, np.nan)
        cnt[rows] = c


def nanmedian0(block: np.ndarray) -> np.ndarray:
    """NaN-ignoring median over axis 0 (all-NaN → NaN), fast for NaN padding.

    ``np.nanmedian`` falls back to a per-pixel Python loop for long axes with NaNs; here
    the frames are sorted per pixel in cache-sized pixel-major blocks (see
    :func:`_nanmedian_count`): all-finite columns take the middle element(s), columns with
    NaN (cutout edges) the middle of their finite values. Non-finite values are ignored.
    """
    block = np.asarray(block)
    n = block.shape[0]
    med, _ = _nanmedian_count(block.reshape(n, -1))
    return med.reshape(block.shape[1:])


def biweight0(block: np.ndarray, c: float = _BIWEIGHT_C) -> np.ndarray:
    """Biweight location over axis 0, NaN-ignoring (astropy's definition, one step from the median).

    ``M + Σ (x−M)(1−u²)² / Σ (1−u²)²`` over |u| < 1 with ``u = (x−M)/(c·MAD)``; where MAD = 0
    the median is returned (as astropy does). Same values as
    ``astropy.stats.biweight_location(block, c=c, axis=0, ignore_nan=True)``, much faster.
    """
    med = nanmedian0(block)
    dev = block - med
    mad = nanmedian0(np.abs(dev))
    with np.errstate(invalid="ignore", divide="ignore"):
        u = dev / (c * mad)
        w = np.square(1 - np.square(u))
        w[~(np.abs(u) < 1)] = 0  # also drops NaN
        num = np.sum(np.where(w > 0, dev, 0) * w, axis=0, dtype=np.float64)
        den = np.sum(w, axis=0, dtype=np.float64)
        loc = med + num / den
    return np.where((mad == 0) | ~np.isfinite(loc), med, loc)


class Coadder:
    """Accumulate aligned chunks ``(nframes_chunk, nfields, N, N)`` and collapse them.

    Parameters
    ----------
    method : {"median", "mean", "varmean", "biweight"}
    tmpdir : path, optional
        For median/biweight: directory of the disk-backed frame store (a ``numpy.memmap``
        temp file, removed by :meth:`close`/:meth:`result`). Without it the chunks are kept
        in memory.
    block_bytes : int
        RAM budget of one row block when collapsing the frame store (default 128 MB).
    capacity : int, optional
        For median/biweight in memory (no ``tmpdir``): number of frames to preallocate, so
        chunks are stored without a final concatenation and :meth:`slot` can hand out
        views of the store to align into directly.

    Notes
    -----
    Median/biweight count the finite frames per pixel while collapsing (no per-chunk
    pass); mean/varmean keep exact running sums. The variance sum ``Σσ²`` comes either from
    ``err4`` (squared where the data are finite) or directly from the caller as
    ``var_sum`` (e.g. :func:`vampd.stages.align.variance_sum_nearest`).

    Examples
    --------
    >>> c = Coadder("median", tmpdir=workdir)           # doctest: +SKIP
    >>> for d4, e4 in chunks: c.add(d4, e4)             # doctest: +SKIP
    >>> image, err, ncoadd = c.result()                 # doctest: +SKIP
    """

    def __init__(
        self, method: str = "median", tmpdir=None, block_bytes: int = 128 << 20, capacity: int | None = None, alloc=None
    ):
        self.method = _check_method(method)
        self.alloc = alloc or np.empty  # (shape, dtype) -> array for the frame store (reused memory)
        self.tmpdir = tmpdir
        self.block_bytes = int(block_bytes)
        self.capacity = None if capacity is None else int(capacity)
        self.nframes = 0
        self.shape = None
        self._sum = self._sumvar = self._count = None  # running sums (float64)
        self._chunks = []
        self._buffer = None  # preallocated in-memory store (capacity frames)
        self._slabs = None  # median: the store's memory, row-interleaved (see _init_shape)
        self._pending = None  # the last view handed out by slot()
        self._file = None
        self._path = None

    @property
    def _stores_frames(self) -> bool:
        return self.method in ("median", "biweight")

    def _init_shape(self, shape) -> None:
        if self.shape is None:
            self.shape = tuple(int(v) for v in shape)
            self._sumvar = np.zeros(self.shape, np.float64)
            if not self._stores_frames:
                self._sum = np.zeros(self.shape, np.float64)
                self._count = np.zeros(self.shape, np.int64)
            if self.method == "varmean":
                self._sumw = np.zeros(self.shape, np.float64)
            if self.method == "median" and self.tmpdir is None and self.capacity:
                # row-interleaved store (nfields * N rows, capacity, N): the frames of one image
                # row are contiguous, so the median's transpose reads one slab at a time
                nf, ny, nx = self.shape
                self._slabs = self.alloc((nf * ny, self.capacity, nx), np.float32)
                self._buffer = self._slabs.reshape(nf, ny, self.capacity, nx).transpose(2, 0, 1, 3)
            elif self._stores_frames and self.tmpdir is None and self.capacity:
                # frame stride = an odd number of cache lines: the median's blocked transpose
                # reads ~40 frames at once, which alias in cache at power-of-two strides (4x slower)
                npix = int(np.prod(self.shape))
                rows = self.alloc((self.capacity, npix + (16 - npix) % 32), np.float32)
                self._buffer = rows[:, :npix].reshape((self.capacity,) + self.shape)
        elif tuple(shape) != self.shape:
            raise ValueError(f"Coadder.add: chunk frame shape {tuple(shape)} differs from {self.shape}")

    def slot(self, n: int, shape) -> np.ndarray:
        """A writable float32 ``(n, *shape)`` array for the next ``n`` frames; pass it to :meth:`add`.

        With a preallocated in-memory store (``capacity``) this is a view into the store,
        so filling it (e.g. with :func:`vampd.stages.align.align_into`) and adding it costs
        no copy; otherwise a new array.
        """
        self._init_shape(shape)
        n = int(n)
        if self._buffer is not None and self.nframes + n <= len(self._buffer):
            self._pending = self._buffer[self.nframes : self.nframes + n]
        else:
            self._pending = np.empty((n,) + self.shape, np.float32)
        return self._pending

    # -- accumulation -------------------------------------------------------------------------
    def add(self, data4, err4=None, var_sum=None) -> Coadder:
        """Add a chunk of aligned frames (and their errors, or None).

        Parameters
        ----------
        data4 : ndarray (n, nfields, N, N) (or (n, N, N))
        err4 : ndarray like ``data4``, optional
            Per-frame errors; their squares are summed where the data are finite.
        var_sum : ndarray (nfields, N, N), optional
            Already summed variances of these frames (instead of ``err4``; not for
            ``varmean``, whose weights are per frame).
        """
        own = data4 is self._pending and self._pending is not None
        self._pending = None
        data4 = np.asarray(data4)
        if data4.ndim == 3:
            data4 = data4[:, None]
        if data4.ndim != 4:
            raise ValueError(f"Coadder.add: expected (nframes, nfields, N, N), got shape {data4.shape}")
        self._init_shape(data4.shape[1:])
        if err4 is not None:
            err4 = np.asarray(err4)
            if err4.ndim == 3:
                err4 = err4[:, None]
            if err4.shape != data4.shape:
                raise ValueError(f"Coadder.add: err shape {err4.shape} differs from data shape {data4.shape}")
        if var_sum is not None:
            if self.method == "varmean":
                raise ValueError("Coadder.add: var_sum cannot be used with varmean (per-frame weights)")
            var_sum = np.asarray(var_sum)
            if var_sum.ndim == 2:
                var_sum = var_sum[None]
            if var_sum.shape != self.shape:
                raise ValueError(f"Coadder.add: var_sum shape {var_sum.shape} differs from {self.shape}")
            self._sumvar += var_sum
        finite = None
        if not self._stores_frames or (err4 is not None and var_sum is None):
            finite = np.isfinite(data4)
        if err4 is not None and var_sum is None:
            var = np.square(np.where(finite, err4, np.float32(0)))
            np.nan_to_num(var, copy=False)
        else:
            var = None
        if self.method == "varmean":
            x = np.where(finite, data4, np.float32(0))
            if var is None:
                var = np.zeros(data4.shape, np.float32)
            wf = frame_weights(data4)
            # normalise by the largest weight so float32 products cannot underflow
            scale = float(wf.max()) if wf.max() > 0 else 1.0
            self._wscale = getattr(self, "_wscale", scale)
            w = (wf / self._wscale).astype(np.float32)[:, :, None, None] * finite
            self._sum += np.sum(w * x, axis=0, dtype=np.float64)
            self._sumw += np.sum(w, axis=0, dtype=np.float64)
            np.multiply(w, w, out=w)
            self._sumvar += np.sum(w * var, axis=0, dtype=np.float64)
            self._count += np.sum(finite, axis=0)
        elif self.method == "mean":
            x = np.where(finite, data4, np.float32(0))
            self._sum += np.sum(x, axis=0, dtype=np.float64)
            if var is not None:
                self._sumvar += np.sum(var, axis=0, dtype=np.float64)
            self._count += np.sum(finite, axis=0)
        else:
            if var is not None:
                self._sumvar += np.sum(var, axis=0, dtype=np.float64)
            self._store_chunk(data4, own)
        self.nframes += data4.shape[0]
        return self

    def _store_chunk(self, data4: np.ndarray, own: bool) -> None:
        n = data4.shape[0]
        if self.tmpdir is None:
            if self._buffer is not None and self.nframes + n <= len(self._buffer):
                if not own:
                    self._buffer[self.nframes : self.nframes + n] = data4
                return
            if self._buffer is not None:  # over capacity: keep what is stored as a chunk
                self._chunks.append(self._buffer[: self.nframes])
                self._buffer = None
            self._chunks.append(np.ascontiguousarray(data4, dtype=np.float32))
            return
        if self._file is None:
            os.makedirs(self.tmpdir, exist_ok=True)
            fd, self._path = tempfile.mkstemp(prefix="vampd_coadd_", suffix=".f32", dir=self.tmpdir)
            self._file = os.fdopen(fd, "wb")
        np.ascontiguousarray(data4, dtype=np.float32).tofile(self._file)

    # -- results ------------------------------------------------------------------------------
    def _store(self):
        if self.tmpdir is None:
            if self._buffer is not None:
                return self._buffer[: self.nframes]
            return self._chunks[0] if len(self._chunks) == 1 else np.concatenate(self._chunks, axis=0)
        self._file.flush()
        return np.memmap(self._path, dtype=np.float32, mode="r", shape=(self.nframes,) + tuple(self.shape))

    def result(self) -> tuple[np.ndarray, np.ndarray, int]:
        """Collapse: ``(image (nfields, N, N), err (nfields, N, N), ncoadd)`` as float32."""
        if self.nframes == 0:
            raise ValueError("Coadder.result: no frames were added")
        try:
            with np.errstate(invalid="ignore", divide="ignore"):
                if self.method == "mean":
                    image = np.where(self._count > 0, self._sum / self._count, np.nan)
                    err = np.where(self._count > 0, np.sqrt(self._sumvar) / self._count, np.nan)
                elif self.method == "varmean":
                    image = np.where(self._sumw > 0, self._sum / self._sumw, np.nan)
                    err = np.where(self._sumw > 0, np.sqrt(self._sumvar) / self._sumw, np.nan)
                elif self._slabs is not None and self._buffer is not None:
                    med, count = _nanmedian_slabs(self._slabs[:, : self.nframes])
                    image, count = med.reshape(self.shape), count.reshape(self.shape)
                    err = np.where(count > 0, np.sqrt(self._sumvar) / count, np.nan) * MEDIAN_ERROR_FACTOR
                else:
                    store = self._store()
                    image = np.empty(self.shape, np.float32)
                    count = np.empty(self.shape, np.int64)
                    nf, ny, nx = self.shape
                    rows = max(1, self.block_bytes // max(1, self.nframes * nf * nx * 4))
                    for y0 in range(0, ny, rows):
                        block = np.asarray(store[:, :, y0 : y0 + rows, :])
                        if block.shape[2] == 0:
                            continue
                        med, cnt = _nanmedian_count(block.reshape(self.nframes, -1))
                        out_shape = block.shape[1:]
                        if self.method == "median":
                            image[:, y0 : y0 + rows, :] = med.reshape(out_shape)
                        else:
                            image[:, y0 : y0 + rows, :] = biweight0(block)
                        count[:, y0 : y0 + rows, :] = cnt.reshape(out_shape)
                    del store
                    err = np.where(count > 0, np.sqrt(self._sumvar) / count, np.nan)
                    if self.method == "median":
                        err = err * MEDIAN_ERROR_FACTOR
        finally:
            self.close()
        return image.astype(np.float32, copy=False), err.astype(np.float32), int(self.nframes)

    def close(self) -> None:
        """Remove the temp file and free the frame store (idempotent)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._path is not None:
            try:
                os.remove(self._path)
            except FileNotFoundError:
                pass
            self._path = None
        self._chunks = []
        self._buffer = None
        self._slabs = None
        self._pending = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):  # best effort: never leave multi-GB temp files behind
        try:
            self.close()
        except Exception:
            pass


def coadd_cube(data4, err4, method: str = "median") -> tuple[np.ndarray, np.ndarray, int]:
    """Collapse aligned frames along axis 0 (docs/instrument.md §6).

    Parameters
    ----------
    data4 : ndarray (nframes, nfields, N, N)
    err4 : ndarray like ``data4`` or None (then the error is 0)
    method : {"median", "mean", "varmean", "biweight"}

    Returns
    -------
    image, err : float32 (nfields, N, N)
    ncoadd : int
        Number of frames coadded.
    """
    return Coadder(method).add(data4, err4).result()


# ---------------------------------------------------------------------------------------------
# Headers
# ---------------------------------------------------------------------------------------------


def coadd_header(
    header,
    method: str,
    ncoadd: int,
    exptime: float | None = None,
    selection: dict | None = None,
    recenter_method: str | None = None,
    calib_files: dict | None = None,
    config_hash: str | None = None,
    copy: bool = True,
) -> fits.Header:
    """Provenance keys of a coadded product (returns a new header; ``copy=False``: ``header`` updated in place).

    Writes ``DPP COADD METH``, ``DPP COADD NCOADD``, ``DPP COADD TINT`` (= EXPTIME·ncoadd, the
    kept exposure), ``NCOADD``, ``TINT`` (same values, summed later by
    :func:`vampd.stages.combine.combine_headers`), ``DPP RECENTER`` / ``DPP RECENTER METH``,
    ``DPP VERSION`` (vampd) and optionally ``DPP SELECT METRIC/QUANTILE/CUTOFF`` (from
    ``selection`` = {"metric", "quantile", "cutoff"}), calibration file names (``calib_files``,
    e.g. {"BACKFILE": "...", "FLATFILE": "..."}) and ``DPP CONFIG HASH``.
    """
    from vampd import __version__

    _check_method(method)
    h = header.copy() if copy else header
    if exptime is None:
        if "EXPTIME" not in h:
            raise ValueError("coadd_header: header has no EXPTIME and no exptime was given")
        exptime = float(h["EXPTIME"])
    tint = float(exptime) * int(ncoadd)
    h["HIERARCH DPP COADD METH"] = (method, "coadd method")
    h["HIERARCH DPP COADD NCOADD"] = (int(ncoadd), "frames coadded")
    h["HIERARCH DPP COADD TINT"] = (tint, "[s] total integration coadded")
    h["NCOADD"] = (int(ncoadd), "frames coadded")
    h["TINT"] = (tint, "[s] total integration time")
    if selection:
        for key, name in (("metric", "METRIC"), ("quantile", "QUANTILE"), ("cutoff", "CUTOFF")):
            if selection.get(key) is not None:
                h[f"HIERARCH DPP SELECT {name}"] = selection[key]
    h["HIERARCH DPP RECENTER"] = (bool(recenter_method), "coadd recentred on the PSF")
    if recenter_method:
        h["HIERARCH DPP RECENTER METH"] = (recenter_method, "recenter method")
    for key, value in (calib_files or {}).items():
        if value:
            h[key] = os.path.basename(str(value))
    h["HIERARCH DPP VERSION"] = (__version__, "vampd version")
    if config_hash:
        h["HIERARCH DPP CONFIG HASH"] = (str(config_hash), "processing config hash")
    return h


def recenter_header(header, method: str, dy: float, dx: float, copy: bool = True) -> fits.Header:
    """``DPP RECENTER`` = True, ``DPP RECENTER METH`` and the applied shift [px] (in place with ``copy=False``)."""
    h = header.copy() if copy else header
    h["HIERARCH DPP RECENTER"] = (True, "coadd recentred on the PSF")
    h["HIERARCH DPP RECENTER METH"] = (method, "recenter method")
    h["HIERARCH DPP RECENTER DY"] = (float(dy), "[px] recenter shift y")
    h["HIERARCH DPP RECENTER DX"] = (float(dx), "[px] recenter shift x")
    return h

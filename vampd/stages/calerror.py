"""Calibration with the error cube computed later, only where it is needed (docs/instrument.md §2.1).

A coadd-only reduction never writes the calibrated error cube: the per-frame metrics read the
error in the PSF windows, and the coadd error needs ``Σσ²`` of the kept frames. Computing
and storing ``σ`` for every pixel of every frame was half the calibration time (and twice
the memory traffic of the data). Here the data are calibrated alone; the error model of
:func:`vampd.stages.calibrate.calibrate_cube` is applied afterwards to the calibrated
values (:func:`~vampd.stages.calibrate.error_from_values`, the same float32 operations, so
the errors are bit-identical) in a row band for the metrics and, per kept frame, as
variances for the coadd (:class:`FrameVariance`). Repaired bad pixels keep the error of the
repair, computed from their neighbours' errors and stored per frame.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from astropy.io import fits

from vampd.imaging import _kernels
from vampd.stages.badpix import neighbour_table, repair_bad_pixels
from vampd.stages.calibrate import (
    CalibFrame,
    _calibrate_blocks,
    _header_constants,
    _pixel_model,
    _PixelModel,
    _repair_mask,
    error_from_values,
)

__all__ = ["CalibModel", "calibration_model", "calibrate_data", "band_error", "band_rows", "FrameVariance"]


@dataclass
class CalibModel:
    """The calibration constants of one file (output orientation), built once by :func:`calibration_model`."""

    model: _PixelModel
    satlevel: float
    flip: bool
    nbad: int
    table: tuple | None = None  # bad-pixel neighbour table (badpix.neighbour_table)
    bad_yx: tuple[np.ndarray, np.ndarray] | None = None  # bad pixels, order of np.nonzero
    _windows: dict = field(default_factory=dict)

    def const(self, name: str, sy: slice, sx: slice):
        """Constant ``name`` (``c1 c2 var_c``) over the window ``(sy, sx)``; scalars and None pass through."""
        a = getattr(self.model, name)
        return a[sy, sx] if isinstance(a, np.ndarray) and a.ndim == 2 else a

    def neighbour_err(self, values: np.ndarray, nby: np.ndarray, nbx: np.ndarray) -> np.ndarray:
        """Errors of pixels ``(nby, nbx)`` from their calibrated values (for the bad-pixel repair)."""
        m = self.model

        def at(a):
            return a[nby, nbx] if isinstance(a, np.ndarray) and a.ndim == 2 else a

        out = np.empty(values.shape, np.float32)
        return error_from_values(values, at(m.c1), None if m.c2 is None else at(m.c2), at(m.var_c), out)

    def bad_index(self) -> np.ndarray:
        """(ny, nx) int map: index into ``bad_yx`` of each bad pixel, -1 elsewhere."""
        if "index" not in self._windows:
            idx = np.full(self.model.badpix.shape, -1, np.int64)
            idx[self.bad_yx] = np.arange(self.nbad)
            self._windows["index"] = idx
        return self._windows["index"]

    def bad_in(self, sy: slice, sx: slice) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(j, y, x)``: the bad pixels inside the window (index into ``bad_yx``, window coordinates)."""
        key = (sy.start, sy.stop, sx.start, sx.stop)
        if key not in self._windows:
            ys, xs = self.bad_yx
            j = np.flatnonzero((ys >= sy.start) & (ys < sy.stop) & (xs >= sx.start) & (xs < sx.stop))
            self._windows[key] = (j, ys[j] - sy.start, xs[j] - sx.start)
        return self._windows[key]


def calibration_model(
    header: fits.Header,
    background: CalibFrame | None,
    flat: CalibFrame | None,
    fix_bad_pixels: bool,
    shape: tuple[int, int],
    path=None,
) -> CalibModel:
    """The per-pixel constants of :func:`~vampd.stages.calibrate.calibrate_cube` for frames of ``shape``."""
    shape = (int(shape[0]), int(shape[1]))
    scale, poisson, satlevel, flip = _header_constants(header, path)
    model = _pixel_model(header, scale, poisson, background, flat, shape, path)
    if fix_bad_pixels:
        model.badpix = _repair_mask(background, flat, None, shape, path)
    if flip:  # work directly in output orientation (docs/instrument.md §1.4)
        model = model.flipped()
    cm = CalibModel(model, satlevel, flip, 0)
    if model.badpix is not None and model.badpix.any():
        cm.nbad = int(model.badpix.sum())
        cm.table = neighbour_table(model.badpix, 5)
        cm.bad_yx = cm.table[0], cm.table[1]
    return cm


def calibrate_data(raw: np.ndarray, cm: CalibModel, data: np.ndarray, xor: int | None = None) -> np.ndarray | None:
    """Calibrate ``raw`` (nframes, ny, nx) into ``data`` without the error cube; the repaired pixels' errors.

    ``raw``: the raw values, or with ``xor`` a view of the mapped file whose values are ``raw ^ xor``
    (:func:`vampd.fitsio.read_raw`).

    ``data`` ends as :func:`~vampd.stages.calibrate.calibrate_cube` gives it. Returns
    ``bad_err`` (nframes, nbad): the error of each repaired pixel (order of ``bad_yx``),
    from its neighbours' errors as the repair computes it; None without bad-pixel repair.
    """
    _calibrate_blocks(raw, data, None, cm.model, cm.satlevel, cm.flip, None, xor)
    if not cm.nbad:
        return None
    bad_err = np.empty((len(data), cm.nbad), np.float32)
    repair_bad_pixels(data, cm.model.badpix, table=cm.table, neighbour_err=cm.neighbour_err, err_out=bad_err)
    return bad_err


def band_error(
    data: np.ndarray, cm: CalibModel, band: slice, bad_err: np.ndarray | None, out: np.ndarray | None = None
) -> np.ndarray:
    """The error cube's rows ``band`` (nframes, band rows, nx) for data from :func:`calibrate_data`.

    Bit-identical to the rows of :func:`~vampd.stages.calibrate.calibrate_cube`'s error: the
    model on the calibrated values, the repair's errors at the repaired pixels. ``out``: an
    optional float32 array of the result's shape to fill.
    """
    full = slice(0, data.shape[2])
    d = data[:, band]
    err = np.empty(d.shape, np.float32) if out is None else out
    consts = cm.const("c1", band, full), cm.const("c2", band, full), cm.const("var_c", band, full)
    tmp = np.empty(d.shape[1:], np.float32)
    for f in range(len(d)):  # frame by frame: the band of one frame and the constants stay in cache
        error_from_values(d[f], *consts, err[f], tmp)
    if bad_err is not None:
        j, y, x = cm.bad_in(band, full)
        err[:, y, x] = bad_err[:, j]
    return err


def band_rows(centers: dict, analysis, ny: int) -> slice:
    """Frame rows every per-frame metric reads: the PSF windows and photometry boxes around
    ``centers`` (field -> [(y, x), ...]), with margin; ``analysis``: the analysis configuration."""
    ann = [float(r) for r in analysis.phot_ann_rad] if analysis.phot_ann_rad else [0.0]
    reach = int(analysis.window_size) + int(np.ceil(max(float(analysis.phot_aper_rad), *ann))) + 4
    ys = [float(c[0]) for cs in centers.values() for c in cs]
    return slice(max(0, int(np.floor(min(ys))) - reach), min(ny, int(np.ceil(max(ys))) + reach + 1))


#: pixels of one row band of :meth:`FrameVariance.group_sum` (its sums and constants stay in cache)
_BAND_PIXELS = 1 << 16


class FrameVariance:
    """Per-frame variances ``σ²`` of calibrated frames, computed on demand from the data.

    The source :func:`vampd.stages.align.variance_sum_nearest` reads instead of an error cube:
    ``shape``, ``group_sum`` and ``variance_at``. Same values as the squares of the
    calibration's error (within float32 rounding).
    """

    def __init__(self, data: np.ndarray, cm: CalibModel, bad_err: np.ndarray | None):
        self.data, self.cm, self.bad_err = data, cm, bad_err
        self.shape = data.shape

    def group_sum(self, frames: np.ndarray, sy: slice, sx: slice) -> np.ndarray:
        """``Σ σ²`` over ``frames`` of the window ``(sy, sx)`` (NaN where some frame's data are NaN).

        With ``h = |d| + d`` the model ``σ² = c1 h + c2 h² + var_c`` sums to
        ``c1 Σh + c2 Σh² + n var_c``: one compiled pass per frame, or without the compiled kernels
        five float32 passes in row bands that stay in cache; the constants are applied once.
        """
        cm, n = self.cm, len(frames)
        h, w = sy.stop - sy.start, sx.stop - sx.start
        if (
            _kernels is not None
            and n
            and h > 0
            and w > 0
            and self.data.dtype == np.float32
            and self.data.strides[2] == 4
        ):
            # both sums in one compiled pass per frame (vampd/_kernels.c), same order and values
            s1, s2 = np.empty((h, w), np.float32), np.empty((h, w), np.float32)
            _kernels.abs_moments(self.data, np.ascontiguousarray(frames, np.int64), sy.start, sx.start, s1, s2)
            out = self._apply_model(s1, s2, n, sy, sx, s1, s2)
        else:
            out = self._group_sum_numpy(frames, sy, sx)
        if self.bad_err is not None:  # repaired pixels: the repair's errors
            j, y, x = cm.bad_in(sy, sx)
            sel = self.bad_err[np.asarray(frames)[:, None], j[None]]
            out[y, x] = np.sum(sel * sel, axis=0)
        return out

    def _group_sum_numpy(self, frames, sy: slice, sx: slice) -> np.ndarray:
        n, h, w = len(frames), sy.stop - sy.start, sx.stop - sx.start
        out = np.empty((h, w), np.float32)
        step = max(1, _BAND_PIXELS // max(w, 1))
        s1, s2, hh, t = (np.empty((min(step, h), w), np.float32) for _ in range(4))
        for a in range(0, h, step):
            b = min(a + step, h)
            band = slice(sy.start + a, sy.start + b)
            S1, S2, H, T = s1[: b - a], s2[: b - a], hh[: b - a], t[: b - a]
            for i, f in enumerate(frames):
                d = self.data[f, band, sx]
                dst = S1 if i == 0 else H
                np.abs(d, out=dst)
                np.add(dst, d, out=dst)  # h
                if i == 0:
                    np.multiply(S1, S1, out=S2)
                else:
                    S1 += H
                    np.multiply(H, H, out=T)
                    S2 += T
            self._apply_model(S1, S2, n, band, sx, out[a:b], T)
        return out

    def _apply_model(self, S1, S2, n: int, sy: slice, sx: slice, o, T):
        """``o = c1 S1 + c2 S2 + n var_c`` on rows ``sy`` (``T``: scratch; may be ``S2``)."""
        cm = self.cm
        np.multiply(S1, cm.const("c1", sy, sx), out=o)
        c2 = cm.const("c2", sy, sx)
        if c2 is not None:
            np.multiply(S2, c2, out=T)
            o += T
        np.multiply(cm.const("var_c", sy, sx), np.float32(n), out=T)
        o += T
        return o

    def variance_at(self, frames: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
        """``σ²`` of ``frames`` at the pixels ``(ys, xs)``: shape (len(frames), len(ys))."""
        m = self.cm.model

        def at(a):
            return a[ys, xs] if isinstance(a, np.ndarray) and a.ndim == 2 else a

        d = self.data[np.asarray(frames)[:, None], ys[None], xs[None]]
        out = np.empty(d.shape, np.float32)
        error_from_values(d, at(m.c1), None if m.c2 is None else at(m.c2), at(m.var_c), out, variance=True)
        if self.bad_err is not None:
            idx = self.cm.bad_index()[ys, xs]
            k = np.flatnonzero(idx >= 0)
            out[:, k] = np.square(self.bad_err[np.asarray(frames)[:, None], idx[k][None]])
        return out

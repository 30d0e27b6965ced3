"""Frame selection by a per-frame quality metric (docs/instrument.md §4).

For each (field, PSF) the frames are ranked by the metric (higher is better for every metric) and
the best ``k = ceil((1 - q) n)`` are above that (field, PSF)'s cutoff, ``n`` being the number of
frames with a finite metric. A frame is kept when it passes the cutoff of **any** (field, PSF) and
discarded only when it fails all of them (as the reference).

The cutoff is rank-based: it is the ``k``-th largest value, i.e. ``numpy.quantile(values, q,
method="inverted_cdf")``-like but anchored so that exactly ``ceil((1 - q) n)`` distinct values
pass (the reference's linear-interpolation ``nanquantile`` keeps ``floor`` or ``ceil`` depending on
where the interpolated value lands). Ties at the cutoff are all kept, so with repeated values more
than ``k`` frames can pass. Fixes of docs/instrument.md §13.5: ``max`` and ``peak`` both select on the window maximum;
``q = 0`` keeps everything and returns the same type; a metric that is NaN for every frame (e.g. a
Strehl that failed everywhere) keeps all frames instead of discarding the whole cube.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
from astropy.io import fits

__all__ = ["METRIC_KEYS", "SelectionError", "apply_selection", "frame_cutoffs", "select_frames", "selection_header"]

#: Configuration metric name -> metrics NPZ key (docs/instrument.md §4; ``l2norm`` is the variance, despite the name).
METRIC_KEYS = {"max": "max", "peak": "max", "l2norm": "var", "normvar": "nvar", "strehl": "strehl"}


class SelectionError(ValueError):
    """Frame-selection request that the metrics cannot satisfy."""


def _metric_array(metrics: Mapping[str, np.ndarray], metric: str) -> np.ndarray:
    if metric not in METRIC_KEYS:
        raise SelectionError(
            f"frame_select.metric = {metric!r} is not a known metric; expected one of {sorted(METRIC_KEYS)}"
        )
    key = METRIC_KEYS[metric]
    if key not in metrics:
        hint = " (needs analysis.strehl = true and a synthetic PSF)" if key == "strehl" else ""
        raise SelectionError(
            f"frame_select.metric = {metric!r} needs the per-frame metric {key!r}, which the metrics do not "
            f"contain{hint}; available: {sorted(metrics)}"
        )
    values = np.asarray(metrics[key], dtype=np.float64)
    if values.ndim == 1:
        values = values[None, None]
    if values.ndim != 3:
        raise SelectionError(f"metric {key!r} has shape {values.shape}, expected (nfields, npsfs, nframes)")
    return values


def _nkeep(q: float, n: int) -> int:
    # round before ceil so that e.g. (1 - 0.7) * 10 = 3.0000000000000004 keeps 3, not 4
    return int(math.ceil(round((1.0 - q) * n, 9)))


def frame_cutoffs(metrics: Mapping[str, np.ndarray], metric: str, cutoff: float) -> np.ndarray:
    """Per-(field, PSF) cutoff values, shape (nfields, npsfs).

    The cutoff is the ``ceil((1 - q) n)``-th largest finite value (``n`` finite frames); NaN if a
    (field, PSF) has no finite value; ``-inf`` when ``q = 0`` (nothing is cut).
    """
    q = float(cutoff)
    if not 0.0 <= q <= 1.0:
        raise SelectionError(f"frame_select.cutoff = {cutoff!r} must be a quantile in [0, 1]")
    values = _metric_array(metrics, metric)
    nf, npsf, _ = values.shape
    out = np.full((nf, npsf), np.nan)
    for i in range(nf):
        for j in range(npsf):
            v = values[i, j]
            v = v[np.isfinite(v)]
            if v.size == 0:
                continue
            if q == 0.0:
                out[i, j] = -np.inf
                continue
            k = _nkeep(q, v.size)
            # k == 0 (q = 1): nothing passes -> +inf
            out[i, j] = np.inf if k == 0 else np.partition(v, v.size - k)[v.size - k]
    return out


def select_frames(metrics: Mapping[str, np.ndarray], metric: str, cutoff: float) -> np.ndarray:
    """Boolean mask of the frames to keep, shape (nframes,).

    Parameters
    ----------
    metrics : mapping
        Per-frame metrics, arrays of shape (nfields, npsfs, nframes) (as :func:`analyze_cube`).
    metric : {"max", "peak", "l2norm", "normvar", "strehl"}
        Configuration metric name (see :data:`METRIC_KEYS`).
    cutoff : float
        Quantile q in [0, 1]: the fraction of frames to discard.

    Returns
    -------
    ndarray of bool
        True for kept frames. For a single (field, PSF) with distinct finite values exactly
        ``ceil((1 - q) n)`` frames are kept, and they are the best ones by the metric.
    """
    values = _metric_array(metrics, metric)
    nframes = values.shape[-1]
    if float(cutoff) == 0.0:
        return np.ones(nframes, dtype=bool)
    cuts = frame_cutoffs(metrics, metric, cutoff)
    if not np.isfinite(values).any():
        # the metric failed everywhere: selecting on it would throw the whole cube away
        return np.ones(nframes, dtype=bool)
    with np.errstate(invalid="ignore"):
        passed = values >= cuts[:, :, None]  # NaN cutoff or NaN value -> False
    return passed.any(axis=(0, 1))


def apply_selection(metrics: Mapping[str, np.ndarray], mask: np.ndarray) -> dict[str, np.ndarray]:
    """Keep the selected frames (last axis) of every metric array."""
    mask = np.asarray(mask, dtype=bool)
    out = {}
    for k, v in metrics.items():
        v = np.asarray(v)
        if v.shape[-1] != mask.size:
            raise SelectionError(f"metric {k!r} has {v.shape[-1]} frames, the selection mask {mask.size}")
        out[k] = v[..., mask]
    return out


def selection_header(header: fits.Header, metric: str, cutoff: float, cutoffs: np.ndarray) -> fits.Header:
    """Copy of ``header`` with ``DPP SELECT METRIC / QUANTILE / CUTOFF`` (median of the finite cutoffs)."""
    hdr = header.copy()
    cuts = np.asarray(cutoffs, dtype=np.float64)
    cuts = cuts[np.isfinite(cuts)]
    bunit = hdr.get("BUNIT", "")
    hdr["HIERARCH DPP SELECT METRIC"] = (str(metric), "Frame selection metric")
    hdr["HIERARCH DPP SELECT QUANTILE"] = (float(cutoff), "Frame selection quantile (fraction discarded)")
    med = float(np.median(cuts)) if cuts.size else 0.0
    hdr["HIERARCH DPP SELECT CUTOFF"] = (med, f"[{bunit}] median cutoff value" if bunit else "median cutoff value")
    return hdr

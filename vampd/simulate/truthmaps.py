"""Noise-free sky-frame Stokes truth of the simulated extended source (``truth_stokes.fits``).

What the PDI chain should recover, on the pipeline's product grid and Stokes scale:

* Grid: ``N × N`` with ``N`` = ``SimConfig.size`` (one MBI cell), the star at the frame centre
  ``((N−1)/2, (N−1)/2)`` as in the registered products, North up, East left (derotated), the
  camera's plate scale. A product of another (same-parity) size compares by a centred cut-out.
* Content: the polarised ring only (I, Q, U, Q_φ, U_φ); the star is unpolarised and left out
  (it adds to I but not to Q, U, Q_φ, U_φ in the ideal model).
* PSF: the coadded products' effective PSF. Frame ``t`` is ``f_t·[S_t K_core + (1 − S_t) K_halo]``
  (registered), so a **mean** coadd over frames (``coadd.method = "mean"``) has exactly
  ``a K_core + b K_halo`` with ``a = ⟨f S⟩``, ``b = ⟨f (1 − S)⟩`` over the night's frames (a median
  coadd is only approximately this). Derotating an image by DEROTANG derotates its PSF too, so the
  core kernel enters rotated by each file's DEROTANG (mean over files, angles binned to 0.1°);
  the halo is circular. Each camera contributes with its own plate scale, pupil offset and
  DEROTANG, and the triple/double difference averages the two cameras' images: the truth is the
  mean over cameras.
* Scale: vampd's differences give ``I_Q = ½ I`` (mean single-beam intensity, e-/s per camera) and Q,
  U on the same scale; the maps here are **already multiplied by ½** (``SCALE = 0.5``).
* ``Q_φ = −Q cos2θ − U sin2θ``, ``U_φ = Q sin2θ − U cos2θ``, ``θ = atan2(c_x − x, y − c_y)``.
* Ring amplitude (what "within 1 %" means): the sum of Q_φ (and U_φ) over the annulus of pixel
  centres with ``r_in ≤ r < r_out`` around the frame centre, ``r_in/out = R ∓ ½R`` (R = ring radius
  in pixels of the mean camera plate scale), clipped inside the frame: :func:`annulus_sum`.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from astropy.io import fits
from scipy.signal import fftconvolve

from vampd.simulate.scene import render_ring

__all__ = ["PLANES", "annulus_mask", "annulus_sum", "truth_stokes_maps", "write_truth_stokes", "read_truth_stokes"]

PLANES = ("I", "Q", "U", "Q_PHI", "U_PHI")
SCALE = 0.5  # pipeline Stokes scale: I_Q = ½ I


def annulus_mask(shape, r_in: float, r_out: float, center=None) -> np.ndarray:
    """Pixels whose centres lie at ``r_in ≤ r < r_out`` from ``center`` (default the frame centre)."""
    ny, nx = int(shape[-2]), int(shape[-1])
    cy, cx = ((ny - 1) / 2, (nx - 1) / 2) if center is None else center
    r = np.hypot(np.arange(ny)[:, None] - cy, np.arange(nx)[None, :] - cx)
    return (r >= r_in) & (r < r_out)


def annulus_sum(image: np.ndarray, r_in: float, r_out: float) -> float:
    """Sum of ``image`` over :func:`annulus_mask` (NaNs count as 0)."""
    m = annulus_mask(image.shape, r_in, r_out)
    return float(np.nansum(np.where(m, image, 0.0)))


def _rotated_core(core: np.ndarray, angles) -> np.ndarray:
    """Mean of the core kernel rotated by each DEROTANG (binned to 0.1°, weights = counts)."""
    from vampd.imaging import derotate

    a = np.round(np.asarray(angles, float) * 10.0) / 10.0
    vals, counts = np.unique(a, return_counts=True)
    out = np.zeros_like(core)
    for v, n in zip(vals, counts, strict=True):
        out += n * np.nan_to_num(derotate(core, float(v), order=3))
    return out / counts.sum()


def _polar(q: np.ndarray, u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ny, nx = q.shape[-2:]
    y = np.arange(ny)[:, None] - (ny - 1) / 2
    x = np.arange(nx)[None, :] - (nx - 1) / 2
    th = np.arctan2(-x, y)
    c2, s2 = np.cos(2 * th), np.sin(2 * th)
    return -q * c2 - u * s2, q * s2 - u * c2


def truth_stokes_maps(
    scene, size: int, fields: list[str], field_models: dict, derotangs: dict, strehl: np.ndarray, flux: np.ndarray
) -> tuple[np.ndarray, dict]:
    """Truth maps ``(nfields, 5, N, N)`` (planes :data:`PLANES`, pipeline scale) and their record.

    Parameters
    ----------
    scene : Scene
    size : int
        Grid side ``N``.
    fields : list of str
    field_models : dict
        ``(camera, field) → FieldModel`` of the simulator.
    derotangs : dict
        ``camera → DEROTANG`` of every science file of that camera.
    strehl, flux : ndarray
        Per-frame Strehl ``S_t`` and flux factor ``f_t`` of all science frames.
    """
    n = int(size)
    c = (n - 1) / 2
    s = np.asarray(strehl, float)
    f = np.asarray(flux, float)
    a, b = float(np.mean(f * s)), float(np.mean(f * (1 - s)))
    maps = np.zeros((len(fields), 5, n, n))
    scales = {}
    for j, name in enumerate(fields):
        acc = np.zeros((3, n, n))
        cams = sorted({cam for cam, fl in field_models if fl == name})
        for cam in cams:
            fm = field_models[cam, name]
            sky = render_ring(scene, (n, n), (c, c), 0.0, fm.pixel_scale)  # North up: DEROTANG 0
            kern = a * _rotated_core(fm.core_kernel, derotangs.get(cam) or [0.0]) + b * fm.halo_kernel
            acc += np.stack([fftconvolve(p, kern, mode="same") for p in sky])
            scales[cam] = fm.pixel_scale
        acc *= SCALE / max(len(cams), 1)
        maps[j, :3] = acc
        maps[j, 3], maps[j, 4] = _polar(acc[1], acc[2])
    px = float(np.mean(list(scales.values()))) if scales else math.nan
    r_px = scene.ring_radius_mas / px
    r_in = 0.5 * r_px
    r_out = min(1.5 * r_px, c - 1.0)
    info = {
        "file": "truth_stokes.fits",
        "planes": list(PLANES),
        "shape": [len(fields), 5, n, n],
        "fields": list(fields),
        "center_yx": [c, c],
        "pixel_scale_mas": px,
        "orientation": "North up, East left (derotated), star at the frame centre",
        "scale": SCALE,
        "scale_note": "pipeline Stokes scale: maps = 0.5 x sky (I_Q = I/2, Q and U likewise), e-/s per pixel",
        "content": "polarised ring only (the unpolarised star is not included)",
        "psf": "a*K_core (rotated by each file's DEROTANG, mean) + b*K_halo, mean over cameras; "
        "exact for coadd.method = 'mean'",
        "psf_weights": {"a_mean_f_strehl": a, "b_mean_f_1_minus_strehl": b},
        "ring_radius_px": r_px,
        "annulus_px": [r_in, r_out],
        "amplitude_definition": "sum of Q_PHI (U_PHI) over pixel centres with r_in <= r < r_out from the frame centre",
        "qphi_sum": {name: annulus_sum(maps[j, 3], r_in, r_out) for j, name in enumerate(fields)},
        "uphi_sum": {name: annulus_sum(maps[j, 4], r_in, r_out) for j, name in enumerate(fields)},
    }
    return maps.astype(np.float32), info


def write_truth_stokes(path, maps: np.ndarray, info: dict) -> Path:
    """``truth_stokes.fits``: PRIMARY ``(nfields, 5, N, N)``, one header HDU per field with its sums."""
    from vampd.fitsio import write_fits_atomic

    h = fits.Header()
    h["STOKES"] = (",".join(PLANES), "planes of axis 3")
    h["BUNIT"] = ("e-/s", "per pixel, pipeline scale (0.5 x sky)")
    h["SCALE"] = (info["scale"], "maps = SCALE x sky Stokes")
    h["PXSCALE"] = (info["pixel_scale_mas"], "[mas/px] mean camera plate scale")
    h["RINGRIN"] = (info["annulus_px"][0], "[px] amplitude annulus inner radius")
    h["RINGROUT"] = (info["annulus_px"][1], "[px] amplitude annulus outer radius")
    h["COMMENT"] = "Noise-free ring truth, North up East left, PSF of a mean coadd; see truth.json truth_maps"
    hdus = [fits.PrimaryHDU(maps, header=h)]
    for name in info["fields"]:
        fh = fits.Header()
        fh["FIELD"] = name
        fh["QPHISUM"] = (info["qphi_sum"][name], "[e-/s] Q_phi summed over the annulus")
        fh["UPHISUM"] = (info["uphi_sum"][name], "[e-/s] U_phi summed over the annulus")
        hdus.append(fits.ImageHDU(header=fh, name=name))
    return write_fits_atomic(path, fits.HDUList(hdus))


def read_truth_stokes(path) -> tuple[np.ndarray, fits.Header]:
    """``(maps, primary header)`` of a ``truth_stokes.fits``."""
    with fits.open(path) as hdul:
        return np.asarray(hdul[0].data, np.float64), hdul[0].header.copy()

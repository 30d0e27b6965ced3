"""SCExAO pupil model and synthetic (diffraction-limited) VAMPIRES PSFs (docs/instrument.md §3.6).

The pupil is the parametric SCExAO pupil of the reference pipeline (outer and central obstruction,
four spiders, two dead-actuator masks and the dead-actuator "spider"), evaluated supersampled and
binned. PSFs are computed by Fraunhofer propagation with a matrix Fourier transform (MFT): the
focal-plane samples are the detector pixel centres themselves, so any pixel scale, frame size and
(sub-pixel) PSF centre is exact, without zero padding or interpolation.

Pixel integration: the polychromatic intensity is band-limited (spatial frequencies below D/λ),
and whenever λ/D spans at least two samples it is fully described by its samples at the pixel
centres; the integral over each pixel is then a multiplication by ``sinc(f_y) sinc(f_x)`` in the
discrete Fourier domain. When a pixel is too coarse for that (λ/D < 2 px), the intensity is computed
on a finer grid first (``oversample``), integrated over the sub-pixels the same way and binned.
A margin of extra pixels around the frame keeps the periodic wrap of that step away from the
returned pixels.

Coordinates: arrays are ``(y, x)`` with +y up (origin lower left); pupil coordinates in metres with
the same orientation; the pupil model is rotated by ``-pupil_offset`` (counter-clockwise positive),
and the PSF is flipped along y as in the reference (docs/instrument.md §3.6).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import os
from pathlib import Path

import numpy as np

from vampd.filenames import safe_part
from vampd.instrument.constants import (
    ACTUATOR_CENTERS,
    ACTUATOR_DIAMETER,
    ACTUATOR_SPIDER_START,
    ACTUATOR_SPIDER_WIDTH,
    MAS_TO_RAD,
    OBSTRUCTION_DIAMETER,
    PUPIL_DIAMETER,
    SPIDER_ANGLE,
    SPIDER_OFFSET,
    SPIDER_WIDTH,
)
from vampd.instrument.filters import band_edges, load_filter_curve, resolve_data_dir

log = logging.getLogger(__name__)

__all__ = [
    "PUPIL_DIAMETER",
    "OBSTRUCTION_DIAMETER",
    "pupil_mask",
    "pupil_area_fraction",
    "synthetic_psf",
    "psf_model",
    "psf_wavelengths",
    "psf_cache_dir",
    "cached_synthetic_psf",
]


def _segments():
    """Spiders as (x0, y0, x1, y1, width) rectangles (no rounded ends, as hcipy's make_spider)."""
    c = math.cos(math.radians(SPIDER_ANGLE)) * PUPIL_DIAMETER
    s = math.sin(math.radians(SPIDER_ANGLE)) * PUPIL_DIAMETER
    o = SPIDER_OFFSET
    segs = [
        (o, 0.0, o + c, s, SPIDER_WIDTH),
        (-o, 0.0, -o - c, s, SPIDER_WIDTH),
        (-o, 0.0, -o - c, -s, SPIDER_WIDTH),
        (o, 0.0, o + c, -s, SPIDER_WIDTH),
    ]
    ax, ay = ACTUATOR_SPIDER_START
    segs.append((ax, ay, ax - c, ay - s, ACTUATOR_SPIDER_WIDTH))
    return segs


def _clear(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """True where the un-rotated pupil transmits, for coordinates in metres."""
    r2 = x * x + y * y
    ok = (r2 <= (PUPIL_DIAMETER / 2) ** 2) & (r2 >= (OBSTRUCTION_DIAMETER / 2) ** 2)
    for x0, y0, x1, y1, w in _segments():
        length = math.hypot(x1 - x0, y1 - y0)
        ux, uy = (x1 - x0) / length, (y1 - y0) / length
        dx, dy = x - x0, y - y0
        t = dx * ux + dy * uy
        n = dx * uy - dy * ux
        ok &= ~((t >= 0) & (t <= length) & (np.abs(n) <= w / 2))
    for cx, cy in ACTUATOR_CENTERS:
        ok &= (x - cx) ** 2 + (y - cy) ** 2 > (ACTUATOR_DIAMETER / 2) ** 2
    return ok


@functools.lru_cache(maxsize=16)
def _pupil_cached(npix: int, pupil_offset_deg: float, supersample: int) -> np.ndarray:
    ns = npix * supersample
    step = PUPIL_DIAMETER / ns
    sub = (np.arange(ns) - (ns - 1) / 2) * step  # symmetric supersampled grid spanning D
    # The model is rotated counter-clockwise by -pupil_offset: sample the un-rotated model at
    # the coordinates rotated by +pupil_offset.
    beta = math.radians(pupil_offset_deg)
    cb, sb = math.cos(beta), math.sin(beta)
    out = np.empty((npix, npix))
    rows = max(1, 64 // supersample)  # blocks of pupil rows keep temporaries small
    for i0 in range(0, npix, rows):
        i1 = min(npix, i0 + rows)
        y = sub[i0 * supersample : i1 * supersample, None]
        x = sub[None, :]
        xr = x * cb - y * sb
        yr = x * sb + y * cb
        clear = _clear(xr, yr).astype(np.float64)
        out[i0:i1] = clear.reshape(i1 - i0, supersample, npix, supersample).mean(axis=(1, 3))
    out.flags.writeable = False
    return out


def pupil_mask(npix: int = 256, pupil_offset_deg: float = 0.0, supersample: int = 8) -> np.ndarray:
    """Parametric SCExAO pupil, ``(npix, npix)`` transmission in [0, 1] (docs/instrument.md §3.6).

    Parameters
    ----------
    npix : int
        Grid size; the grid spans the 7.92 m outer diameter exactly (pitch ``7.92 / npix`` m,
        centred on ``(npix - 1) / 2``).
    pupil_offset_deg : float
        Instrument pupil offset; the model is rotated by ``-pupil_offset_deg``
        (counter-clockwise positive, +y up).
    supersample : int
        Each pixel is the mean of ``supersample**2`` sub-samples (grey edges).

    Returns
    -------
    ndarray
        Float64 array ``(y, x)``.
    """
    return _pupil_cached(int(npix), float(pupil_offset_deg), int(supersample)).copy()


def pupil_area_fraction() -> float:
    """Analytic clear fraction of the pupil disc (annulus minus spiders and actuator masks).

    Spider areas are the parts of the rectangles between the two circles (the curvature of the
    circles across a spider's width is neglected); disc-spider overlaps are added back exactly.
    The mask of :func:`pupil_mask` agrees to ~1e-4 (its grey edges).
    """
    r_out, r_in = PUPIL_DIAMETER / 2, OBSTRUCTION_DIAMETER / 2
    area = math.pi * (r_out**2 - r_in**2)
    for x0, y0, x1, y1, w in _segments():
        # length of the centre line inside the annulus: from the inner to the outer circle
        length = math.hypot(x1 - x0, y1 - y0)
        ux, uy = (x1 - x0) / length, (y1 - y0) / length
        b = x0 * ux + y0 * uy
        c0 = x0 * x0 + y0 * y0
        t_out = -b + math.sqrt(b * b - (c0 - r_out**2))
        t_in = -b + math.sqrt(b * b - (c0 - r_in**2))
        area -= w * (t_out - t_in)
    r_act = ACTUATOR_DIAMETER / 2
    area -= len(ACTUATOR_CENTERS) * math.pi * r_act**2

    # Dead-actuator discs sit on spiders (one on a main spider, one on the actuator spider):
    # add back each disc-strip overlap, the integral of the disc chord across the strip width.
    def chord_integral(u):
        u = min(max(u, -r_act), r_act)
        return u * math.sqrt(r_act**2 - u * u) + r_act**2 * math.asin(u / r_act)

    for x0, y0, x1, y1, w in _segments():
        length = math.hypot(x1 - x0, y1 - y0)
        ux, uy = (x1 - x0) / length, (y1 - y0) / length
        for cx, cy in ACTUATOR_CENTERS:
            t = (cx - x0) * ux + (cy - y0) * uy
            d = (cx - x0) * uy - (cy - y0) * ux
            if r_act < t < length - r_act:  # disc fully within the strip's length
                area += chord_integral(d + w / 2) - chord_integral(d - w / 2)
    return area / (math.pi * r_out**2)


# ----------------------------------------------------------------------------------------------
# PSF


def psf_wavelengths(filter_name: str, data_dir=None, nwave: int = 7) -> tuple[np.ndarray, np.ndarray]:
    """Wavelengths (nm) and normalised weights of the polychromatic PSF (docs/instrument.md §3.6).

    ``nwave`` wavelengths evenly spaced between the 50 % band edges, weighted by the throughput
    there (linear interpolation of the curve); weights sum to 1.
    """
    wave, thr = load_filter_curve(filter_name, data_dir)
    wmin, wmax = band_edges(wave, thr)
    waves = np.linspace(wmin, wmax, nwave) if nwave > 1 else np.array([(wmin + wmax) / 2])
    weights = np.interp(waves, wave, thr)
    if not np.all(weights > 0):
        weights = np.where(weights > 0, weights, 0.0)
    return waves, weights / weights.sum()


def _pixel_box(img: np.ndarray) -> np.ndarray:
    """Integrate a Nyquist-sampled band-limited image over its sample cells (sinc filter)."""
    ny, nx = img.shape
    fy = np.fft.fftfreq(ny)[:, None]
    fx = np.fft.rfftfreq(nx)[None, :]
    return np.fft.irfft2(np.fft.rfft2(img) * (np.sinc(fy) * np.sinc(fx)), s=(ny, nx))


def _ceil_to(n: float, m: int) -> int:
    return int(m * math.ceil(n / m))


@functools.lru_cache(maxsize=32)
def _psf_cached(
    filter_name: str,
    pixel_scale_mas: float,
    pupil_offset_deg: float,
    ny: int,
    nx: int,
    cy: float,
    cx: float,
    data_dir: str | None,
    nwave: int,
    oversample: int | None,
    flip_y: bool,
    margin: int,
) -> np.ndarray:
    waves_nm, weights = psf_wavelengths(filter_name, data_dir, nwave)
    pix = pixel_scale_mas * MAS_TO_RAD
    lamd_px_min = waves_nm.min() * 1e-9 / PUPIL_DIAMETER / pix
    # intensity samples must resolve λ/D by >= 2 for the sinc pixel integration to be exact
    s = int(oversample) if oversample else max(1, math.ceil(2.0 / lamd_px_min))

    # Sampled pupil: the focal field repeats every npup λ/D; keep replicas far from the frame.
    reach = max(ny, nx) + 2 * max(abs(cy - (ny - 1) / 2), abs(cx - (nx - 1) / 2)) + 2 * margin
    npup = max(256, _ceil_to(1.25 * reach / lamd_px_min, 16))
    pupil = _pupil_cached(npup, float(pupil_offset_deg), 8)
    dp = PUPIL_DIAMETER / npup
    xp = (np.arange(npup) - (npup - 1) / 2) * dp
    power = float(np.sum(pupil**2)) * dp * dp  # ∫|P|² dA, for flux normalisation (Parseval)

    # Focal samples (pixel units, sub-pixel centres), including a margin around the frame.
    def axis(n, c, sign):
        sub = (np.arange((n + 2 * margin) * s) + 0.5) / s - 0.5 - margin
        return sign * (sub - c) * pix  # radians

    ty = axis(ny, cy, -1.0 if flip_y else 1.0)  # the y-flip of docs/instrument.md §3.6 = mirrored y offsets
    tx = axis(nx, cx, 1.0)
    pupil_c = pupil.astype(np.complex64)
    image = np.zeros((ty.size, tx.size))
    for lam_nm, wgt in zip(waves_nm, weights, strict=True):
        lam = lam_nm * 1e-9
        ay = np.exp((-2j * np.pi / lam) * np.outer(ty, xp)).astype(np.complex64)
        ax = np.exp((-2j * np.pi / lam) * np.outer(xp, tx)).astype(np.complex64)
        field = ay @ (pupil_c @ ax)
        # |E|² dA_pupil² / (λ² ∫|P|²) is the flux per steradian; times the sample's solid angle
        norm = (dp * dp) ** 2 * (pix / s) ** 2 / (lam * lam * power)
        image += (wgt * norm) * (field.real.astype(np.float64) ** 2 + field.imag.astype(np.float64) ** 2)

    image = _pixel_box(image)
    if s > 1:
        my, mx = image.shape[0] // s, image.shape[1] // s
        image = image.reshape(my, s, mx, s).sum(axis=(1, 3))
    image = image[margin : margin + ny, margin : margin + nx].astype(np.float32)
    image.flags.writeable = False
    return image


def _shape(npix) -> tuple[int, int]:
    if np.isscalar(npix):
        return int(npix), int(npix)
    ny, nx = npix
    return int(ny), int(nx)


def _dir_key(data_dir) -> str | None:
    d = resolve_data_dir(data_dir)
    return None if d is None else str(d)


def psf_model(
    filter_name: str,
    pixel_scale_mas: float,
    pupil_offset_deg: float,
    npix,
    center=None,
    data_dir: str | os.PathLike | None = None,
    nwave: int = 7,
    oversample: int | None = None,
    normalize: str = "total",
) -> np.ndarray:
    """Pixel-integrated diffraction-limited PSF centred at an arbitrary sub-pixel position.

    Parameters
    ----------
    filter_name : str
        Filter whose curve sets the wavelengths and weights (:func:`psf_wavelengths`).
    pixel_scale_mas : float
        Detector pixel scale (mas/px); the focal-plane samples are the pixel centres.
    pupil_offset_deg : float
        Pupil offset of the camera (the pupil is rotated by its negative).
    npix : int or (ny, nx)
        Frame shape.
    center : (y, x), optional
        PSF centre in pixels; default the frame centre ``((ny - 1) / 2, (nx - 1) / 2)``.
    data_dir : path-like, optional
        Data directory for the filter curve (nominal top-hat without one).
    nwave : int
        Number of wavelengths across the 50 % band.
    oversample : int, optional
        Sub-samples per pixel for the intensity; default automatic (1 unless λ/D < 2 px).
    normalize : {"total", "frame"}
        ``"total"``: unit flux over the whole focal plane, so the frame holds the fraction that
        falls on it (the simulator's convention). ``"frame"``: unit sum over the frame.

    Returns
    -------
    ndarray
        float32 ``(ny, nx)``, flipped along y like :func:`synthetic_psf`. Results are cached
        (keyed on all arguments); each call returns a fresh copy.
    """
    ny, nx = _shape(npix)
    if center is None:
        center = ((ny - 1) / 2, (nx - 1) / 2)
    cy, cx = (round(float(c), 9) for c in center)
    img = _psf_cached(
        str(filter_name),
        float(pixel_scale_mas),
        float(pupil_offset_deg),
        ny,
        nx,
        cy,
        cx,
        _dir_key(data_dir),
        int(nwave),
        None if not oversample else int(oversample),
        True,
        8,
    )
    if normalize == "frame":
        return (img / img.sum(dtype=np.float64)).astype(np.float32)
    if normalize != "total":
        raise ValueError(f"psf_model: normalize={normalize!r}, expected 'total' or 'frame'")
    return img.copy()


def synthetic_psf(
    filter_name: str,
    pixel_scale_mas: float,
    pupil_offset_deg: float,
    npix: int,
    data_dir: str | os.PathLike | None = None,
    nwave: int = 7,
    oversample: int | None = None,
) -> np.ndarray:
    """Synthetic PSF of docs/instrument.md §3.6: centred on the frame centre, unit sum, flipped along y, float32.

    Parameters are those of :func:`psf_model`; the PSF is centred exactly on
    ``((npix - 1) / 2, (npix - 1) / 2)`` and normalised to unit sum over the frame.
    """
    return psf_model(
        filter_name,
        pixel_scale_mas,
        pupil_offset_deg,
        npix,
        None,
        data_dir,
        nwave,
        oversample,
        normalize="frame",
    )


# ----------------------------------------------------------------------------------------------
# on-disk cache of synthetic PSFs (shared by worker processes and successive commands)


def psf_cache_dir(fallback: str | os.PathLike | None = None) -> Path | None:
    """Directory of the on-disk PSF cache (``<user cache>/psf``, :func:`vampd.cache.cache_dir`)."""
    from vampd.cache import cache_dir

    return cache_dir("psf", fallback)


@functools.cache
def _model_fingerprint() -> str:
    """vampd version + hash of this module's source: a changed PSF model never reads stale files."""
    from vampd import __version__

    return __version__ + ":" + hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]


def _psf_key(filter_name, pixel_scale_mas, pupil_offset_deg, npix, data_dir, nwave) -> str:
    waves, weights = psf_wavelengths(filter_name, data_dir, nwave)  # the filter curve's effect, exactly
    h = hashlib.sha256()
    h.update(
        repr(
            (
                _model_fingerprint(),
                str(filter_name),
                float(pixel_scale_mas),
                float(pupil_offset_deg),
                int(npix),
                int(nwave),
            )
        ).encode()
    )
    h.update(np.ascontiguousarray(waves, np.float64).tobytes())
    h.update(np.ascontiguousarray(weights, np.float64).tobytes())
    return h.hexdigest()[:24]


@functools.lru_cache(maxsize=64)
def cached_synthetic_psf(
    filter_name: str,
    pixel_scale_mas: float,
    pupil_offset_deg: float,
    npix: int,
    data_dir: str | None = None,
    cache_dir: str | None = None,
    nwave: int = 7,
) -> np.ndarray:
    """:func:`synthetic_psf`, read from / written to an on-disk cache (read-only array).

    The file name is keyed by the vampd version and PSF-model source, filter (its wavelengths and
    weights), pixel scale, pupil offset and size. Writes are atomic (temporary file in the cache
    directory, then rename), so worker processes and concurrent commands share the cache safely:
    the first to finish publishes, the others read. An unreadable entry is recomputed.
    """
    path = None
    if cache_dir is not None:
        key = _psf_key(filter_name, pixel_scale_mas, pupil_offset_deg, npix, data_dir, nwave)
        safe = safe_part(str(filter_name))
        path = Path(cache_dir) / f"psf_{safe}_{int(npix)}_{key}.npy"
        try:
            psf = np.load(path, allow_pickle=False)
            if psf.shape == (npix, npix) and psf.dtype == np.float32 and np.isfinite(psf).all():
                psf.flags.writeable = False
                return psf
            log.warning("PSF cache entry %s is malformed: recomputed", path)
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as exc:
            log.warning("PSF cache entry %s unreadable (%s): recomputed", path, exc)
    psf = synthetic_psf(filter_name, pixel_scale_mas, pupil_offset_deg, npix, data_dir=data_dir, nwave=nwave)
    psf.flags.writeable = False
    if path is not None:
        from vampd.cache import write_atomic

        if not write_atomic(path, lambda fh: np.save(fh, psf, allow_pickle=False)):
            log.warning("could not write PSF cache entry %s", path)
    return psf

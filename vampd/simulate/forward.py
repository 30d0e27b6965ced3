"""Instrument forward model of the simulator: sky scene → calibrated-orientation e-/s
images per file and camera → per-frame cubes → raw detector counts.

Per file and camera (``k``) the static images are

* ``A = K_core ⊗ X_core`` and ``B = K_halo ⊗ X_halo`` with
  ``X = Σ_j M[0, j] S_j`` (the intensity row of the file's Mueller matrix applied to the
  sky Stokes maps; the star, satellite spots and ring all go through it),
  ``K_core`` the diffraction-limited PSF (:func:`vampd.instrument.pupil.psf_model`,
  pixel-integrated, unit total flux) and ``K_halo`` a Moffat "seeing halo";
  in coronagraphic mode the star's core term is multiplied by the leak.

and frame ``t`` is ``f_t · shift_t[S_t A + (1 − S_t) B]`` (flux variation ``f_t``, Strehl
``S_t``, tip/tilt ``shift_t`` as an FFT phase ramp), so a whole cube is a linear
combination of two precomputed images done in Fourier space chunk by chunk.
Everything is in calibrated (flipped) orientation; the flipped camera's frames are
mirrored along y at the very end, before the detector model (which works in raw pixels).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import scipy.fft as sfft
from scipy.signal import fftconvolve

from vampd.simulate.scene import Scene, render_ring

__all__ = [
    "moffat",
    "FieldModel",
    "StaticImages",
    "render_field",
    "place_fields",
    "frame_chunks",
    "DetectorModel",
    "continuous_peak",
    "aperture_sum",
]


def moffat(shape, center_yx, fwhm_px: float, beta: float) -> np.ndarray:
    """Unit-flux circular Moffat profile sampled at pixel centres (e-/px per unit flux)."""
    alpha = fwhm_px / (2.0 * math.sqrt(2.0 ** (1.0 / beta) - 1.0))
    ny, nx = shape
    dy = (np.arange(ny) - center_yx[0])[:, None]
    dx = (np.arange(nx) - center_yx[1])[None, :]
    r2 = (dy * dy + dx * dx) / (alpha * alpha)
    return (beta - 1.0) / (math.pi * alpha * alpha) * (1.0 + r2) ** (-beta)


def moffat_peak(fwhm_px: float, beta: float) -> float:
    """Peak of the unit-flux Moffat profile."""
    alpha = fwhm_px / (2.0 * math.sqrt(2.0 ** (1.0 / beta) - 1.0))
    return (beta - 1.0) / (math.pi * alpha * alpha)


def continuous_peak(image: np.ndarray, center_yx) -> float:
    """Value of the un-pixel-integrated intensity at ``center_yx`` of a band-limited image.

    Divides out the pixel response ``sinc(f_y) sinc(f_x)`` in Fourier space and evaluates
    the Fourier series at the (sub-pixel) point: the "true continuous peak" of docs/instrument.md §3.2.
    """
    ny, nx = image.shape
    fy = np.fft.fftfreq(ny)
    fx = np.fft.fftfreq(nx)
    spec = np.fft.fft2(image) / (np.sinc(fy)[:, None] * np.sinc(fx)[None, :])
    ey = np.exp(2j * np.pi * fy * center_yx[0])
    ex = np.exp(2j * np.pi * fx * center_yx[1])
    return float(np.real(ey @ spec @ ex) / (ny * nx))


def aperture_sum(image: np.ndarray, center_yx, radius: float = 8.0) -> float:
    """Exact-overlap circular aperture sum (photutils) at ``center_yx``."""
    from photutils.aperture import CircularAperture

    ap = CircularAperture((center_yx[1], center_yx[0]), r=radius)
    return float(ap.do_photometry(image, method="exact")[0][0])


@dataclass
class FieldModel:
    """Optics of one field (one MBI band, or the single field) for one camera.

    ``core_kernel``: centred PSF kernel (odd size) for convolving extended emission;
    ``wavelength_nm`` sets the spot separation.
    """

    name: str
    filter_name: str
    pixel_scale: float
    pupil_offset: float
    wavelength_nm: float
    cell_shape: tuple[int, int]
    core_kernel: np.ndarray
    halo_kernel: np.ndarray
    core_peak_ideal: float  # continuous peak / aperture sum of the ideal PSF (Strehl denominator)
    data_dir: str | None = None
    psf_cache: dict = field(default_factory=dict, repr=False)

    def point_psf(self, center_yx) -> np.ndarray:
        """Pixel-integrated PSF (unit total flux) at a sub-pixel cell position (cached here:
        star and spot positions are the same in every file)."""
        from vampd.instrument.pupil import psf_model

        key = (round(float(center_yx[0]), 9), round(float(center_yx[1]), 9))
        if key not in self.psf_cache:
            self.psf_cache[key] = psf_model(
                self.filter_name,
                self.pixel_scale,
                self.pupil_offset,
                self.cell_shape,
                center=key,
                data_dir=self.data_dir,
            ).astype(np.float64)
        return self.psf_cache[key]


@dataclass
class StaticImages:
    """Core- and halo-convolved images of one field (cell) [e-/s], plus photometry truth."""

    core: np.ndarray
    halo: np.ndarray
    star_core_ap: float  # aperture sum of the star's core term (incl. M00, star flux, leak)
    star_halo_ap: float
    star_core_peak: float  # continuous peak of the star's core term
    star_halo_peak: float
    spots_yx: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))


def render_field(
    fm: FieldModel,
    scene: Scene,
    m0: np.ndarray,
    star_yx: tuple[float, float],
    derotang: float,
    halo_fwhm_px: float,
    halo_beta: float,
    coronagraphic: bool = False,
    spot_offsets: np.ndarray | None = None,
    aper_radius: float = 8.0,
) -> StaticImages:
    """Static core/halo images of one field cell for one file and camera.

    Parameters
    ----------
    fm : FieldModel
    scene : Scene
    m0 : ndarray (4,)
        First row of the file's Mueller matrix for this camera and field.
    star_yx : (y, x)
        Nominal star position in cell coordinates (calibrated orientation).
    derotang : float
        DEROTANG of the file [deg] (sky → detector rotation about the star).
    spot_offsets : ndarray (4, 2), optional
        Satellite-spot offsets (dy, dx) [px] in coronagraphic mode.
    """
    shape = fm.cell_shape
    # extended emission: M0 · (I, Q, U) of the ring, then convolved with each kernel
    stokes = render_ring(scene, shape, star_yx, derotang, fm.pixel_scale)
    ext = m0[0] * stokes[0] + m0[1] * stokes[1] + m0[2] * stokes[2]
    core = fftconvolve(ext, fm.core_kernel, mode="same")
    halo = fftconvolve(ext, fm.halo_kernel, mode="same")

    star = scene.star_flux * m0[0]  # unpolarised star: only M[0,0] matters
    star_core = fm.point_psf(star_yx)
    star_halo = moffat(shape, star_yx, halo_fwhm_px, halo_beta)
    leak = scene.coronagraph_leak if coronagraphic else 1.0
    core += (star * leak) * star_core
    halo += star * star_halo
    spots = np.zeros((0, 2))
    if coronagraphic and spot_offsets is not None:
        spots = np.asarray(star_yx)[None, :] + np.asarray(spot_offsets)
        for sy, sx in spots:
            core += star * scene.spot_contrast * fm.point_psf((sy, sx))
            halo += star * scene.spot_contrast * moffat(shape, (sy, sx), halo_fwhm_px, halo_beta)
    return StaticImages(
        core=core,
        halo=halo,
        star_core_ap=star * leak * aperture_sum(star_core, star_yx, aper_radius),
        star_halo_ap=star * aperture_sum(star_halo, star_yx, aper_radius),
        star_core_peak=star * leak * continuous_peak(star_core, star_yx),
        star_halo_peak=star * moffat_peak(halo_fwhm_px, halo_beta),
        spots_yx=spots,
    )


def place_fields(frame_shape, cells: list[tuple[np.ndarray, tuple[int, int]]]) -> np.ndarray:
    """Add cell images into a frame at integer origins ``(y0, x0)`` (clipped to the frame)."""
    out = np.zeros(frame_shape)
    ny, nx = frame_shape
    for img, (y0, x0) in cells:
        h, w = img.shape
        ys, xs = max(y0, 0), max(x0, 0)
        ye, xe = min(y0 + h, ny), min(x0 + w, nx)
        if ye > ys and xe > xs:
            out[ys:ye, xs:xe] += img[ys - y0 : ye - y0, xs - x0 : xe - x0]
    return out


def frame_chunks(
    core: np.ndarray,
    halo: np.ndarray,
    flux: np.ndarray,
    strehl: np.ndarray,
    dy: np.ndarray,
    dx: np.ndarray,
    chunk: int = 64,
    illumination: np.ndarray | None = None,
    double: bool = False,
) -> Iterator[np.ndarray]:
    """Per-frame images ``f_t · shift_t[S_t core + (1 − S_t) halo]`` [e-/s], in chunks.

    The sub-pixel shift (content moves by (+dy, +dx)) is an FFT phase ramp (periodic, exact
    for band-limited content). ``illumination`` (field-stop mask, static on the detector)
    multiplies after the shift. Yields float32 arrays ``(n, ny, nx)`` with n ≤ chunk (float64
    with ``double``, for exact tests); only one chunk is alive at a time.
    """
    ny, nx = core.shape
    rt, ct = (np.float64, np.complex128) if double else (np.float32, np.complex64)
    a_hat = sfft.rfft2(core, workers=1).astype(ct)
    b_hat = sfft.rfft2(halo, workers=1).astype(ct)
    ky = np.fft.fftfreq(ny).astype(rt)
    kx = np.fft.rfftfreq(nx).astype(rt)
    n = len(flux)
    for i0 in range(0, n, chunk):
        sl = slice(i0, min(i0 + chunk, n))
        s = np.asarray(strehl[sl], dtype=rt)[:, None, None]
        f = np.asarray(flux[sl], dtype=rt)[:, None, None]
        ramp_y = np.exp(-2j * np.pi * ky[None, :] * np.asarray(dy[sl], dtype=rt)[:, None]).astype(ct)
        ramp_x = np.exp(-2j * np.pi * kx[None, :] * np.asarray(dx[sl], dtype=rt)[:, None]).astype(ct)
        spec = (s * a_hat[None] + (1 - s) * b_hat[None]) * f
        spec *= ramp_y[:, :, None]
        spec *= ramp_x[:, None, :]
        out = sfft.irfft2(spec, s=(ny, nx), workers=1).astype(rt, copy=False)
        del spec
        if illumination is not None:
            out *= illumination
        yield out


@dataclass
class DetectorModel:
    """Raw-pixel detector model of one camera (raw orientation).

    ``response`` is the pixel response (flat field, incl. dead pixels at 0 and the MBI field
    stops), ``dark`` the dark current map [e-/s/px] (hot pixels included), ``bias`` the bias
    map [adu].
    """

    gain: float
    readnoise: float
    bias: np.ndarray
    dark: np.ndarray
    response: np.ndarray
    noise_free: bool = False

    def counts(self, eps: np.ndarray, exptime: float, rng: np.random.Generator, as_float: bool = False) -> np.ndarray:
        """Raw adu for frames of incident e-/s ``eps`` ``(n, ny, nx)`` (raw orientation).

        electrons = eps·t·response + dark·t → Poisson → + N(0, RN) → /gain + bias →
        round and clip to uint16 (unless ``as_float``: float32, no rounding or clipping).
        """
        lam = np.asarray(eps, dtype=np.float64) * (exptime * self.response)
        lam += self.dark * exptime
        if self.noise_free:
            adu = lam / self.gain + self.bias
        else:
            np.clip(lam, 0, None, out=lam)
            e = rng.poisson(lam)
            del lam
            # float32 from here on: 1/0.103 adu steps need far fewer than 24 bits
            adu = e.astype(np.float32)
            del e
            adu += rng.standard_normal(adu.shape, dtype=np.float32) * np.float32(self.readnoise)
            adu *= np.float32(1.0 / self.gain)
            adu += self.bias.astype(np.float32)
        if as_float:
            return adu.astype(np.float32)
        return np.clip(np.rint(adu), 0, 65535).astype(np.uint16)

"""Analytic sky scene for the simulator: an unpolarised star, a polarised ring and
(coronagraphic mode) four astrogrid satellite spots.

Sky frame: North up, East left (display origin lower-left), offsets in mas from the star.
A detector pixel in calibrated (flipped) orientation at offset ``d = (dx, dy)`` [px] from
the star sees the sky at ``R(DEROTANG) d`` (CCW rotation, docs/instrument.md §5.5), so derotating
the calibrated image by DEROTANG puts North up.

Polarisation convention (docs/instrument.md §9.8): position angle East of North
``theta = atan2(-x_sky, y_sky)`` (= ``atan2(c_x - x, y - c_y)`` in a North-up image);
azimuthal (tangential) polarisation has ``Q = -p I cos 2theta``, ``U = -p I sin 2theta``,
so ``Q_phi = -Q cos 2theta - U sin 2theta = p I > 0``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from vampd.instrument.constants import PUPIL_DIAMETER

__all__ = [
    "Scene",
    "sky_offsets",
    "ring_stokes",
    "render_ring",
    "spot_offsets_px",
    "lambda_over_d_mas",
    "TELESCOPE_DIAMETER_M",
]

TELESCOPE_DIAMETER_M = PUPIL_DIAMETER  # defined once in vampd.instrument.constants
_FWHM_TO_SIGMA = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))


@dataclass(frozen=True)
class Scene:
    """What is on the sky (all fluxes in detected e-/s summed over both cameras).

    Attributes
    ----------
    star_flux : float
        Unpolarised star [e-/s] per field (before the polarising beamsplitter).
    ring_flux : float
        Total flux of the ring [e-/s].
    ring_radius_mas, ring_width_mas : float
        Ring radius and Gaussian FWHM of its radial profile [mas] (face-on ring).
    pol_fraction : float
        Linear polarisation fraction of the ring; positive = azimuthal (Q_phi > 0),
        negative = radial.
    spot_contrast : float
        Satellite-spot flux / star flux (coronagraphic mode), each spot.
    coronagraph_leak : float
        Fraction of the star's diffraction core that leaks through the coronagraph.
    """

    star_flux: float = 2.0e6
    ring_flux: float = 2.0e5
    ring_radius_mas: float = 300.0
    ring_width_mas: float = 40.0
    pol_fraction: float = 0.3
    spot_contrast: float = 5.0e-3
    coronagraph_leak: float = 2.0e-3

    def to_dict(self) -> dict:
        return asdict(self)


def sky_offsets(shape, center_yx, derotang_deg: float, pixel_scale_mas: float):
    """Sky offsets (North, West) [mas] seen by each pixel of a calibrated frame.

    Parameters
    ----------
    shape : tuple
        ``(ny, nx)`` of the frame.
    center_yx : tuple of float
        Star position (calibrated coordinates) [px]; the sky rotates about it.
    derotang_deg : float
        DEROTANG of the file [deg].
    pixel_scale_mas : float
        Plate scale [mas/px].

    Returns
    -------
    north, west : ndarray
        ``(ny, nx)`` arrays: sky offsets as they appear in the derotated (North-up,
        East-left) image, i.e. +y and +x of that image, in mas.
    """
    ny, nx = shape
    dy = (np.arange(ny, dtype=float) - center_yx[0])[:, None]
    dx = (np.arange(nx, dtype=float) - center_yx[1])[None, :]
    a = math.radians(derotang_deg)
    c, s = math.cos(a), math.sin(a)
    x_sky = (dx * c - dy * s) * pixel_scale_mas
    y_sky = (dx * s + dy * c) * pixel_scale_mas
    return y_sky, x_sky


def ring_stokes(scene: Scene, y_sky, x_sky):
    """I, Q, U surface brightness [e-/s/mas²] of the ring at sky offsets [mas].

    ``y_sky`` is North, ``x_sky`` the image +x of a North-up East-left image (West).
    Q and U refer to North (angle East of North), see the module docstring.
    """
    r = np.hypot(x_sky, y_sky)
    sigma = scene.ring_width_mas * _FWHM_TO_SIGMA
    rr = scene.ring_radius_mas
    # normalise the radial Gaussian ring to total flux ring_flux: ∫ 2π r g(r) dr
    norm = 2.0 * math.pi * sigma * math.sqrt(2.0 * math.pi) * rr * 0.5 * (1 + math.erf(rr / (math.sqrt(2) * sigma)))
    norm += 2.0 * math.pi * sigma**2 * math.exp(-0.5 * (rr / sigma) ** 2)
    intensity = scene.ring_flux / norm * np.exp(-0.5 * ((r - rr) / sigma) ** 2)
    theta = np.arctan2(-x_sky, y_sky)
    q = -scene.pol_fraction * intensity * np.cos(2 * theta)
    u = -scene.pol_fraction * intensity * np.sin(2 * theta)
    return intensity, q, u


def render_ring(scene: Scene, shape, center_yx, derotang_deg: float, pixel_scale_mas: float):
    """Ring Stokes maps ``(3, ny, nx)`` = (I, Q, U) [e-/s/px] on a calibrated frame.

    Point-sampled at pixel centres times the pixel area (the ring is several pixels wide).
    """
    y_sky, x_sky = sky_offsets(shape, center_yx, derotang_deg, pixel_scale_mas)
    i, q, u = ring_stokes(scene, y_sky, x_sky)
    return np.stack([i, q, u]) * pixel_scale_mas**2


def lambda_over_d_mas(wavelength_nm: float) -> float:
    """Diffraction scale λ/D [mas] for Subaru's 7.92 m pupil."""
    return math.degrees(wavelength_nm * 1e-9 / TELESCOPE_DIAMETER_M) * 3.6e6


def spot_offsets_px(sep_lamd: float, wavelength_nm: float, pixel_scale_mas: float, angle_deg: float = 0.0):
    """Offsets ``(4, 2)`` as (dy, dx) [px] of the 4 astrogrid spots from the star.

    A "+" pattern (0, 90, 180, 270 deg from +x, plus ``angle_deg``) at ``sep_lamd`` λ/D.
    The spots are made by the DM, so they are fixed on the detector (they do not rotate
    with the sky).
    """
    sep = sep_lamd * lambda_over_d_mas(wavelength_nm) / pixel_scale_mas
    ang = np.deg2rad(angle_deg + np.array([0.0, 90.0, 180.0, 270.0]))
    return np.stack([sep * np.sin(ang), sep * np.cos(ang)], axis=1)

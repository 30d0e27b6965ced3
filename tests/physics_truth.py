"""An independent forward model of a VAMPIRES CMOS polarimetric night (issue 11).

Nothing here computes physics with vampd: the Mueller matrices are written out below from their
textbook definitions, the parallactic angle, altitude and azimuth come from astropy's
``AltAz``/``ICRS`` transforms, the PSF is an analytic Moffat profile and the detector constants are
typed in from docs/instrument.md §1.2. vampd is used only to format the raw header keywords
(:func:`vampd.simulate.headers.raw_header`, which computes no physics: it writes the values it is
given) and, by the tests, to run the real chain.

The duplication with :mod:`vampd.instrument.mueller` is intentional: do not merge the two or import
one from the other. The Mueller matrices below repeat the pipeline's on purpose (and ``duplicates``
reports them) so that a mistake in the pipeline's copy cannot also make the expected values
wrong; the tests compare two independent derivations.

Conventions (stated here, independently of vampd's code):

* Sky images are North up (+y), East left (−x); a position angle θ is East of North, so the offset
  of a point at separation ρ and position angle θ is ``(dx, dy) = ρ (−sin θ, cos θ)``.
* Sky Stokes Q, U are referred to North (Q > 0 along North–South, U > 0 along NE–SW).
* The calibrated detector image (after the pipeline's flip of the flipped camera) is the sky image
  rotated clockwise by DEROTANG = wrap(PA + PAOFFSET), PAOFFSET = wrap(pupil offset − 180 + PAP):
  the pipeline rotates it counter-clockwise by DEROTANG to put North up.
* The instrument's Mueller chain (right-most first) is PBS · FLC · IMR · HWP · R(−alt) · M3 · R(PA),
  with R the rotation of the Stokes reference frame, ideal half-wave retarders, an ideal mirror for
  M3 and the HWP in pupil-tracking mode (sync angle of docs/instrument.md §9.5). CMOS FLC states A 0°, B 43°.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import astropy.units as u
import numpy as np
from astropy.coordinates import ICRS, AltAz, EarthLocation, SkyCoord
from astropy.io import fits
from astropy.time import Time

# ------------------------------------------------------------------------------------------------
# constants (docs/instrument.md §1.2; typed in, not imported from vampd)

LAT_DEG = 19.825504
LON_DEG = -155.4760187
SITE = EarthLocation.from_geodetic(lon=LON_DEG * u.deg, lat=LAT_DEG * u.deg, height=0 * u.m)
GAIN = 0.103  # e-/adu, CMOS fast readout
BIAS = 200.0  # adu
ADC_MAX = 65535
PXSCALE = {1: 5.952, 2: 5.938}  # mas/px, post-NBS
PUPIL_OFFSET = {1: 129.44, 2: 129.99}  # deg, post-NBS
PAP = -37.0  # D_IMRPAP written in the headers
FLIPPED_CAMERA = 2  # post-NBS: camera 2 is flipped along y by the pipeline
FLC_DEG = {"A": 0.0, "B": 43.0}  # CMOS FLC fast axes (docs/instrument.md §1.5)
HWP_ANGLES = (0.0, 45.0, 22.5, 67.5)
DAY = 86400.0


def wrap180(a):
    return (np.asarray(a, dtype=float) + 180.0) % 360.0 - 180.0


# ------------------------------------------------------------------------------------------------
# elementary Mueller matrices (written here from their definitions)


def frame_rotation(theta_rad: float) -> np.ndarray:
    """Rotation of the Stokes reference frame by θ (counter-clockwise): Q' = Q c + U s, U' = −Q s + U c."""
    c, s = math.cos(2 * theta_rad), math.sin(2 * theta_rad)
    return np.array([[1, 0, 0, 0], [0, c, s, 0], [0, -s, c, 0], [0, 0, 0, 1]], dtype=float)


def retarder(theta_rad: float, delta_rad: float) -> np.ndarray:
    """Linear retarder with its fast axis at θ: R(−θ) · diag-retarder(δ) · R(θ)."""
    c, s = math.cos(delta_rad), math.sin(delta_rad)
    aligned = np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, c, s], [0, 0, -s, c]], dtype=float)
    return frame_rotation(-theta_rad) @ aligned @ frame_rotation(theta_rad)


def mirror(diattenuation: float = 0.0, theta_rad: float = 0.0) -> np.ndarray:
    """Ideal metallic mirror (half-wave retardance, optional diattenuation ε) with axes at θ."""
    e = diattenuation
    f = math.sqrt(1 - e * e)
    aligned = np.array([[1, e, 0, 0], [e, 1, 0, 0], [0, 0, -f, 0], [0, 0, 0, -f]], dtype=float)
    return frame_rotation(-theta_rad) @ aligned @ frame_rotation(theta_rad)


def polariser_beam(ordinary: bool) -> np.ndarray:
    """One beam of an ideal polarising beam splitter: analyser at 0° (ordinary) or 90°."""
    s = 1.0 if ordinary else -1.0
    return 0.5 * np.array([[1, s, 0, 0], [s, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]], dtype=float)


def hwp_sync_rad(alt_deg: float, az_deg: float) -> float:
    """HWP offset added in pupil-tracking mode (docs/instrument.md §9.5): ½ atan2(sin A, sin h cos A + cos h tan φ) + h."""
    a, h, phi = math.radians(az_deg - 180.0), math.radians(alt_deg), math.radians(LAT_DEG)
    return 0.5 * math.atan2(math.sin(a), math.sin(h) * math.cos(a) + math.cos(h) * math.tan(phi)) + h


def instrument_row(pa, alt, az, hwp, imr, flc: str, camera: int) -> np.ndarray:
    """First row of the instrument Mueller matrix: sky (I, Q, U, V) → counts on ``camera``."""
    half = math.pi
    m = frame_rotation(math.radians(pa))
    m = mirror() @ m
    m = frame_rotation(-math.radians(alt)) @ m
    m = retarder(math.radians(hwp) + hwp_sync_rad(alt, az), half) @ m
    m = retarder(math.radians(imr), half) @ m
    m = retarder(math.radians(FLC_DEG[flc]), half) @ m
    m = polariser_beam(camera == 1) @ m
    return m[0]


# ------------------------------------------------------------------------------------------------
# sky geometry (astropy)


def sky_angles(ra_deg: float, dec_deg: float, mjd) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PA (ICRS position angle of the zenith seen from the target), altitude, azimuth [deg]."""
    t = Time(np.atleast_1d(np.asarray(mjd, dtype=float)), format="mjd", scale="utc")
    frame = AltAz(obstime=t, location=SITE)
    target = SkyCoord(ra_deg * u.deg, dec_deg * u.deg, frame="icrs")
    zenith = SkyCoord(alt=np.full(t.shape, 90.0) * u.deg, az=np.zeros(t.shape) * u.deg, frame=frame).transform_to(
        ICRS()
    )
    pa = wrap180(target.position_angle(zenith).deg)
    aa = target.transform_to(frame)
    return pa, np.asarray(aa.alt.deg), np.asarray(aa.az.deg)


def zenith_icrs(mjd: float) -> tuple[float, float]:
    t = Time(mjd, format="mjd", scale="utc")
    z = SkyCoord(alt=90 * u.deg, az=0 * u.deg, frame=AltAz(obstime=t, location=SITE)).transform_to(ICRS())
    return float(z.ra.deg), float(z.dec.deg)


def paoffset(camera: int) -> float:
    return float(wrap180(PUPIL_OFFSET[camera] - 180.0 + PAP))


# ------------------------------------------------------------------------------------------------
# scene and PSF


def moffat(dx, dy, fwhm: float, beta: float = 2.5) -> np.ndarray:
    """Unit-flux circular Moffat profile sampled at offsets (dx, dy) [px]."""
    alpha = fwhm / (2 * math.sqrt(2 ** (1 / beta) - 1))
    return (beta - 1) / (math.pi * alpha**2) * (1 + (dx * dx + dy * dy) / alpha**2) ** (-beta)


@dataclass(frozen=True)
class Scene:
    """Sky scene: unpolarised star, polarised companion, azimuthally polarised ring (fluxes in e-/s)."""

    star_flux: float = 2.4e5  # peak ≈ 55 000 adu in a 0.5 s frame: just unsaturated
    companion_sep_px: float = 34.0
    companion_pa_deg: float = 57.0
    companion_ratio: float = 0.02
    companion_p: float = 0.2
    companion_chi_deg: float = 30.0
    ring_radius_px: float = 18.0
    ring_sigma_px: float = 2.5
    ring_flux: float = 1.0e5
    ring_p: float = 0.5
    fwhm_px: float = 3.6


def ring_sky_stokes(scene: Scene, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Unconvolved ring (I, Q, U) at sky offsets (North up, East left), e-/s per px."""
    r = np.hypot(xs, ys)
    prof = np.exp(-0.5 * ((r - scene.ring_radius_px) / scene.ring_sigma_px) ** 2)
    norm = scene.ring_flux / (2 * math.pi * scene.ring_radius_px * math.sqrt(2 * math.pi) * scene.ring_sigma_px)
    i = norm * prof
    theta = np.arctan2(-xs, ys)  # East of North
    q = -scene.ring_p * i * np.cos(2 * theta)
    uu = -scene.ring_p * i * np.sin(2 * theta)
    return np.stack([i, q, uu])


def _convolve(maps: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    k = np.fft.rfft2(np.fft.ifftshift(kernel))
    return np.fft.irfft2(np.fft.rfft2(maps) * k, s=maps.shape[-2:])


def sky_frame_stokes(scene: Scene, n: int, derotang_deg: float) -> np.ndarray:
    """(I, Q, U) on the calibrated detector grid (n×n, star at the geometric centre) for one
    instant: the sky rotated clockwise by DEROTANG, convolved with the PSF; Q, U referred to North."""
    c = (n - 1) / 2
    yy, xx = np.mgrid[0:n, 0:n] - c
    a = math.radians(derotang_deg)
    # detector offset d shows the sky offset Rot(+a) d (the pipeline rotates by +a to undo)
    xs = math.cos(a) * xx - math.sin(a) * yy
    ys = math.sin(a) * xx + math.cos(a) * yy
    ring = _convolve(ring_sky_stokes(scene, xs, ys), moffat(xx, yy, scene.fwhm_px))
    star = scene.star_flux * moffat(xx, yy, scene.fwhm_px)
    # companion: its sky offset, seen on the detector at Rot(−a) s
    th = math.radians(scene.companion_pa_deg)
    sx, sy = -scene.companion_sep_px * math.sin(th), scene.companion_sep_px * math.cos(th)
    dx, dy = math.cos(a) * sx + math.sin(a) * sy, -math.sin(a) * sx + math.cos(a) * sy
    comp = scene.companion_ratio * scene.star_flux * moffat(xx - dx, yy - dy, scene.fwhm_px)
    chi = math.radians(scene.companion_chi_deg)
    out = ring.copy()
    out[0] += star + comp
    out[1] += scene.companion_p * comp * math.cos(2 * chi)
    out[2] += scene.companion_p * comp * math.sin(2 * chi)
    return out


def truth_qphi(scene: Scene, n: int, r_in: float, r_out: float) -> tuple[float, float]:
    """Σ Q_φ and Σ U_φ of the ring (PSF-convolved, North up) over an annulus of the n×n grid."""
    c = (n - 1) / 2
    yy, xx = np.mgrid[0:n, 0:n] - c
    _, q, uu = _convolve(ring_sky_stokes(scene, xx, yy), moffat(xx, yy, scene.fwhm_px))
    theta = np.arctan2(-xx, yy)
    qphi = -q * np.cos(2 * theta) - uu * np.sin(2 * theta)
    uphi = q * np.sin(2 * theta) - uu * np.cos(2 * theta)
    r = np.hypot(xx, yy)
    ann = (r >= r_in) & (r <= r_out)
    return float(qphi[ann].sum()), float(uphi[ann].sum())


# ------------------------------------------------------------------------------------------------
# the night


@dataclass(frozen=True)
class Night:
    """One HWP cycle: 4 HWP angles × FLC A, B (time order) × both cameras (simultaneous)."""

    scene: Scene = field(default_factory=Scene)
    size: int = 112
    nframes: int = 4
    exptime: float = 0.5
    gap_s: float = 0.3
    mjd_mid: float = 61000.30  # 2025-11-20, post-NBS
    #: target position relative to the zenith at mjd_mid: (dRA·cosδ, dDec) in degrees
    zenith_offset_deg: tuple[float, float] = (0.0, 3.0)
    #: or explicit ICRS coordinates (deg), overriding zenith_offset_deg
    radec: tuple[float, float] | None = None
    saturate: bool = False


def night_geometry(night: Night) -> tuple[float, float]:
    if night.radec is not None:
        return night.radec
    zra, zdec = zenith_icrs(night.mjd_mid)
    dx, dy = night.zenith_offset_deg
    dec = zdec + dy
    return (zra + dx / math.cos(math.radians(dec))) % 360.0, dec


def write_night(outdir: Path, night: Night) -> dict:
    """Write the raw cubes (uint16, realistic CMOS headers) and return the truth."""
    from vampd.simulate.headers import (
        raw_header,  # keyword formatting only (no physics)
    )

    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    ra, dec = night_geometry(night)
    slot_s = night.nframes * night.exptime + night.gap_s
    nslots = 2 * len(HWP_ANGLES)
    t0 = night.mjd_mid - 0.5 * nslots * slot_s / DAY
    n = night.size
    c = (n - 1) / 2
    files, truth_files = [], []
    frameid = 1000
    for k in range(nslots):
        hwp = HWP_ANGLES[k // 2]
        flc = "AB"[k % 2]
        start = t0 + k * slot_s / DAY
        starts = start + np.arange(night.nframes) * night.exptime / DAY
        mids = starts + 0.5 * night.exptime / DAY
        mjd_str, mjd_end = float(starts[0]), float(starts[-1] + night.exptime / DAY)
        pa_f, alt_f, az_f = sky_angles(ra, dec, mids)
        pa_m, alt_m, az_m = (float(a[0]) for a in sky_angles(ra, dec, 0.5 * (mjd_str + mjd_end)))
        imr = 64.5115 + 0.5 * alt_m  # any plausible rotator angle; the header value is what counts
        for cam in (1, 2):
            cube = np.empty((night.nframes, n, n))
            for j in range(night.nframes):
                derot = float(wrap180(pa_f[j] + paoffset(cam)))
                stokes = sky_frame_stokes(night.scene, n, derot)
                row = instrument_row(pa_f[j], alt_f[j], az_f[j], hwp, imr, flc, cam)
                e_per_s = row[0] * stokes[0] + row[1] * stokes[1] + row[2] * stokes[2]
                cube[j] = e_per_s * night.exptime
            adu = BIAS + cube / GAIN
            if cam == FLIPPED_CAMERA:
                adu = adu[:, ::-1, :]
            raw = np.clip(np.round(adu), 0, ADC_MAX).astype(np.uint16)
            frameid += 1
            hdr = raw_header(
                shape=raw.shape,
                camera=cam,
                frameid=frameid,
                data_typ="OBJECT",
                obj="PHYSTRUTH",
                ra_deg=ra,
                dec_deg=dec,
                mjd_str=mjd_str,
                mjd_end=mjd_end,
                exptime=night.exptime,
                filter01="Open",
                hwp=hwp,
                flc=flc,
                altitude=alt_m,
                azimuth=az_m,
                imrang=imr,
                imrpap=PAP,
            )
            hdr["RADESYS"] = "ICRS"
            hdr.remove("EQUINOX", ignore_missing=True)
            name = f"{'VMPA' if cam == 1 else 'VMPB'}{frameid:08d}.fits"
            path = outdir / name
            fits.PrimaryHDU(raw, header=hdr).writeto(path, overwrite=True)
            files.append(str(path))
            truth_files.append(
                {
                    "file": name,
                    "camera": cam,
                    "hwp": hwp,
                    "flc": flc,
                    "mjd": 0.5 * (mjd_str + mjd_end),
                    "pa": pa_m,
                    "derotang": float(wrap180(pa_m + paoffset(cam))),
                    "altitude": alt_m,
                    "azimuth": az_m,
                    "saturated_frames": int(np.sum((raw >= ADC_MAX).reshape(night.nframes, -1).any(axis=1))),
                }
            )
    truth = {"ra": ra, "dec": dec, "files": truth_files, "paths": files, "center": c}
    (outdir / "truth.json").write_text(json.dumps(truth, indent=1))
    return truth


def saturated_night(**kw) -> Night:
    """A night whose star core is saturated in every frame (peak ≫ 65535 adu)."""
    scene = replace(Scene(), star_flux=1.0e6)  # peak ≈ 24 000 e-: ~20 px clipped at 65535 adu
    return Night(scene=scene, saturate=True, **kw)


# ------------------------------------------------------------------------------------------------
# measurements on the products (independent estimators)


def centroid(image: np.ndarray, guess: tuple[float, float], half: int = 6, niter: int = 4) -> tuple[float, float]:
    """Background-subtracted, iterated centre of mass (y, x) in a (2·half+1)² box (NaNs ignored)."""
    y, x = guess
    for _ in range(niter):
        iy, ix = round(y), round(x)
        box = image[iy - half : iy + half + 1, ix - half : ix + half + 1].astype(float)
        box = box - np.nanmedian(np.concatenate([box[0], box[-1], box[:, 0], box[:, -1]]))
        box = np.where(np.isfinite(box), np.clip(box, 0, None), 0.0)
        yy, xx = np.mgrid[-half : half + 1, -half : half + 1]
        s = box.sum()
        y, x = iy + float((yy * box).sum() / s), ix + float((xx * box).sum() / s)
    return y, x


def fit_centre_wings(image: np.ndarray, guess: tuple[float, float], fwhm: float, r_min: float, r_max: float):
    """Centre (y, x) of a Moffat of known FWHM fitted (amplitude, centre) to the ring r_min..r_max
    around the guess: the saturated (or NaN) core is excluded."""
    from scipy.optimize import least_squares

    n0, n1 = image.shape
    yy, xx = np.mgrid[0:n0, 0:n1]
    r = np.hypot(yy - guess[0], xx - guess[1])
    sel = (r >= r_min) & (r <= r_max) & np.isfinite(image)
    yv, xv, dv = yy[sel], xx[sel], image[sel].astype(float)

    def resid(p):
        return p[0] * moffat(xv - p[2], yv - p[1], fwhm) - dv

    a0 = float(np.nansum(dv) / np.sum(moffat(xv - guess[1], yv - guess[0], fwhm)))
    res = least_squares(resid, [a0, guess[0], guess[1]], x_scale=[abs(a0) or 1.0, 0.1, 0.1])
    return float(res.x[1]), float(res.x[2])


def position_angle(dy: float, dx: float) -> float:
    """Position angle East of North of an offset in a North-up East-left image."""
    return float(math.degrees(math.atan2(-dx, dy)))

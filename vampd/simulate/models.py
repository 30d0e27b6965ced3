"""Instrument pieces of a simulated night: detectors, field layout and illumination, PSF models, Mueller.

Split out of :mod:`vampd.simulate.night`, which builds them once per night.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from astropy.io import fits

from vampd.simulate.forward import DetectorModel, FieldModel, aperture_sum, continuous_peak, moffat

if TYPE_CHECKING:
    from vampd.simulate.night import SimConfig


def _detectors(cfg: SimConfig) -> dict:
    from vampd.instrument.detectors import cmos_detector

    return {cam: cmos_detector(cam, "fast", cfg.night_mjd) for cam in (1, 2)}


def _field_layout(cfg: SimConfig) -> list[dict]:
    """Fields: name, PSF filter, centre (calibrated frame), cell origin and shape."""
    from vampd.instrument.fields import default_field_centers

    shape = cfg.frame_shape
    hdr = fits.Header({"OBS-MOD": cfg.obs_mod, "FILTER01": "Open" if cfg.mbi else cfg.filter})
    centers = default_field_centers(hdr, shape)
    out = []
    for name, (cy, cx) in centers.items():
        if cfg.mbi:
            s = cfg.size
            y0, x0 = int(round(cy - (s - 1) / 2)), int(round(cx - (s - 1) / 2))
            cell = (s, s)
        else:
            y0, x0, cell = 0, 0, shape
        filt = name if cfg.mbi else cfg.filter
        out.append({"name": name, "filter": filt, "center": (cy, cx), "origin": (y0, x0), "cell": cell})
    return out


def _illumination(cfg: SimConfig, layout) -> np.ndarray | None:
    """MBI field stops (calibrated orientation): 1 inside each field square, 0 between."""
    if not cfg.mbi:
        return None
    shape = cfg.frame_shape
    mask = np.zeros(shape, dtype=np.float32)
    half = (cfg.size - 2 * max(2, cfg.size // 32)) / 2
    yy = np.arange(shape[0])[:, None]
    xx = np.arange(shape[1])[None, :]
    for f in layout:
        cy, cx = f["center"]
        mask[(np.abs(yy - cy) <= half) & (np.abs(xx - cx) <= half)] = 1.0
    return mask


def _field_models(cfg: SimConfig, dets, layout) -> dict:
    """FieldModel per (camera, field name)."""
    from vampd.instrument.filters import filter_info
    from vampd.instrument.pupil import psf_model

    models = {}
    for cam in (1, 2):
        d = dets[1] if cfg.identical_cameras else dets[cam]
        for f in layout:
            k = min(2 * min(f["cell"]) - 1, 511)
            c = (k - 1) / 2
            core = psf_model(f["filter"], d.pixel_scale, d.pupil_offset, k, center=(c, c), data_dir=cfg.data_dir)
            core = core.astype(np.float64)
            halo = moffat((k, k), (c, c), cfg.halo_fwhm_mas / d.pixel_scale, cfg.halo_beta)
            ideal = continuous_peak(core, (c, c)) / aperture_sum(core, (c, c), cfg.aper_radius)
            models[cam, f["name"]] = FieldModel(
                name=f["name"],
                filter_name=f["filter"],
                pixel_scale=d.pixel_scale,
                pupil_offset=d.pupil_offset,
                wavelength_nm=filter_info(f["filter"], cfg.data_dir).waveave,
                cell_shape=tuple(f["cell"]),
                core_kernel=core,
                halo_kernel=halo,
                core_peak_ideal=ideal,
                data_dir=cfg.data_dir,
            )
    return models


def _detector_models(cfg: SimConfig, dets, illum) -> tuple[dict, dict]:
    """DetectorModel per camera (raw orientation) and its truth (bad pixels etc.)."""
    from vampd.instrument.detectors import flipped_camera

    shape = cfg.frame_shape
    ny, nx = shape
    flipped = flipped_camera(cfg.night_mjd)
    models, truth = {}, {}
    for cam in (1, 2):
        d = dets[cam]
        rng = np.random.default_rng([cfg.seed, 101, cam])
        ill = None
        if illum is not None:
            ill = illum[::-1] if cam == flipped else illum
        if cfg.noise_free:
            response = np.ones(shape)
            dark = np.zeros(shape)
            bias = np.full(shape, d.bias)
            hot, dead = np.zeros((0, 2), int), np.zeros((0, 2), int)
        else:
            yy = (np.arange(ny) - (ny - 1) / 2)[:, None] / max(ny, nx)
            xx = (np.arange(nx) - (nx - 1) / 2)[None, :] / max(ny, nx)
            vignette = 1.0 - 0.12 * (yy**2 + xx**2) * 4
            response = vignette * (1.0 + cfg.flat_rms * rng.standard_normal(shape))
            # a flat is normalised by its median (docs/instrument.md §2.4): give the response median 1 so that
            # flat-fielded data reproduce the injected e-/s exactly (truth stays comparable)
            response /= np.median(response)
            bias = d.bias + cfg.bias_pattern_adu * rng.standard_normal(nx)[None, :] * np.ones((ny, 1))
            dark = np.full(shape, d.dark_current)
            pix = rng.choice(ny * nx, size=cfg.n_hot + cfg.n_dead, replace=False)
            ys, xs = np.unravel_index(pix, shape)
            hot = np.stack([ys[: cfg.n_hot], xs[: cfg.n_hot]], axis=1)
            dead = np.stack([ys[cfg.n_hot :], xs[cfg.n_hot :]], axis=1)
            dark[hot[:, 0], hot[:, 1]] += rng.uniform(2e4, 2e5, cfg.n_hot)
            response[dead[:, 0], dead[:, 1]] = 0.0
        if ill is not None:
            response = response * ill
        models[cam] = DetectorModel(d.gain, d.readnoise, bias, dark, response, cfg.noise_free)
        truth[str(cam)] = {
            "gain": d.gain,
            "bias": d.bias,
            "readnoise": d.readnoise,
            "dark_current": d.dark_current,
            "pixel_scale": d.pixel_scale,
            "pupil_offset": d.pupil_offset,
            "flipped": cam == flipped,
            "hot_pixels_raw_yx": hot.tolist(),
            "hot_dark_e_per_s": [float(dark[y, x]) for y, x in hot],
            "dead_pixels_raw_yx": dead.tolist(),
            "flat_rms": 0.0 if cfg.noise_free else cfg.flat_rms,
            "vignetting": "none" if cfg.noise_free else "1 - 0.48 r^2, r in units of the larger frame side",
            "bias_pattern_adu": 0.0 if cfg.noise_free else cfg.bias_pattern_adu,
        }
    return models, truth


def _mueller_params(cfg: SimConfig):
    from vampd.instrument.mueller import MuellerParams

    p = MuellerParams.ideal("cmos")
    changes = dict(cfg.mueller)
    if cfg.ip:
        changes.setdefault("m3_diat", float(cfg.ip))
    return p.replace(**changes) if changes else p

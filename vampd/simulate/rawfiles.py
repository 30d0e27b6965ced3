"""Raw archive files of a simulated night: calibration and science cubes, sidecars, truth JSON.

Split out of :mod:`vampd.simulate.night`, which plans the night and calls these writers once per
file.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from vampd.simulate.forward import frame_chunks, place_fields, render_field
from vampd.simulate.headers import raw_header
from vampd.simulate.plan import _DAY, _target_coords
from vampd.simulate.scene import spot_offsets_px
from vampd.simulate.stream import apply_fault
from vampd.simulate.writer import sidecar_lines, write_cube, write_sidecar

if TYPE_CHECKING:
    from vampd.simulate.night import SimConfig

__all__ = ["crop_origin", "raw_name", "write_calibration", "write_json", "write_science"]

_SENSOR_SHAPE = (2304, 4096)  # qCMOS (ORCA-Quest) full frame (y, x)


def crop_origin(shape) -> tuple[int, int]:
    """``(PRD-MIN2, PRD-MIN1)`` of a crop centred on the sensor (clipped at 0)."""
    return max((_SENSOR_SHAPE[0] - shape[0]) // 2, 0), max((_SENSOR_SHAPE[1] - shape[1]) // 2, 0)


def raw_name(camera: int, frameid: int) -> str:
    """Archive file stem of ``camera`` (1 → VMPA, 2 → VMPB) and ``frameid``."""
    return f"{'VMPA' if camera == 1 else 'VMPB'}{frameid:08d}"


def write_calibration(cfg: SimConfig, outdir: Path, det_models, first_mjd: float, layout) -> list[dict]:
    """Raw darks (DATA-TYP DARK) and flats (DATA-TYP FLAT), one cube per camera each."""
    calib_dir = outdir / "calib"
    out = []
    shape = cfg.frame_shape
    n = cfg.calib_nframes
    dt = cfg.exptime / _DAY
    ra, dec = _target_coords(cfg.targets[0])
    for kind, frameid, t0 in (("DARK", 9000, first_mjd - 3600 / _DAY), ("FLAT", 9001, first_mjd - 3000 / _DAY)):
        for cam in (1, 2):
            dm = det_models[cam]
            rng = np.random.default_rng([cfg.seed, 303, cam, frameid])
            level = 0.0 if kind == "DARK" else cfg.flat_level_e / cfg.exptime
            hdr = raw_header(
                shape=(n, *shape),
                camera=cam,
                frameid=frameid,
                data_typ=kind,
                obj=kind,
                ra_deg=ra,
                dec_deg=dec,
                mjd_str=t0,
                mjd_end=t0 + n * dt,
                exptime=cfg.exptime,
                filter01="Open" if cfg.mbi else cfg.filter,
                obs_mod=cfg.obs_mod,
                hwp=0.0,
                flc=None if cfg.doublediff else "A",
                mbi=cfg.mbi,
                as_float=cfg.write_float,
                crop_origin=crop_origin(shape),
            )

            def chunks(dm=dm, rng=rng, level=level):
                for i0 in range(0, n, cfg.frames_chunk):
                    m = min(cfg.frames_chunk, n - i0)
                    yield dm.counts(np.full((m, *shape), level), cfg.exptime, rng, cfg.write_float)

            name = raw_name(cam, frameid)
            path = write_cube(calib_dir / f"{name}.fits", hdr, chunks())
            write_sidecar(path.with_suffix(".txt"), sidecar_lines(t0 + np.arange(n) * dt, cfg.exptime))
            out.append(
                {
                    "name": name,
                    "path": str(path.relative_to(outdir)),
                    "data_typ": kind,
                    "camera": cam,
                    "mjd_str": t0,
                    "mjd_end": t0 + n * dt,
                    "nframes": n,
                    "flat_level_e_per_frame": cfg.flat_level_e if kind == "FLAT" else 0.0,
                }
            )
    return out


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_json(path: Path, obj) -> None:
    """Write ``obj`` as JSON (numpy values converted, non-finite floats as null), atomically."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as fh:
        json.dump(_jsonable(obj), fh, indent=1)
    os.replace(tmp, path)


def write_science(
    cfg, outdir, f, blocks, layout, field_models, det_models, halo_fwhm, illum, flipped, cached=None
) -> None:
    """Write the science cube of planned file ``f`` (and its sidecar), injecting its fault if any.

    ``cached`` is the file's static ``(core, halo)`` images already rendered while planning; None
    renders them here (long nights drop the cache to bound memory).
    """
    cam = f["camera"]
    b = blocks[f["block"]]
    k = f["block_frames"]
    shape = cfg.frame_shape
    core_cells, halo_cells = [], []
    for fl in layout if cached is None else ():
        fm = field_models[cam, fl["name"]]
        m0 = f["mueller"][fl["name"]]
        oy, ox = fl["origin"]
        star_cal = (fl["center"][0] + cfg.star_offset[0], fl["center"][1] + cfg.star_offset[1])
        offs = (
            spot_offsets_px(cfg.grid_sep_lamd, fm.wavelength_nm, fm.pixel_scale, cfg.spot_angle_deg)
            if cfg.coronagraphic
            else None
        )
        st = render_field(
            fm,
            cfg.scene,
            m0,
            (star_cal[0] - oy, star_cal[1] - ox),
            f["derotang"],
            halo_fwhm[cam],
            cfg.halo_beta,
            cfg.coronagraphic,
            offs,
            cfg.aper_radius,
        )
        core_cells.append((st.core, (oy, ox)))
        halo_cells.append((st.halo, (oy, ox)))
    if cached is None:
        core = place_fields(shape, core_cells)
        halo = place_fields(shape, halo_cells)
    else:
        core, halo = cached

    hdr = raw_header(
        shape=(len(k), *shape),
        camera=cam,
        frameid=f["frameid"],
        data_typ="OBJECT",
        obj=f["target"],
        ra_deg=f["ra_deg"],
        dec_deg=f["dec_deg"],
        mjd_str=f["mjd_str"],
        mjd_end=f["mjd_end"],
        exptime=cfg.exptime,
        filter01="Open" if cfg.mbi else cfg.filter,
        obs_mod=cfg.obs_mod,
        hwp=f["hwp"],
        flc=f["flc"],
        altitude=f["altitude"],
        azimuth=f["azimuth"],
        imrang=f["imrang"],
        imrpap=f["imrpap"],
        coronagraphic=cfg.coronagraphic,
        grid_amp_um=cfg.grid_amp_um,
        grid_sep_lamd=cfg.grid_sep_lamd,
        mbi=cfg.mbi,
        as_float=cfg.write_float,
        crop_origin=crop_origin(shape),
    )
    if f["fault"] == "missing_keyword":
        del hdr["U_CAMERA"]
    dm = det_models[cam]
    rng = np.random.default_rng([cfg.seed, 404, f["frameid"], cam])

    def chunks():
        for eps in frame_chunks(
            core,
            halo,
            b["flux"][k],
            b["strehl"][k],
            b["dy"][k],
            b["dx"][k],
            cfg.frames_chunk,
            illum,
            double=cfg.write_float,
        ):
            if cam == flipped:
                eps = eps[:, ::-1, :]
            yield dm.counts(eps, cfg.exptime, rng, cfg.write_float)

    def finalize(tmp, head_bytes, data_bytes):
        if f["fault"]:
            f["fault_description"] = apply_fault(
                f["fault"], tmp, head_bytes, data_bytes, np.random.default_rng([cfg.seed, 505, f["frameid"]])
            )

    path = outdir / f["path"]
    write_cube(path, hdr, chunks(), finalize=finalize)
    write_sidecar(path.with_suffix(".txt"), sidecar_lines(f["frame_mjd"], cfg.exptime))

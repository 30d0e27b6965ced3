"""A simulated VAMPIRES night: plan, geometry, calibration files, science cubes, truth.

:func:`simulate_night` writes ``OUTDIR/raw/VMP{A,B}{frameid:08d}.fits`` (+ ``.txt``
sidecars), ``OUTDIR/calib/`` raw darks and flats (same archive format) and
``OUTDIR/truth.json`` with every injected quantity.

Observing sequence (documented choices):

* Targets one after another; per target ``ncycles`` HWP cycles in the instrument's order
  (0, 45, 22.5, 67.5); ``hwp_overhead_s`` between HWP positions.
* Both cameras simultaneous (same times, same frame id, same jitter/Strehl/flux draws).
* FLC A and B are **interleaved** as on the real CMOS system: at one HWP angle the frames
  alternate A, B, A, B, ... (frame period = EXPTIME) and the logger splits them into an A
  file and a B file whose time spans overlap (B starts one frame later). Double-diff mode
  (no FLC) writes one file per camera and HWP angle.
* Geometry per file at its midpoint ``MJD = (MJD-STR + MJD-END)/2``: PA from the header's
  RA/DEC strings (as the pipeline parses them) via
  :func:`vampd.instrument.angles.parallactic_angle`, ALTITUDE/AZIMUTH from astropy AltAz at
  Subaru (offline), D_IMRANG from :func:`~vampd.simulate.headers.imr_angle`,
  DEROTANG = wrap(PA + PAOFFSET) with the camera's pupil offset and D_IMRPAP. The Mueller
  matrix and the sky rotation use the rounded header values. ``rotation=False`` freezes all
  of this at each target's first file (a test mode: the header times still advance, so the
  pipeline's recomputed PA will differ).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from vampd.simulate.forward import place_fields, render_field
from vampd.simulate.models import (
    _detector_models,
    _detectors,
    _field_layout,
    _field_models,
    _illumination,
    _mueller_params,
)
from vampd.simulate.plan import HWP_ORDER, TARGETS, _geometry, plan_files
from vampd.simulate.rawfiles import crop_origin as crop_origin  # re-exported (was defined here)
from vampd.simulate.rawfiles import raw_name, write_calibration, write_json, write_science
from vampd.simulate.scene import Scene, spot_offsets_px
from vampd.simulate.stream import canonical_fault, fault_targets

__all__ = ["HWP_ORDER", "TARGETS", "SimConfig", "simulate_night", "plan_files"]

POST_NBS_NIGHT_MJD = 61004.0  # 2026-11-25 00:00 UT
PRE_NBS_NIGHT_MJD = 60639.0  # 2024-11-25 00:00 UT
_STATIC_CACHE_BYTES = 512 * 2**20


@dataclass(frozen=True)
class SimConfig:
    """Everything that defines a simulated night (defaults: small, test-sized).

    Geometry and sequence: ``size`` (frame side, px; MBI frames are 2·size × 4·size with
    one size² cell per field), ``nframes`` per file, ``ncycles`` HWP cycles per target,
    ``exptime`` [s], ``filter`` (FILTER01; MBI uses F610/F670/F720/F760), ``targets``
    (names of :data:`TARGETS`), ``start_mjd`` (default: 5 min before the first target's
    transit on 2026-11-25, or 2024-11-25 with ``pre_nbs``).

    Modes: ``mbi``, ``doublediff`` (FLC out), ``coronagraphic`` (core × leak + 4 spots at
    ``grid_sep_lamd`` λ/D), ``rotation`` (False freezes PA/alt/az per target),
    ``identical_cameras`` (both cameras use camera 1's plate scale, pupil offset and
    DEROTANG: exact triple-difference tests).

    Polarisation: ``ip`` = M3 diattenuation (≈ instrumental polarisation fraction),
    ``mueller`` = other :class:`~vampd.instrument.mueller.MuellerParams` overrides.

    Per-frame AO variations: Strehl uniform in ``strehl_range``, tip/tilt jitter
    ``jitter_rms_px`` per axis, flux scatter ``flux_rms``; seeing halo Moffat
    (``halo_fwhm_mas``, ``halo_beta``). ``star_offset`` (dy, dx) [px] from the field centre,
    calibrated orientation.

    Detector: ``noise_free`` (no Poisson/read noise, no dark, no bad pixels, flat = 1,
    bias = the constant BIAS), ``write_float`` (float32 adu cubes, no rounding/clipping),
    ``n_hot``/``n_dead`` bad pixels per camera, ``flat_rms`` pixel response scatter,
    ``bias_pattern_adu`` column-bias pattern rms. Calibration files: ``calib``,
    ``calib_nframes``, ``flat_level_e``.

    Sequence: ``cubes_per_hwp`` consecutive cubes per camera and FLC state at each HWP position.

    Writing: ``max_files`` (write only the first N science files of the plan),
    ``frames_chunk`` frames per chunk, ``faults`` (see :mod:`vampd.simulate.stream`),
    ``fault_files`` (optional science-file indices of the faults, in order), ``data_dir`` (filter curves; top-hat without).
    """

    seed: int = 0
    size: int = 256
    nframes: int = 20
    ncycles: int = 1
    exptime: float = 0.02
    filter: str = "750-50"
    mbi: bool = False
    doublediff: bool = False
    coronagraphic: bool = False
    targets: tuple[str, ...] = ("ABAUR",)
    ip: float = 0.0
    mueller: dict = field(default_factory=dict)
    noise_free: bool = False
    write_float: bool = False
    rotation: bool = True
    pre_nbs: bool = False
    identical_cameras: bool = False
    start_mjd: float | None = None
    hwp_overhead_s: float = 3.0
    target_overhead_s: float = 600.0
    frames_chunk: int = 32
    strehl_range: tuple[float, float] = (0.3, 0.7)
    jitter_rms_px: float = 0.5
    flux_rms: float = 0.03
    halo_fwhm_mas: float = 150.0
    halo_beta: float = 2.5
    star_offset: tuple[float, float] = (2.4, -1.7)
    scene: Scene = field(default_factory=Scene)
    grid_sep_lamd: float = 15.5
    grid_amp_um: float = 0.05
    spot_angle_deg: float = 0.0
    calib: bool = True
    calib_nframes: int = 10
    flat_level_e: float = 2000.0
    flat_rms: float = 0.01
    n_hot: int = 5
    n_dead: int = 5
    bias_pattern_adu: float = 2.0
    faults: tuple[str, ...] = ()
    data_dir: str | None = None
    aper_radius: float = 8.0
    imrpap: float | None = None
    max_files: int | None = None
    cubes_per_hwp: int = 1
    fault_files: tuple[int, ...] = ()

    def replace(self, **changes) -> SimConfig:
        """Copy with some fields changed (``scene`` may be a dict of Scene fields)."""
        if isinstance(changes.get("scene"), dict):
            changes["scene"] = replace(self.scene, **changes["scene"])
        return replace(self, **changes)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["scene"] = self.scene.to_dict()
        d["targets"] = list(self.targets)
        d["faults"] = list(self.faults)
        return d

    @property
    def obs_mod(self) -> str:
        return "IPOL_MBI" if self.mbi else "IPOL"

    @property
    def frame_shape(self) -> tuple[int, int]:
        return (2 * self.size, 4 * self.size) if self.mbi else (self.size, self.size)

    @property
    def night_mjd(self) -> float:
        return PRE_NBS_NIGHT_MJD if self.pre_nbs else POST_NBS_NIGHT_MJD


# ---------------------------------------------------------------------------------------
# the night


def _block_draws(cfg: SimConfig, blocks: list[dict]) -> None:
    """Per-frame AO draws of each HWP block (shared by both cameras and both FLC files)."""
    for b in blocks:
        rng = np.random.default_rng([cfg.seed, 202, b["index"]])
        n = b["nframes"]
        lo, hi = cfg.strehl_range
        b["strehl"] = rng.uniform(lo, hi, n)
        b["flux"] = np.clip(1.0 + cfg.flux_rms * rng.standard_normal(n), 0.0, None)
        b["dy"] = cfg.jitter_rms_px * rng.standard_normal(n)
        b["dx"] = cfg.jitter_rms_px * rng.standard_normal(n)


def _file_truth(f: dict, outdir: Path, cfg: SimConfig, star_fields: dict, blocks) -> dict:
    b = blocks[f["block"]]
    k = f["block_frames"]
    keep = (
        "name",
        "path",
        "target",
        "cycle",
        "cube",
        "hwp",
        "flc",
        "camera",
        "frameid",
        "mjd_str",
        "mjd_end",
        "mjd",
        "pa",
        "paoffset",
        "derotang",
        "altitude",
        "azimuth",
        "imrang",
        "imrpap",
        "fault",
        "fault_description",
        "mueller",
        "spots_cal_yx",
        "spots_raw_yx",
    )
    t = {key: f.get(key) for key in keep}
    t["nframes"] = len(k)
    t["frames"] = {
        "mjd_start": f["frame_mjd"],
        "pa": f["frame_pa"],
        "jitter_dy_cal": b["dy"][k],
        "jitter_dx_cal": b["dx"][k],
        "flux_scale": b["flux"][k],
        "strehl": b["strehl"][k],
        "fields": star_fields,
    }
    return t


def simulate_night(
    outdir,
    config: SimConfig | None = None,
    *,
    stream: bool = False,
    cadence: float = 0.0,
    stop_event=None,
    progress=None,
) -> dict:
    """Write a simulated night to ``outdir`` and return its truth dictionary.

    Parameters
    ----------
    outdir : path-like
        Output directory: ``raw/``, ``calib/`` and ``truth.json`` are written below it.
    config : SimConfig, optional
        Defaults to ``SimConfig()``.
    stream : bool
        Logger mode: sleep ``cadence`` seconds after each raw file (``.tmp`` → rename →
        ``.txt`` happens in both modes).
    stop_event : threading.Event, optional
        Stop (after the current file) when set.
    progress : callable, optional
        ``progress(index, total, path)`` after each raw file.

    Returns
    -------
    dict
        The truth (also ``outdir/truth.json``, written before the first raw file and
        rewritten at the end).
    """
    from vampd.instrument.detectors import flipped_camera

    cfg = SimConfig() if config is None else config
    outdir = Path(outdir)
    raw_dir = outdir / "raw"
    raw_dir.mkdir(parents=True, exist_ok=True)
    faults = [canonical_fault(x) for x in cfg.faults]

    dets = _detectors(cfg)
    files, blocks = plan_files(cfg)
    if cfg.max_files is not None:
        files = files[: max(int(cfg.max_files), 1)]
    _geometry(cfg, files, dets)
    _block_draws(cfg, blocks)
    layout = _field_layout(cfg)
    illum = _illumination(cfg, layout)
    field_models = _field_models(cfg, dets, layout)
    det_models, det_truth = _detector_models(cfg, dets, illum)
    params = _mueller_params(cfg)
    if cfg.fault_files:
        if len(cfg.fault_files) != len(faults):
            raise ValueError(f"fault_files has {len(cfg.fault_files)} indices for {len(faults)} faults")
        fault_at = {int(i): f for i, f in zip(cfg.fault_files, faults, strict=True)}
    else:
        fault_at = fault_targets(len(files), faults)
    flipped = flipped_camera(cfg.night_mjd)
    shape = cfg.frame_shape
    ny = shape[0]

    from vampd.instrument.mueller import instrument_mueller

    calib_truth = []
    if cfg.calib:
        calib_truth = write_calibration(cfg, outdir, det_models, files[0]["mjd_str"], layout)

    truth = {
        "generator": "vampd simulate",
        "config": cfg.to_dict(),
        "frame_shape": list(shape),
        "hwp_order": list(HWP_ORDER),
        "flc_scheme": "doublediff (FLC out)" if cfg.doublediff else "interleaved A/B frames, one file per state",
        "night_mjd": cfg.night_mjd,
        "post_nbs": not cfg.pre_nbs,
        "flipped_camera": flipped,
        "scene": cfg.scene.to_dict(),
        "polarisation_convention": "Q,U refer to North (angle East of North); azimuthal ring Q = -p I cos2t, U = -p I sin2t, t = atan2(cx - x, y - cy) in a North-up image",
        "mueller_params": params.as_dict(),
        "hwp_adi_sync": True,
        "detectors": det_truth,
        "fields": [
            {
                "name": f["name"],
                "filter": f["filter"],
                "center_cal_yx": f["center"],
                "cell_origin_yx": f["origin"],
                "cell_shape": f["cell"],
                "strehl_ideal_ratio": {str(c): field_models[c, f["name"]].core_peak_ideal for c in (1, 2)},
            }
            for f in layout
        ],
        "calib_files": calib_truth,
        "files": [],
        "faults": [],
        "units": {
            "flux": "e-/s detected (calibrated units), star_flux/ring_flux summed over both cameras",
            "positions": "pixels (y, x), (0,0) = centre of the first pixel; *_cal = calibrated (flipped) "
            "frame, *_raw = raw file rows; jitter is given in calibrated orientation",
            "pdi_scale": "Q, U, I_Q from the triple/double difference + Mueller inversion (docs/instrument.md §9.3-9.4) are on "
            "the single-beam scale: half of this truth's total-intensity scale",
        },
        "definitions": {
            "frame_model": "f_t * shift_t[S_t * (K_core (x) X_core) + (1 - S_t) * (K_halo (x) X_halo)], X = sum_j M[0,j] S_j",
            "strehl": "S_t: weight of the diffraction-limited core (the injected Strehl)",
            "strehl_metric": "(continuous peak / aperture sum) of the star image / the same for the ideal PSF, "
            "aperture radius aper_radius (docs/instrument.md §3.2); star only (no ring/spots)",
            "aper_flux": "star flux [e-/s] inside the aperture centred on the true star position, calibrated units",
            "star_flux_e_per_s": "total star flux reaching this camera and field [e-/s] (incl. M[0,0] and f_t)",
            "mueller": "first row of the instrument Mueller matrix per field (instrument_mueller at the file midpoint)",
        },
    }

    # per-file work ----------------------------------------------------------------------
    halo_fwhm = {
        cam: cfg.halo_fwhm_mas / (dets[1] if cfg.identical_cameras else dets[cam]).pixel_scale for cam in (1, 2)
    }
    file_records = []
    for i, f in enumerate(files):
        f["name"] = raw_name(f["camera"], f["frameid"])
        f["path"] = str((raw_dir / f"{f['name']}.fits").relative_to(outdir))
        f["mjd"] = 0.5 * (f["mjd_str"] + f["mjd_end"])
        f["fault"] = fault_at.get(i)
        f["fault_description"] = None
        cam = f["camera"]
        b = blocks[f["block"]]
        k = f["block_frames"]
        star_fields = {}
        statics = []
        spots_cal = []
        mrows = {}
        for fl in layout:
            fm = field_models[cam, fl["name"]]
            m = instrument_mueller(
                f["pa"],
                f["altitude"],
                f["azimuth"],
                f["hwp"],
                f["imrang"],
                f["flc"] or "A",
                cam,
                params,
                "cmos",
                flc_in=not cfg.doublediff,
                hwp_adi_sync=True,
            )
            m0 = np.asarray(m)[0]
            mrows[fl["name"]] = m0
            oy, ox = fl["origin"]
            star_cal = (fl["center"][0] + cfg.star_offset[0], fl["center"][1] + cfg.star_offset[1])
            star_cell = (star_cal[0] - oy, star_cal[1] - ox)
            offs = (
                spot_offsets_px(cfg.grid_sep_lamd, fm.wavelength_nm, fm.pixel_scale, cfg.spot_angle_deg)
                if cfg.coronagraphic
                else None
            )
            st = render_field(
                fm,
                cfg.scene,
                m0,
                star_cell,
                f["derotang"],
                halo_fwhm[cam],
                cfg.halo_beta,
                cfg.coronagraphic,
                offs,
                cfg.aper_radius,
            )
            statics.append((st, (oy, ox)))
            if cfg.coronagraphic:
                sc = st.spots_yx + np.array([oy, ox])
                spots_cal.append({"field": fl["name"], "yx": sc})
            s = b["strehl"][k]
            num = s * st.star_core_peak + (1 - s) * st.star_halo_peak
            den = s * st.star_core_ap + (1 - s) * st.star_halo_ap
            y_cal = star_cal[0] + b["dy"][k]
            x_cal = star_cal[1] + b["dx"][k]
            y_raw = (ny - 1) - y_cal if cam == flipped else y_cal
            star_fields[fl["name"]] = {
                "star_y_cal": y_cal,
                "star_x_cal": x_cal,
                "star_y_raw": y_raw,
                "star_x_raw": x_cal,
                "strehl_metric": np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan) / fm.core_peak_ideal,
                "aper_flux": b["flux"][k] * den,
                "star_flux_e_per_s": cfg.scene.star_flux * m0[0] * b["flux"][k],
            }
        f["mueller"] = {name: row for name, row in mrows.items()}
        if cfg.coronagraphic:
            f["spots_cal_yx"] = {d["field"]: d["yx"] for d in spots_cal}
            f["spots_raw_yx"] = {
                d["field"]: np.stack(
                    [(ny - 1) - d["yx"][:, 0] if cam == flipped else d["yx"][:, 0], d["yx"][:, 1]], axis=1
                )
                for d in spots_cal
            }
        truth["files"].append(_file_truth(f, outdir, cfg, star_fields, blocks))
        if f["fault"]:
            truth["faults"].append({"name": f["name"], "path": f["path"], "fault": f["fault"]})
        # keep the static images unless a long night would need too much memory (then
        # they are recomputed when the file is written)
        cached = None
        if (i + 1) * 2 * 8 * shape[0] * shape[1] <= _STATIC_CACHE_BYTES:
            cached = (
                place_fields(shape, [(st.core, o) for st, o in statics]),
                place_fields(shape, [(st.halo, o) for st, o in statics]),
            )
        file_records.append((f, cached))

    # noise-free sky-frame Stokes truth of the ring on the product grid (truthmaps docstring)
    from vampd.simulate.truthmaps import truth_stokes_maps, write_truth_stokes

    frames = [
        (blocks[f["block"]]["strehl"][f["block_frames"]], blocks[f["block"]]["flux"][f["block_frames"]]) for f in files
    ]
    maps, tinfo = truth_stokes_maps(
        cfg.scene,
        cfg.size,
        [fl["name"] for fl in layout],
        field_models,
        {cam: [f["derotang"] for f in files if f["camera"] == cam] for cam in (1, 2)},
        np.concatenate([s for s, _ in frames]) if frames else np.ones(1),
        np.concatenate([x for _, x in frames]) if frames else np.ones(1),
    )
    write_truth_stokes(outdir / tinfo["file"], maps, tinfo)
    truth["truth_maps"] = tinfo

    truth_path = outdir / "truth.json"
    write_json(truth_path, truth)

    # writing ------------------------------------------------------------------------------
    for i, (f, cached) in enumerate(file_records):
        if stop_event is not None and stop_event.is_set():
            break
        write_science(cfg, outdir, f, blocks, layout, field_models, det_models, halo_fwhm, illum, flipped, cached)
        file_records[i] = (f, None)
        truth["files"][i]["fault_description"] = f["fault_description"]
        if progress is not None:
            progress(i, len(file_records), outdir / f["path"])
        if stream and cadence > 0:
            if stop_event is not None:
                stop_event.wait(cadence)
            else:
                time.sleep(cadence)
    for entry in truth["faults"]:
        rec = next(t for t in truth["files"] if t["name"] == entry["name"])
        entry["description"] = rec["fault_description"]
    write_json(truth_path, truth)
    return truth

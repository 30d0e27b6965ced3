"""Plan of a simulated night: targets, HWP blocks and files in writing order, and their geometry.

Split out of :mod:`vampd.simulate.night` (which re-exports the public names); the observing
sequence and the geometry conventions are documented there.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from vampd.simulate.headers import altaz, imr_angle, parse_radec

if TYPE_CHECKING:
    from vampd.simulate.night import SimConfig

__all__ = ["HWP_ORDER", "TARGETS", "plan_files"]

HWP_ORDER = (0.0, 45.0, 22.5, 67.5)

#: Built-in targets: name → (RA deg, Dec deg), J2000. AB Aur transits at ~79° altitude
#: from Subaru, so the field rotates fast around transit.
TARGETS = {
    "ABAUR": (73.941025, 30.551192),
    "MWC480": (74.692775, 29.843608),
    "HD34282": (79.001992, -9.809831),
    "HD169142": (276.124083, -29.780361),
}

_DAY = 86400.0


def _transit_mjd(ra_deg: float, mjd0: float) -> float:
    """First upper transit at Subaru after ``mjd0`` (local sidereal time = RA)."""
    from astropy.time import Time

    from vampd.instrument.angles import SUBARU

    lst = Time(mjd0, format="mjd", scale="utc", location=SUBARU).sidereal_time("apparent").hour
    dt_h = ((ra_deg / 15.0 - lst) % 24.0) / 1.00273790935
    return mjd0 + dt_h / 24.0


def _target_coords(name: str) -> tuple[float, float]:
    key = name.strip().upper().replace(" ", "").replace("_", "")
    if key not in TARGETS:
        raise ValueError(f"unknown target {name!r}; built-in targets: {', '.join(TARGETS)}")
    return TARGETS[key]


def plan_files(cfg: SimConfig) -> tuple[list[dict], list[dict]]:
    """Science files and HWP blocks of the night, in writing order (no geometry yet).

    Returns ``(files, blocks)``. A block is one HWP position of one cycle: ``t0`` (MJD of
    its first frame), ``nframes_block`` draws of jitter/flux/Strehl shared by both
    cameras. Each file dict has camera, FLC, HWP, target, frameid, MJD-STR/END, the block
    index and the block frame indices it takes (A: even, B: odd when interleaved).
    """
    dt = cfg.exptime / _DAY
    n = cfg.nframes
    flcs = [None] if cfg.doublediff else ["A", "B"]
    step = len(flcs)
    start = cfg.start_mjd
    if start is None:
        ra0, _ = _target_coords(cfg.targets[0])
        start = _transit_mjd(ra0, cfg.night_mjd) - 300.0 / _DAY
    t = float(start)
    files: list[dict] = []
    blocks: list[dict] = []
    frameid = 10000
    for ti, target in enumerate(cfg.targets):
        ra, dec = _target_coords(target)
        if ti > 0:
            t += cfg.target_overhead_s / _DAY
        for cycle in range(cfg.ncycles):
            for hwp in HWP_ORDER:
                b = len(blocks)
                ncubes = max(1, int(cfg.cubes_per_hwp))
                blocks.append(
                    {"index": b, "target": target, "cycle": cycle, "hwp": hwp, "t0": t, "nframes": n * step * ncubes}
                )
                for c in range(ncubes):
                    for j, flc in enumerate(flcs):
                        k = c * n * step + j + step * np.arange(n)
                        for cam in (1, 2):
                            files.append(
                                {
                                    "target": target,
                                    "ra_deg": ra,
                                    "dec_deg": dec,
                                    "cycle": cycle,
                                    "hwp": hwp,
                                    "cube": c,
                                    "flc": flc,
                                    "camera": cam,
                                    "frameid": frameid,
                                    "block": b,
                                    "block_frames": k,
                                    "frame_mjd": t + k * dt,
                                    "mjd_str": t + k[0] * dt,
                                    "mjd_end": t + (k[-1] + 1) * dt,
                                }
                            )
                        frameid += 1
                t += n * step * ncubes * dt + cfg.hwp_overhead_s / _DAY
    return files, blocks


# ---------------------------------------------------------------------------------------
# geometry


def _fk5_to_icrs(ra_deg: float, dec_deg: float) -> tuple[float, float]:
    import astropy.units as u
    from astropy.coordinates import SkyCoord

    c = SkyCoord(ra_deg * u.deg, dec_deg * u.deg, frame="fk5", equinox="J2000").icrs
    return float(c.ra.deg), float(c.dec.deg)


def _geometry(cfg: SimConfig, files: list[dict], dets) -> None:
    """Add header geometry (rounded as written) and PA/DEROTANG to each file dict."""
    from vampd.instrument.angles import pa_offset, parallactic_angle, wrap
    from vampd.simulate.headers import format_dec, format_ra

    pap = cfg.imrpap if cfg.imrpap is not None else dets[1].default_pap
    mids = np.array([0.5 * (f["mjd_str"] + f["mjd_end"]) for f in files])
    by_target: dict[str, list[int]] = {}
    for i, f in enumerate(files):
        by_target.setdefault(f["target"], []).append(i)
    for idx in by_target.values():
        ra, dec = files[idx[0]]["ra_deg"], files[idx[0]]["dec_deg"]
        ra_h, dec_h = parse_radec(format_ra(ra), format_dec(dec))  # what the pipeline reads
        ra_i, dec_i = _fk5_to_icrs(ra_h, dec_h)  # the headers say FK5; the PA takes ICRS
        m = mids[idx]
        if not cfg.rotation:
            m = np.full_like(m, m[0])
        alt, az = altaz(ra_h, dec_h, m)
        pa = np.atleast_1d(parallactic_angle(ra_i, dec_i, m))
        allframes = np.concatenate([files[i]["frame_mjd"] for i in idx]) + 0.5 * cfg.exptime / _DAY
        pa_frames = np.atleast_1d(parallactic_angle(ra_i, dec_i, allframes)) if cfg.rotation else None
        pos = 0
        for j, i in enumerate(idx):
            f = files[i]
            f["altitude"] = round(float(alt[j]), 5)
            f["azimuth"] = round(float(az[j]), 5)
            f["imrang"] = round(float(imr_angle(f["altitude"])), 5)
            f["imrpap"] = float(pap)
            f["pa"] = float(pa[j])
            d = dets[1] if cfg.identical_cameras else dets[f["camera"]]
            f["paoffset"] = float(pa_offset(d, pap))
            f["derotang"] = float(wrap(f["pa"] + f["paoffset"]))
            nf = len(f["frame_mjd"])
            f["frame_pa"] = pa_frames[pos : pos + nf] if pa_frames is not None else np.full(nf, f["pa"])
            pos += nf

"""Per-file products: paths, provenance cards, the cam2 → cam1 reprojection and atomic writing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from astropy.io import fits

from vampd import __version__
from vampd.fitsio import output_stem, write_hdus_atomic

__all__ = ["product_paths", "expected_products", "centroid_file", "provenance", "reprojection", "write_product"]


def product_paths(cfg, outdir: Path, path: str | Path) -> dict[str, Path]:
    """Where each per-file product of ``path`` goes (docs/instrument.md §11.1, stable key = file stem)."""
    name = cfg.name or "vampd"
    stem = output_stem(path)
    outdir = Path(outdir)
    return {
        "metrics": outdir / "metrics" / f"{name}_{stem}_metrics.npz",
        "coadded": outdir / "coadded" / f"{name}_{stem}_coll.fits",
        "calibrated": outdir / "calibrated" / f"{stem}_calib.fits",
        "selected": outdir / "selected" / f"{name}_{stem}_fs.fits",
        "aligned": outdir / "aligned" / f"{name}_{stem}_reg.fits",
    }


def expected_products(cfg) -> list[str]:
    """The product kinds a successful run of this config writes for one file."""
    kinds = ["metrics"]
    kinds.append("coadded" if cfg.coadd.coadd else "aligned")
    if cfg.calibrate.save_intermediate:
        kinds.append("calibrated")
    if cfg.frame_select.frame_select and cfg.frame_select.save_intermediate:
        kinds.append("selected")
    if (cfg.align.save_intermediate or pdi_blocks(cfg)) and cfg.coadd.coadd:
        kinds.append("aligned")
    return kinds


def pdi_blocks(cfg) -> bool:
    """``combine.method = "pdi"``: each cube's aligned frames are kept for its HWP-block coadd."""
    return cfg.combine.method == "pdi" and cfg.polarimetry is not None


def centroid_file(cfg, outdir: Path, cam: int) -> Path:
    """The night's centroid file of one camera (``aux/<name>_centroids_cam<N>.toml``)."""
    return Path(outdir) / "aux" / f"{cfg.name or 'vampd'}_centroids_cam{cam}.toml"


def provenance(header: fits.Header, cfg) -> None:
    """vampd version and config hash cards (in place)."""
    header["HIERARCH DPP VERSION"] = (__version__, "vampd version")
    header["HIERARCH DPP CONFIG HASH"] = (cfg.config_hash(), "processing config hash")


def reprojection(cfg, header, outdir: Path, shape, fields: list[str]) -> tuple[np.ndarray, np.ndarray] | str:
    """cam2 → cam1 similarity per field (docs/instrument.md §5.6) from the night's two centroid files.

    Returns ``(angles_deg, scales)`` of shape (nfields,), or the reason why there is none
    (recorded in the product header, so ``reproject = true`` is never silently ignored).
    """
    from vampd.stages.align import similarity_from_spots
    from vampd.stages.centroids import centers_to_calibrated, load_centroid_file

    files = {cam: centroid_file(cfg, outdir, cam) for cam in (1, 2)}
    missing = [str(p.name) for p in files.values() if not p.is_file()]
    if missing:
        return f"no centroid file(s) {', '.join(missing)} in aux/"
    spots = {}
    for cam, path in files.items():
        h = header.copy()
        h["U_CAMERA"] = cam  # each camera's raw positions flip by its own rule (docs/instrument.md §1.4)
        spots[cam] = centers_to_calibrated(load_centroid_file(path), h, shape)
    angles, scales = [], []
    for f in fields:
        if f not in spots[1] or f not in spots[2] or len(spots[1][f]) < 2:
            return f"field {f}: the centroid files need >= 2 PSFs per camera (satellite spots)"
        a, k = similarity_from_spots(spots[1][f], spots[2][f])
        angles.append(a)
        scales.append(k)
    return np.asarray(angles), np.asarray(scales)


def _field_headers(header: fits.Header, fields: list[str]) -> list[fits.Header]:
    """One header per field (EXTNAME = field name) carrying the keys that differ per field."""
    hdrs = []
    for name in fields:
        h = fits.Header()
        h["FIELD"] = (name, "MBI field / filter")
        for key in ("FILTER01", "FILTER02", "U_CAMERA", "U_FLC", "RET-ANG1", "BUNIT"):
            if key in header:
                h[key] = header[key]
        h["EXTNAME"] = (name, "extension name")
        hdrs.append(h)
    return hdrs


def write_product(
    path: Path, data: np.ndarray, err: np.ndarray, header: fits.Header, fields: list[str], sync_dir: bool = False
) -> None:
    """PRIMARY (data) + ERR + one header HDU per field, written atomically.

    Our own headers are valid by construction: they are written card by card by
    :func:`vampd.fitsio.write_hdus_atomic` (layout keys derived from the arrays), without
    astropy's HDU construction, header copies and per-card verification.
    """
    err_hdr = fits.Header()
    err_hdr["BUNIT"] = header.get("BUNIT", "")
    err_hdr["EXTNAME"] = ("ERR", "extension name")
    hdus = [(header, np.asarray(data, np.float32)), (err_hdr, np.asarray(err, np.float32))]
    hdus += [(h, None) for h in _field_headers(header, fields)]
    write_hdus_atomic(path, hdus, sync_dir=sync_dir)

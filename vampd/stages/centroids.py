"""Window centres for the per-frame analysis (docs/instrument.md §3.1, §3.4, §3.5).

Centres come from, in order of preference:

1. a centroid file ``aux/{name}_centroids_cam{1,2}.toml``: a TOML table ``{field = [[x, y], ...]}``,
   one ``[x, y]`` pair per PSF, in **0-based raw (unflipped) pixel coordinates** (numpy indices of
   the raw frame; ds9 shows these values + 1). vampd reads and writes this one convention (fix of
   docs/instrument.md §13.10: the reference wrote 1-based values and read them as 0-based). On calibrated data the
   flipped camera's y is mapped ``y -> ny - 1 - y`` (docs/instrument.md §1.4);
2. automatic detection on a median (or mean) calibrated image, no interactive clicks: a single PSF
   is the brightest smoothed peak near the expected field centre; a coronagraphic field's 4
   satellite spots are the brightest peaks that form a square around it;
3. the defaults: one PSF per field at the docs/instrument.md §1.6 field centre (frame centre without MBI) — fix of
   docs/instrument.md §13.8.

Positions are ``(y, x)`` in this module; only the TOML file stores ``[x, y]``.
"""

from __future__ import annotations

import itertools
import json
import os
import tomllib
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from vampd.fitsio import atomic_write
from vampd.imaging import frame_center

__all__ = [
    "CentroidError",
    "centers_to_calibrated",
    "find_centers",
    "find_psf",
    "find_satellite_spots",
    "intersect_diagonals",
    "load_centroid_file",
    "resolve_centers",
    "save_centroid_file",
]

Centers = dict[str, list[tuple[float, float]]]


class CentroidError(ValueError):
    """A centroid file or an automatic centre search that cannot give window centres."""


# ----------------------------------------------------------------------------------------------
# centroid files
# ----------------------------------------------------------------------------------------------
def load_centroid_file(path: os.PathLike | str) -> Centers:
    """Read a centroid TOML file: ``{field: [(y, x), ...]}`` in 0-based raw coordinates.

    The file stores ``field = [[x, y], ...]`` (x first, as ds9 and the reference). Key order is
    kept. Raises :class:`CentroidError` naming the file, field and value for malformed entries.
    """
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            table = tomllib.load(fh)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise CentroidError(f"{path}: cannot read centroid file ({exc})") from exc
    out: Centers = {}
    for field, value in table.items():
        if not isinstance(value, list) or not value:
            raise CentroidError(f"{path}: field {field!r} = {value!r}; expected a non-empty list of [x, y] pairs")
        pts = []
        for item in value:
            if (
                not isinstance(item, (list, tuple))
                or len(item) != 2
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in item)
            ):
                raise CentroidError(f"{path}: field {field!r} has entry {item!r}; expected a pair [x, y] of numbers")
            pts.append((float(item[1]), float(item[0])))
        out[str(field)] = pts
    if not out:
        raise CentroidError(f"{path}: centroid file has no fields")
    return out


def save_centroid_file(path: os.PathLike | str, centers_raw: Mapping[str, Sequence[tuple[float, float]]]) -> Path:
    """Atomically write ``{field: [(y, x), ...]}`` (0-based raw coordinates) as TOML ``[[x, y], ...]``."""
    lines = [
        "# vampd centroid file: field = [[x, y], ...], one pair per PSF,",
        "# 0-based pixel coordinates of the RAW (unflipped) frame (ds9 shows x + 1, y + 1).",
    ]
    for field, pts in centers_raw.items():
        pairs = ", ".join(f"[{round(float(x), 3)!r}, {round(float(y), 3)!r}]" for (y, x) in pts)
        lines.append(f"{json.dumps(str(field))} = [{pairs}]")  # a JSON string is a valid TOML key
    text = "\n".join(lines) + "\n"
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def centers_to_calibrated(centers_raw: Mapping[str, Sequence[tuple[float, float]]], header, shape) -> Centers:
    """Map raw-coordinate centres to calibrated (flipped) coordinates (docs/instrument.md §1.4) for this header's camera."""
    from vampd.instrument.fields import raw_to_calibrated_yx

    ny = int(shape[-2])
    out: Centers = {}
    for field, pts in centers_raw.items():
        conv = []
        for y, x in pts:
            yc, xc = raw_to_calibrated_yx(float(y), float(x), ny, header)
            conv.append((float(yc), float(xc)))
        out[field] = conv
    return out


# ----------------------------------------------------------------------------------------------
# satellite-spot geometry
# ----------------------------------------------------------------------------------------------
_PAIRINGS = np.array([[[0, 1], [2, 3]], [[0, 2], [1, 3]], [[0, 3], [1, 2]]])


def intersect_diagonals(points: np.ndarray) -> np.ndarray:
    """Intersection of the diagonals of 4 points (the image centre of 4 satellite spots, docs/instrument.md §3.4).

    The diagonals are the pairing of the 4 points with the largest total length (for a convex
    quadrilateral the diagonals are longer, together, than either pair of opposite sides). This
    gives the reference's result for "+"-like layouts (where it sorts the points by x and joins
    0–3 and 1–2) and, unlike it, also works for axis-aligned squares. The two coordinates play
    symmetric roles, so ``(y, x)`` and ``(x, y)`` inputs both work (output in the same order).

    Parameters
    ----------
    points : array_like, shape (..., 4, 2)

    Returns
    -------
    ndarray, shape (..., 2)
        NaN where the diagonals are parallel.
    """
    p = np.asarray(points, dtype=np.float64)
    if p.shape[-2:] != (4, 2):
        raise ValueError(f"intersect_diagonals: expected points of shape (..., 4, 2), got {p.shape}")
    # total length of each pairing: (..., 3)
    a = p[..., _PAIRINGS[:, :, 0], :]  # (..., 3, 2, 2)
    b = p[..., _PAIRINGS[:, :, 1], :]
    lengths = np.linalg.norm(a - b, axis=-1).sum(axis=-1)
    best = np.argmax(lengths, axis=-1)  # (...,)
    pair = _PAIRINGS[best]  # (..., 2, 2)
    idx = pair.reshape(*pair.shape[:-2], 4)
    q = np.take_along_axis(p, idx[..., None], axis=-2)  # (..., 4, 2): p1 p2 (line 1), p3 p4 (line 2)
    x1, y1 = q[..., 0, 0], q[..., 0, 1]
    x2, y2 = q[..., 1, 0], q[..., 1, 1]
    x3, y3 = q[..., 2, 0], q[..., 2, 1]
    x4, y4 = q[..., 3, 0], q[..., 3, 1]
    den = (x1 - x2) * (y3 - y4) - (y1 - y2) * (x3 - x4)
    c12 = x1 * y2 - y1 * x2
    c34 = x3 * y4 - y3 * x4
    with np.errstate(divide="ignore", invalid="ignore"):
        px = (c12 * (x3 - x4) - (x1 - x2) * c34) / den
        py = (c12 * (y3 - y4) - (y1 - y2) * c34) / den
    bad = np.abs(den) < 1e-12
    return np.stack([np.where(bad, np.nan, px), np.where(bad, np.nan, py)], axis=-1)


# ----------------------------------------------------------------------------------------------
# automatic detection
# ----------------------------------------------------------------------------------------------
def _region(image: np.ndarray, center, size) -> tuple[np.ndarray, int, int]:
    ny, nx = image.shape
    hy, hx = (size, size) if np.isscalar(size) else size
    y0 = int(max(round(center[0] - hy / 2), 0))
    x0 = int(max(round(center[1] - hx / 2), 0))
    y1 = int(min(round(center[0] + hy / 2) + 1, ny))
    x1 = int(min(round(center[1] + hx / 2) + 1, nx))
    if y1 - y0 < 3 or x1 - x0 < 3:
        raise CentroidError(f"search region around {tuple(center)} (size {size}) lies outside the {image.shape} frame")
    return image[y0:y1, x0:x1], y0, x0


def _filtered(region: np.ndarray, psf: np.ndarray | None, sigma: float = 1.5, binning: int = 1) -> np.ndarray:
    """Hot-pixel-clipped, smoothed and high-passed image for peak finding.

    The smoothing is a Gaussian matched to the PSF core (sigma from the template's peak-to-sum
    ratio when a template is given, else ``sigma``); the high-pass subtracts a 31-px box mean.
    Both filters are separable, so a 256² image costs a few ms (this runs once per file).
    ``binning`` > 1: ``region`` is already binned by that factor; the filter scales follow.
    """
    from scipy import ndimage

    img = np.asarray(region, dtype=np.float64)
    bad = ~np.isfinite(img)
    if bad.any():
        # NaN pixels are saturated (calibration masks them) or invalid: fill them with the
        # brightest value, so a saturated core stays the brightest spot instead of a hole;
        # isolated filled pixels are removed by the clip and the median below
        img = np.where(bad, np.nanmax(img) if (~bad).any() else 0.0, img)
    # clip every pixel to its brightest neighbour: isolated hot pixels and single-pixel cosmic
    # rays (often brighter than the star's smoothed peak in uncorrected data) become harmless,
    # while a PSF core (several pixels wide) keeps most of its peak
    ring = np.ones((3, 3), dtype=bool)
    ring[1, 1] = False
    img = np.minimum(img, ndimage.maximum_filter(img, footprint=ring, mode="nearest"))
    # a 3x3 median removes what the clip leaves: pairs and small clusters of hot, dead or
    # filled pixels (a PSF core, several pixels wide, keeps its peak)
    img = ndimage.median_filter(img, size=3, mode="nearest")
    if psf is not None:
        k = np.nan_to_num(np.asarray(psf, dtype=np.float64))
        peak, total = k.max(), k.sum()
        if peak > 0 and total > 0:
            # Gaussian with the same peak-to-flux ratio: 1 / (2 pi sigma^2)
            sigma = float(np.clip(np.sqrt(total / (2 * np.pi * peak)), 0.7, 5.0))
    sm = ndimage.gaussian_filter(img, max(sigma / binning, 0.5))
    # high-pass: removes a smooth background / halo so that faint spots on a bright halo stand out
    return sm - ndimage.uniform_filter(sm, max(31 // binning | 1, 3), mode="nearest")


def _subpixel(img: np.ndarray, iy: np.ndarray, ix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Parabolic sub-pixel refinement of integer maxima of a smooth image."""
    ny, nx = img.shape
    iy = np.clip(np.asarray(iy), 1, ny - 2)
    ix = np.clip(np.asarray(ix), 1, nx - 2)
    c0 = img[iy, ix]

    def vertex(cm, cp):
        den = cm - 2 * c0 + cp
        with np.errstate(divide="ignore", invalid="ignore"):
            off = np.where(den < 0, 0.5 * (cm - cp) / den, 0.0)
        return np.clip(off, -0.5, 0.5)

    return iy + vertex(img[iy - 1, ix], img[iy + 1, ix]), ix + vertex(img[iy, ix - 1], img[iy, ix + 1])


def find_psf(
    image: np.ndarray, expected: tuple[float, float], search_size: float | None = None, psf: np.ndarray | None = None
) -> tuple[float, float]:
    """Brightest matched-filtered peak within ``search_size`` px of ``expected`` (whole frame if None).

    Large regions are searched on 2x2 bins first (4x fewer pixels), then the peak is refined
    at full resolution in a 48-px box around the coarse position. Returns ``(y, x)`` with
    parabolic sub-pixel refinement on the filtered image.
    """
    image = np.asarray(image, dtype=np.float64)
    size = max(image.shape) * 2 if search_size is None else search_size
    region, y0, x0 = _region(image, expected, size)
    if min(region.shape) >= 128:
        h, w = region.shape[0] // 2 * 2, region.shape[1] // 2 * 2
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN bins stay NaN
            binned = np.nanmean(region[:h, :w].reshape(h // 2, 2, w // 2, 2), axis=(1, 3))
        coarse = _filtered(binned, psf, binning=2)
        by, bx = np.unravel_index(np.argmax(coarse), coarse.shape)
        region, y1, x1 = _region(region, (2 * by + 0.5, 2 * bx + 0.5), 48)
        y0, x0 = y0 + y1, x0 + x1
    filt = _filtered(region, psf)
    iy, ix = np.unravel_index(np.argmax(filt), filt.shape)
    ry, rx = _subpixel(filt, iy, ix)
    return float(ry + y0), float(rx + x0)


def _local_maxima(filt: np.ndarray, min_distance: int, npeaks: int) -> np.ndarray:
    from scipy import ndimage

    mx = ndimage.maximum_filter(filt, size=2 * min_distance + 1, mode="nearest")
    peaks = np.argwhere((filt == mx) & (filt > 0))
    if len(peaks) == 0:
        return peaks
    order = np.argsort(filt[peaks[:, 0], peaks[:, 1]])[::-1]
    return peaks[order[:npeaks]]


def find_satellite_spots(
    image: np.ndarray,
    expected: tuple[float, float],
    search_size: float | None = None,
    psf: np.ndarray | None = None,
    min_separation: float = 10.0,
    tolerance: float = 0.15,
    npeaks: int = 12,
) -> np.ndarray:
    """Find the 4 satellite spots of a coronagraphic field, without interaction.

    Local maxima of the matched-filtered, high-passed image within the search region are ranked
    by brightness; among every 4-subset of the ``npeaks`` brightest, those forming a square (the two
    diagonals of equal length within ``tolerance``, sharing their midpoint and perpendicular within
    ``tolerance``, sides > ``min_separation`` px) are kept, and the brightest such square wins.

    Returns
    -------
    ndarray, shape (4, 2)
        ``(y, x)`` of the spots, ordered counter-clockwise by angle around their centre starting
        from +x (so that PSF indices are stable between files).
    """
    image = np.asarray(image, dtype=np.float64)
    size = max(image.shape) * 2 if search_size is None else search_size
    region, y0, x0 = _region(image, expected, size)
    filt = _filtered(region, psf)
    peaks = _local_maxima(filt, min_distance=max(int(min_separation // 3), 2), npeaks=npeaks)
    if len(peaks) < 4:
        raise CentroidError(
            f"coronagraphic centre search near {tuple(expected)}: found {len(peaks)} peaks, need 4 satellite spots"
        )
    bright = filt[peaks[:, 0], peaks[:, 1]]
    combos = np.array(list(itertools.combinations(range(len(peaks)), 4)))  # (m, 4)
    pts = peaks[combos].astype(np.float64)  # (m, 4, 2)
    a = pts[:, _PAIRINGS[:, :, 0], :]
    b = pts[:, _PAIRINGS[:, :, 1], :]
    seg = np.linalg.norm(a - b, axis=-1)  # (m, 3, 2)
    best = np.argmax(seg.sum(axis=-1), axis=1)
    r = np.arange(len(combos))
    d = seg[r, best]  # diagonal lengths (m, 2)
    pair = _PAIRINGS[best]  # (m, 2, 2)
    q = np.take_along_axis(pts, pair.reshape(-1, 4)[:, :, None], axis=1)  # (m, 4, 2)
    v1, v2 = q[:, 1] - q[:, 0], q[:, 3] - q[:, 2]
    m1, m2 = (q[:, 0] + q[:, 1]) / 2, (q[:, 2] + q[:, 3]) / 2
    dmean = d.mean(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        cosang = np.abs((v1 * v2).sum(axis=1)) / (d[:, 0] * d[:, 1])
        square = (
            (np.abs(d[:, 0] - d[:, 1]) / dmean < tolerance)
            & (np.linalg.norm(m1 - m2, axis=1) / dmean < tolerance)
            & (cosang < tolerance)
            & (dmean / np.sqrt(2) > min_separation)
        )
    if not square.any():
        raise CentroidError(
            f"coronagraphic centre search near {tuple(expected)}: no 4 of the {len(peaks)} brightest peaks form a "
            f"square (tolerance {tolerance}, side > {min_separation} px)"
        )
    score = np.where(square, bright[combos].sum(axis=1), -np.inf)
    chosen = peaks[combos[np.argmax(score)]]
    ry, rx = _subpixel(filt, chosen[:, 0], chosen[:, 1])
    spots = np.stack([ry + y0, rx + x0], axis=1)
    c = spots.mean(axis=0)
    ang = np.mod(np.arctan2(spots[:, 0] - c[0], spots[:, 1] - c[1]), 2 * np.pi)
    return spots[np.argsort(ang)]


def _default_search_size(expected: Mapping[str, tuple[float, float]], shape) -> float | None:
    """Whole frame for one field; otherwise the smallest Chebyshev distance between field centres."""
    if len(expected) < 2:
        return None
    c = np.array(list(expected.values()))
    d = np.abs(c[:, None, :] - c[None, :, :]).max(axis=-1)
    d[np.eye(len(c), dtype=bool)] = np.inf
    return float(d.min())


def find_centers(
    image: np.ndarray,
    header=None,
    fields: Sequence[str] | None = None,
    coronagraphic: bool = False,
    psf: np.ndarray | Mapping[str, np.ndarray] | None = None,
    expected: Mapping[str, tuple[float, float]] | None = None,
    search_size: float | None = None,
) -> Centers:
    """Find window centres automatically on a calibrated image (or cube: its median is used).

    Parameters
    ----------
    image : ndarray, shape (ny, nx) or (nframes, ny, nx)
        Calibrated (flipped) data.
    header : fits.Header, optional
        Gives the field names and rough field centres (docs/instrument.md §1.6) when ``fields``/``expected`` are not
        given.
    fields : list of str, optional
        Field names (default ``field_names(header)``).
    coronagraphic : bool
        Find 4 satellite spots per field instead of one PSF.
    psf : ndarray or mapping field -> ndarray, optional
        Matched filter (synthetic PSF); a Gaussian of sigma 1.5 px otherwise.
    expected : mapping field -> (y, x), optional
        Rough field centres (default ``default_field_centers(header, shape)``, frame centre for a
        single field without header).
    search_size : float, optional
        Side of the square searched around each expected centre (default: whole frame for a single
        field, else the smallest distance between field centres).

    Returns
    -------
    dict field -> list of (y, x)
        Calibrated coordinates; 1 PSF per field, or 4 spots ordered by angle.
    """
    image = np.asarray(image, dtype=np.float64)
    if image.ndim == 3:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            image = np.nanmedian(image, axis=0)
    if image.ndim != 2:
        raise CentroidError(f"find_centers: expected an image or a cube, got shape {image.shape}")
    if expected is None:
        if header is not None:
            from vampd.instrument.fields import default_field_centers

            expected = default_field_centers(header, image.shape)
        else:
            expected = {"": frame_center(image.shape)}
    if fields is None:
        if header is not None:
            from vampd.instrument.fields import field_names

            fields = field_names(header)
        else:
            fields = list(expected)
    size = search_size if search_size is not None else _default_search_size(expected, image.shape)
    out: Centers = {}
    for field in fields:
        exp = expected.get(field, frame_center(image.shape))
        template = psf.get(field) if isinstance(psf, Mapping) else psf
        if coronagraphic:
            spots = find_satellite_spots(image, exp, size, psf=template)
            out[field] = [(float(y), float(x)) for y, x in spots]
        else:
            out[field] = [find_psf(image, exp, size, psf=template)]
    return out


def resolve_centers(
    header,
    shape,
    centroid_file: os.PathLike | str | None = None,
    image: np.ndarray | None = None,
    coronagraphic: bool = False,
    psf: np.ndarray | Mapping[str, np.ndarray] | None = None,
) -> Centers:
    """Window centres in calibrated coordinates: centroid file > automatic search > defaults.

    Fields follow the header's field order (docs/instrument.md §1.6), not the TOML key order (fix of §13.9); a
    field missing from the centroid file raises :class:`CentroidError`. Without a file and without
    an image (or when the automatic search fails, with a warning), each field gets one PSF at its
    default centre.
    """
    from vampd.instrument.fields import default_field_centers, field_names

    fields = field_names(header)
    if centroid_file is not None and Path(centroid_file).is_file():
        raw = load_centroid_file(centroid_file)
        missing = [f for f in fields if f not in raw]
        if missing:
            raise CentroidError(
                f"{centroid_file}: no entry for field(s) {missing} (file has {list(raw)}; header fields {fields})"
            )
        cal = centers_to_calibrated({f: raw[f] for f in fields}, header, shape)
        counts = {f: len(v) for f, v in cal.items()}
        if len(set(counts.values())) != 1:
            raise CentroidError(f"{centroid_file}: every field needs the same number of PSFs, got {counts}")
        return cal
    if image is not None:
        try:
            return find_centers(image, header, fields=fields, coronagraphic=coronagraphic, psf=psf)
        except CentroidError as exc:
            # quicklook must go on: fall back to the rough field centres, and say so
            warnings.warn(f"automatic window centres failed ({exc}); using the default field centres", stacklevel=2)
    defaults = default_field_centers(header, shape)
    return {f: [tuple(float(v) for v in defaults[f])] for f in fields}

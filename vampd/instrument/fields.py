"""MBI field layout and the camera y-flip (docs/instrument.md §1.4, §1.6)."""

from __future__ import annotations

import numpy as np

from vampd.imaging import frame_center
from vampd.instrument.detectors import flipped_camera
from vampd.instrument.headers import HeaderError, camera_number, header_mjd

__all__ = [
    "MBI_FIELDS",
    "MBIR_FIELDS",
    "field_names",
    "default_field_centers",
    "is_flipped",
    "flip_cube",
    "raw_to_calibrated_yx",
]

MBI_FIELDS = ("F610", "F670", "F720", "F760")
MBIR_FIELDS = ("F670", "F720", "F760")

# Rough MBI field centres as multiples of the frame centre (hy, hx), on flipped data
# with camera 2 orientation as reference (docs/instrument.md §1.6: "not based on anything sensible").
_MBI_MULTIPLES = {
    "F610": (1.5, 0.25),
    "F670": (0.5, 0.25),
    "F720": (0.5, 0.75),
    "F760": (0.5, 1.75),
}


def _obs_mode(header) -> str:
    return str(header.get("OBS-MOD", "IPOL")).strip().upper()


def field_names(header, path=None) -> list[str]:
    """Names of the fields in a frame (docs/instrument.md §1.6).

    ``OBS-MOD`` ending in ``MBI`` → F610, F670, F720, F760; in ``MBIR`` → F670, F720,
    F760; in ``SDI`` → [FILTER02]; otherwise [FILTER01] (``U_FILTER`` for raw EMCCD
    headers).
    """
    mode = _obs_mode(header)
    if mode.endswith("MBIR"):
        return list(MBIR_FIELDS)
    if mode.endswith("MBI"):
        return list(MBI_FIELDS)
    key = "FILTER02" if mode.endswith("SDI") else "FILTER01"
    if key in header:
        return [str(header[key]).strip()]
    if key == "FILTER01" and "U_FILTER" in header:
        return [str(header["U_FILTER"]).strip()]
    raise HeaderError(key, f"missing (needed to name the field, OBS-MOD {mode!r})", path)


def default_field_centers(header, shape) -> dict[str, tuple[float, float]]:
    """Rough field centres ``{name: (y, x)}`` in flipped (calibrated) coordinates.

    Used when there is no centroid file. With ``(hy, hx)`` the frame centre: MBI fields
    at F610 (1.5 hy, 0.25 hx), F670 (0.5 hy, 0.25 hx), F720 (0.5 hy, 0.75 hx),
    F760 (0.5 hy, 1.75 hx); MBIR doubles ``hy`` first and has no F610. A single field sits
    at the frame centre.
    """
    hy, hx = frame_center(shape)
    names = field_names(header)
    mode = _obs_mode(header)
    if mode.endswith("MBIR"):
        hy *= 2
    elif not mode.endswith("MBI"):
        return {names[0]: (float(hy), float(hx))}
    return {name: (float(_MBI_MULTIPLES[name][0] * hy), float(_MBI_MULTIPLES[name][1] * hx)) for name in names}


def is_flipped(header, path=None) -> bool:
    """True if this camera's frames are flipped along y (cam 1 pre-NBS, cam 2 post-NBS)."""
    return camera_number(header, path) == flipped_camera(header_mjd(header, path))


def flip_cube(cube, header, path=None) -> np.ndarray:
    """Flip ``cube`` along y (axis −2) when :func:`is_flipped`; otherwise return it as is.

    ``out[..., y, x] = in[..., ny - 1 - y, x]``. The flipped result is a new contiguous
    array.
    """
    cube = np.asarray(cube)
    if is_flipped(header, path):
        return np.ascontiguousarray(cube[..., ::-1, :])
    return cube


def raw_to_calibrated_yx(y, x, ny: int, header, path=None):
    """Map raw (unflipped) pixel coordinates to calibrated (flipped) ones.

    For the flipped camera ``y → ny − 1 − y``; x is unchanged. Works on scalars or
    arrays. The map is its own inverse: applied again, it maps calibrated back to raw.
    """
    if not is_flipped(header, path):
        return y, x
    y_cal = (ny - 1) - np.asarray(y, dtype=float)
    return (y_cal if np.ndim(y) else float(y_cal)), x

"""Everything that describes VAMPIRES itself: detectors, headers, angles, WCS, fields, optics.

The package namespace is lazy (PEP 562): ``from vampd.instrument import update_angles`` imports
only :mod:`vampd.instrument.angles`, so a process that needs the header helpers does not pay for
astropy.coordinates or scipy. Fixed optical constants live in :mod:`vampd.instrument.constants`.
"""

from __future__ import annotations

import importlib

#: public name -> submodule that defines it
_EXPORTS: dict[str, str] = {
    # angles
    "SUBARU": "angles",
    "SUBARU_LAT_DEG": "angles",
    "SUBARU_LON_DEG": "angles",
    "derotation_angle": "angles",
    "pa_offset": "angles",
    "parallactic_angle": "angles",
    "target_coord": "angles",
    "update_angles": "angles",
    "wrap": "angles",
    # detectors
    "Detector": "detectors",
    "NBS_INSTALL_MJD": "detectors",
    "cmos_detector": "detectors",
    "detector_from_header": "detectors",
    "emccd_detector": "detectors",
    "flipped_camera": "detectors",
    "is_post_nbs": "detectors",
    # fields
    "default_field_centers": "fields",
    "field_names": "fields",
    "flip_cube": "fields",
    "is_flipped": "fields",
    "raw_to_calibrated_yx": "fields",
    # headers
    "HeaderError": "headers",
    "camera_number": "headers",
    "fix_header": "headers",
    "header_mjd": "headers",
    "header_summary": "headers",
    "missing_keywords": "headers",
    "normalize_flc": "headers",
    "required_keywords": "headers",
    # wcs
    "apply_wcs": "wcs",
    # filters
    "FilterError": "filters",
    "FilterInfo": "filters",
    "band_edges": "filters",
    "data_dir": "filters",
    "filter_info": "filters",
    "load_filter_curve": "filters",
    "resolve_data_dir": "filters",
    # mueller
    "MuellerParams": "mueller",
    "MuellerTableError": "mueller",
    "diattenuating_retarder": "mueller",
    "hwp_sync_angle": "mueller",
    "instrument_mueller": "mueller",
    "linear_retarder": "mueller",
    "mm_table_key": "mueller",
    "mueller_from_header": "mueller",
    "rotator": "mueller",
    "wollaston": "mueller",
    # pupil
    "psf_model": "pupil",
    "psf_wavelengths": "pupil",
    "pupil_area_fraction": "pupil",
    "pupil_mask": "pupil",
    "synthetic_psf": "pupil",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'vampd.instrument' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"vampd.instrument.{module}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))

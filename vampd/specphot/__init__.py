"""Spectrophotometric calibration (docs/instrument.md §8): synthetic photometry, conversion factors and the
per-sequence factor files read by the PDI code.

Everything is offline: filter curves, zero points, the Pickles atlas, reference passbands and Vega
come from the data directory (``data_dir`` in the config, else ``$VAMPD_DATA_DIR``).
"""

from vampd.specphot.calibrate import (
    UNITS,
    SpecphotError,
    SpecphotResult,
    apply_units,
    calibrate_hdul,
    conversion_factor,
    instrumental_flux,
    satellite_spot_contrast,
    specphot_header,
)
from vampd.specphot.data import DataFileError, load_zeropoint_table, pickles_file, vega_file
from vampd.specphot.factors import load_factor_files, pdi_unit_factor, scale_hdul
from vampd.specphot.synth import SynthPhot, synthetic_photometry
from vampd.specphot.zeropoints import BUILTIN_ZEROPOINTS, ZeroPoint, zeropoint

__all__ = [
    "UNITS",
    "BUILTIN_ZEROPOINTS",
    "DataFileError",
    "SpecphotError",
    "SpecphotResult",
    "SynthPhot",
    "ZeroPoint",
    "apply_units",
    "calibrate_hdul",
    "conversion_factor",
    "instrumental_flux",
    "load_factor_files",
    "load_zeropoint_table",
    "pdi_unit_factor",
    "pickles_file",
    "satellite_spot_contrast",
    "scale_hdul",
    "specphot_header",
    "synthetic_photometry",
    "vega_file",
    "zeropoint",
]

"""Cost of the parallactic angle per file (issue 11): ``update_angles`` on a stream of headers.

Prints CPU time per file (process user+sys) beside wall time: the first file of a 2-hour block
pays one astropy AltAz→ICRS transform (25 grid times), the rest interpolate.

    OPENBLAS_NUM_THREADS=1 python benchmarks/angles.py
"""

from __future__ import annotations

import os
import time

from astropy.io import fits

import vampd  # noqa: F401  (offline astropy)
from vampd.instrument.angles import _zenith_block, update_angles


def _header(mjd: float) -> fits.Header:
    h = fits.Header()
    h.update(
        RA="18:24:29.780",
        DEC="-29:46:49.30",
        RADESYS="FK5",
        EQUINOX=2000.0,
        U_CAMERA=1,
        U_DETMOD="FAST",
        MJD=mjd,
        **{"MJD-STR": mjd - 2e-5, "MJD-END": mjd + 2e-5},
    )
    return h


def main(nfiles: int = 2000) -> None:
    _zenith_block.cache_clear()
    cpu0, t0 = os.times(), time.perf_counter()
    update_angles(_header(61000.3))
    cpu1, t1 = os.times(), time.perf_counter()
    cold_cpu = (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)
    print(f"first file (one astropy transform): {1e3 * (t1 - t0):.1f} ms wall, {1e3 * cold_cpu:.1f} ms CPU")
    headers = [_header(61000.3 + i * 5.0 / 86400) for i in range(nfiles)]  # a file every 5 s (2.8 h)
    cpu0, t0 = os.times(), time.perf_counter()
    for h in headers:
        update_angles(h)
    cpu1, t1 = os.times(), time.perf_counter()
    cpu = (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)
    print(
        f"{nfiles} files: {1e3 * (t1 - t0) / nfiles:.3f} ms wall, {1e3 * cpu / nfiles:.3f} ms CPU per file"
        f" ({_zenith_block.cache_info().misses} astropy transforms)"
    )


if __name__ == "__main__":
    main()

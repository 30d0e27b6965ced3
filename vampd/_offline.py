"""Keep astropy (and therefore synphot) off the network.

The summit machines have no internet. Without these settings every sidereal-time
computation for a date past the bundled IERS-A table tries to download a new one and
raises. They are applied by the command-line entry point and, lazily, by the functions that
need IERS or remote data (sidereal time, alt/az, synphot), never at import time.
"""

from __future__ import annotations

import functools


@functools.cache
def configure_offline() -> None:
    """Disable every astropy download path (idempotent: applied once per process)."""
    from astropy.utils import iers
    from astropy.utils.data import conf as data_conf

    iers.conf.auto_download = False
    iers.conf.auto_max_age = None
    # Past the end of the bundled table, degrade to the predicted values quietly
    # instead of raising: a quicklook PA good to ~1e-4 deg is plenty.
    iers.conf.iers_degraded_accuracy = "ignore"
    data_conf.allow_internet = False

"""Keep astropy (and therefore synphot) off the network.

The summit machines have no internet. Without these settings every sidereal-time
computation for a date past the bundled IERS-A table tries to download a new one and
raises. They are applied lazily, by the functions that need IERS or remote data (sidereal time,
alt/az, synphot), never at import time: worker processes get them too.

Start-up cost: parsing astropy's bundled IERS-A/B tables (fixed-width text) takes ~0.5 s of CPU
in every new process, the largest part of a worker's first file. The parsed table is kept in the
per-user cache (:mod:`vampd.cache`), keyed by the astropy, IERS-data, Python and vampd versions,
and installed as astropy's table, so the values are exactly astropy's own.
"""

from __future__ import annotations

import functools
import logging
import pickle
import sys

log = logging.getLogger(__name__)


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
    _install_iers_table(iers)


def _install_iers_table(iers) -> None:
    """Give astropy its IERS table from the per-user cache (parsed and stored on first use)."""
    if iers.IERS_Auto.iers_table is not None:
        return
    import astropy

    from vampd import __version__
    from vampd.cache import cache_dir, write_atomic

    try:
        import astropy_iers_data

        data_version = astropy_iers_data.__version__
    except (ImportError, AttributeError):
        data_version = "bundled"
    d = cache_dir("iers")
    if d is None:
        return
    py = f"{sys.version_info[0]}.{sys.version_info[1]}"
    path = d / f"iers_auto-astropy{astropy.__version__}-data{data_version}-py{py}-vampd{__version__}.pkl"
    try:
        with open(path, "rb") as fh:
            table = pickle.load(fh)  # our own file in the user's cache, written below
        if isinstance(table, iers.IERS_Auto) and len(table):
            iers.IERS_Auto.iers_table = table
            return
    except FileNotFoundError:
        pass
    except Exception as exc:  # noqa: BLE001 -- a damaged cache entry is re-made, never fatal
        log.warning("IERS cache entry %s unreadable (%s): re-parsed", path, exc)
    table = iers.IERS_Auto.open()  # parses the bundled tables (offline: auto_download is off)
    write_atomic(path, lambda fh: pickle.dump(table, fh, protocol=pickle.HIGHEST_PROTOCOL))

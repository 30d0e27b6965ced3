"""vampd — the night-time quicklook daemon for VAMPIRES (SCExAO, Subaru Telescope)."""

from vampd._offline import configure_offline

__version__ = "0.1.0"

configure_offline()

__all__ = ["__version__"]

"""vampd — the night-time quicklook daemon for VAMPIRES (SCExAO, Subaru Telescope)."""

import os as _os
import sys as _sys

__version__ = "0.1.0"

#: SIGTERM/SIGINT received while ``vampd watch`` was still importing (see watch.commands)
early_stop_signals: list[int] = []

if len(_sys.argv) > 1 and _sys.argv[1] == "watch" and (
    _sys.argv[0] == "-m" or _os.path.basename(_sys.argv[0]) == "vampd"
):
    # the daemon: a stop request during the ~0.5 s of imports below must end in a clean drain
    # (exit 0), not in death by the default handler
    import signal as _signal

    for _sig in (_signal.SIGTERM, _signal.SIGINT):
        _signal.signal(_sig, lambda signum, frame: early_stop_signals.append(signum))

from vampd._offline import configure_offline  # noqa: E402

configure_offline()

__all__ = ["__version__"]

"""vampd — the night-time quicklook daemon for VAMPIRES (SCExAO, Subaru Telescope).

Importing :mod:`vampd` has no side effects: signal handlers and astropy's offline settings
are applied by the command-line entry point (:func:`vampd.cli.main`) and, for the offline
settings, at first use by the code that computes sidereal time or synthetic photometry
(:func:`vampd._offline.configure_offline`).
"""

__version__ = "0.1.0"

#: SIGTERM/SIGINT received while ``vampd watch`` was still starting (see watch.commands)
early_stop_signals: list[int] = []


def install_early_stop() -> None:
    """Record SIGTERM/SIGINT in :data:`early_stop_signals` instead of dying.

    Called by the CLI for ``vampd watch`` before any heavy import: a stop request during
    start-up must end in a clean drain (exit 0), not in death by the default handler.
    """
    import signal

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: early_stop_signals.append(signum))


__all__ = ["__version__", "early_stop_signals", "install_early_stop"]

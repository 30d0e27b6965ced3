"""Command-line entry point: argument parsing only.

Every sub-command calls one ``main(args) -> int`` function, imported lazily so that
``vampd --help`` stays fast. Sub-command modules own their behaviour.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from vampd import __version__

# command name -> (module, function, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "new": ("vampd.config.commands", "cmd_new", "write a commented configuration template"),
    "check": ("vampd.config.commands", "cmd_check", "validate a configuration and say what it will do"),
    "simulate": ("vampd.simulate.commands", "cmd_simulate", "write a simulated night of raw VAMPIRES files"),
    "calib": ("vampd.engine.commands", "cmd_calib", "build master backgrounds and flats from raw darks/flats"),
    "run": ("vampd.engine.commands", "cmd_run", "reduce existing raw files (batch; same engine as watch)"),
    "watch": ("vampd.watch.commands", "cmd_watch", "watch directories and reduce files as they arrive"),
    "retry": ("vampd.watch.commands", "cmd_retry", "put parked files back to pending (tries reset)"),
    "status": ("vampd.watch.commands", "cmd_status", "one-shot summary of a night's ledger"),
    "live": ("vampd.live.commands", "cmd_live", "full-screen live view of the night"),
    "finalize": ("vampd.finalize.commands", "cmd_finalize", "write the night's final products and report"),
    "demo": ("vampd.watch.demo", "cmd_demo", "stream a simulated night into a temp dir and reduce it live"),
    "reprocess": ("vampd.cluster.commands", "cmd_reprocess", "reprocess archived nights on a Dask cluster"),
}


PRESET_NAMES = ("quicklook", "pdi-triplediff", "pdi-doublediff", "mbi", "coronagraphic")


def _add_new(p: argparse.ArgumentParser) -> None:
    # the preset names are checked by `vampd new` itself: importing the config models here would
    # slow every `vampd --help` (tests/test_config.py checks this list against PRESETS)
    p.add_argument("path", help="where to write the TOML file")
    p.add_argument("--preset", default="quicklook", metavar="PRESET", help="starting point: " + ", ".join(PRESET_NAMES))
    p.add_argument("--name", default=None, help="the config's `name` (default: the file's stem)")
    p.add_argument("-f", "--force", action="store_true", help="overwrite an existing file")


def _add_check(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="configuration TOML file")


def _add_simulate(p: argparse.ArgumentParser) -> None:
    from vampd.simulate.commands import add_arguments

    add_arguments(p)


def _add_calib(p: argparse.ArgumentParser) -> None:
    p.add_argument("files", nargs="+", help="raw dark/sky and flat files")
    p.add_argument("-o", "--outdir", required=True, help="calibration directory to write masters into")
    p.add_argument(
        "--method",
        default="median",
        choices=["median", "mean", "varmean", "biweight"],
        help="how the frames of the input files are combined",
    )
    p.add_argument("--force", action="store_true", help="rebuild masters that are newer than their inputs")


def _add_run(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="configuration TOML file")
    p.add_argument("files", nargs="+", help="raw FITS files")
    p.add_argument("-o", "--outdir", default=None, help="output directory (default: the config's directory)")
    p.add_argument(
        "-j", "--jobs", type=int, default=None, help="worker processes (default: the config's watch.workers)"
    )
    p.add_argument("--force", action="store_true", help="redo work even if products are up to date")


def _add_watch(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="configuration TOML file")
    p.add_argument("-i", "--input", action="append", default=None, help="directory to watch (repeatable)")
    p.add_argument(
        "-o", "--outdir", default=None, help="output directory (default: watch.outdir, else the config's directory)"
    )
    p.add_argument(
        "-j", "--jobs", type=int, default=None, help="worker processes (default: the config's watch.workers)"
    )
    p.add_argument("--poll", action="store_true", help="poll instead of inotify (NFS/CIFS)")


def _add_retry(p: argparse.ArgumentParser) -> None:
    p.add_argument("outdir", help="output directory holding vampd.sqlite")
    p.add_argument("files", nargs="*", help="only these raw files (default: every parked file)")
    p.add_argument(
        "--kind",
        action="append",
        choices=["permanent", "transient", "rejected", "memory"],
        help="only files parked for this kind of error (repeatable)",
    )


def _add_status(p: argparse.ArgumentParser) -> None:
    p.add_argument("outdir", nargs="?", default=".", help="output directory holding vampd.sqlite")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def _add_live(p: argparse.ArgumentParser) -> None:
    p.add_argument("outdir", nargs="?", default=".", help="output directory holding vampd.sqlite")
    p.add_argument("--once", action="store_true", help="render one frame to stdout and exit")
    p.add_argument("--config", default=None, help="configuration TOML (alert thresholds; default: the daemon's)")
    p.add_argument("--refresh", type=float, default=1.0, help="seconds between refreshes")


def _add_finalize(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="configuration TOML file")
    p.add_argument(
        "-o", "--outdir", default=None, help="output directory (default: watch.outdir, else the config's directory)"
    )
    p.add_argument("--mean", action="store_true", help="collapse sets by their mean instead of the median")
    p.add_argument("--ivar", action="store_true", help="collapse sets by the inverse-variance weighted mean")


def _add_demo(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workdir", default=None, help="keep the demo here instead of a temp dir")
    p.add_argument("--files", type=int, default=32, help="raw files to stream")
    p.add_argument("--cadence", type=float, default=0.5, help="seconds between files")
    p.add_argument("--no-live", action="store_true", help="plain log lines instead of the live view")


def _add_reprocess(p: argparse.ArgumentParser) -> None:
    from vampd.cluster.commands import add_arguments

    add_arguments(p)


ARGUMENTS = {
    "new": _add_new,
    "check": _add_check,
    "simulate": _add_simulate,
    "calib": _add_calib,
    "run": _add_run,
    "watch": _add_watch,
    "retry": _add_retry,
    "status": _add_status,
    "live": _add_live,
    "finalize": _add_finalize,
    "demo": _add_demo,
    "reprocess": _add_reprocess,
}


#: one example per command (shown at the end of its ``--help``); commands added later may add theirs
EXAMPLES: dict[str, str] = {
    "new": "vampd new night.toml --preset pdi-triplediff",
    "check": "vampd check night.toml",
    "simulate": "vampd simulate /tmp/sim --cycles 2 --size 128",
    "calib": "vampd calib /data/darks/*.fits /data/flats/*.fits -o /reduced/calib",
    "run": "vampd run night.toml /data/20251125/*.fits -o /reduced/20251125 -j 2",
    "watch": "vampd watch night.toml -i /data/20251125/vcam1 -i /data/20251125/vcam2 -o /reduced/20251125",
    "status": "vampd status /reduced/20251125 --json",
    "live": "vampd live /reduced/20251125 --refresh 2",
    "finalize": "vampd finalize night.toml -o /reduced/20251125",
    "demo": "vampd demo --files 16 --no-live",
    "retry": "vampd retry /reduced/20251125 --kind transient",
    "reprocess": "vampd reprocess night.toml /data/20251125 /data/20251126 -o /reduced --local 4",
}


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the example's layout and appends every option's default (unless it is ``None``,
    ``False`` or already written in the help text)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        d = action.default
        if "default" in text or d is None or d is False or d is argparse.SUPPRESS or not action.option_strings:
            return text
        if isinstance(d, list) and not d:
            return text
        return f"{text} (default: %(default)s)"


def _verbosity_options(p: argparse.ArgumentParser, default) -> None:
    p.add_argument("-v", "--verbose", action="count", default=default, help="more logging (repeatable)")
    p.add_argument("-q", "--quiet", action="count", default=default, help="less logging: warnings and errors only")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The argument parser; with ``only``, the arguments of that command alone (fast ``--help``)."""
    parser = argparse.ArgumentParser(
        prog="vampd",
        description="Night-time quicklook daemon for VAMPIRES (SCExAO/Subaru).",
        formatter_class=_HelpFormatter,
        epilog="example:\n  vampd new night.toml && vampd check night.toml && vampd watch night.toml -i /data/tonight\n\n"
        "`vampd COMMAND --help` shows each command's options, defaults and an example.",
    )
    parser.add_argument("--version", action="version", version=f"vampd {__version__}")
    _verbosity_options(parser, 0)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_mod, _fn, help_) in COMMANDS.items():
        example = EXAMPLES.get(name)
        p = sub.add_parser(
            name,
            help=help_,
            description=help_,
            formatter_class=_HelpFormatter,
            epilog=f"example:\n  {example}" if example else None,
        )
        _verbosity_options(p, argparse.SUPPRESS)  # -v/-q after the command too
        if only is not None and name != only:
            continue  # sub-command arguments may import (presets, simulator): only the one used
        try:
            ARGUMENTS[name](p)
        except ImportError as exc:  # a missing optional module must not break every other command
            p.set_defaults(_unavailable=str(exc))
    return parser


def _run(fn, args: argparse.Namespace) -> int:
    """Call a command; Ctrl-C → 130 and a closed stdout (``vampd status | head``) → quiet exit."""
    try:
        rc = int(fn(args) or 0)
        sys.stdout.flush()  # a closed pipe shows up here, not in the interpreter's exit
        return rc
    except KeyboardInterrupt:
        print(f"vampd {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        import os

        # the reader went away: nothing more to say, and no second error when Python flushes stdout
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    if command == "watch":
        from vampd import install_early_stop

        install_early_stop()  # before any heavy import: an early SIGTERM drains cleanly
    elif command == "run" and not {"-h", "--help"} & set(argv):
        import os

        from vampd.engine.pool import DEFAULT_PROCESS, prestart

        # the workers' fork server imports the pipeline (~0.6 s, the run's start-up): begin before
        # our own parser and logging (it ends by itself if the arguments turn out wrong)
        prestart(os.environ.get("VAMPD_PROCESS", DEFAULT_PROCESS))
    parser = build_parser(only=command if command in COMMANDS else "")
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    if getattr(args, "_unavailable", None):
        print(f"vampd {args.command}: not available in this build ({args._unavailable})", file=sys.stderr)
        return 3
    from vampd.logs import setup_logging

    setup_logging(args.verbose, getattr(args, "quiet", 0))
    module, func, _ = COMMANDS[args.command]
    try:
        fn = getattr(importlib.import_module(module), func)
    except (ImportError, AttributeError) as exc:
        print(f"vampd {args.command}: not available in this build ({exc})", file=sys.stderr)
        return 3
    return _run(fn, args)


#: one-shot commands whose process ends the moment they return: their products are written and
#: synced, the workers reaped and the ledger closed, so the interpreter's teardown (freeing ~300
#: modules, ~40 ms of every ``vampd run``) has nothing left to do
_FAST_EXIT = frozenset({"run"})


def entry() -> None:
    """The ``vampd`` program (console script and ``python -m vampd``): :func:`main`, then exit."""
    rc = main()
    if next((a for a in sys.argv[1:] if not a.startswith("-")), None) in _FAST_EXIT:
        import logging
        import os

        logging.shutdown()
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except (BrokenPipeError, OSError):
            pass
        os._exit(rc)
    raise SystemExit(rc)


if __name__ == "__main__":
    entry()

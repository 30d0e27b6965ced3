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
    "status": ("vampd.live.commands", "cmd_status", "one-shot summary of a night's ledger"),
    "live": ("vampd.live.commands", "cmd_live", "full-screen live view of the night"),
    "finalize": ("vampd.finalize.commands", "cmd_finalize", "write the night's final products and report"),
    "demo": ("vampd.watch.demo", "cmd_demo", "stream a simulated night into a temp dir and reduce it live"),
}


def _add_new(p: argparse.ArgumentParser) -> None:
    from vampd.config.presets import PRESETS

    p.add_argument("path", help="where to write the TOML file")
    p.add_argument("--preset", default="quicklook", choices=sorted(PRESETS), help="starting point (default: quicklook)")
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
    p.add_argument("--method", default="median", choices=["median", "mean", "varmean", "biweight"])
    p.add_argument("--force", action="store_true")


def _add_run(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="configuration TOML file")
    p.add_argument("files", nargs="+", help="raw FITS files")
    p.add_argument("-o", "--outdir", default=None, help="output directory (default: the config's directory)")
    p.add_argument("-j", "--jobs", type=int, default=None, help="worker processes")
    p.add_argument("--force", action="store_true", help="redo work even if products are up to date")


def _add_watch(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="configuration TOML file")
    p.add_argument("-i", "--input", action="append", default=None, help="directory to watch (repeatable)")
    p.add_argument("-o", "--outdir", default=None, help="output directory")
    p.add_argument("-j", "--jobs", type=int, default=None, help="worker processes")
    p.add_argument("--poll", action="store_true", help="poll instead of inotify (NFS/CIFS)")


def _add_retry(p: argparse.ArgumentParser) -> None:
    p.add_argument("outdir", help="output directory holding vampd.sqlite")
    p.add_argument("files", nargs="*", help="only these raw files (default: every parked file)")
    p.add_argument("--kind", action="append", choices=["permanent", "transient", "rejected", "memory"],
                   help="only files parked for this kind of error (repeatable)")


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
    p.add_argument("-o", "--outdir", default=None, help="output directory")
    p.add_argument("--mean", action="store_true", help="collapse sets by their mean instead of the median")
    p.add_argument("--ivar", action="store_true", help="collapse sets by the inverse-variance weighted mean")


def _add_demo(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workdir", default=None, help="keep the demo here instead of a temp dir")
    p.add_argument("--files", type=int, default=32, help="raw files to stream")
    p.add_argument("--cadence", type=float, default=0.5, help="seconds between files")
    p.add_argument("--no-live", action="store_true", help="plain log lines instead of the live view")


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
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vampd",
        description="Night-time quicklook daemon for VAMPIRES (SCExAO/Subaru).",
    )
    parser.add_argument("--version", action="version", version=f"vampd {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (repeatable)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_mod, _fn, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        try:
            ARGUMENTS[name](p)
        except ImportError as exc:  # a missing optional module must not break every other command
            p.set_defaults(_unavailable=str(exc))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    if getattr(args, "_unavailable", None):
        print(f"vampd {args.command}: not available in this build ({args._unavailable})", file=sys.stderr)
        return 3
    from vampd.logs import setup_logging

    setup_logging(args.verbose)
    module, func, _ = COMMANDS[args.command]
    try:
        fn = getattr(importlib.import_module(module), func)
    except (ImportError, AttributeError) as exc:
        print(f"vampd {args.command}: not available in this build ({exc})", file=sys.stderr)
        return 3
    return int(fn(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())

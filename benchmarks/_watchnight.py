"""Shared set-up of the daemon benchmarks: a work dir with ``raw/``, ``out/`` and a quicklook
config whose ``[watch]`` section is tuned for the run."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path


def watch_night(prefix: str, workdir: str | None = None, **watch) -> tuple[Path, Path, Path]:
    """Create the work dir and ``night.toml`` (``vampd new`` + ``watch`` overrides).

    Returns ``(work, out, config path)``; raw files go to ``work / "raw"``.
    """
    from vampd.config import load_config, save_config

    os.environ["OPENBLAS_NUM_THREADS"] = "1"
    work = Path(workdir or tempfile.mkdtemp(prefix=f"vampd-{prefix}-"))
    (work / "raw").mkdir(parents=True, exist_ok=True)
    cfgp = work / "night.toml"
    subprocess.run([sys.executable, "-m", "vampd", "new", str(cfgp), "-f"], check=True, capture_output=True)
    cfg = load_config(cfgp)
    for key, value in watch.items():
        setattr(cfg.watch, key, value)
    save_config(cfg, cfgp)
    return work, work / "out", cfgp

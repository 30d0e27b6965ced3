"""A per-file entry point for tests/test_cluster.py: the real chain, made slow enough to be killed
mid-task, leaving a start and an end marker per execution (``$VAMPD_TEST_MARKS``)."""

import os
import time
from pathlib import Path

from vampd.engine.pipeline import process_file


def slow_process_file(path, cfg, outdir, force=False):
    marks = Path(os.environ["VAMPD_TEST_MARKS"])
    tag = f"{Path(path).stem}.{os.getpid()}.{time.time_ns()}"
    (marks / f"{tag}.start").write_text(str(path))
    time.sleep(float(os.environ.get("VAMPD_TEST_SLEEP", "0.4")))
    res = process_file(path, cfg, outdir, force)
    (marks / f"{tag}.end").write_text(str(path))
    return res

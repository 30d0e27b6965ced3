"""The README's first command: ``vampd demo`` streams a simulated night into a work dir while a
real ``vampd watch`` process reduces it, then finalizes. Run as the user would (subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from astropy.io import fits

pytestmark = pytest.mark.slow  # a whole streamed night through a real daemon (~25 s)


def test_demo_reduces_and_finalizes_a_streamed_night(tmp_path):
    work = tmp_path / "demo"
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
    p = subprocess.run(
        [sys.executable, "-m", "vampd", "demo", "--workdir", str(work), "--files", "16", "--cadence", "0.1", "--no-live"],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    assert "16 of 16 files reduced, 0 failed; 1 HWP sets complete, 0 broken" in p.stdout
    out = work / "out"
    st = json.loads(subprocess.run(
        [sys.executable, "-m", "vampd", "status", str(out), "--json"], capture_output=True, text=True, env=env
    ).stdout)
    assert st["files"]["done"] == 16 and st["sets"]["complete"] == 1 and not st["daemon"]["alive"]
    assert (out / "report" / "report.md").exists()
    with fits.open(out / "pdi" / "demo_stokes_coll.fits") as hdul:
        assert hdul[0].header["STOKES"].split(",") == ["I_Q", "I_U", "Q", "U", "Q_PHI", "U_PHI", "LP_I", "AOLP"]
        qphi = hdul[0].data[4]
    # the demo's ring is azimuthally polarised: Q_phi on the ring is clearly positive
    n = qphi.shape[-1]
    yy, xx = np.indices(qphi.shape) - (n - 1) / 2
    r = np.hypot(yy, xx)
    ring = np.nanmedian(qphi[(r > 0.25 * n) & (r < 0.31 * n)])  # the ring sits at ~0.28 n
    outside = qphi[(r > 0.4 * n) & (r < 0.45 * n)]
    assert ring > 5 * np.nanstd(outside) and abs(np.nanmedian(outside)) < ring / 5

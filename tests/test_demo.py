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
        [
            sys.executable,
            "-m",
            "vampd",
            "demo",
            "--workdir",
            str(work),
            "--files",
            "16",
            "--cadence",
            "0.1",
            "--no-live",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.splitlines()[-1] == "vampd demo: 16 of 16 files reduced; 1 HWP set complete"
    out = work / "out"
    st = json.loads(
        subprocess.run(
            [sys.executable, "-m", "vampd", "status", str(out), "--json"], capture_output=True, text=True, env=env
        ).stdout
    )
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


def test_ctrl_c_in_run_drains_prints_the_summary_and_exits_130(tmp_path):
    """Ctrl-C (SIGINT to the terminal's process group) while `vampd run` works: the running file
    is finished and recorded, nothing is left queued or running, the summary is printed, exit 130;
    the next run does the rest."""
    import signal
    import sqlite3
    import time

    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
    env.pop("VAMPD_PROCESS", None)
    vampd = [sys.executable, "-m", "vampd"]
    subprocess.run(
        vampd + ["simulate", str(tmp_path / "sim"), "--size", "64", "--nframes", "4", "--cycles", "3", "--no-calib"],
        check=True,
        capture_output=True,
        env=env,
        timeout=300,
    )
    subprocess.run(vampd + ["new", str(tmp_path / "c.toml")], check=True, capture_output=True, env=env)
    files = sorted(str(p) for p in (tmp_path / "sim" / "raw").glob("*.fits"))
    assert len(files) == 48
    out = tmp_path / "out"
    p = subprocess.Popen(
        vampd + ["run", str(tmp_path / "c.toml"), *files, "-o", str(out), "-j", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )

    def ndone():
        try:
            con = sqlite3.connect(f"file:{out / 'vampd.sqlite'}?mode=ro", uri=True, timeout=5)
            try:
                return con.execute("SELECT COUNT(*) FROM files WHERE state='done'").fetchone()[0]
            finally:
                con.close()
        except sqlite3.Error:
            return 0

    t0 = time.time()
    while ndone() < 2 and time.time() - t0 < 120 and p.poll() is None:
        time.sleep(0.1)
    assert p.poll() is None, "the run finished before it could be interrupted"
    os.killpg(p.pid, signal.SIGINT)  # what the terminal does on Ctrl-C
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 130, stdout + stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    line = next(ln for ln in stdout.splitlines() if ln.startswith("vampd run: 48 file(s)"))
    assert "left for the next run (interrupted)" in line
    con = sqlite3.connect(f"file:{out / 'vampd.sqlite'}?mode=ro", uri=True)
    states = dict(con.execute("SELECT state, COUNT(*) FROM files GROUP BY state").fetchall())
    con.close()
    assert set(states) <= {"done", "pending"} and 2 <= states["done"] < 48, states
    again = subprocess.run(
        vampd + ["run", str(tmp_path / "c.toml"), *files, "-o", str(out), "-j", "1", "-q"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"{48 - states['done']} processed, {48 - states['done']} done, 0 parked" in again.stdout


def test_calib_prints_one_line_per_master(tmp_path):
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
    vampd = [sys.executable, "-m", "vampd"]
    subprocess.run(
        vampd + ["simulate", str(tmp_path / "sim"), "--size", "64", "--nframes", "2", "--cycles", "1"],
        check=True,
        capture_output=True,
        env=env,
        timeout=300,
    )
    calib = sorted(str(p) for p in (tmp_path / "sim" / "calib").glob("*.fits"))
    p = subprocess.run(
        vampd + ["calib", *calib, "-o", str(tmp_path / "cal")], capture_output=True, text=True, env=env, timeout=300
    )
    assert p.returncode == 0, p.stderr
    masters = sorted(str(q) for q in (tmp_path / "cal").rglob("*_coll.fits"))
    lines = p.stdout.splitlines()
    assert len(masters) == len(calib) == len(lines) == 4
    assert sorted(ln.split()[1] for ln in lines) == masters  # each master once, with its kind
    assert sorted(ln.split()[0] for ln in lines) == ["background", "background", "flat", "flat"]
    assert not any(m in p.stderr for m in masters)  # not repeated by the log

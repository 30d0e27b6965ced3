"""The wall-clock set timeout (issue 12): with ``combine.method = "pdi"`` an HWP block closes
``polarimetry.set_timeout`` s after its last cube arrived even when no further file arrives, and
so does the set it completes; a cube arriving after its block closed is named in a warning and
stays out of the closed block and set; a restart makes no product twice.

A real ``vampd watch`` subprocess on a simulated night (2 cubes per camera/FLC at each HWP
position, ``vampd simulate --cubes-per-hwp 2``), the real ledger and the worker pool.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vampd.engine.ledger import Ledger
from vampd.pdi.blocks import split_blocks
from vampd.pdi.sets import WALL_TIMEOUT, assemble_sets
from vampd.simulate.night import SimConfig, simulate_night

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 8.0  # polarimetry.set_timeout (s)


def _env() -> dict:
    e = dict(os.environ, OPENBLAS_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    e.pop("VAMPD_PROCESS", None)
    e.setdefault("VAMPD_DATA_DIR", str(ROOT.parent / "shared" / "data"))
    return e


def _config(path: Path) -> Path:
    from vampd.config.io import save_config
    from vampd.config.presets import preset_config

    cfg = preset_config("pdi-triplediff")
    cfg.name = "t"
    cfg.align.crop_width = 48
    cfg.combine.method = "pdi"
    cfg.polarimetry.use_ideal_mm = True
    cfg.polarimetry.set_timeout = TIMEOUT
    cfg.diff_images.make_diff = False
    cfg.watch.settle_time = 0.2
    cfg.watch.stop_timeout = 20.0
    save_config(cfg, path)
    return path


def _start(cfg: Path, raw: Path, out: Path, log: Path) -> subprocess.Popen:
    with open(log, "ab") as fh:  # the child keeps its own descriptor
        return subprocess.Popen(
            [sys.executable, "-m", "vampd", "watch", str(cfg), "-i", str(raw), "-o", str(out)],
            env=_env(),
            stdout=fh,
            stderr=fh,
        )


def _stop(d: subprocess.Popen) -> None:
    d.send_signal(signal.SIGTERM)
    assert d.wait(timeout=120) == 0


def _feed(paths, raw: Path) -> None:
    """Copy files in as the logger does (temp name, then rename)."""
    for p in paths:
        tmp = raw / (Path(p).name + ".tmp")
        shutil.copy(p, tmp)
        os.replace(tmp, raw / Path(p).name)


def _wait(cond, timeout: float = 240.0) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if cond():
                return True
        except Exception:  # noqa: BLE001 -- the ledger may be mid-creation
            pass
        time.sleep(0.5)
    return False


def _rows(out: Path) -> tuple[list[dict], list[dict], dict]:
    """(blocks, sets, file counts) from the ledger."""
    with Ledger(out, readonly=True) as led:
        return [dict(r) for r in led.block_rows()], [dict(r) for r in led.set_rows()], led.counts()


def _products(out: Path) -> dict[str, str]:
    """Every product file under ``coadded/`` and ``pdi/`` with its content digest."""
    files = sorted(p for d in ("coadded", "pdi") for p in (out / d).rglob("*.fits"))
    return {str(p.relative_to(out)): hashlib.sha1(p.read_bytes()).hexdigest() for p in files}


# -- the pure rules ----------------------------------------------------------------------------------
def _cube(i: int, hwp: float, t: float, cam: int = 1, flc: str = "A") -> dict:
    """Cube ``i`` (MJD 60000 + i s) that arrived at wall-clock time ``t``."""
    return {
        "path": f"/raw/VMP{'AB'[cam - 1]}{i:08d}.fits",
        "camera": cam,
        "flc": flc,
        "hwp": hwp,
        "mjd": 60000.0 + i / 86400.0,
        "target": "T",
        "filter": "F",
        "t_complete": t,
    }


def test_block_closes_on_the_wall_clock_only_when_every_earlier_file_is_known():
    recs = [_cube(0, 0.0, 100.0), _cube(1, 0.0, 101.0)]

    def reason(**kw):
        (b,) = split_blocks(recs, 0.1, TIMEOUT, **kw)
        return b.reason

    assert reason() is None  # observation time only: no newer cube, the block stays open
    assert reason(now=109.0) is None  # 8 s after its last cube, not more
    assert reason(now=110.0) == "timeout: no cube arrived for 9 s (> 8 s, wall clock)"
    # a file that arrived 4 s after the last cube is still being reduced: it may be the block's
    assert reason(now=120.0, horizon=105.0) is None
    assert reason(now=120.0, horizon=109.5).startswith("timeout: no cube arrived for 19 s")
    # the next cube of the stream closes it the usual way, whatever the clock
    recs.append(_cube(2, 45.0, 102.0))
    assert split_blocks(recs, 0.1, TIMEOUT, now=200.0)[0].reason == "hwp moved on: VMPA00000002 at HWP 45"


def test_set_given_up_on_the_wall_clock():
    members = [_cube(0, 0.0, 100.0), _cube(1, 0.0, 101.0, cam=2), _cube(2, 45.0, 102.0)]

    def one(**kw):
        asm = assemble_sets(members, "triplediff", 0.1, TIMEOUT, **kw)
        assert len(asm.open) + len(asm.broken) == 1 and not asm.complete
        return (asm.open + asm.broken)[0]

    assert one(now=110.0).state == "open" and one().state == "open"
    s = one(now=111.0)
    assert s.state == "broken" and s.reason == f"{WALL_TIMEOUT}no member arrived for 9 s (> 8 s)"
    assert one(now=111.0, horizon=103.0).state == "open"  # an earlier file is still being reduced


def test_late_member_of_a_given_up_set_is_named():
    from vampd.engine.pdi_trigger import late_members

    old = [_cube(0, 0.0, 100.0), _cube(1, 0.0, 100.0, cam=2)]
    row = {
        "key": "triplediff:T:F:VMPA00000000",
        "state": "broken",
        "reason": f"{WALL_TIMEOUT}no member arrived for 9 s (> 8 s)",
        "members": json.dumps(
            [{"slot": "HWP 0 FLC A cam1", "path": old[0]["path"]}, {"slot": "HWP 0 FLC A cam2", "path": old[1]["path"]}]
        ),
    }
    by_path = {m["path"]: m for m in old}

    def late(cube):
        return late_members([row], assemble_sets([cube], "triplediff", 0.1, TIMEOUT).open, by_path, TIMEOUT)

    assert late(_cube(5, 45.0, 120.0)) == [("/raw/VMPA00000005.fits", row["key"])]  # an empty slot, 5 s later
    assert late(_cube(5, 0.0, 120.0)) == []  # its slot was filled: the next cycle
    assert late(_cube(30, 45.0, 120.0)) == []  # observed 30 s after: not late, later
    new = assemble_sets([_cube(5, 45.0, 120.0)], "triplediff", 0.1, TIMEOUT).open
    assert late_members([dict(row, reason="end of night")], new, by_path, TIMEOUT) == []  # not given up


# -- the daemon ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_wall_clock_timeout_closes_blocks_and_set(tmp_path):
    truth = simulate_night(
        tmp_path / "sim", SimConfig(size=64, nframes=2, cubes_per_hwp=2, noise_free=True, calib=False, seed=4)
    )
    files = list(truth["files"])  # observation order
    assert len(files) == 32
    # the last cube of the night (HWP 67.5, FLC B, camera 2, its second cube) is held back: it
    # comes after its block closed by timeout
    late = next(f for f in reversed(files) if (f["hwp"], f["flc"], f["camera"], f["cube"]) == (67.5, "B", 2, 1))
    first = [str(tmp_path / "sim" / f["path"]) for f in files if f is not late]
    late_path = tmp_path / "sim" / late["path"]
    cfg = _config(tmp_path / "t.toml")
    raw, out, log = tmp_path / "raw", tmp_path / "out", tmp_path / "daemon.log"
    raw.mkdir()
    stokes = out / "pdi" / "stokes" / "t_stokes_000.fits"
    d = _start(cfg, raw, out, log)
    try:
        _feed(first, raw)
        # no further file: the HWP 67.5 blocks close by the wall clock, are coadded, the set completes
        assert _wait(lambda: stokes.exists() and _rows(out)[1][0]["state"] == "complete"), log.read_text()[-3000:]
        blocks, sets, counts = _rows(out)
        assert counts["done"] == 31 and len(blocks) == 16 and {b["state"] for b in blocks} == {"done"}
        last = [b for b in blocks if b["hwp"] == 67.5]
        assert len(last) == 4 and all("wall clock" in b["reason"] for b in last), [b["reason"] for b in last]
        assert all("wall clock" not in b["reason"] for b in blocks if b["hwp"] != 67.5)
        short = next(b for b in last if (b["camera"], b["flc"]) == (2, "B"))
        assert len(json.loads(short["members"])) == 1  # its second cube has not come
        assert len(sets) == 1 and "uneven HWP blocks: HWP 67.5 FLC B cam2 has 1 cube(s)" in sets[0]["reason"]

        # the late cube: warned by name, not added to the closed block or the complete set
        _feed([late_path], raw)
        assert _wait(lambda: f"late cube {late_path.name}" in log.read_text(), 60), log.read_text()[-3000:]
        # its own block closes by the wall clock too; the set it starts is given up for good
        assert _wait(lambda: any(s["state"] == "broken" for s in _rows(out)[1]), 120), log.read_text()[-3000:]
        blocks, sets, counts = _rows(out)
    finally:
        _stop(d)
    assert counts["done"] == 32
    assert json.loads(next(b for b in blocks if b["key"] == short["key"])["members"]) == json.loads(short["members"])
    mine = [b for b in blocks if late_path.name in b["members"]]
    assert len(mine) == 1 and mine[0]["state"] == "done" and "wall clock" in mine[0]["reason"]
    complete = [s for s in sets if s["state"] == "complete"]
    broken = [s for s in sets if s["state"] == "broken"]
    assert len(complete) == 1 and mine[0]["product"] not in complete[0]["members"]
    assert len(broken) == 1 and broken[0]["reason"].startswith("timeout (wall clock): no member arrived for")
    assert [m["path"] for m in json.loads(broken[0]["members"])] == [mine[0]["product"]]
    assert sorted(p.name for p in (out / "pdi" / "stokes").glob("*.fits")) == ["t_stokes_000.fits"]
    with Ledger(out, readonly=True) as led:
        warned = [e["message"] for e in led.events(200) if e["level"] == "warning" and "late cube" in e["message"]]
    assert len(warned) == 1 and late_path.name in warned[0]

    # restart: nothing is made again, nothing changes
    before, rows_before = _products(out), _rows(out)
    t0 = time.time()
    d = _start(cfg, raw, out, log)
    try:
        with Ledger(out, readonly=True) as led:
            assert _wait(lambda: (led.daemon_info() or {"started": 0})["started"] > t0, 60)
        time.sleep(3 * 2.0 + 1.0)  # resume and a few timeout checks
    finally:
        _stop(d)
    assert _products(out) == before
    assert _rows(out)[:2] == rows_before[:2]  # block and set rows untouched (not even rewritten)
    assert log.read_text().count(f"late cube {late_path.name}") == 1

"""Several cubes per HWP position, bad files inside a cycle and order-independent batches
(issue 12; issue 11 item 4): simulated FITS nights through ``vampd run``/``vampd watch``, the real
ledger and the worker pool.

Truth: the simulator's plan (``truth.json``: which file is which cube of which HWP block) and its
noise-free ring (``truth_stokes.fits``), never the code under test.
"""

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from vampd.engine.ledger import Ledger
from vampd.pdi.blocks import cube_index, split_blocks
from vampd.simulate.night import SimConfig, simulate_night
from vampd.simulate.scene import Scene
from vampd.simulate.truthmaps import annulus_sum, read_truth_stokes

RING = Scene(ring_radius_mas=70.0, ring_width_mas=20.0, ring_flux=2e5)  # inside the 48-px crop
# 3 cubes per camera/FLC at each HWP position, 2 cycles: 96 cubes of 64², 2 frames each
NIGHT = SimConfig(
    size=64,
    nframes=2,
    ncycles=2,
    cubes_per_hwp=3,
    noise_free=True,
    calib=False,
    scene=RING,
    identical_cameras=True,
    strehl_range=(0.5, 0.5),
    jitter_rms_px=0.0,
    flux_rms=0.0,
)
ROOT = Path(__file__).resolve().parent.parent


def env() -> dict:
    e = dict(os.environ, OPENBLAS_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    e.setdefault("VAMPD_DATA_DIR", str(ROOT.parent / "shared" / "data"))
    return e


def write_config(path: Path, combine: str, complete_timeout: float | None = None, **pol) -> Path:
    from vampd.config.io import save_config
    from vampd.config.presets import preset_config

    cfg = preset_config("pdi-triplediff")
    cfg.name = "t"
    cfg.align.crop_width = 48
    cfg.coadd.method = "mean"  # the truth's PSF is exact for a mean coadd
    cfg.combine.method = combine
    cfg.polarimetry.use_ideal_mm = True
    cfg.diff_images.make_diff = False
    if complete_timeout is not None:
        cfg.watch.complete_timeout = complete_timeout
    for k, v in pol.items():
        setattr(cfg.polarimetry, k, v)
    save_config(cfg, path)
    return path


def vampd(*args, check=True, timeout=900) -> subprocess.CompletedProcess:
    p = subprocess.run(
        [sys.executable, "-m", "vampd", *map(str, args)], env=env(), capture_output=True, text=True, timeout=timeout
    )
    if check:
        assert p.returncode == 0, p.stderr[-3000:]
    return p


def sets(out: Path) -> list[dict]:
    with Ledger(out, readonly=True) as led:
        return [dict(r) for r in led.set_rows()]


def blocks(out: Path) -> list[dict]:
    with Ledger(out, readonly=True) as led:
        return [dict(r) for r in led.block_rows()]


def stokes_digest(out: Path) -> dict:
    return {p.name: hashlib.sha1(p.read_bytes()).hexdigest() for p in sorted((out / "pdi").rglob("*.fits"))}


def qphi_ratio(sim: Path, stokes_file: Path) -> float:
    from vampd.pdi.stokes import stokes_products

    truth = json.loads((sim / "truth.json").read_text())
    tm = truth["truth_maps"]
    maps, _ = read_truth_stokes(sim / tm["file"])
    with fits.open(stokes_file) as h:
        st, er = h[0].data.astype(float), h["ERR"].data.astype(float)
    if st.ndim == 3:
        st, er = st[None], er[None]
    data, _ = stokes_products(st, er)
    n = min(data.shape[-1], maps.shape[-1])
    o1, o2 = (data.shape[-1] - n) // 2, (maps.shape[-1] - n) // 2
    q = annulus_sum(data[0, 4, o1 : o1 + n, o1 : o1 + n], *tm["annulus_px"])
    assert abs(
        annulus_sum(maps[0, 3, o2 : o2 + n, o2 : o2 + n], *tm["annulus_px"]) - tm["qphi_sum"][tm["fields"][0]]
    ) < 1e-3 * abs(q)
    return q / tm["qphi_sum"][tm["fields"][0]]


@pytest.fixture(scope="module")
def night(tmp_path_factory):
    root = tmp_path_factory.mktemp("blocks")
    truth = simulate_night(root / "sim", NIGHT)
    files = [str(root / "sim" / f["path"]) for f in truth["files"]]
    assert len(files) == 96
    return root, truth, files


# ------------------------------------------------------------------------------------------------
# pure block rules


def _recs(hwps, cam=1, flc="A"):
    return [
        {
            "path": f"/r/c{cam}{flc}{i:03d}.fits",
            "camera": cam,
            "flc": flc,
            "hwp": h,
            "mjd": 60000 + i * 1e-4,
            "target": "T",
            "filter": "F",
            "t_complete": 1.0,
        }
        for i, h in enumerate(hwps)
    ]


def test_blocks_from_stream_time_order():
    recs = _recs([0, 0, 0, 45, 45, 22.5, 22.5, 22.5, 67.5])
    random.Random(1).shuffle(recs)
    bl = split_blocks(recs, timeout=None)
    assert [(b.hwp, len(b.members)) for b in bl] == [(0, 3), (45, 2), (22.5, 3), (67.5, 1)]
    assert [b.closed for b in bl] == [True, True, True, False]
    assert bl[0].reason.startswith("hwp moved on: c1A003 at HWP 45")
    # a file that arrived before the closing cube is still being reduced: nothing closes
    assert not any(b.closed for b in split_blocks(recs, timeout=None, horizon=0.5))
    assert all(b.closed for b in split_blocks(recs, timeout=None, final=True))
    ci = cube_index(recs)
    assert ci["/r/c1A002.fits"] == (2, 3) and ci["/r/c1A004.fits"] == (1, 2)


# ------------------------------------------------------------------------------------------------
# acceptance: 3 cubes per HWP position, 2 cycles


@pytest.mark.slow
def test_pdi_blocks_batch_and_daemon(night, tmp_path):
    """combine = "pdi": 32 blocks of 3 cubes, 2 complete sets, NCOADD counts every frame of the
    96 cubes, Q_φ within 1 %; the daemon fed the same files forms the same sets and blocks."""
    root, truth, files = night
    cfg = write_config(tmp_path / "p.toml", "pdi")
    out = tmp_path / "run"
    shuffled = list(files)
    random.Random(3).shuffle(shuffled)
    vampd("run", cfg, *shuffled, "-o", out, "-j", "2")
    rows = sets(out)
    assert [r["state"] for r in rows] == ["complete", "complete"], rows
    bl = blocks(out)
    assert len(bl) == 32 and {b["state"] for b in bl} == {"done"}
    assert all(len(json.loads(b["members"])) == 3 for b in bl)
    # each block = the simulator's HWP block of one camera/FLC: the same (cycle, hwp), cubes 0, 1, 2
    by_path = {str(root / "sim" / f["path"]): f for f in truth["files"]}
    for b in bl:
        fs = [by_path[p] for p in json.loads(b["members"])]
        assert len({(f["cycle"], f["hwp"], f["camera"], f["flc"]) for f in fs}) == 1
        assert [f["cube"] for f in fs] == [0, 1, 2]
        assert Path(b["product"]).name == f"t_{b['run']:03d}_cam{b['camera']}_FLC{b['flc']}_coll.fits"
    # NCOADD: every selected frame of all 96 cubes is in a block product, and in a set
    with Ledger(out, readonly=True) as led:
        per_cube = {}
        for p in files:
            prod = next(r["path"] for r in led.products(p) if r["kind"] == "coadded")
            per_cube[p] = fits.getheader(prod)["HIERARCH DPP COADD NCOADD"]
    block_n = [fits.getheader(b["product"])["HIERARCH DPP COADD NCOADD"] for b in bl]
    assert sum(block_n) == sum(per_cube.values()) == 96 * NIGHT.nframes
    set_n = [
        fits.getheader(out / "pdi" / "stokes" / f"t_stokes_{i:03d}.fits")["HIERARCH DPP COADD NCOADD"] for i in range(2)
    ]
    assert 2 * sum(set_n) == sum(
        per_cube.values()
    )  # the two cameras are simultaneous: halved (docs/instrument.md §9.3)
    for i in range(2):
        ratio = qphi_ratio(root / "sim", out / "pdi" / "stokes" / f"t_stokes_{i:03d}.fits")
        assert abs(ratio - 1) < 0.01, (i, ratio)

    # the daemon, fed the files one by one in time order, agrees: its blocks close as the HWP
    # moves on (the last 4 stay open until the end of the night), then finalize closes them
    raw, dout = tmp_path / "raw", tmp_path / "daemon"
    d = start_daemon(cfg, raw, dout)
    try:
        feed(files, raw)
        # the set rebuild after the last block coadd runs on the trigger thread, after the block
        # is recorded: wait for it too (a set seen while a block of its cycle was still being
        # coadded is "broken" until that rebuild)
        want = (96, 28, 4, {"open": 1, "complete": 1, "broken": 0})

        def settled(o):
            with Ledger(o, readonly=True) as led:
                bc = led.block_counts()
                return (files_done(o), bc["done"], bc["open"], led.set_counts()) == want

        ok = wait_for(dout, settled, timeout=300)
    finally:
        stop(d)
    assert ok, (sets(dout), blocks(dout))
    vampd("finalize", cfg, "-o", dout)
    drows = sets(dout)
    assert [r["state"] for r in drows] == ["complete", "complete"], drows
    names = lambda rows: [[Path(m["path"]).name for m in json.loads(r["members"])] for r in rows]  # noqa: E731
    assert names(drows) == names(rows)
    dbl = blocks(dout)
    assert [[Path(p).name for p in json.loads(b["members"])] for b in dbl] == [
        [Path(p).name for p in json.loads(b["members"])] for b in bl
    ]
    for a, b in zip(dbl, bl, strict=True):
        assert np.array_equal(fits.getdata(a["product"]), fits.getdata(b["product"]), equal_nan=True)
    status = json.loads(vampd("status", dout, "--json").stdout)
    assert status["blocks"]["done"] == 32


@pytest.mark.slow
def test_cube_sets_kth_cube(night, tmp_path):
    """combine = "cube": the k-th cube of each slot forms the k-th set: 6 complete sets, nothing
    broken; a missing cube leaves its set without a partner, with that reason."""
    root, truth, files = night
    cfg = write_config(tmp_path / "c.toml", "cube")
    out = tmp_path / "run"
    vampd("run", cfg, *files, "-o", out, "-j", "2")
    rows = sets(out)
    assert [r["state"] for r in rows] == ["complete"] * 6, rows
    by_path = {str(root / "sim" / f["path"]): f for f in truth["files"]}
    for r in rows:
        fs = [by_path[m["path"]] for m in json.loads(r["members"])]
        assert len({(f["cycle"], f["cube"]) for f in fs}) == 1  # one cycle, one cube index
    # uneven: cube 2 of HWP 45 FLC A cam1 of cycle 0 is missing
    gone = next(
        p
        for p in files
        if (lambda f: (f["cycle"], f["hwp"], f["flc"], f["camera"], f["cube"]) == (0, 45.0, "A", 1, 2))(by_path[p])
    )
    out2 = tmp_path / "uneven"
    vampd("run", cfg, *[p for p in files if p != gone], "-o", out2, "-j", "2")
    vampd("finalize", cfg, "-o", out2)
    rows = sets(out2)
    assert sorted(r["state"] for r in rows) == ["broken"] + ["complete"] * 5, rows
    bad = next(r for r in rows if r["state"] == "broken")
    assert "uneven HWP blocks: no cube 3 at HWP 45 FLC A cam1 (cube without partners)" in bad["reason"]
    assert len(json.loads(bad["members"])) == 15


@pytest.mark.slow
def test_uneven_pdi_blocks_reported(night, tmp_path):
    """combine = "pdi" with a cube missing at one position: the set completes from the blocks and
    says which block is short."""
    root, truth, files = night
    by_path = {str(root / "sim" / f["path"]): f for f in truth["files"]}
    gone = next(
        p
        for p in files
        if (by_path[p]["cycle"], by_path[p]["hwp"], by_path[p]["flc"], by_path[p]["camera"], by_path[p]["cube"])
        == (1, 22.5, "B", 2, 1)
    )
    cfg = write_config(tmp_path / "p.toml", "pdi")
    out = tmp_path / "run"
    vampd("run", cfg, *[p for p in files if p != gone], "-o", out, "-j", "2")
    rows = sets(out)
    assert [r["state"] for r in rows] == ["complete", "complete"]
    assert rows[0]["reason"] is None
    assert rows[1]["reason"] == "uneven HWP blocks: HWP 22.5 FLC B cam2 has 2 cube(s), the others 3"


# ------------------------------------------------------------------------------------------------
# daemon helpers


def start_daemon(cfg: Path, raw: Path, out: Path) -> subprocess.Popen:
    raw.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [sys.executable, "-m", "vampd", "watch", str(cfg), "-i", str(raw), "-o", str(out)],
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def feed(files, raw: Path, pause: float = 0.05) -> None:
    """Copy files into the watched directory as the logger does (temp name, then rename)."""
    for p in files:
        tmp = raw / (Path(p).name + ".tmp")
        shutil.copy(p, tmp)
        os.replace(tmp, raw / Path(p).name)
        time.sleep(pause)


def wait_for(out: Path, cond, timeout: float = 600.0) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        time.sleep(1.0)
        if (out / "vampd.sqlite").exists():
            try:
                if cond(out):
                    return True
            except Exception:  # noqa: BLE001 -- the ledger may be mid-creation
                pass
    return False


def stop(d: subprocess.Popen) -> None:
    d.send_signal(signal.SIGTERM)
    d.wait(timeout=120)


def files_done(out: Path) -> int:
    with Ledger(out, readonly=True) as led:
        return led.counts()["done"]


# ------------------------------------------------------------------------------------------------
# bad files cost only their own set


@pytest.mark.slow
def test_faults_break_only_their_sets(tmp_path):
    """4 cycles streamed to the daemon; truncated + corrupt files in cycle 1, non-FITS + missing
    keyword in cycle 3: cycles 0 and 2 complete, each fault breaks only its cycle's set and is
    named; no set has an empty target; the report shows I and Q_φ."""
    sim = SimConfig(
        size=64,
        nframes=2,
        ncycles=4,
        noise_free=True,
        calib=False,
        scene=RING,
        faults=("truncated", "corrupt", "nonfits", "missing_keyword"),
        fault_files=(18, 27, 50, 61),
    )
    truth = simulate_night(tmp_path / "sim", sim)
    files = [str(tmp_path / "sim" / f["path"]) for f in truth["files"]]
    bad = {Path(f["path"]).name: f["fault"] for f in truth["faults"]}
    assert {i // 16 for i, f in enumerate(truth["files"]) if Path(f["path"]).name in bad} == {1, 3}
    cfg = write_config(tmp_path / "c.toml", "cube", complete_timeout=5.0)
    out = tmp_path / "out"
    d = start_daemon(cfg, tmp_path / "raw", out)
    try:
        assert wait_for(out, lambda o: True, timeout=120)  # the daemon is up: the files stream in
        feed(files, tmp_path / "raw", pause=0.2)
        assert wait_for(out, lambda o: files_done(o) == 60 and Ledger(o, readonly=True).counts()["parked"] == 4)
    finally:
        stop(d)
    vampd("finalize", cfg, "-o", out)
    rows = sets(out)
    assert all(r["key"].split(":")[1] == "ABAUR" for r in rows), [r["key"] for r in rows]
    by_cycle = {}
    cyc = {str(tmp_path / "raw" / Path(f["path"]).name): f["cycle"] for f in truth["files"]}
    for r in rows:
        cs = {cyc[m["path"]] for m in json.loads(r["members"])}
        assert len(cs) == 1, r  # never mixes cycles
        by_cycle.setdefault(cs.pop(), []).append(r)
    assert [r["state"] for r in by_cycle[0]] == ["complete"] and [r["state"] for r in by_cycle[2]] == ["complete"]
    for c in (1, 3):
        assert len(by_cycle[c]) == 1 and by_cycle[c][0]["state"] == "broken", by_cycle[c]
        names = [n for n, f in bad.items() if cyc[str(tmp_path / "raw" / n)] == c]
        for n in names:
            assert f"bad file {n}" in by_cycle[c][0]["reason"], (n, by_cycle[c][0]["reason"])
        assert len(json.loads(by_cycle[c][0]["members"])) == 16 - len(names)
    assert len(rows) == 4
    report = out / "report"
    assert list(report.glob("*_i.png")) and list(report.glob("*_q_phi.png"))


# ------------------------------------------------------------------------------------------------
# order-independent batches (issue 11 item 4)


@pytest.mark.slow
def test_same_batch_any_order_identical_products(tmp_path):
    """Two cycles given to `vampd run` sorted and shuffled: the same sets and byte-identical
    Stokes products (per set and collapsed)."""
    sim = SimConfig(size=64, nframes=2, ncycles=2, noise_free=True, calib=False, scene=RING)
    truth = simulate_night(tmp_path / "sim", sim)
    files = [str(tmp_path / "sim" / f["path"]) for f in truth["files"]]
    cfg = write_config(tmp_path / "c.toml", "cube")
    digests, members = [], []
    for i, order in enumerate((files, random.Random(7).sample(files, len(files)), files[::-1])):
        out = tmp_path / f"o{i}"
        vampd("run", cfg, *order, "-o", out, "-j", "2")
        rows = sets(out)
        assert [r["state"] for r in rows] == ["complete", "complete"]
        members.append(sorted(tuple(m["path"] for m in json.loads(r["members"])) for r in rows))
        digests.append(stokes_digest(out))
    assert members[0] == members[1] == members[2]
    assert digests[0] == digests[1] == digests[2] and len(digests[0]) >= 3


# ------------------------------------------------------------------------------------------------
# kill -9 in the middle of a block


@pytest.mark.slow
def test_kill9_mid_block_same_block_products(night, tmp_path):
    """The daemon is killed (SIGKILL) while HWP blocks are open; after a restart every block
    product is byte-identical to an uninterrupted `vampd run`'s."""
    root, truth, files = night
    files = files[:48]  # the first cycle: 16 blocks of 3 cubes
    cfg = write_config(tmp_path / "p.toml", "pdi")
    ref = tmp_path / "ref"
    vampd("run", cfg, *files, "-o", ref, "-j", "2")
    raw, out = tmp_path / "raw", tmp_path / "out"
    d = start_daemon(cfg, raw, out)
    try:
        feed(files[:26], raw)  # HWP 22.5 of the cycle: its blocks have 1 of 3 cubes
        assert wait_for(out, lambda o: files_done(o) >= 22)
    finally:
        d.kill()
        d.wait(timeout=60)
    with Ledger(out, readonly=True) as led:
        states = [r["state"] for r in led.block_rows()]
    assert "open" in states  # killed in the middle of a block
    d = start_daemon(cfg, raw, out)
    try:
        feed(files[26:], raw)
        assert wait_for(out, lambda o: files_done(o) == 48)
    finally:
        stop(d)
    vampd("finalize", cfg, "-o", out)
    got = {b["key"]: b for b in blocks(out)}
    want = {b["key"]: b for b in blocks(ref)}
    assert set(got) == set(want) and len(want) == 16
    for k, b in want.items():
        assert got[k]["members"] == b["members"].replace(str(Path(files[0]).parent), str(raw)) or [
            Path(p).name for p in json.loads(got[k]["members"])
        ] == [Path(p).name for p in json.loads(b["members"])]
        assert got[k]["state"] == "done" and Path(got[k]["product"]).name == Path(b["product"]).name
        a, c = fits.open(got[k]["product"]), fits.open(b["product"])
        try:
            assert np.array_equal(a[0].data, c[0].data, equal_nan=True)
            assert np.array_equal(a["ERR"].data, c["ERR"].data, equal_nan=True)
            assert a[0].header["HIERARCH DPP COADD NCOADD"] == c[0].header["HIERARCH DPP COADD NCOADD"] == 3 * 2
        finally:
            a.close()
            c.close()


# ------------------------------------------------------------------------------------------------
# issue 18: the PDI trigger never reads a parked file


def test_trigger_never_reads_parked_inputs(tmp_path):
    """A parked FIFO and a parked symlink to /dev/zero named *.fits: the trigger only uses what the
    ledger recorded (reading either would block or never end)."""
    from vampd.config.presets import preset_config
    from vampd.engine import pdi_trigger

    fifo = tmp_path / "a.fits"
    os.mkfifo(fifo)
    zero = tmp_path / "z.fits"
    zero.symlink_to("/dev/zero")
    cfg = preset_config("pdi-triplediff")
    cfg.name = "t"
    out = tmp_path / "out"
    led = Ledger(out)
    for p in (fifo, zero):
        led.record_failure(str(p), f"{p}: not a regular file", max_tries=1, permanent=True)

    def hung(*_):
        raise TimeoutError("the PDI trigger blocked on a parked input")

    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(30)  # opening the FIFO would block: the alarm interrupts it and fails the test
    try:
        res = pdi_trigger.on_file_done(led, cfg, out, str(fifo))
        res.update(pdi_trigger.on_file_done(led, cfg, out, str(zero)))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert res["sets"]["complete"] == 0 and res["sets"]["open"] == 0
    assert led.set_rows() == []  # a file without a recorded slot opens no set

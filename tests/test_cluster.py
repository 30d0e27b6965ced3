"""``vampd reprocess`` on a real Dask ``LocalCluster`` (issue 16 acceptance).

Three small simulated PDI nights (64² frames, 2 frames per file, one HWP cycle: 16 files each)
are reprocessed by the real command (a subprocess, 2 worker processes) and compared with
``vampd run`` + ``vampd finalize`` of each night: the same product files, byte-identical FITS
data and headers, the same HWP sets. Then a run is hit by a SIGKILL of a worker process in the
middle of a task and of the client itself; a rerun must end with every file done exactly once.
The tests that need ``distributed`` are skipped when it is not installed.
"""

import importlib.util
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from astropy.io import fits

from vampd.cluster.reprocess import night_inputs, night_label
from vampd.config import load_config, save_config
from vampd.config.presets import preset_config

HAVE_DASK = importlib.util.find_spec("distributed") is not None
needs_dask = pytest.mark.skipif(not HAVE_DASK, reason="distributed not installed (pip install 'vampd[cluster]')")
TESTS = Path(__file__).parent
DATA = TESTS.parent.parent / "shared" / "data"
NIGHTS = ("20261120", "20261121", "20261122")


def env(**extra) -> dict:
    e = dict(os.environ)
    e.update(OPENBLAS_NUM_THREADS="1")
    if DATA.is_dir():
        e["VAMPD_DATA_DIR"] = str(DATA)
    e.pop("VAMPD_PROCESS", None)
    e.update(extra)
    return e


def vampd(*args, timeout=600, **envx) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vampd", *map(str, args)],
        env=env(**envx),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def write_config(path: Path) -> Path:
    cfg = preset_config("pdi-triplediff", "t")
    cfg.align.crop_width = 48
    cfg.coadd.method = "mean"
    cfg.polarimetry.use_ideal_mm = True
    cfg.watch.workers = 2
    cfg.watch.max_tries = 3
    cfg.cluster.dashboard_address = ":0"  # any free port: tests may run side by side
    save_config(cfg, path)
    return path


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """Three nights of raw files (different seeds) and the config."""
    from vampd.simulate.night import SimConfig, simulate_night

    root = tmp_path_factory.mktemp("archive")
    for i, name in enumerate(NIGHTS):
        simulate_night(root / f"sim{i}", SimConfig(seed=10 + i, size=64, nframes=2, ncycles=1, calib=False))
        (root / f"sim{i}" / "raw").rename(root / name)
    os.mkfifo(root / NIGHTS[0] / "stray.fits")  # a FIFO matching the pattern is not a raw file
    return root, write_config(root / "night.toml")


@pytest.fixture(scope="module")
def reference(archive):
    """``vampd run`` + ``vampd finalize`` of each night (the local engine)."""
    root, cfg = archive
    for name in NIGHTS:
        files = sorted(str(p) for p in (root / name).glob("VMP*.fits"))
        p = vampd("run", cfg, *files, "-o", root / "ref" / name, "-j", "2")
        assert p.returncode == 0, p.stderr[-3000:]
        p = vampd("finalize", cfg, "-o", root / "ref" / name)
        assert p.returncode == 0, p.stderr[-3000:]
    return root / "ref"


def tree(d: Path) -> set[str]:
    return {str(p.relative_to(d)) for p in d.rglob("*") if p.is_file() and not p.name.startswith("vampd.sqlite")}


def assert_same_fits(a: Path, b: Path) -> None:
    with fits.open(a) as ha, fits.open(b) as hb:
        assert len(ha) == len(hb), a
        for x, y in zip(ha, hb, strict=True):
            assert (x.data is None) == (y.data is None), a
            if x.data is not None:
                assert x.data.tobytes() == y.data.tobytes(), f"{a}: data differ"
            assert x.header.tostring() == y.header.tostring(), f"{a}: header differs"


def ledger_rows(out: Path, sql: str) -> list[dict]:
    con = sqlite3.connect(f"file:{out / 'vampd.sqlite'}?mode=ro", uri=True)
    con.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in con.execute(sql)]
    finally:
        con.close()


def sets_of(out: Path) -> list[tuple]:
    rows = ledger_rows(out, "SELECT key, mode, state, members FROM sets ORDER BY key")
    return [
        (
            r["key"],
            r["mode"],
            r["state"],
            json.dumps(
                sorted(
                    Path(m["path"] if isinstance(m, dict) and "path" in m else str(m)).name
                    for m in json.loads(r["members"])
                )
            ),
        )
        for r in rows
    ]


def assert_exactly_once(out: Path, n_files: int) -> None:
    rows = ledger_rows(out, "SELECT path, state, nprocessed FROM files WHERE path LIKE '%VMP%'")
    assert len(rows) == n_files
    assert {r["state"] for r in rows} == {"done"}, [r for r in rows if r["state"] != "done"]
    assert [r["path"] for r in rows if r["nprocessed"] != 1] == []


# ------------------------------------------------------------------------------------------------
# no Dask needed


def test_night_label_and_inputs(tmp_path):
    (tmp_path / "20240101" / "raw").mkdir(parents=True)
    assert night_label(tmp_path / "20240101") == "20240101"
    assert night_label(tmp_path / "20240101" / "raw") == "20240101"  # archive layout NIGHT/raw
    raw = tmp_path / "20240101" / "raw"
    for n in ("a.fits", "b.fits.fz", "notes.txt"):
        (raw / n).write_bytes(b"x")
    os.mkfifo(raw / "c.fits")
    (raw / "d.fits").mkdir()
    cfg = preset_config("quicklook", "t")
    assert [Path(p).name for p in night_inputs(raw, cfg)] == ["a.fits", "b.fits.fz"]
    with pytest.raises(FileNotFoundError, match="night directory does not exist"):
        night_inputs(tmp_path / "nope", cfg)


def test_cluster_section_does_not_change_the_config_hash(tmp_path):
    cfg = preset_config("pdi-triplediff", "t")
    import tomli_w

    d = cfg.to_dict()
    d["cluster"] = {"scheduler": "tcp://head:8786", "oversubscribe": 3}
    p = tmp_path / "c.toml"
    p.write_text(tomli_w.dumps(d))
    back = load_config(p)
    assert back.cluster.scheduler == "tcp://head:8786" and back.cluster.oversubscribe == 3
    assert back.config_hash() == cfg.config_hash()
    assert back.stage_hash("coadd") == cfg.stage_hash("coadd")


def test_missing_distributed_is_a_clear_error(monkeypatch):
    from vampd.cluster.executor import MissingDistributed, require_distributed

    monkeypatch.setitem(sys.modules, "distributed", None)  # import fails as if not installed
    with pytest.raises(MissingDistributed, match=r"vampd\[cluster\]"):
        require_distributed()


def test_docs_snippets_compile_and_slurm_config_loads():
    root = TESTS.parent
    text = (root / "docs" / "cluster.md").read_text()
    blocks = [b.split("```", 1)[0] for b in text.split("```python\n")[1:]]
    assert len(blocks) == 2
    for b in blocks:
        compile(b, "docs/cluster.md", "exec")
    cfg = load_config(root / "configs" / "cluster-slurm.toml")
    assert cfg.cluster.scheduler == "tcp://login01:8786" and cfg.polarimetry is not None
    assert cfg.config_hash() == preset_config("pdi-triplediff", "reprocess").config_hash()


@needs_dask
def test_usage_errors_exit_2_before_any_cluster(tmp_path):
    cfg = write_config(tmp_path / "c.toml")
    p = vampd("reprocess", cfg, tmp_path / "nope", "-o", tmp_path / "out", "--local", "1", timeout=120)
    assert p.returncode == 2 and f"night directory not found: {tmp_path / 'nope'}" in p.stderr
    (tmp_path / "a" / "raw").mkdir(parents=True)
    (tmp_path / "b" / "a").mkdir(parents=True)
    p = vampd(
        "reprocess",
        cfg,
        tmp_path / "a" / "raw",
        tmp_path / "b" / "a",
        "-o",
        tmp_path / "out",
        "--local",
        "1",
        "--no-progress",
        timeout=300,
    )
    assert p.returncode == 2 and "same output name ['a']" in p.stderr


# ------------------------------------------------------------------------------------------------
# a real LocalCluster


@needs_dask
@pytest.mark.slow
def test_reprocess_matches_run(archive, reference):
    root, cfg = archive
    out = root / "cluster"
    p = vampd("reprocess", cfg, *(root / n for n in NIGHTS), "-o", out, "--local", "2", "--no-progress")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "dashboard http" in p.stdout
    for name in NIGHTS:
        assert f"{name}: 16/16 done, 0 failed, 1 set(s) complete" in p.stdout
        got, ref = out / name, reference / name
        assert tree(got) == tree(ref)
        fitsfiles = sorted(f for f in tree(ref) if f.endswith(".fits"))
        assert any(f.startswith("pdi/stokes/") for f in fitsfiles) and len(fitsfiles) > 40
        for f in fitsfiles:
            assert_same_fits(got / f, ref / f)
        for f in sorted(f for f in tree(ref) if f.endswith((".csv", ".md"))):  # paths name the outdir
            assert (got / f).read_text().replace(str(got), "OUT") == (ref / f).read_text().replace(str(ref), "OUT"), f
        assert sets_of(got) == sets_of(ref) and len(sets_of(got)) == 1
        assert_exactly_once(got, 16)


def _descendants(pid: int) -> list:
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _wait_done(out: Path, n: int, proc, timeout=240.0) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        assert proc.poll() is None, "reprocess ended before the kill"
        try:
            done = ledger_rows(out, "SELECT COUNT(*) AS n FROM files WHERE state='done'")[0]["n"]
        except sqlite3.OperationalError:  # not created yet
            done = 0
        if done >= n:
            return
        time.sleep(0.2)
    raise AssertionError(f"{out}: {n} files not done in {timeout} s")


@needs_dask
@pytest.mark.slow
def test_killed_worker_and_client_then_rerun_exactly_once(archive, reference, tmp_path):
    import psutil

    root, cfg = archive
    out, marks = tmp_path / "out", tmp_path / "marks"
    marks.mkdir()
    nights = [root / n for n in NIGHTS]
    cmd = [
        sys.executable,
        "-m",
        "vampd",
        "reprocess",
        str(cfg),
        *map(str, nights),
        "-o",
        str(out),
        "--local",
        "2",
        "--no-progress",
    ]
    slow = env(
        VAMPD_PROCESS="_cluster_task:slow_process_file",
        VAMPD_TEST_MARKS=str(marks),
        PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
    )
    log = open(tmp_path / "reprocess.log", "wb")
    proc = subprocess.Popen(cmd, env=slow, stdout=log, stderr=log)
    survivors = []
    try:
        _wait_done(out / NIGHTS[0], 3, proc)
        # `vampd status` reads the night while the client writes it
        st = vampd("status", out / NIGHTS[0], "--json", timeout=120)
        assert st.returncode == 0, st.stderr
        assert json.loads(st.stdout)["files"]["done"] >= 3
        # SIGKILL one worker process in the middle of a task (the slow entry point sleeps first)
        workers = [
            c
            for c in _descendants(proc.pid)
            if "spawn_main" in " ".join(c.cmdline()) and "resource_tracker" not in " ".join(c.cmdline())
        ]
        assert len(workers) == 2, [c.cmdline() for c in workers]
        victim = workers[0].pid
        deadline = time.time() + 60
        while time.time() < deadline:
            started = {m.name.rsplit(".", 1)[0] for m in marks.glob(f"*.{victim}.*.start")}
            ended = {m.name.rsplit(".", 1)[0] for m in marks.glob(f"*.{victim}.*.end")}
            if started - ended:
                break
            time.sleep(0.05)
        os.kill(victim, signal.SIGKILL)
        killed_tasks = {m.name.rsplit(".", 1)[0] for m in marks.glob(f"*.{victim}.*.start")} - {
            m.name.rsplit(".", 1)[0] for m in marks.glob(f"*.{victim}.*.end")
        }
        assert killed_tasks, "the worker was not mid-task"
        # then the client itself, while the second night runs
        _wait_done(out / NIGHTS[1], 2, proc)
        survivors = _descendants(proc.pid)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        gone, alive = psutil.wait_procs(survivors, timeout=30)
        assert alive == [], "worker processes outlived the killed client"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        for c in survivors:
            if c.is_running():
                c.kill()
        log.close()
    rows = ledger_rows(out / NIGHTS[1], "SELECT state FROM files")
    assert any(r["state"] != "done" for r in rows), "the client was killed too late to test a restart"

    p = vampd("reprocess", cfg, *nights, "-o", out, "--local", "2", "--no-progress")
    assert p.returncode == 0, p.stderr[-3000:]
    for name in NIGHTS:
        assert_exactly_once(out / name, 16)
        assert sets_of(out / name) == sets_of(reference / name)
        for f in sorted(f for f in tree(reference / name) if f.startswith(("coadded/", "pdi/stokes/"))):
            assert_same_fits(out / name / f, reference / name / f)


@needs_dask
@pytest.mark.slow
def test_joins_a_running_scheduler_from_the_config(archive, reference, tmp_path):
    """The shared-workstation recipe of docs/cluster.md: `dask scheduler` + `dask worker
    --nthreads 1 --resources MEMORY=...` started by hand, the address in `[cluster].scheduler`."""
    root, _cfg = archive
    sched_file = tmp_path / "scheduler.json"
    procs = []
    try:
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "dask",
                    "scheduler",
                    "--scheduler-file",
                    str(sched_file),
                    "--port",
                    "0",
                    "--dashboard-address",
                    ":0",
                ],
                env=env(),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        deadline = time.time() + 120
        while not sched_file.exists() and time.time() < deadline:
            time.sleep(0.2)
        address = json.loads(sched_file.read_text())["address"]
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "dask",
                    "worker",
                    "--scheduler-file",
                    str(sched_file),
                    "--nworkers",
                    "1",
                    "--nthreads",
                    "1",
                    "--memory-limit",
                    "2GB",
                    "--resources",
                    "MEMORY=1e9",
                ],
                env=env(),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        cfg = load_config(root / "night.toml")
        cfg.cluster.scheduler = address
        save_config(cfg, tmp_path / "joined.toml")
        name = NIGHTS[1]
        p = vampd("reprocess", tmp_path / "joined.toml", root / name, "-o", tmp_path / "out", "--no-progress")
        assert p.returncode == 0, p.stderr[-3000:]
        assert f"1 worker(s) on {address}" in p.stdout
    finally:
        for proc in reversed(procs):
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=30)
    got = tmp_path / "out" / name
    assert_exactly_once(got, 16)
    assert sets_of(got) == sets_of(reference / name)
    for f in sorted(f for f in tree(reference / name) if f.endswith(".fits")):
        assert_same_fits(got / f, reference / name / f)

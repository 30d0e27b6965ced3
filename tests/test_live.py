"""The live view, its snapshot and the alerts, against real ledgers.

* a small simulated night (64² px, 4 frames) reduced by ``vampd run``, with one camera-2 file
  removed before the run (→ an open HWP set with that member missing) and one non-FITS file
  (→ parked, a ``parked`` alert);
* a hand-built ledger (through the ledger API) for the faults that are hard to simulate
  (lagging camera, FLC imbalance, HWP off the grid, frame-count mismatch, Strehl drop, idle,
  dead daemon);
* ``vampd live`` in a pseudo-terminal against a daemon fed by ``vampd simulate --stream``.
"""

from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rich.console import Console

from vampd.config.models import AlertsConfig
from vampd.engine.ledger import FileIdentity, Ledger
from vampd.live.alerts import compute_alerts, hwp_grid_offset
from vampd.live.snapshot import take_snapshot
from vampd.live.sparkline import sparkline
from vampd.live.view import render, render_text

PY = sys.executable


def _env(**extra) -> dict:
    e = dict(os.environ, OPENBLAS_NUM_THREADS="1")
    e.pop("VAMPD_PROCESS", None)
    e.update(extra)
    return e


def _vampd(*args, check=True, **kw):
    p = subprocess.run(
        [PY, "-m", "vampd", *map(str, args)],
        env=_env(**kw.pop("env", {})),
        capture_output=True,
        text=True,
        timeout=kw.pop("timeout", 120),
        **kw,
    )
    if check:
        assert p.returncode == 0, p.stderr + p.stdout
    return p


def _config(path: Path, **watch) -> Path:
    from vampd.config import load_config, save_config

    from conftest import apply_fast_watch

    _vampd("new", path, "-f")
    cfg = load_config(path)
    apply_fast_watch(cfg, **{"stop_timeout": 10.0, "workers": 1, **watch})
    save_config(cfg, path)
    return path


def _record(console_width, console_height, renderable) -> str:
    """Render with rich's recording console and return the plain text."""
    con = Console(width=console_width, height=console_height, record=True, file=open(os.devnull, "w"))
    con.print(renderable)
    con.file.close()
    return con.export_text()


# -- a simulated night, reduced ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def night(tmp_path_factory):
    from vampd.simulate.night import SimConfig, simulate_night

    root = tmp_path_factory.mktemp("livenight")
    truth = simulate_night(root / "night", SimConfig(size=64, nframes=4, calib=False, seed=3, faults=("nonfits",)))
    raw = root / "night" / "raw"
    gone = [f for f in truth["files"] if f["camera"] == 2 and not f.get("fault")][2]
    gone_path = raw / Path(gone["path"]).name
    gone_path.unlink()
    cfg = _config(root / "cfg.toml")
    out = root / "out"
    files = sorted(str(p) for p in raw.glob("*.fits"))
    p = _vampd("run", cfg, *files, "-o", out, "-j", "1", check=False)
    assert p.returncode == 1 and "1 parked" in p.stdout, p.stderr  # the non-FITS file
    faulty = [f for f in truth["files"] if f.get("fault")]
    return {
        "root": root,
        "out": out,
        "truth": truth,
        "gone": gone,
        "gone_name": gone_path.name,
        "faulty": faulty,
        "nfiles": len(files),
    }


def test_snapshot_and_status_agree_with_the_ledger(night):
    out = night["out"]
    con = sqlite3.connect(f"file:{out / 'vampd.sqlite'}?mode=ro", uri=True)
    counts = dict(con.execute("SELECT state, COUNT(*) FROM files GROUP BY state").fetchall())
    con.close()
    assert counts.get("done") == night["nfiles"] - 1 and counts.get("parked") == 1
    snap = take_snapshot(out)
    st = json.loads(_vampd("status", out, "--json").stdout)
    assert snap.status["files"] == st["files"]
    assert st["files"]["total"] == night["nfiles"] == sum(counts.values())
    assert st["files"]["done"] == counts["done"]
    assert [a["code"] for a in st["alerts"]] == ["parked"]
    # the view says the same numbers
    text = render_text(snap, 120, 40)
    assert f"files {night['nfiles']}: {counts['done']} done" in text
    assert "1 parked" in text
    assert (
        f"latest files ({min(night['nfiles'], len(snap.latest))} of {night['nfiles']})" in text
        or f"of {night['nfiles']})" in text
    )


def test_view_shows_missing_member_parked_file_and_daemon_notice(night):
    snap = take_snapshot(night["out"])
    gone = night["gone"]
    label = f"HWP {float(gone['hwp']):g} FLC {gone['flc']} cam2"
    assert len(snap.open_sets) == 1
    assert label in snap.open_sets[0].missing
    text = _record(120, 40, render(snap, 120, 40))
    lines = text.splitlines()
    assert len(lines) == 40 and max(len(x) for x in lines) == 120
    assert f"missing: {label}" in text
    # the open set: 14 of 16 members present (the removed file and the parked non-FITS file)
    assert "14/16" in text
    bad = night["faulty"][0]
    bad_name = Path(bad["path"]).name
    assert bad_name in text and "parked" in text
    assert "DAEMON NOT RUNNING" in text
    assert "ALERT" not in text and "WARNING" in text and f"1 file(s) parked: {bad_name}" in text
    # trends: both cameras, a sparkline per metric
    assert "cam1" in text and "cam2" in text and re.search(r"Strehl\s+[▁▂▃▄▅▆▇█]{4,}", text)


def test_view_degrades_when_narrow(night):
    snap = take_snapshot(night["out"])
    small = _record(80, 24, render(snap, 80, 24))
    lines = small.splitlines()
    assert len(lines) == 24 and max(len(x) for x in lines) <= 80
    assert "DAEMON NOT RUNNING" in small and "missing:" in small  # header and set board stay
    cols = small.split("latest files")[1].splitlines()[1]  # the column-header row (line 0 is the title)
    assert "Strehl" in cols and "FWHM" not in cols  # low-priority columns dropped, Strehl kept
    tiny = _record(50, 14, render(snap, 50, 14))
    assert len(tiny.splitlines()) == 14 and "alerts" in tiny


def test_live_once_uses_terminal_size(night):
    p = _vampd("live", night["out"], "--once", env={"COLUMNS": "90", "LINES": "30"})
    lines = p.stdout.rstrip("\n").splitlines()
    assert len(lines) == 30 and max(len(x) for x in lines) == 90
    assert f"files {night['nfiles']}:" in p.stdout
    p = _vampd("live", night["root"] / "nowhere", "--once", check=False)
    assert p.returncode == 2 and "no ledger" in p.stdout


# -- hand-built ledger: faults that are hard to simulate ------------------------------------------
def _add(
    led: Ledger, name: str, t: float, camera: int, flc: str, hwp: float, mjd: float, nframes=20, strehl=0.6, flux=1000.0
):
    path = f"/data/{name}.fits"
    led.register(path, "h", identity=FileIdentity(1, 1, name), t_complete=t)
    led.record_done(
        path,
        [],
        {
            "target": "HD1",
            "filter": "750-50",
            "camera": camera,
            "flc": flc,
            "hwp": hwp,
            "mjd": mjd,
            "nframes": nframes,
            "exptime": 0.5,
            "obs_mod": "IPOL",
        },
        {"nframes": nframes, "nkept": nframes, "strehl": strehl, "flux": flux, "fwhm": 3.0, "offset": 0.1},
    )


def test_alerts_from_a_hand_built_ledger(tmp_path):
    out = tmp_path / "out"
    led = Ledger(out)
    t0 = time.time() - 400.0
    mjd0 = 61000.5
    for i in range(12):  # camera 1: 12 files, 10 s apart; FLC B fainter; Strehl collapses at the end
        flc = "AB"[i % 2]
        _add(
            led,
            f"VMPA{i:08d}",
            t0 + 10 * i,
            1,
            flc,
            [0.0, 45.0, 22.5, 67.5][(i // 2) % 4],
            mjd0 + 10 * i / 86400,
            strehl=0.2 if i >= 9 else 0.6,
            flux=1000.0 if flc == "A" else 600.0,
        )
    for i in range(4):  # camera 2 stops after 4 files (lags by 80 s); one file with 18 frames, one HWP off-grid
        _add(
            led,
            f"VMPB{i:08d}",
            t0 + 10 * i,
            2,
            "AB"[i % 2],
            30.0 if i == 3 else [0.0, 45.0][i // 2],
            mjd0 + 10 * i / 86400,
            nframes=18 if i == 1 else 20,
        )
    led.daemon_start(os.getpid(), "", "h")  # this process: a live daemon whose last file came 290 s ago
    led.close()
    snap = take_snapshot(out)
    cfg = AlertsConfig(
        lag_seconds=60,
        flc_imbalance=0.2,
        hwp_grid_tolerance=0.5,
        idle_seconds=120,
        strehl_drop=0.3,
        flux_drop=0.5,
        disk_free_gb=0.0,
    )
    alerts = {a.code: a for a in compute_alerts(snap, cfg, snap.taken)}
    assert "camera 2 lags camera 1 by 80 s" in alerts["camera_lag"].message
    assert "8 newer camera 1 file(s)" in alerts["camera_lag"].message
    # medians: A 1000, B 600 → |A − B| / mean = 400 / 800 = 50 %
    assert "camera 1: FLC A/B flux imbalance 50%" in alerts["flc_imbalance"].message
    assert "VMPB00000003.fits" in alerts["hwp_off_grid"].message and "7.50° off" in alerts["hwp_off_grid"].message
    assert "VMPA00000001.fits has 20, VMPB00000001.fits has 18" in alerts["frame_mismatch"].message
    # Strehl: last 3 median 0.2 vs 0.6 before → 67 % drop
    assert "camera 1: Strehl dropped 67%" in alerts["strehl_drop"].message
    assert "flux_drop" not in alerts  # flux of camera 1: last 3 are B, A, B → 600 vs 800: 25 % < 50 %
    gap = snap.taken - (t0 + 110)
    assert alerts["idle"].message.startswith(f"no new file for {gap:.0f} s")
    assert "disk_full" not in alerts and "daemon_down" not in alerts
    # a threshold the disk cannot meet
    disk = compute_alerts(snap, cfg.model_copy(update={"disk_free_gb": 1e9}), snap.taken)
    assert disk[0].code == "disk_full" and disk[0].level == "error"
    text = render_text(snap, 120, 40, list(alerts.values()))
    assert "camera 2 lags camera 1 by 80 s" in text and "daemon running" in text
    # lower thresholds off → no alerts at all
    quiet = AlertsConfig(
        lag_seconds=1e6,
        flc_imbalance=0.99,
        hwp_grid_tolerance=45,
        idle_seconds=1e6,
        strehl_drop=0.99,
        flux_drop=0.99,
        disk_free_gb=0.0,
    )
    assert [a.code for a in compute_alerts(snap, quiet, snap.taken)] == ["frame_mismatch"]


def test_dead_daemon_is_reported(tmp_path):
    out = tmp_path / "out"
    led = Ledger(out)
    _add(led, "VMPA00000000", time.time() - 5, 1, "A", 0.0, 61000.5)
    p = subprocess.Popen([PY, "-c", "pass"])
    p.wait()
    led.daemon_start(p.pid, "", "h")  # a daemon that died without saying so
    led.close()
    snap = take_snapshot(out)
    alerts = compute_alerts(snap, AlertsConfig(disk_free_gb=0.0))
    assert alerts[0].code == "daemon_down" and f"pid {p.pid} gone" in alerts[0].message
    text = render_text(snap, 100, 30)
    assert "DAEMON NOT RUNNING" in text and f"pid {p.pid} gone" in text


def test_helpers():
    assert sparkline([0, 1, 2, 3, 4, 5, 6, 7]) == "▁▂▃▄▅▆▇█"
    assert sparkline([1, None, 1]) == "▄ ▄"
    assert [round(hwp_grid_offset(a), 3) for a in (0, 44.9, 22.6, 90.2, -0.3, 10, 33.75)] == [
        0.0,
        0.1,
        0.1,
        0.2,
        0.3,
        10.0,
        11.25,
    ]


# -- vampd live in a pseudo-terminal against a running daemon ---------------------------------------
_ANSI = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][A-Z0-9]|\x1b[=>]")


def _read_pty(fd: int, timeout: float, until=None) -> bytes:
    """What the pseudo-terminal ``fd`` shows until it closes, ``timeout`` s pass or
    ``until(bytes so far)`` is true."""
    buf = b""
    t0 = time.time()
    while time.time() - t0 < timeout:
        r, _, _ = select.select([fd], [], [], 0.5)
        if r:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                break
            if not chunk:
                break
            buf += chunk
            if until is not None and until(buf):
                break
    return buf


@pytest.mark.slow
def test_live_in_a_pty_sees_the_count_grow(tmp_path):
    night = tmp_path / "night"
    (night / "raw").mkdir(parents=True)
    out = tmp_path / "out"
    cfg = _config(tmp_path / "cfg.toml")
    log = open(tmp_path / "daemon.log", "wb")
    procs = []
    pid = fd = None
    try:
        procs.append(
            subprocess.Popen(
                [PY, "-m", "vampd", "watch", str(cfg), "-i", str(night / "raw"), "-o", str(out)],
                env=_env(),
                stdout=log,
                stderr=log,
            )
        )
        procs.append(
            subprocess.Popen(
                [
                    PY,
                    "-m",
                    "vampd",
                    "simulate",
                    str(night),
                    "--stream",
                    "--cadence",
                    "0.4",
                    "--size",
                    "64",
                    "--nframes",
                    "4",
                    "--no-calib",
                    "--seed",
                    "5",
                ],
                env=_env(),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        t0 = time.time()
        while not (out / "vampd.sqlite").exists() and time.time() - t0 < 60:
            time.sleep(0.2)
        pid, fd = pty.fork()
        if pid == 0:  # child: the live view on the pty
            os.environ.update(_env(COLUMNS="100", LINES="30", TERM="xterm-256color"))
            os.execv(PY, [PY, "-m", "vampd", "live", str(out), "--refresh", "0.3"])
        seen: list[int] = []

        def grown(buf: bytes) -> bool:
            text = _ANSI.sub(b"", buf[-20000:]).decode(errors="ignore")
            found = re.findall(r"files (\d+): (\d+) done", text)
            if found:
                seen.append(int(found[-1][1]))
            return bool(seen) and seen[-1] >= 6 and min(seen) < seen[-1]

        buf = _read_pty(fd, 90, grown)
        assert seen, _ANSI.sub(b"", buf[-3000:]).decode(errors="ignore")
        assert min(seen) < max(seen) and max(seen) >= 6, seen
        screen = _ANSI.sub(b"", buf[-20000:]).decode(errors="ignore")
        assert "daemon running" in screen and "HWP set" in screen
        os.write(fd, b"q")  # quit like an observer
        t0 = time.time()
        while time.time() - t0 < 10:
            done, _status = os.waitpid(pid, os.WNOHANG)
            if done:
                pid = None
                break
            try:
                select.select([fd], [], [], 0.2) and os.read(fd, 65536)
            except OSError:
                pass
        assert pid is None, "vampd live did not quit on q"
    finally:
        if pid:
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
        if fd is not None:
            os.close(fd)
        for p in procs[::-1]:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        log.close()


# -- a PDI night: the set board and the running-PDI panel read the PDI trigger's rows -------------
@pytest.fixture(scope="module")
def pdi_night(tmp_path_factory):
    """Two HWP cycles reduced by ``vampd run`` with PDI on: set 0 complete, set 1 open because
    one of its raw files (FLC B, camera 2) was deleted before the run. IP of 2 % left uncorrected,
    so the star has a DoLP to show."""
    from vampd.cli import main
    from vampd.config.io import save_config
    from vampd.config.presets import preset_config
    from vampd.simulate.night import SimConfig, simulate_night

    root = tmp_path_factory.mktemp("livepdi")
    truth = simulate_night(
        root / "night", SimConfig(size=64, nframes=2, ncycles=2, noise_free=True, calib=False, ip=0.02)
    )
    raw = root / "night" / "raw"
    second = sorted((f for f in truth["files"] if f["camera"] == 2), key=lambda f: f["mjd"])[8:]
    gone = next(f for f in second if f["flc"] == "B")
    (raw / Path(gone["path"]).name).unlink()
    cfg = preset_config("pdi-triplediff")
    cfg.name = "lp"
    cfg.align.crop_width = 56
    cfg.polarimetry.use_ideal_mm = True
    cfg.polarimetry.ip_correct = False
    cfg.diff_images.make_diff = False
    save_config(cfg, root / "lp.toml")
    out = root / "out"
    files = sorted(str(p) for p in raw.glob("*.fits"))
    assert len(files) == 31
    # a file cut short: parked before its header is read
    bad = raw / "VMPA00019999.fits"
    bad.write_bytes(Path(files[0]).read_bytes()[:5000])
    assert main(["run", str(root / "lp.toml"), *files, str(bad), "-o", str(out), "-j", "2"]) == 1
    return {"root": root, "out": out, "gone": gone, "cfg": root / "lp.toml", "bad": bad}


def test_pdi_panel_and_set_board_from_real_sets(pdi_night):
    from astropy.io import fits

    out, gone = pdi_night["out"], pdi_night["gone"]
    con = sqlite3.connect(f"file:{out / 'vampd.sqlite'}?mode=ro", uri=True)
    sets = dict(con.execute("SELECT state, COUNT(*) FROM sets GROUP BY state").fetchall())
    con.close()
    assert sets == {"complete": 1, "open": 1}
    snap = take_snapshot(out)
    assert [s.source for s in snap.open_sets] == ["ledger"]
    text = render_text(snap, 120, 48)
    assert "sets done 1" in text
    # the star's DoLP of set 0 as the per-set file says it, in % with 2 decimals
    hdr = fits.getheader(out / "pdi" / "stokes" / "lp_stokes_000.fits")
    dolp = float(hdr["DPP PDI DOLP 750-50"])
    assert 0.005 < dolp < 0.05  # the uncorrected 2 % IP, diluted by the unpolarised halo
    row = next(line for line in text.splitlines() if "750-50" in line and f"{100 * dolp:+.2f}±" in line)
    assert row.split("│")[1].split()[0] == "0"  # set index 0
    # the open set: 15/16 with the deleted member named
    label = f"HWP {float(gone['hwp']):g} FLC B cam2"
    assert snap.open_sets[0].missing == [label]
    assert f"missing: {label}" in text and "15/16" in text
    # vampd status --json: the same set counts as the ledger
    st = json.loads(_vampd("status", out, "--json").stdout)
    assert st["sets"] == {"complete": 1, "broken": 0, "open": 1}


def _pty_once(out: Path, cols: int, rows: int) -> list[str]:
    """``vampd live OUT --once`` on a real pseudo-terminal of ``cols`` × ``rows`` (the size comes
    from the terminal, not from COLUMNS/LINES); the screen's lines without ANSI codes."""
    import fcntl
    import struct
    import termios

    pid, fd = pty.fork()
    if pid == 0:  # child: size the terminal, then run the view on it
        fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        env = _env(TERM="xterm-256color")
        env.pop("COLUMNS", None)
        env.pop("LINES", None)
        os.execve(PY, [PY, "-m", "vampd", "live", str(out), "--once"], env)
    try:
        buf = _read_pty(fd, 120)
    finally:
        _pid, status = os.waitpid(pid, 0)
        os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 0, buf[-2000:]
    text = _ANSI.sub(b"", buf).decode(errors="ignore").replace("\r\n", "\n").replace("\r", "")
    return text.rstrip("\n").split("\n")


@pytest.mark.parametrize("cols, rows", [(120, 40), (80, 24)])
def test_live_in_a_pty_keeps_the_news(pdi_night, cols, rows):
    """At 120×40 and 80×24 the screen holds the set count, the parked file with its reason and
    the running-PDI line; nothing inside the header is cut."""
    lines = _pty_once(pdi_night["out"], cols, rows)
    assert len(lines) == rows and max(len(x) for x in lines) <= cols
    top = next(i for i, ln in enumerate(lines) if ln.startswith("┏"))
    bottom = next(i for i, ln in enumerate(lines) if ln.startswith("┗"))
    header = lines[top + 1 : bottom]
    assert header and not any("…" in ln for ln in header), header
    screen = "\n".join(lines)
    assert "sets 1 complete, 1 open, 0 broken" in "\n".join(header)
    # the parked file and its reason (the structure check's words), on the screen
    name = pdi_night["bad"].name
    assert any(name in ln and "parked" in ln and "header" in ln for ln in lines), screen
    if cols >= 100:
        assert "running PDI" in screen and "sets done 1" in screen
        # the parked-files panel (right of the running PDI): the whole reason, wrapped, not cut
        i = next(i for i, ln in enumerate(lines) if "╭─ parked files (1)" in ln)
        col = lines[i].index("╭─ parked files")
        body = []
        for ln in lines[i + 1 :]:
            if ln[col:].startswith("╰"):
                break
            body.append(ln[col:].strip("│ "))
        assert "header incomplete: no END card in the first 5000 bytes" in " ".join(" ".join(body).split())
    else:
        assert any(ln.strip("│ ").startswith("running PDI: sets done 1") for ln in lines), screen
        assert any(ln.strip("│ ").startswith(f"parked {name}: header incomplete") for ln in lines), screen
    # observation times, and the wall-clock times marked as such
    assert "obs UT" in screen and "(wall clock)" in "\n".join(header)


def test_latest_files_by_observation_time(pdi_night):
    snap = take_snapshot(pdi_night["out"])
    obs = [f.mjd for f in snap.latest if f.mjd is not None]
    assert obs == sorted(obs, reverse=True) and len(obs) == len(snap.latest) - 1
    text = render_text(snap, 120, 40)
    assert "~ = arrival (wall clock)" in text


def test_status_survives_a_closed_pipe(pdi_night):
    """`vampd status | head`: the reader has gone; no traceback, exit 0."""
    code = (
        "import os, sys; r, w = os.pipe(); os.close(r); os.dup2(w, 1); "
        "from vampd.cli import main; sys.exit(main(['status', sys.argv[1]]))"
    )
    p = subprocess.run([PY, "-c", code, str(pdi_night["out"])], capture_output=True, text=True, timeout=120, env=_env())
    assert p.returncode == 0 and "Traceback" not in p.stderr and "BrokenPipe" not in p.stderr, p.stderr
    st = _vampd("status", pdi_night["out"]).stdout
    assert "1 parked" in st and "failed" not in st.split("files", 1)[1].splitlines()[0]
    assert f"parked  {pdi_night['bad'].name}" in st and "header incomplete" in st


# -- several cubes per HWP with combine.method = "pdi": the board counts cubes per slot --------------
def _reduce(runner, paths: list[str], blocks: bool = True) -> None:
    """Offer ``paths`` to the engine and reduce them with the triggers inline, as ``vampd run``
    does but without its end-of-batch close of the open HWP blocks. ``blocks=False``: the blocks
    that close are left ``ready`` (not coadded yet): ``pump`` runs once, before they close."""
    for p in paths:
        runner.offer(p, t_complete=time.time())
    runner.pump()
    while runner.pool.jobs or runner.ledger.next_pending(1) or (blocks and runner.ledger.block_rows("ready")):
        runner.collect(0.2)
        if blocks:
            runner.pump()


@pytest.fixture(scope="module")
def cubes_night(tmp_path_factory):
    """2 cubes per camera/FLC at each HWP position (``vampd simulate --cubes-per-hwp 2``),
    ``combine.method = "pdi"``. Reduced: HWP 0 and 45 of every stream, the first HWP 22.5
    cube of FLC A (both cameras); then the first HWP 22.5 cube of FLC B camera 1, whose
    HWP 45 block closes but is not coadded yet."""
    from vampd.config.io import save_config
    from vampd.config.presets import preset_config
    from vampd.engine.commands import open_engine
    from vampd.simulate.night import SimConfig, simulate_night

    root = tmp_path_factory.mktemp("livecubes")
    truth = simulate_night(root / "night", SimConfig(size=64, nframes=2, cubes_per_hwp=2, noise_free=True, calib=False))
    cfg = preset_config("pdi-triplediff")
    cfg.name = "lc"
    cfg.align.crop_width = 48
    cfg.combine.method = "pdi"
    cfg.polarimetry.use_ideal_mm = True
    cfg.diff_images.make_diff = False
    save_config(cfg, root / "lc.toml")
    # in observation order, as they arrive at night (the plan's order)
    path = {(f["hwp"], f["flc"], f["camera"], f["cube"]): str(root / "night" / f["path"]) for f in truth["files"]}
    first = [p for (h, flc, _c, k), p in path.items() if h in (0.0, 45.0) or (h == 22.5 and flc == "A" and k == 0)]
    out = root / "out"
    _cfg, _out, ledger, pool, runner = open_engine(str(root / "lc.toml"), str(out), 2)
    pool.start()
    try:
        _reduce(runner, first)
        _reduce(runner, [path[(22.5, "B", 1, 0)]], blocks=False)
    finally:
        pool.shutdown(30)
        ledger.close()
    return {"out": out, "nfirst": len(first)}


def _board_rows(text: str) -> dict[str, list[str]]:
    """The set board's cells by HWP row, read from the rendered screen."""
    lines = text.splitlines()
    i = next(i for i, ln in enumerate(lines) if "A·c1" in ln)
    col = lines[i].index("│") + 1
    rows = {}
    for ln in lines[i + 1 : i + 5]:
        cells = ln[col:].split("│")[0].split()
        rows[cells[0]] = cells[1:]
    return rows


def test_set_board_counts_cubes_per_slot(cubes_night):
    snap = take_snapshot(cubes_night["out"])
    s = snap.open_sets[-1]
    assert (s.source, len(s.members), s.cells["HWP 45 FLC B cam1"].kind) == ("ledger", 6, "processing")
    text = render_text(snap, 120, 48)
    assert "HWP set filling: ABAUR 750-50 6/16" in text
    want = {
        "0": ["✓×2", "✓×2", "✓×2", "✓×2"],
        "45": ["✓×2", "✓×2", "⚙×2", "…×2"],
        "22.5": ["…×1", "…×1", "…×1", "·"],
        "67.5": ["·", "·", "·", "·"],
    }
    assert _board_rows(text) == want
    # at 100×30 the legend goes and the filling line is cut, the counts and the panels below stay
    small = render_text(snap, 100, 30)
    assert _board_rows(small) == want and "running PDI" in small and "parked files" in small
    assert "block filling: HWP 45 FLC B cam2, 2 cubes so far;" in small and "×n cubes" not in small
    assert "missing: 5 slots (·)" in text and "block filling: HWP 45 FLC B cam2, 2 cubes so far;" in text
    assert s.filling == [
        "HWP 45 FLC B cam2, 2 cubes so far",
        "HWP 22.5 FLC A cam1, 1 cube so far",
        "HWP 22.5 FLC A cam2, 1 cube so far",
        "HWP 22.5 FLC B cam1, 1 cube so far",
    ]
    assert "│ ×n cubes: ✓ in set … filling ⚙ processing ✗ failed · empty" in text
    # vampd status --json: the HWP blocks by state, and open/closed
    st = json.loads(_vampd("status", cubes_night["out"], "--json").stdout)
    assert st["blocks"] == {"open": 4, "ready": 1, "running": 0, "done": 6, "failed": 0, "closed": 7}

"""systemd units: `systemd-analyze verify` must print nothing (it exits 0 on unknown keys,
so its output is what is checked), and the keys the daemon relies on are present."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parents[1] / "systemd"
ANALYZE = shutil.which("systemd-analyze")


def _vampd_exe() -> str:
    exe = Path(sys.executable).parent / "vampd"
    return str(exe if exe.exists() else shutil.which("vampd") or sys.executable)


def _service(name: str) -> dict:
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.optionxform = str
    text = (UNITS / name).read_text()
    cp.read_string(text)
    return {s: dict(cp[s]) for s in cp.sections()} | {
        "_env": [ln for ln in text.splitlines() if ln.startswith("Environment=")]
    }


@pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze not installed")
@pytest.mark.parametrize(
    "unit,instance", [("vampd.service", "vampd.service"), ("vampd@.service", "vampd@night1.service")]
)
def test_systemd_analyze_verify_is_silent(tmp_path, unit, instance):
    # ExecStart must name an existing executable for verify: point it at this environment's vampd
    text = (UNITS / unit).read_text().replace("/usr/local/bin/vampd", _vampd_exe())
    (tmp_path / instance).write_text(text)
    p = subprocess.run(
        [ANALYZE, "verify", "--man=no", str(tmp_path / instance)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    out = (p.stdout + p.stderr).strip()
    assert p.returncode == 0 and out == "", out


def test_verify_catches_unknown_keys(tmp_path):
    """The check above can fail: an unknown key produces output even though the exit status is 0."""
    if ANALYZE is None:
        pytest.skip("systemd-analyze not installed")
    text = (UNITS / "vampd.service").read_text().replace("/usr/local/bin/vampd", _vampd_exe())
    (tmp_path / "vampd.service").write_text(text.replace("Restart=on-failure", "Restart=on-failure\nRestartt=always"))
    p = subprocess.run(
        [ANALYZE, "verify", "--man=no", str(tmp_path / "vampd.service")], capture_output=True, text=True, timeout=60
    )
    assert "Unknown key 'Restartt'" in p.stdout + p.stderr


@pytest.mark.parametrize("unit", ["vampd.service", "vampd@.service"])
def test_unit_keys(unit):
    u = _service(unit)
    svc = u["Service"]
    assert svc["Type"] == "notify" and svc["NotifyAccess"] == "main"
    assert int(svc["WatchdogSec"]) > 0 and svc["Restart"] == "on-failure"
    assert int(u["Unit"]["StartLimitBurst"]) > 0 and int(u["Unit"]["StartLimitIntervalSec"]) > 0
    assert svc["KillMode"] == "mixed"
    # long enough for the default 60 s drain ([watch].stop_timeout)
    assert int(svc["TimeoutStopSec"]) > 60
    env = " ".join(u["_env"])
    assert "PYTHONUNBUFFERED=1" in env and "OPENBLAS_NUM_THREADS=1" in env
    assert svc["EnvironmentFile"].startswith("/etc/vampd/")
    assert svc["ExecStart"].split()[1] == "watch"
    assert "kill -HUP" in svc["ExecReload"]


def test_sd_notify_protocol(tmp_path):
    import socket

    from vampd.watch.notify import notify, watchdog_interval

    path = str(tmp_path / "n.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        assert notify("READY=1", "STATUS=3 done", env={"NOTIFY_SOCKET": path})
        assert sock.recv(1024) == b"READY=1\nSTATUS=3 done"
    assert not notify("READY=1", env={})  # outside systemd: a no-op
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) is None  # not for us
    assert watchdog_interval({}) is None


HARDENING = {
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "RestrictAddressFamilies": "AF_UNIX",
    "UMask": "0022",
}


@pytest.mark.parametrize("unit", ["vampd.service", "vampd@.service"])
def test_units_are_hardened(unit):
    svc = _service(unit)["Service"]
    assert svc["User"] == "vampd" and svc["User"] != "root"
    for key, value in HARDENING.items():
        assert svc[key] == value, key
    assert svc["ReadWritePaths"] and svc["ReadOnlyPaths"] and svc["MemoryMax"]
    text = (UNITS / unit).read_text()
    assert "SystemCallFilter=@system-service" in text
    # configuration errors (documented exit codes 2-6 of vampd watch) must not loop
    assert set(svc["RestartPreventExitStatus"].split()) == {"2", "3", "4", "5", "6"}


@pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze not installed")
@pytest.mark.parametrize(
    "unit,instance", [("vampd.service", "vampd.service"), ("vampd@.service", "vampd@night1.service")]
)
def test_systemd_analyze_security_exposure(tmp_path, unit, instance):
    text = (UNITS / unit).read_text().replace("/usr/local/bin/vampd", _vampd_exe())
    (tmp_path / instance).write_text(text)
    p = subprocess.run(
        [ANALYZE, "security", "--offline=yes", "--no-pager", instance],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    import re

    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", p.stdout + p.stderr)
    assert m, p.stdout + p.stderr
    assert float(m.group(1)) <= 2.5


def test_sd_notify_never_blocks_on_a_full_receiver(tmp_path):
    """A notify socket nobody reads: the sends fail fast instead of stalling the daemon's loop."""
    import socket
    import time

    from vampd.watch.notify import notify

    path = str(tmp_path / "full.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        t0 = time.monotonic()
        sent = [notify("STATUS=" + "x" * 1000, env={"NOTIFY_SOCKET": path}) for _ in range(2000)]
        assert time.monotonic() - t0 < 30  # blocking sends would hang here forever
        assert sent[0] and not sent[-1]  # the queue filled up, later sends were dropped

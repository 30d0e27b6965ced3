"""Soak: an accelerated night of thousands of files with every fault kind and odd path,
SIGKILL / SIGHUP / SIGTERM at random moments and a brief full output disk.

    python benchmarks/soak.py [--files 2000] [--cadence 0.02] [--seed 1] [--full-disk 20] [--workdir DIR]

Good files are tiny (16x16, one frame, quicklook without Strehl) so the night's length, not
the science, is what is soaked. Every ~100 good files one bad thing is dropped in the input
directory (truncated, junk, zero bytes, FIFO, /dev/zero and /dev/urandom symlinks, a
directory named *.fits, a symlink loop, a non-UTF-8 name, a vanishing file, a growing file).
The daemon is killed with SIGKILL (restarted), reloaded with SIGHUP, stopped with SIGTERM
(restarted) at random moments; with root and tmpfs, the output is a small tmpfs that is
filled for ``--full-disk`` seconds mid-night.

Reports: good files lost (not done) and duplicated (``nprocessed`` > 1), rows and log lines
per bad file, latency per 10 % of the night, the daemon's RSS and open descriptors sampled
every second (per restart), wall and CPU time (daemon + workers, user + sys). Exit 0 when
nothing is lost or duplicated.
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


def vampd(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vampd", *args], capture_output=True, text=True, **kw)


def ledger(out: Path, sql: str) -> list[tuple]:
    try:
        con = sqlite3.connect(f"file:{out / 'vampd.sqlite'}?mode=ro", uri=True, timeout=10)
        rows = con.execute(sql).fetchall()
        con.close()
        return rows
    except sqlite3.Error:
        return []


def proc_sample(pid: int) -> tuple[float, int] | None:
    """RSS (MB) and open descriptors of a process."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            rss = next(int(ln.split()[1]) for ln in fh if ln.startswith("VmRSS:")) / 1024
        return rss, len(os.listdir(f"/proc/{pid}/fd"))
    except (OSError, StopIteration):
        return None


class Daemon:
    def __init__(self, cfg: Path, raw: Path, out: Path, log: Path):
        self.cfg, self.raw, self.out, self.logpath = cfg, raw, out, log
        self.proc: subprocess.Popen | None = None
        self.samples: list[tuple[float, int, float, int]] = []  # (t, pid, rss MB, fds)
        self.starts = 0

    def start(self) -> None:
        log = open(self.logpath, "ab")
        env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vampd", "watch", str(self.cfg), "-i", str(self.raw), "-o", str(self.out)],
            stdout=log,
            stderr=log,
            env=env,
        )
        self.starts += 1

    def sample(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            s = proc_sample(self.proc.pid)
            if s:
                self.samples.append((time.time(), self.proc.pid, *s))

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None


BAD_KINDS = (
    "truncated",
    "junk",
    "zero",
    "fifo",
    "devzero",
    "urandom",
    "dir",
    "loop",
    "nonutf8",
    "vanish",
    "grow",
    "endtime_cut",
)


def drop_bad(raw: Path, kind: str, i: int, src: bytes) -> str:
    """Create one bad path; returns the name the ledger/log will use."""
    name = f"BAD{i:05d}_{kind}.fits"
    p = raw / name
    if kind == "truncated":
        p.write_bytes(src[: len(src) // 2])
    elif kind == "junk":
        p.write_bytes(os.urandom(400))
    elif kind == "zero":
        p.write_bytes(b"")
    elif kind == "fifo":
        os.mkfifo(p)
    elif kind == "devzero":
        p.symlink_to("/dev/zero")
    elif kind == "urandom":
        p.symlink_to("/dev/urandom")
    elif kind == "dir":
        p.mkdir()
    elif kind == "loop":
        p.symlink_to(p)
    elif kind == "nonutf8":
        with open(os.fsencode(raw) + f"/BAD{i:05d}_\xe9".encode("latin-1") + b".fits", "wb") as fh:
            fh.write(os.urandom(200))
        return f"BAD{i:05d}_\\xe9.fits"
    elif kind == "vanish":
        p.write_bytes(src[:100])
        p.unlink()
    elif kind == "grow":
        p.write_bytes(src)

        def grow():
            for _ in range(20):
                time.sleep(0.5)
                with open(p, "ab") as fh:
                    fh.write(b"\0" * 64)

        threading.Thread(target=grow, daemon=True).start()
    elif kind == "endtime_cut":
        p.write_bytes(src[: len(src) - 2880 - 160])
    return name


def make_source(work: Path) -> tuple[bytes, bytes]:
    from vampd.simulate.night import SimConfig, simulate_night

    simulate_night(work / "sim", SimConfig(size=16, nframes=1, ncycles=1, n_hot=0, n_dead=0, calib=False))
    f = sorted((work / "sim" / "raw").glob("*.fits"))[0]
    return f.read_bytes(), f.with_suffix(".txt").read_bytes()


def write_config(path: Path) -> None:
    from vampd.config import save_config
    from vampd.config.presets import preset_config

    cfg = preset_config("quicklook", "soak")
    cfg.analysis.strehl = False
    cfg.align.crop_width = 16
    for k, v in dict(
        settle_time=0.1,
        complete_timeout=3.0,
        reconcile_interval=5.0,
        stop_timeout=10.0,
        expect_sidecar=False,
        workers=2,
        max_tries=2,
    ).items():
        setattr(cfg.watch, k, v)
    save_config(cfg, path)


def mount_tmpfs(out: Path, mb: int) -> bool:
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    out.mkdir(parents=True, exist_ok=True)
    return (
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={mb}m", "tmpfs", str(out)], capture_output=True).returncode
        == 0
    )


def fill(out: Path) -> Path:
    filler = out / "filler"
    with open(filler, "wb", buffering=0) as fh:
        try:
            while True:
                fh.write(b"\0" * 65536)
        except OSError:
            pass
    return filler


def wait_all_done(d: Daemon, out: Path, n: int, timeout: float, events: list, t0: float) -> None:
    """Until every good file is done (restarting a daemon that died: a finding, reported)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        done = ledger(out, "SELECT COUNT(*) FROM files WHERE state='done' AND path LIKE '%/VMPA%'")
        if done and done[0][0] == n:
            break
        if d.proc.poll() is not None:
            events.append((time.time() - t0, f"daemon exited rc={d.proc.returncode}; restarted"))
            d.start()
        time.sleep(1.0)
    time.sleep(2 * 5.0)  # two reconciliations: repeated judgements would show now


def run(args) -> int:
    rng = random.Random(args.seed)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="vampd-soak-"))
    raw, out = work / "raw", work / "out"
    raw.mkdir(parents=True, exist_ok=True)
    src, side = make_source(work)
    cfg = work / "soak.toml"
    write_config(cfg)
    tmpfs = mount_tmpfs(out, args.tmpfs_mb) if args.full_disk > 0 else False
    d = Daemon(cfg, raw, out, work / "daemon.log")
    d.start()
    t0 = time.time()
    good: list[str] = []
    bad: dict[str, str] = {}
    events: list[tuple[float, str]] = []
    n = args.files
    kill_at = sorted(rng.sample(range(n // 10, n - n // 10), args.kills))
    hup_at = set(rng.sample(range(n // 10, n), args.hups))
    term_at = set(rng.sample(range(n // 10, n), args.terms))
    full_at = n // 2 if tmpfs else -1
    filler = None
    t_fill = 0.0
    stop_sampler = threading.Event()

    def sampler():
        while not stop_sampler.is_set():
            d.sample()
            time.sleep(1.0)

    threading.Thread(target=sampler, daemon=True).start()

    for i in range(n):
        name = f"VMPA{i:08d}.fits"
        tmp = raw / (name + ".7.7.tmp")
        tmp.write_bytes(src)
        os.rename(tmp, raw / name)
        good.append(str(raw / name))
        if i and i % args.bad_every == 0:
            kind = BAD_KINDS[(i // args.bad_every) % len(BAD_KINDS)]
            bad[drop_bad(raw, kind, i, src)] = kind
        if i in kill_at:
            d.signal(signal.SIGKILL)
            d.wait(10)
            events.append((time.time() - t0, "SIGKILL"))
            d.start()
        if i in hup_at:
            d.signal(signal.SIGHUP)
            events.append((time.time() - t0, "SIGHUP"))
        if i in term_at:
            t = time.time()
            d.signal(signal.SIGTERM)
            rc = d.wait(60)
            events.append((time.time() - t0, f"SIGTERM rc={rc} in {time.time() - t:.1f} s"))
            d.start()
        if i == full_at:
            filler, t_fill = fill(out), time.time()
            events.append((time.time() - t0, "disk full"))
        if filler is not None and time.time() - t_fill > args.full_disk:
            filler.unlink()
            filler = None
            events.append((time.time() - t0, "disk space back"))
        time.sleep(args.cadence)
    if filler is not None:
        while time.time() - t_fill < args.full_disk:
            time.sleep(0.5)
        filler.unlink()
        events.append((time.time() - t0, "disk space back"))
    t_written = time.time() - t0
    wait_all_done(d, out, n, args.timeout, events, t0)
    t_all = time.time() - t0
    d.signal(signal.SIGTERM)
    rc_final = d.wait(60)
    stop_sampler.set()
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    report(args, work, out, good, bad, events, d, t_written, t_all, rc_final, ru, tmpfs)
    rows = dict(ledger(out, "SELECT path, nprocessed FROM files WHERE path LIKE '%/VMPA%' AND state='done'"))
    lost = [g for g in good if g not in rows]
    dup = [g for g in good if rows.get(g, 0) > 1]
    if tmpfs:
        subprocess.run(["umount", "-l", str(out)])
    return 0 if not lost and not dup else 1


def report(args, work, out, good, bad, events, d, t_written, t_all, rc_final, ru, tmpfs) -> None:
    rows = {r[0]: r for r in ledger(out, "SELECT path, state, nprocessed, latency, t_done, error FROM files")}
    lost = [g for g in good if g not in rows or rows[g][1] != "done"]
    dup = [g for g in good if g in rows and rows[g][2] > 1]
    log = (work / "daemon.log").read_text(errors="replace").splitlines()
    print(
        f"soak: {len(good)} good files + {len(bad)} bad paths in {t_written:.0f} s, all settled {t_all:.0f} s "
        f"(workdir {work}; machine shared and loaded)"
    )
    print(
        f"  events: {len(events)} ({sum('SIGKILL' in e for _, e in events)} SIGKILL, "
        f"{sum('SIGHUP' in e for _, e in events)} SIGHUP, {sum('SIGTERM' in e for _, e in events)} SIGTERM, "
        f"full disk {'yes (tmpfs)' if tmpfs else 'no'}); daemon starts {d.starts}; final stop rc={rc_final}"
    )
    for t, e in events:
        if "SIGTERM" in e or "disk" in e or "exited" in e:
            print(f"    t={t:6.1f} s  {e}")
    print(f"  lost: {len(lost)}  duplicated: {len(dup)}")
    per_kind: dict[str, list[tuple[int, int]]] = {}
    for name, kind in bad.items():
        nrows = sum(1 for p in rows if os.path.basename(p) == name)
        # the alert summaries ("alert parked: N file(s) parked: a, b ...") are not per-file lines
        nlines = sum(1 for ln in log if name in ln and ("ERROR" in ln or "WARNING" in ln) and "vampd.alerts" not in ln)
        per_kind.setdefault(kind, []).append((nrows, nlines))
    print("  bad paths: kind: rows per path (max), error/warning log lines per path (max)")
    for kind, v in sorted(per_kind.items()):
        print(f"    {kind:12s} n={len(v):3d} rows max {max(r for r, _ in v)}  log lines max {max(n for _, n in v)}")
    lat = sorted((rows[g][4], rows[g][3]) for g in good if g in rows and rows[g][4] is not None)
    if lat:
        chunks = np.array_split(np.array([x[1] for x in lat]), 10)
        print(
            "  latency median per tenth of the night [s]: " + " ".join(f"{np.median(c):.2f}" for c in chunks if len(c))
        )
    if d.samples:
        s = np.array([(t, rss, fds) for t, _, rss, fds in d.samples])
        chunks = np.array_split(s, 10)
        print("  RSS MB per tenth:  " + " ".join(f"{c[:, 1].mean():.0f}" for c in chunks if len(c)))
        print("  open fds per tenth: " + " ".join(f"{c[:, 2].mean():.0f}" for c in chunks if len(c)))
    cpu = ru.ru_utime + ru.ru_stime
    print(f"  CPU (daemons + workers, user+sys): {cpu:.0f} s = {1000 * cpu / max(1, len(good)):.0f} ms per good file")
    print(f"  log lines total: {len(log)}; Tracebacks: {sum('Traceback' in ln for ln in log)}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=2000)
    ap.add_argument("--cadence", type=float, default=0.02, help="seconds between good files")
    ap.add_argument("--bad-every", type=int, default=40, help="one bad path per this many good files")
    ap.add_argument("--kills", type=int, default=4)
    ap.add_argument("--hups", type=int, default=3)
    ap.add_argument("--terms", type=int, default=2)
    ap.add_argument("--full-disk", type=float, default=20.0, help="seconds of full output disk (0: none)")
    ap.add_argument("--tmpfs-mb", type=int, default=200)
    ap.add_argument("--timeout", type=float, default=900.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--workdir", default=None)
    return run(ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

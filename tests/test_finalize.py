"""vampd finalize: collapse statistics by hand, products from hand-written set files, and the
real chain on a simulated night (simulate → vampd run → vampd finalize, twice)."""

import hashlib
import math
import re
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from vampd.finalize.products import collapse_sets, load_set_file, write_final_pdi
from vampd.pdi.stokes import cylindrical_stokes

from conftest import simulate_pdi_night

# ------------------------------------------------------------------------------------------------
# collapse over sets


def test_collapse_median_mean_ivar_by_hand():
    x = np.array([1.0, 2.0, 10.0, np.nan]).reshape(4, 1, 1)
    s = np.array([1.0, 1.0, 2.0, 1.0]).reshape(4, 1, 1)
    d, e, n = collapse_sets(x, s, "median")
    assert d[0, 0] == 2.0 and n[0, 0] == 3  # the NaN set is "no data", not 0
    assert e[0, 0] == pytest.approx(math.sqrt(math.pi / 2) * math.sqrt(6.0) / 3, rel=1e-6)
    d, e, n = collapse_sets(x, s, "mean")
    assert d[0, 0] == pytest.approx(13 / 3) and e[0, 0] == pytest.approx(math.sqrt(6.0) / 3, rel=1e-6)
    d, e, n = collapse_sets(x, s, "ivar")
    assert d[0, 0] == pytest.approx((1 + 2 + 10 / 4) / 2.25) and e[0, 0] == pytest.approx(1 / math.sqrt(2.25), rel=1e-6)
    with pytest.raises(ValueError, match="collapse method"):
        collapse_sets(x, s, "sum")


# ------------------------------------------------------------------------------------------------
# products from hand-written per-set files

N = 48
C = (N - 1) / 2


def _ring(amp=1.0):
    yy, xx = np.mgrid[0:N, 0:N] - C
    r = np.hypot(xx, yy)
    i = 100.0 * np.exp(-0.5 * ((r - 14) / 2.0) ** 2)
    th = np.arctan2(-xx, yy)
    return i, -0.3 * amp * i * np.cos(2 * th), -0.3 * amp * i * np.sin(2 * th)


def _write_set(path, idx, fields, amp, nan_corner=False):
    i, q, u = _ring(amp)
    st = np.stack([i, i, q, u])[None].repeat(len(fields), 0).astype(np.float32)
    if nan_corner:
        st[:, :, :4, :4] = np.nan
    h = fits.Header()
    h["OBJECT"] = "HD1"
    h["MJD"] = 60000.0 + idx * 0.01
    h["TINT"] = 2.0
    h["NCOADD"] = 8
    h["DEROTANG"] = 10.0 * idx
    h["HIERARCH DPP PDI SET KEY"] = f"k{idx}"
    h["HIERARCH DPP PDI NMEMBERS"] = 16
    hdus = [fits.PrimaryHDU(st, header=h), fits.ImageHDU(np.ones_like(st), name="ERR")]
    hdus += [fits.ImageHDU(header=fits.Header({"FIELD": f}), name=f) for f in fields]
    fits.HDUList(hdus).writeto(path)
    return path


@pytest.mark.parametrize("fields", [["F1"], ["F610", "F670"]])
def test_final_products_from_set_files(tmp_path, fields):
    paths = [
        _write_set(tmp_path / f"s{k}.fits", k, fields, amp, nan_corner=k == 0) for k, amp in enumerate((1.0, 0.8, 1.4))
    ]
    sets = [load_set_file(p) for p in paths]
    w = write_final_pdi(tmp_path, "n", sets, "median")
    with fits.open(w["coll"]) as h:
        d, hdr = h[0].data, h[0].header
        assert d.shape == h["ERR"].data.shape == (8, N, N)
        assert hdr["STOKES"] == "I_Q,I_U,Q,U,Q_PHI,U_PHI,LP_I,AOLP" and hdr["DPP PDI NSETS"] == 3
        # NCOADD/TINT: frames and seconds per camera, summed over sets, not divided by nfields
        assert hdr["NCOADD"] == hdr["DPP COADD NCOADD"] == 24 and hdr["TINT"] == hdr["DPP COADD TINT"] == 6.0
        assert hdr["DPP PDI NFILES"] == 48 and all(x.header["NCOADD"] == 24 for x in h[2:])
        assert hdr["DPP PDI COLLAPSE"] == "median" and "DATE" not in hdr
        assert [x.name for x in h[2:]] == fields
    i, q, u = _ring(1.0)  # the median set
    qphi = cylindrical_stokes(q, u, 0 * q, 0 * u)[0]
    np.testing.assert_allclose(d[4][8:, 8:], qphi[8:, 8:], atol=1e-3)
    assert np.all(np.abs(d[5]) < 1e-3)
    # the corner has data from 2 of 3 sets: the median of (0.8, 1.4) scaled, footprint 2/3
    foot = fits.getdata(w["footprint"])
    assert foot.shape == ((N, N) if len(fields) == 1 else (len(fields), N, N))
    assert np.all(foot[..., :4, :4] == pytest.approx(2 / 3)) and np.all(foot[..., 10:, 10:] == 1)
    if len(fields) > 1:
        assert fits.getdata(w["cube"]).shape == (len(fields), 8, N, N)
    else:
        assert "cube" not in w
    assert w["table"].read_text().splitlines()[0].startswith("OBJECT,MJD")
    # the mean option: (1 + 0.8 + 1.4)/3
    w2 = write_final_pdi(tmp_path / "m", "n", sets, "mean")
    np.testing.assert_allclose(fits.getdata(w2["coll"])[4][8:, 8:], qphi[8:, 8:] * 3.2 / 3, atol=1e-3)


# ------------------------------------------------------------------------------------------------
# the real chain on a simulated night


def _digest(root):
    out = {}
    for sub in ("pdi", "aux", "adi", "diff", "report"):
        for p in sorted((root / sub).rglob("*")):
            if p.is_file() and not p.name.startswith("."):
                out[str(p.relative_to(root))] = hashlib.sha1(p.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def night(tmp_path_factory):
    from vampd.cli import main
    from vampd.config.io import save_config
    from vampd.simulate.scene import Scene

    root = tmp_path_factory.mktemp("night")
    ring = Scene(ring_radius_mas=150.0, ring_width_mas=40.0)
    sim, truth, cfg = simulate_pdi_night(
        root / "sim", "n", 96, size=128, nframes=3, ncycles=2, identical_cameras=True, steady_strehl=1.0, scene=ring
    )
    cfg.save_adi_cubes = True
    save_config(cfg, root / "n.toml")
    # the second HWP cycle is cut short: 24 of 32 files → one complete set, one broken at dawn
    files = sorted(str(p) for p in (root / "sim" / "raw").glob("*.fits"))
    files = [f for f in files if int(f[-10:-5]) < 10012]
    # a file cut short by the logger: parked before its header is read (no target, no camera)
    bad = root / "sim" / "raw" / "VMPA00019999.fits"
    bad.write_bytes(Path(files[3]).read_bytes()[:5000])
    out = root / "red"
    assert main(["run", str(root / "n.toml"), *files, str(bad), "-o", str(out), "-j", "2"]) == 1
    assert main(["finalize", str(root / "n.toml"), "-o", str(out)]) == 0
    first = _digest(out)
    assert main(["finalize", str(root / "n.toml"), "-o", str(out)]) == 0
    return {"root": root, "out": out, "truth": truth, "sim": sim, "first": first, "second": _digest(out)}


def _truth_qphi(sim, n):
    """The ring's Q_phi on the pipeline's single-beam scale, convolved with the simulator's PSF core
    (Strehl 1: no halo) on the North-up frame centred on the star."""
    from scipy.signal import fftconvolve

    from vampd.simulate import night as sn
    from vampd.simulate.scene import render_ring

    layout = sn._field_layout(sim)
    fm = sn._field_models(sim, sn._detectors(sim), layout)[1, layout[0]["name"]]
    _i, q, u = render_ring(sim.scene, (n, n), ((n - 1) / 2, (n - 1) / 2), 0.0, fm.pixel_scale)
    qc, uc = fftconvolve(q, fm.core_kernel, mode="same"), fftconvolve(u, fm.core_kernel, mode="same")
    return 0.5 * cylindrical_stokes(qc, uc, 0 * qc, 0 * uc)[0]


@pytest.mark.slow
def test_finalize_products_on_simulated_night(night):
    out = night["out"]
    with fits.open(out / "pdi" / "n_stokes_coll.fits") as h:
        coll, hdr = h[0].data, h[0].header
        n = coll.shape[-1]
        assert coll.shape == h["ERR"].data.shape == (8, n, n) and n >= 96
        assert hdr["DPP PDI NSETS"] == 1 and hdr["DPP PDI NFILES"] == 16 and hdr["DPP PDI COLLAPSE"] == "median"
        # one meaning everywhere: frames (and their seconds) per camera
        assert hdr["NCOADD"] == hdr["DPP COADD NCOADD"] and hdr["TINT"] == hdr["DPP COADD TINT"]
        assert hdr["TINT"] == pytest.approx(hdr["NCOADD"] * hdr["EXPTIME"])
        assert hdr["DPP VERSION"] and len(hdr["DPP CONFIG HASH"]) >= 8
        assert hdr["DPP FINAL NFILES DONE"] == 24 and hdr["DPP FINAL NSETS BROKEN"] == 1
        assert "DATE" not in hdr and hdr["OBJECT"] == "ABAUR"
    # Q_phi of the ring within 1 % of the truth (annulus sum, the star's core excluded)
    truth = _truth_qphi(night["sim"], n)
    yy, xx = np.mgrid[0:n, 0:n] - (n - 1) / 2
    ann = (np.hypot(xx, yy) > 12) & (np.hypot(xx, yy) < 36)
    ratio = np.nansum(coll[4][ann]) / truth[ann].sum()
    assert ratio == pytest.approx(1.0, abs=0.01)
    assert abs(np.nansum(coll[5][ann])) < 0.02 * truth[ann].sum()
    # footprint, Stokes table, header table, ADI cubes: 24 files, 2 cameras → 12 (MJD, FLC) groups
    assert fits.getdata(out / "pdi" / "n_footprint.fits").shape == (n, n)
    assert len((out / "pdi" / "n_stokes_table.csv").read_text().splitlines()) == 2
    table = (out / "aux" / "n_table.csv").read_text().splitlines()
    assert len(table) == 25 and "MJD" in table[0].split(",") and table[0].endswith("path")
    cube = fits.getdata(out / "adi" / "n_adi_cube.fits")
    ang = fits.getdata(out / "adi" / "n_adi_angles.fits")
    assert cube.shape[:2] == (12, 1) and ang.shape == (12,) and ang.dtype.itemsize == 4


@pytest.mark.slow
def test_report_names_targets_sets_and_reasons(night):
    text = (night["out"] / "report" / "report.md").read_text()
    assert "ABAUR" in text and "750-50" in text
    assert "**1 complete**, **1 broken**" in text
    assert "end of night" in text  # the broken set's reason
    assert "pdi/n_stokes_coll.fits" in text and "aux/n_table.csv" in text and "adi/n_adi_cube.fits" in text
    for png in ("n_i.png", "n_q_phi.png", "n_u_phi.png", "metrics_trends.png", "sets_timeline.png", "ip_per_set.png"):
        assert (night["out"] / "report" / png).exists(), png
        assert png in text


@pytest.mark.slow
def test_second_finalize_byte_identical(night):
    first, second = night["first"], night["second"]
    assert any(k.startswith("pdi/") for k in first) and any(k.endswith(".png") for k in first)
    assert first == second


def _previews(night):
    """The final product's planes and preview figures, as the report draws them."""
    from vampd.finalize.previews import (
        PreviewMeta,
        preview_figure,
        preview_planes,
        stokes_limit,
    )

    out = night["out"]
    with fits.open(out / "pdi" / "n_stokes_coll.fits") as h:
        data, hdr = h[0].data.astype(float), h[0].header
    planes = preview_planes(data, hdr["STOKES"].split(","), fits.getdata(out / "pdi" / "n_footprint.fits"))
    meta = PreviewMeta(target="ABAUR", filter="750-50", pixel_scale_mas=hdr["PXSCALE"], unit=hdr["BUNIT"], nsets=1)
    lim = stokes_limit(planes["Q_PHI"])
    return planes, {k: preview_figure(v, k, meta, None if k == "I" else lim) for k, v in planes.items()}


@pytest.mark.slow
def test_every_preview_has_axes_colour_bar_and_symmetric_limits(night):
    planes, figs = _previews(night)
    assert set(figs) == {"I", "Q_PHI", "U_PHI"}
    for key, fig in figs.items():
        ax, cax = fig.axes[0], fig.axes[1]
        assert "arcsec" in ax.get_xlabel() and "arcsec" in ax.get_ylabel()
        assert "e-/s" in cax.get_ylabel() and "ABAUR" in ax.get_title() and "750-50" in ax.get_title()
        assert ax.images and cax.get_ylim()[1] > cax.get_ylim()[0]  # a real colour bar
        lo, hi = ax.images[0].get_clim()
        if key != "I":
            assert lo == pytest.approx(-hi) and hi > 0
            assert "RdBu" in ax.images[0].get_cmap().name
    # axes: arcsec offsets from the star, East (positive dRA) to the left
    ext = figs["Q_PHI"].axes[0].images[0].get_extent()
    n = planes["Q_PHI"].shape[0]
    assert ext[0] > 0 > ext[1] and ext[0] - ext[1] == pytest.approx(
        n * fits.getheader(night["out"] / "pdi" / "n_stokes_coll.fits")["PXSCALE"] / 1000
    )
    # the ring is positive in Q_phi, the background near zero; pixels outside the footprint masked
    q = np.ma.filled(figs["Q_PHI"].axes[0].images[0].get_array().astype(float), np.nan)
    px = night["truth"]["detectors"]["1"]["pixel_scale"]
    yy, xx = np.mgrid[0:n, 0:n] - (n - 1) / 2
    r = np.hypot(xx, yy)
    ring = np.abs(r - 150.0 / px) < 2
    assert np.nanmin(q[ring]) > 0 and np.nanmean(q[ring]) > 0.3 * hi
    assert np.isnan(q[0, 0]) and np.isnan(planes["I"][0, 0])  # the derotated field's corner
    i_img = planes["I"]
    c = n // 2
    assert np.nanmean(i_img[c - 2 : c + 2, c - 2 : c + 2]) > 100 * np.nanmedian(i_img)  # the star


@pytest.mark.slow
def test_report_png_files_and_html(night):
    import matplotlib.image as mpimg

    rdir = night["out"] / "report"
    text = (rdir / "report.md").read_text()
    assert text.splitlines()[2] == "![night summary](n_night_summary.png)"
    html = (rdir / "report.html").read_text()
    assert html.startswith("<!DOCTYPE html>") and '<img alt="night summary" src="n_night_summary.png">' in html
    assert html.count("<table>") == sum(ln.startswith("|---") for ln in text.splitlines()) and "<td>ABAUR</td>" in html
    for png in ("n_night_summary.png", "n_q_phi.png", "metrics_trends.png", "sets_timeline.png"):
        img = mpimg.imread(rdir / png)
        assert img.ndim == 3 and min(img.shape[:2]) >= 200, png


def _md_table(text: str, heading: str) -> list[list[str]]:
    sec = text.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    rows = [ln for ln in sec.splitlines() if ln.startswith("|")]
    cells = [[c.strip() for c in r.strip().strip("|").split("|")] for r in rows]
    assert all(len(c) == len(cells[0]) for c in cells), f"{heading}: ragged table"
    return cells


@pytest.mark.slow
def test_report_tables_match_the_ledger(night):
    import sqlite3

    out = night["out"]
    con = sqlite3.connect(f"file:{out / 'vampd.sqlite'}?mode=ro", uri=True)
    states = dict(con.execute("SELECT state, COUNT(*) FROM files GROUP BY state").fetchall())
    per_cam = dict(con.execute("SELECT camera, COUNT(*) FROM files WHERE state='done' GROUP BY camera").fetchall())
    con.close()
    assert states == {"done": 24, "parked": 1}
    text = (out / "report" / "report.md").read_text()
    counts = _md_table(text, "Counts")
    assert counts[0] == ["state", "files"]
    assert {r[0]: int(r[1]) for r in counts[2:] if not r[0].startswith("**")} == states
    assert counts[-1] == ["**total**", "**25**"]
    targets = _md_table(text, "Targets")
    head = targets[0]
    rows = [dict(zip(head, r)) for r in targets[2:]]
    assert all("None" not in r.values() and "(unknown)" not in r.values() for r in rows)
    assert {(r["target"], r["filter"], int(r["camera"])): int(r["files done"]) for r in rows} == {
        ("ABAUR", "750-50", c): n for c, n in per_cam.items()
    }
    assert sum(int(r["parked"]) for r in rows) == 1  # the truncated file, on its sequence's row
    parked = _md_table(text, "Parked and unfinished files")
    assert parked[2][0] == "`VMPA00019999.fits`" and "END" in parked[2][2] and "/" not in parked[2][2].split(":")[0]


# ------------------------------------------------------------------------------------------------
# finalize while the daemon is still running


def _ledger_rows(out):
    """Files and sets as the ledger holds them (read-only; the daemon table changes by itself)."""
    import sqlite3

    con = sqlite3.connect(f"file:{out / 'vampd.sqlite'}?mode=ro", uri=True, timeout=30)
    try:
        files = con.execute("SELECT path, state, tries, error, t_done FROM files ORDER BY path").fetchall()
        sets = con.execute("SELECT key, state, reason, members FROM sets ORDER BY key").fetchall()
    finally:
        con.close()
    return files, sets


def _wait_for(out, ndone, nsets, proc, timeout=120):
    import sqlite3
    import time

    t0 = time.time()
    while time.time() - t0 < timeout:
        assert proc.poll() is None, "the daemon died"
        if (out / "vampd.sqlite").exists():
            try:
                files, sets = _ledger_rows(out)
            except sqlite3.OperationalError:  # the daemon is still creating the schema
                time.sleep(0.3)
                continue
            if sum(f[1] == "done" for f in files) >= ndone and sum(s[1] == "complete" for s in sets) >= nsets:
                time.sleep(1.0)  # the set trigger runs just after the last record: wait until the rows settle
                if _ledger_rows(out) == (files, sets):
                    return files, sets
                continue
        time.sleep(0.3)
    raise AssertionError(f"daemon did not reach {ndone} done files / {nsets} sets in {timeout} s")


def _drop(src, dest_dir):
    """Copy a raw file in like the logger: a hidden temporary name, then an atomic rename."""
    import os
    import shutil

    tmp = dest_dir / f".{src.name}.part"
    shutil.copyfile(src, tmp)
    os.replace(tmp, dest_dir / src.name)


@pytest.mark.slow
def test_finalize_while_the_daemon_runs(tmp_path, capsys):
    """``vampd finalize`` next to a live ``vampd watch``: it reads one snapshot (20 files, one
    complete set, one open), writes products and report from it, writes nothing to the ledger and
    closes no set; the daemon goes on with the next files and exits 0 on SIGTERM."""
    import os
    import signal
    import subprocess
    import sys

    from vampd.cli import main
    from vampd.config.io import save_config
    from vampd.config.presets import preset_config
    from vampd.simulate.night import SimConfig, simulate_night

    simulate_night(tmp_path / "sim", SimConfig(size=64, nframes=2, ncycles=2, noise_free=True, calib=False))
    raw = sorted((tmp_path / "sim" / "raw").glob("*.fits"), key=lambda p: (p.name[4:], p.name))  # time order
    cfg = preset_config("pdi-triplediff")
    cfg.name = "d"
    cfg.align.crop_width = 56
    cfg.polarimetry.use_ideal_mm = True
    cfg.diff_images.make_diff = False
    for k, v in dict(
        settle_time=0.1,
        complete_timeout=3.0,
        reconcile_interval=2.0,
        stop_timeout=10.0,
        expect_sidecar=False,
        workers=1,
    ).items():
        setattr(cfg.watch, k, v)
    save_config(cfg, tmp_path / "d.toml")
    inbox, out = tmp_path / "in", tmp_path / "out"
    inbox.mkdir()
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
    env.pop("VAMPD_PROCESS", None)
    log = open(tmp_path / "daemon.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "vampd", "watch", str(tmp_path / "d.toml"), "-i", str(inbox), "-o", str(out)],
        env=env,
        stdout=log,
        stderr=log,
    )
    try:
        for p in raw[:20]:  # set 0 (16 files) and 4 members of set 1
            _drop(p, inbox)
        before = _wait_for(out, 20, 1, proc)
        assert sum(s[1] == "open" for s in before[1]) == 1
        capsys.readouterr()
        assert main(["finalize", str(tmp_path / "d.toml"), "-o", str(out)]) == 0
        said = capsys.readouterr().out
        assert f"(daemon pid {proc.pid} still running: snapshot only)" in said
        assert "20 file(s) done" in said and "sets 1 complete, 0 broken, 1 open" in said
        # nothing written to the ledger: no file redone, the open set not closed "end of night"
        assert _ledger_rows(out) == before
        with fits.open(out / "pdi" / "d_stokes_coll.fits") as h:
            assert h[0].header["DPP FINAL NFILES DONE"] == 20 and h[0].header["DPP PDI NSETS"] == 1
            assert h[0].header["DPP PDI COLLAPSE"] == "median"
        report = (out / "report" / "report.md").read_text()
        assert f"daemon pid {proc.pid} was still running" in report
        assert "**1 complete**, **0 broken**, 1 open" in report
        # the daemon goes on: the rest of set 1 completes it
        for p in raw[20:]:
            _drop(p, inbox)
        files, sets = _wait_for(out, 32, 2, proc)
        assert sum(f[1] == "done" for f in files) == 32
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
        log.close()
    assert rc == 0, (tmp_path / "daemon.log").read_text()[-3000:]
    with fits.open(out / "pdi" / "d_stokes_coll.fits") as h:  # the running product moved on
        assert h[0].header["DPP PDI NSETS"] == 2 and h[0].header["DPP PDI COLLAPSE"] == "mean"


# ------------------------------------------------------------------------------------------------
# an MBI night with two targets and specphot, end to end


@pytest.fixture(scope="module")
def mbi_night(tmp_path_factory):
    from vampd.cli import main
    from vampd.config.io import save_config
    from vampd.simulate.scene import Scene

    root = tmp_path_factory.mktemp("mbi")
    ring = Scene(ring_radius_mas=100.0, ring_width_mas=25.0, ring_flux=2e5)
    _sim, truth, cfg = simulate_pdi_night(
        root / "sim", "m", 56, size=64, nframes=2, ncycles=1, mbi=True, targets=("ABAUR", "MWC480"), scene=ring
    )
    cfg.diff_images.make_diff = False
    cfg.specphot.unit = "Jy"
    cfg.specphot.source = "zeropoints"
    save_config(cfg, root / "m.toml")
    files = sorted(str(p) for p in (root / "sim" / "raw").glob("*.fits"))
    out = root / "red"
    import contextlib
    import io

    buf = io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("VAMPD_DATA_DIR", raising=False)  # the built-in zero points
        with contextlib.redirect_stdout(buf):
            assert main(["run", str(root / "m.toml"), *files, "-o", str(out), "-j", "2"]) == 0
        # what exists when `vampd run` returns (before any finalize)
        after_run = sorted(str(p.relative_to(out)) for p in out.rglob("*_jy.fits"))
        assert main(["finalize", str(root / "m.toml"), "-o", str(out)]) == 0
    return {
        "root": root,
        "out": out,
        "truth": truth,
        "nfiles": len(files),
        "after_run": after_run,
        "run_stdout": buf.getvalue(),
    }


@pytest.mark.slow
def test_run_closes_its_sequences_jy_products_exist_when_it_returns(mbi_night):
    """A finished batch is a finished sequence: `vampd run` calibrates the last target's
    sequence too, and says where the products are."""
    out, after = mbi_night["out"], mbi_night["after_run"]
    coadded = sorted(p.name for p in (out / "coadded").glob("*.fits"))
    per_file = [p for p in after if p.startswith("specphot/")]
    assert len(per_file) == len(coadded) == 32  # every file of both targets, in Jy
    with fits.open(out / "specphot" / "m_VMPB00010015_coll_jy.fits") as h:  # the night's last file
        assert h[0].header["BUNIT"] == "Jy" and h[0].header["OBJECT"] == "MWC480"
    line = next(ln for ln in mbi_night["run_stdout"].splitlines() if "spectrophotometry" in ln)
    assert "(Jy): 4 sequence(s) calibrated" in line and str(out / "specphot") in line


MBI_FIELDS = ["F610", "F670", "F720", "F760"]


@pytest.mark.slow
def test_mbi_night_final_cube_per_target(mbi_night):
    out = mbi_night["out"]
    assert mbi_night["nfiles"] == 32
    for target in ("ABAUR", "MWC480"):
        base = out / "pdi" / f"m_{target}_F610-F670-F720-F760"
        with fits.open(f"{base}_stokes_cube.fits") as h:
            cube, n = h[0].data, h[0].data.shape[-1]
            assert cube.shape == h["ERR"].data.shape == (4, 8, n, n) and n >= 56
            assert [x.name for x in h[2:]] == MBI_FIELDS and h[0].header["OBJECT"] == target
            assert h[0].header["DPP PDI NSETS"] == 1 and h[0].header["DPP PDI NFILES"] == 16
            assert h[0].header["NCOADD"] == h[0].header["DPP COADD NCOADD"] == h["F610"].header["NCOADD"]
        with fits.open(f"{base}_stokes_coll.fits") as h:
            assert h[0].data.shape == (8, n, n) and h[0].header["FIELD"] == "COMB"
            # the collapse over fields is their mean
            with np.errstate(invalid="ignore"):
                ok = np.isfinite(cube[:, 2]).all(axis=0)
            np.testing.assert_allclose(
                h[0].data[2][ok], cube[:, 2].mean(axis=0)[ok], rtol=1e-5, atol=1e-6 * np.abs(cube[:, 2][:, ok]).max()
            )
        assert fits.getdata(f"{base}_footprint.fits").shape == (4, n, n)
        # the calibrated cube: every field by its own factor
        with fits.open(f"{base}_stokes_cube_jy.fits") as h:
            fac = [h[0].header[f"DPP FLUX FACTOR {f}"] for f in MBI_FIELDS]
            np.testing.assert_allclose(h[0].data[:, 4], cube[:, 4] * np.asarray(fac)[:, None, None], rtol=1e-5)
            np.testing.assert_array_equal(h[0].data[:, 7], cube[:, 7])  # AOLP stays in rad
    text = (out / "report" / "report.md").read_text()
    assert "**2 complete**, **0 broken**" in text and "ABAUR" in text and "MWC480" in text


@pytest.mark.slow
def test_specphot_summary_per_target(mbi_night):
    """One summary row per target and camera, factor = median over its files of the built-in
    C_FD · 10^(0.4 k AIRMASS)."""
    import csv

    from vampd.engine.ledger import Ledger

    out = mbi_night["out"]
    with open(out / "aux" / "m_specphot_summary.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["target"], r["camera"]) for r in rows] == [
        ("ABAUR", "1"),
        ("ABAUR", "2"),
        ("MWC480", "1"),
        ("MWC480", "2"),
    ]
    led = Ledger(out, readonly=True)
    prods = led.conn.execute(
        "SELECT f.target, f.camera, p.path FROM files f JOIN products p ON p.file = f.path WHERE p.kind = 'coadded'"
    ).fetchall()
    led.close()
    zp = {"F610": (1.40e-06, 0.09034138), "F760": (1.17e-06, 0.031851713)}
    for r in rows:
        assert (
            r["unit"] == "Jy"
            and r["source"] == "zeropoints"
            and r["files"] == "8"
            and r["filter"] == ",".join(MBI_FIELDS)
        )
        x = [float(fits.getheader(p)["AIRMASS"]) for t, c, p in prods if t == r["target"] and str(c) == r["camera"]]
        for f, (c_fd, k) in zp.items():
            assert float(r[f"factor_{f}"]) == pytest.approx(
                np.median([c_fd * 10 ** (0.4 * k * a) for a in x]), rel=1e-5
            )
    text = (out / "report" / "report.md").read_text()
    assert "## Spectrophotometric calibration" in text and text.count("| zeropoints |") == 4


def test_trends_and_summary_use_ut_clock_times():
    """Trend axes are UT clock times (not hours since an MJD); an imaging night's summary is its
    three metric trends; set axes are integers."""
    from vampd.finalize.previews import ip_figure, summary_figure, timeline_figure

    mjd0 = 61004.45
    files = [
        {
            "state": "done",
            "mjd": mjd0 + i / 86400.0 * 30,
            "camera": 1 + i % 2,
            "metrics": {"strehl": 0.8, "fwhm": 3.5, "flux": 1e5 + i},
        }
        for i in range(8)
    ]
    fig = summary_figure("night", None, None, files, [])
    axes = [ax for ax in fig.axes if ax.get_ylabel()]
    assert [ax.get_ylabel() for ax in axes] == ["Strehl", "FWHM [px]", "flux [e-/s]"]
    fig.canvas.draw()
    ticks = [t.get_text() for t in axes[-1].get_xticklabels() if t.get_text()]
    from astropy.time import Time

    first = Time(mjd0, format="mjd", scale="utc").datetime  # 2025-11-25 10:48:00
    assert any(t.startswith(f"{first:%H:%M}") for t in ticks) and all(
        re.fullmatch(r"\d\d:\d\d:\d\d", t) for t in ticks
    ), ticks
    assert axes[-1].get_xlabel() == f"UT on {first:%Y-%m-%d}"
    sets = [
        {"t0": mjd0, "t1": mjd0 + 1e-3, "state": "complete"},
        {"t0": mjd0 + 2e-3, "t1": mjd0 + 3e-3, "state": "broken"},
    ]
    tl = timeline_figure(sets)
    tl.canvas.draw()
    assert [t.get_text() for t in tl.axes[0].get_yticklabels()] == ["0", "1"]
    ip = ip_figure([{"index": 0, "model_pq": 0.01, "model_pu": 0.0, "resid_pq": 1e-4, "resid_pu": 2e-4}])
    ip.canvas.draw()
    assert [t.get_text() for t in ip.axes[0].get_xticklabels()] == ["0"]

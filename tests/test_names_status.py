"""Header text in file names (one rule, :func:`vampd.filenames.safe_part`) and what
``vampd status`` / ``vampd retry`` say about problem files. Real simulated nights, real
ledgers, no mocks."""

from __future__ import annotations

import os

import pytest
from astropy.io import fits

from vampd.filenames import MAX_PART, safe_part

LONG = "V" * 600  # 605 characters with the suffixes below
LONG_A, LONG_B = LONG + "-disk", LONG + "-star"  # differ only at the very end
SLASHED = "HD 163296/b"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("HD 163296/b", "HD_163296_b"),
        ("AB Aur", "AB_Aur"),
        ("F610+F670", "F610+F670"),
        ("../../etc/passwd", "etc_passwd"),
        ("..", "unknown"),
        ("", "unknown"),
        (".hidden", "hidden"),
        ("Ḩα band", "band"),
    ],
)
def test_safe_part_short_values(text, expected):
    assert safe_part(text) == expected


def test_safe_part_long_values_keep_a_prefix_and_a_hash_of_the_whole():
    a, b = safe_part(LONG_A), safe_part(LONG_B)
    assert len(a) == len(b) == MAX_PART
    assert a != b and a[:40] == b[:40] == "V" * 40
    assert safe_part(LONG_A) == a  # stable
    # a long value that sanitises like another still gets its own name (hash of the original)
    assert safe_part("x y" * 40) != safe_part("x/y" * 40)
    assert safe_part("", empty="none") == "none"


def test_group_label_and_factor_file_name_are_bounded():
    from vampd.finalize.products import group_label
    from vampd.specphot.factors import factor_file_name, slug

    lab = group_label(LONG_A, ["F610", "F670"])
    assert lab.endswith("_F610-F670") and len(lab) <= 2 * MAX_PART + 1
    assert group_label(SLASHED, []) == "HD_163296_b"
    assert slug("Jy/arcsec^2") == "jyas2" and slug(SLASHED) == "HD_163296_b"
    name = factor_file_name("n", LONG_B, "Open", 1, "VMPA00010000")
    assert "/" not in name and len(name.encode()) <= 255
    from vampd.engine.leastsq_products import product_paths
    from vampd.engine.leastsq_trigger import _label

    a, b = product_paths("/o", "n", _label(LONG_A, "Open")), product_paths("/o", "n", _label(LONG_B, "Open"))
    assert a["coll"] != b["coll"] and all(len(p.name.encode()) <= 255 for p in a.values())
    assert product_paths("/o", "n", _label(SLASHED, "Open"))["coll"].name == "n_HD_163296_b_Open_stokes_coll.fits"


# -- a simulated night with odd OBJECT values, run and finalize with ADI cubes -----------------


@pytest.fixture(scope="module")
def odd_night(tmp_path_factory):
    from vampd.cli import main
    from vampd.config.io import save_config
    from vampd.config.presets import preset_config
    from vampd.simulate.night import SimConfig, simulate_night

    root = tmp_path_factory.mktemp("names")
    sim = SimConfig(size=64, nframes=2, ncycles=1, noise_free=True, calib=False, targets=("ABAUR", "MWC480", "HD34282"))
    simulate_night(root / "sim", sim)
    rename = {"ABAUR": LONG_A, "MWC480": LONG_B, "HD34282": SLASHED}
    files = sorted((root / "sim" / "raw").glob("*.fits"))
    for p in files:  # the telescope's OBJECT is free text (long-string CONTINUE cards)
        with fits.open(p, mode="update") as h:
            h[0].header["OBJECT"] = rename[h[0].header["OBJECT"]]
    cfg = preset_config("pdi-triplediff")
    cfg.name = "n"
    cfg.align.crop_width = 56
    cfg.polarimetry.use_ideal_mm = True
    cfg.save_adi_cubes = True
    save_config(cfg, root / "n.toml")
    out = root / "red"
    rc_run = main(["run", str(root / "n.toml"), *map(str, files), "-o", str(out), "-j", "2"])
    rc_fin = main(["finalize", str(root / "n.toml"), "-o", str(out)])
    return {"out": out, "rc": (rc_run, rc_fin), "nfiles": len(files)}


def test_odd_objects_run_and_finalize(odd_night):
    out = odd_night["out"]
    assert odd_night["rc"] == (0, 0)
    real = out.resolve()
    every = [p for p in real.rglob("*")]
    assert every
    for p in every:
        assert len(p.name.encode()) <= 255, p.name
        assert p.resolve().is_relative_to(real)  # nothing escaped through "/" or ".."
    adi = sorted(p.name for p in (out / "adi").glob("*_adi_cube.fits"))
    labels = [safe_part(LONG_A), safe_part(LONG_B), "HD_163296_b"]
    assert adi == sorted(f"n_{lab}_adi_cube.fits" for lab in labels)
    assert len(set(adi)) == 3  # the two long objects differing at the end are two files
    for lab, obj in zip(labels, (LONG_A, LONG_B, SLASHED), strict=True):
        # the final Stokes product of each target keeps the full OBJECT; only its name is short
        coll = out / "pdi" / f"n_{lab}_750-50_stokes_coll.fits"
        assert fits.getheader(coll)["OBJECT"] == obj
    assert not (out / "adi" / "HD 163296").exists() and not (out / "pdi" / "HD 163296").exists()
    assert os.path.isdir(out / "report")


# -- vampd status / vampd retry on a real ledger -------------------------------------------------


@pytest.fixture
def problem_night(tmp_path):
    """A batch run with a truncated FITS (parked: rejected, its header is cut) and a file that failed transiently
    (recorded through the ledger as the runner does, with a 10-minute backoff)."""
    from vampd.cli import main
    from vampd.config.io import save_config
    from vampd.config.presets import preset_config
    from vampd.engine.ledger import Ledger
    from vampd.simulate.night import SimConfig, simulate_night

    simulate_night(tmp_path / "sim", SimConfig(size=32, nframes=1, ncycles=1, noise_free=True, calib=False))
    files = sorted((tmp_path / "sim" / "raw").glob("*.fits"))
    bad = files[0].with_name("VMPA00019999.fits")
    bad.write_bytes(files[0].read_bytes()[:5000])
    save_config(preset_config("quicklook", "q"), tmp_path / "q.toml")
    out = tmp_path / "red"
    assert main(["run", str(tmp_path / "q.toml"), str(files[0]), str(bad), "-o", str(out), "-j", "1"]) == 1
    flaky = str(files[1])
    with Ledger(out) as led:
        assert led.record_failure(flaky, f"{flaky}: worker lost", 3, kind="transient", backoff=600.0) == "failed"
    return {"out": out, "bad": str(bad), "flaky": flaky}


def test_status_shows_error_kind_and_next_retry(problem_night, capsys):
    import json
    import re

    from vampd.cli import main

    out = problem_night["out"]
    capsys.readouterr()
    assert main(["status", str(out)]) == 0
    text = capsys.readouterr().out
    parked = next(ln for ln in text.splitlines() if "VMPA00019999.fits" in ln)
    assert (
        parked
        == "parked  VMPA00019999.fits (parked: rejected; tries 1): header incomplete: no END card in the first 5000 bytes"
    )
    name = os.path.basename(problem_night["flaky"])
    failed = next(ln for ln in text.splitlines() if name in ln)
    m = re.fullmatch(rf"failed  {name} \(transient, retry in (\d+) s; tries 1\): worker lost", failed)
    assert m and 500 < int(m.group(1)) <= 600, failed

    assert main(["status", str(out), "--json"]) == 0
    errs = {os.path.basename(e["path"]): e for e in json.loads(capsys.readouterr().out)["errors"]}
    assert set(errs) == {"VMPA00019999.fits", name}
    p = errs["VMPA00019999.fits"]
    assert (p["state"], p["error_kind"], p["t_retry"], p["retry_in"]) == ("parked", "rejected", None, None)
    f = errs[name]
    assert (f["state"], f["error_kind"]) == ("failed", "transient")
    assert 500 < f["retry_in"] <= 600 and re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", f["t_retry"])


def test_retry_lists_the_files_it_requeued(problem_night, capsys):
    from vampd.cli import main
    from vampd.engine.ledger import Ledger

    out = problem_night["out"]
    capsys.readouterr()
    assert main(["retry", str(out), "--kind", "rejected"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("vampd retry: 1 file(s) back to pending in ")
    assert lines[1:] == [f"  {problem_night['bad']}"]
    assert main(["retry", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("vampd retry: 1 file(s) back to pending") and lines[1:] == [
        f"  {problem_night['flaky']}"
    ]
    with Ledger(out, readonly=True) as led:
        assert [led.get(p)["state"] for p in (problem_night["bad"], problem_night["flaky"])] == ["pending"] * 2
    assert main(["retry", str(out)]) == 0
    assert capsys.readouterr().out.splitlines()[1:] == []  # nothing left to re-queue


def test_demo_summary_counts_only_what_is_there():
    from vampd.watch.demo import demo_summary

    ok = {"files": {"total": 16, "done": 16, "failed": 0, "parked": 0}, "sets": {"complete": 1, "broken": 0}}
    assert demo_summary(ok) == "vampd demo: 16 of 16 files reduced; 1 HWP set complete"
    bad = {"files": {"total": 16, "done": 12, "failed": 4, "parked": 3}, "sets": {"complete": 0, "broken": 2}}
    assert (
        demo_summary(bad) == "vampd demo: 12 of 16 files reduced, 3 parked, 1 to retry; 0 HWP sets complete, 2 broken"
    )

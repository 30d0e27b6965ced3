"""HWP-set assembly (vampd.pdi.sets): tolerant matching, any arrival order, gaps, duplicates."""

import random

import pytest

from vampd.pdi.sets import all_slots, assemble_sets, nominal_hwp, slot_label

HWP = (0.0, 45.0, 22.5, 67.5)
DT = 10.0 / 86400  # 10 s per HWP position


def night(ncycles=2, mode="triplediff", hwp_values=None, target="T", start=0):
    """Member records of ``ncycles`` complete HWP cycles in observing order."""
    recs = []
    fid = start
    for c in range(ncycles):
        for k, h in enumerate(HWP):
            hv = hwp_values.get(h, h) if hwp_values else h
            t0 = 60000.0 + (c * 4 + k) * DT
            flcs = ("A", "B") if mode == "triplediff" else ("NA",)
            for j, flc in enumerate(flcs):
                for cam in (1, 2):
                    recs.append(
                        {
                            "path": f"/raw/VMP{'AB'[cam - 1]}{fid + j:08d}.fits",
                            "camera": cam,
                            "flc": flc,
                            "hwp": hv,
                            "mjd": t0 + j * 1e-6,
                            "target": target,
                            "filter": "750-50",
                            "state": "done",
                        }
                    )
            fid += len(flcs)
    return recs


def test_nominal_hwp_tolerance():
    assert nominal_hwp(22.49, 0.1) == 22.5
    assert nominal_hwp(67.35, 0.1) is None
    assert nominal_hwp(89.95, 0.1) == 0.0  # modulo 90
    assert nominal_hwp(None) is None


def test_complete_sequence_and_shuffled_order_give_same_keys():
    recs = night(3)
    a = assemble_sets(recs)
    assert len(a.complete) == 3 and not a.open and not a.broken
    assert a.complete[0].key == "triplediff:T:750-50:VMPA00000000"
    shuffled = recs[:]
    random.Random(1).shuffle(shuffled)
    b = assemble_sets(shuffled)
    assert [s.key for s in b.complete] == [s.key for s in a.complete]
    assert [s.paths for s in b.complete] == [s.paths for s in a.complete]
    # each set holds one member per slot, cycle by cycle
    for i, s in enumerate(a.complete):
        assert sorted(s.members) == sorted(all_slots("triplediff"))
        assert {m["path"] for m in s.members.values()} == {r["path"] for r in recs[16 * i : 16 * (i + 1)]}


def test_hwp_2249_matches_within_tolerance_but_not_with_exact_equality():
    recs = night(1, hwp_values={22.5: 22.49})
    assert len(assemble_sets(recs, tolerance=0.1).complete) == 1
    strict = assemble_sets(recs, tolerance=0.001, final=True)
    assert not strict.complete
    assert len(strict.rejected) == 4 and "22.49" in strict.rejected[0][1]
    assert strict.broken[0].reason == "end of night"
    assert set(strict.broken[0].missing) == {slot_label((22.5, f, c)) for f in "AB" for c in (1, 2)}


def test_missing_member_breaks_one_set_and_recovers_the_next():
    recs = night(3)
    lost = recs[5]  # HWP 45 FLC A cam2 of cycle 0
    recs = [r for r in recs if r is not lost]
    a = assemble_sets(recs)
    assert len(a.broken) >= 1
    br = a.broken[0]
    assert br.reason.startswith("hwp moved on")
    assert slot_label((45.0, "A", 2)) in br.missing
    # the reference's windows would lose the cycle; here the following data still form 2 sets
    assert len(a.complete) == 2
    for s in a.complete:
        assert lost["path"] not in s.paths and len(s.members) == 16


def test_duplicate_record_is_skipped():
    recs = night(1)
    dup = dict(recs[3], path="/raw/copy_of_VMPB00000001.fits")
    a = assemble_sets(recs + [dup])
    assert len(a.complete) == 1
    assert a.complete[0].duplicates == [dup["path"]]
    assert dup["path"] not in a.complete[0].paths


def test_open_then_timeout_then_end_of_night():
    recs = night(1)[:10]
    a = assemble_sets(recs, timeout=900)
    assert len(a.open) == 1 and not a.broken
    assert len(a.open[0].missing) == 6
    later = dict(recs[0], path="/raw/VMPA99999999.fits", hwp=10.0, mjd=recs[-1]["mjd"] + 2000 / 86400)
    b = assemble_sets(recs + [later], timeout=900)
    assert b.broken and b.broken[0].reason.startswith("timeout")
    c = assemble_sets(recs, final=True)
    assert c.broken[0].reason == "end of night"


def test_target_change_breaks_open_set():
    recs = night(1)[:12] + night(1, target="U", start=100)
    for r in recs[12:]:
        r["mjd"] += 0.01
    a = assemble_sets(recs)
    assert [s.target for s in a.complete] == ["U"]
    assert a.broken[0].target == "T" and a.broken[0].reason == "target changed"


def test_parked_member_breaks_set():
    recs = night(1)
    recs[7] = dict(recs[7], state="parked")
    a = assemble_sets(recs)
    assert not a.complete
    assert a.broken[0].reason.startswith("member failed") and "VMPB00000003" in a.broken[0].reason


def test_locked_members_excluded_and_doublediff():
    recs = night(2, mode="doublediff")
    a = assemble_sets(recs, mode="doublediff")
    assert len(a.complete) == 2 and all(len(s.members) == 8 for s in a.complete)
    b = assemble_sets(recs, mode="doublediff", locked={a.complete[0].key: a.complete[0].paths})
    assert [s.key for s in b.complete] == [a.complete[1].key]


def test_bad_mode():
    with pytest.raises(ValueError, match="polarimetry.method"):
        assemble_sets([], mode="leastsq")


def test_missing_member_breaks_exactly_one_set_with_all_others():
    """A missing file in the middle of cycle 1 breaks that cycle's set once (15 members), not a
    cascade of slides; cycles 0 and 2 complete."""
    recs = night(3)
    lost = recs[16 + 9]
    a = assemble_sets([r for r in recs if r is not lost])
    assert len(a.complete) == 2 and len(a.broken) == 1
    assert len(a.broken[0].members) == 15 and a.broken[0].missing == [slot_label((22.5, "A", 2))]
    assert a.broken[0].reason.startswith("hwp moved on: HWP 0 FLC A cam1 again in")


def test_data_starting_mid_cycle_form_the_reference_window():
    """Data start at HWP 45: like the reference's consecutive window, the first 16 members in
    time (45/22.5/67.5 of cycle 0 and HWP 0 of cycle 1) form a set; the rest of cycle 1 stays open."""
    recs = night(2)[4:]
    a = assemble_sets(recs)
    assert len(a.complete) == 1 and not a.broken
    assert sorted(a.complete[0].paths) == sorted(r["path"] for r in recs[:16])
    assert len(a.open) == 1 and sorted(a.open[0].paths) == sorted(r["path"] for r in recs[16:])


def test_kth_cube_sets_and_horizon():
    """Two cubes per slot: cube k of every slot forms set k; a set waits for earlier arrivals."""
    from vampd.pdi.blocks import cube_index

    recs = []
    for r in night(1):
        for k in range(2):
            recs.append(dict(r, path=r["path"].replace(".fits", f"_{k}.fits"), mjd=r["mjd"] + k * 1e-5, t_complete=1.0))
    random.Random(4).shuffle(recs)
    ci = cube_index(recs)
    a = assemble_sets(recs, cube_of=ci)
    assert len(a.complete) == 2 and not a.broken
    assert {tuple(sorted({p[-7:-5] for p in s.paths})) for s in a.complete} == {("_0",), ("_1",)}
    w = assemble_sets(recs, cube_of=ci, horizon=0.5)
    assert not w.complete and {s.reason for s in w.open} == {"waiting for earlier files"}

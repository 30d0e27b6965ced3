"""Streaming least-squares polarimetry in the engine (``polarimetry.method = "leastsq"``, issue 13).

After every recorded file the engine calls :func:`on_file_done` (through the PDI trigger), which
runs :func:`sync`: the cubes that should be in the normal equations (done files with a coadded
product, grouped per target and filter) are compared with the cubes that are in them (the
ledger's ``lsq_members``), and the difference is applied: new cubes are added, cubes whose
product or least-squares configuration changed (a redone file, a new Mueller table) are
subtracted and re-added, cubes no longer done are subtracted. The science is in
:mod:`vampd.pdi.leastsq`.

Exactly once (shadow paging). An accumulator *generation* is an immutable NPZ
``pdi/leastsq/{name}_{group}_acc_{gen:06d}.npz``. One ledger transaction (:meth:`Ledger.lsq_commit`)
moves the group's ``lsq_acc`` row to the new generation (path, SHA-1 digest of its arrays) and
rewrites the member rows it contains. So

* kill -9 before the commit: the ledger still names generation g, whose file is untouched; the
  new file is an orphan (deleted later) and the cubes are added again on restart;
* kill -9 after the commit: the ledger names g+1, which is complete on disk (atomic rename, fsync);
  old generations are garbage-collected only after the commit.

A cube's contribution (w = 1/σ², w·d, its Mueller rows) is written once to
``pdi/leastsq/contrib/…_{token}.npz`` before it is added, so it can be subtracted exactly as it was
added even after its product was overwritten. A generation file that is missing or whose digest
differs from the ledger's is rebuilt from the contributions of the recorded members.

Products: the solve is cheap (closed-form 3×3 inverse per pixel) and runs after every change to
update the Q_φ S/N in the ledger; the running products (``pdi/{name}_stokes_coll.fits`` of the
group just updated, plus ``pdi/{name}_{group}_stokes_coll.fits`` when the night has several groups,
MBI cube, footprint, specphot companions) are rewritten every ``leastsq_refresh_files`` generations or
``leastsq_refresh_seconds`` seconds (also from :func:`tick`, the daemon's reconciliation), at the end of
a batch run and always at finalize.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from pathlib import Path

import numpy as np
from astropy.io import fits

from vampd.fitsio import output_stem, save_npz_atomic
from vampd.imaging import derotate
from vampd.pdi.leastsq import Contribution, LeastSqAccumulator, contribution
from vampd.pdi.mmfiles import file_mueller
from vampd.pdi.process import load_member

__all__ = ["lsq_enabled", "group_key", "sync", "on_file_done", "on_finalize", "cube_contribution", "load_accumulator"]

log = logging.getLogger("vampd.pdi")
_CACHE: dict[tuple[str, str], tuple[int, LeastSqAccumulator]] = {}
_CONFIG_KEYS = ("derotate", "hwp_adi_sync", "use_ideal_mm", "mm_table", "leastsq_weights")


def lsq_enabled(cfg) -> bool:
    pc = getattr(cfg, "polarimetry", None)
    return pc is not None and pc.method == "leastsq"


def _name(cfg) -> str:
    return cfg.name or "vampd"


def group_key(name: str, target, filt) -> str:
    """One accumulator per run name, target and filter."""
    return f"{name}|{target or 'unknown'}|{filt or 'unknown'}"


def _label(target, filt) -> str:
    from vampd.finalize.products import group_label

    return group_label(str(target or "unknown"), [str(filt or "unknown")])


def lsq_dir(outdir) -> Path:
    return Path(outdir) / "pdi" / "leastsq"


def _config_hash(pcfg) -> str:
    """What a cube's contribution depends on besides its product (Mueller model, derotation)."""
    d = {k: getattr(pcfg, k, None) for k in _CONFIG_KEYS}
    table = d.get("mm_table")
    if table is not None and Path(table).exists():
        st = Path(table).stat()
        d["mm_table_stat"] = (st.st_size, st.st_mtime_ns)
    return hashlib.sha1(json.dumps(d, default=str, sort_keys=True).encode()).hexdigest()[:12]


def _token(rec, chash: str) -> str:
    s = f"{rec['product']}|{rec['mtime_ns']}|{rec['size']}|{chash}"
    return hashlib.sha1(s.encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------------
# per cube


def cube_contribution(product, pcfg) -> tuple[Contribution, list[str], fits.Header]:
    """Derotated least-squares terms of one coadded product (data by cubic spline, variance
    linearly, as :mod:`vampd.pdi.process` does) and the Mueller first rows of its fields.

    Raises
    ------
    vampd.pdi.process.SetInvalid, vampd.instrument.headers.HeaderError
        Unreadable product, missing keyword for the Mueller model.
    """
    m = load_member(product)
    mm, _desc = file_mueller(m.header, m.fields, pcfg, path=product)
    var = np.square(m.err, dtype=np.float32)
    if pcfg.derotate:
        ang = float(m.header.get("DEROTANG", 0.0))
        data, var = derotate(m.data, ang, order=3), derotate(var, ang, order=1)
    else:
        data = m.data
    tint = float(m.header.get("TINT", 0.0) or 0.0)
    return contribution(data, var, mm, tint, getattr(pcfg, "leastsq_weights", "equal")), m.fields, m.header


def _contrib_path(outdir, name: str, product, token: str) -> Path:
    return lsq_dir(outdir) / "contrib" / f"{name}_{output_stem(product)}_{token}.npz"


def _load_contrib(path) -> Contribution:
    with np.load(path, allow_pickle=False) as z:
        return Contribution.from_arrays(z)


# ------------------------------------------------------------------------------------------------
# accumulator generations


def _gen_path(outdir, name: str, label: str, gen: int) -> Path:
    return lsq_dir(outdir) / f"{name}_{label}_acc_{gen:06d}.npz"


def load_accumulator(ledger, outdir, key: str) -> tuple[int, LeastSqAccumulator | None]:
    """The generation the ledger names for ``key`` and its accumulator (``(0, None)`` if none).

    Raises ``ValueError`` if the file is missing or its digest differs from the ledger's."""
    row = next((r for r in ledger.lsq_accumulators() if r["key"] == key), None)
    if row is None:
        return 0, None
    cached = _CACHE.get((str(outdir), key))
    if cached is not None and cached[0] == row["gen"]:
        return row["gen"], cached[1]
    path = Path(row["path"])
    if not path.exists():
        raise ValueError(f"{path.name}: accumulator generation {row['gen']} named by the ledger is missing")
    with np.load(path, allow_pickle=False) as z:
        acc = LeastSqAccumulator.from_arrays(z)
    if acc.digest() != row["digest"]:
        raise ValueError(f"{path.name}: digest differs from the ledger's (generation {row['gen']})")
    _CACHE[(str(outdir), key)] = (row["gen"], acc)
    return row["gen"], acc


def _rebuild(ledger, outdir, name: str, key: str, members: dict, pcfg) -> LeastSqAccumulator:
    """Accumulator of the recorded members from their contribution files (recomputed if lost)."""
    acc = LeastSqAccumulator()
    for f, r in members.items():
        if r["error"] is not None:
            continue
        c = _load_contrib(r["contrib"]) if r["contrib"] and os.path.exists(r["contrib"]) else None
        if c is None:
            prod = next((x["product"] for x in ledger.lsq_inputs() if x["file"] == f), None)
            if prod is None:
                raise ValueError(f"{Path(f).name}: contribution lost and no product to recompute it")
            c = cube_contribution(prod, pcfg)[0]
        acc.add(c)
    return acc


def _gc(outdir, name: str, label: str, keep: Path, contribs: list[str]) -> None:
    """Delete older generations of a group and contributions no longer referenced."""
    for p in lsq_dir(outdir).glob(f"{name}_{label}_acc_*.npz"):
        if p != keep:
            p.unlink(missing_ok=True)
    for c in contribs:
        if c:
            Path(c).unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------------
# sync


def _desired(ledger, name: str, chash: str) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for r in ledger.lsq_inputs():
        rec = dict(r)
        rec["token"] = _token(rec, chash)
        out.setdefault(group_key(name, rec["target"], rec["filter"]), {})[rec["file"]] = rec
    return out


def _apply(ledger, cfg, outdir, key: str, want: dict, have: dict) -> dict | None:
    """Bring one group's accumulator to ``want``; returns a change summary (None: nothing to do)."""
    name, pcfg = _name(cfg), cfg.polarimetry
    remove = [f for f, r in have.items() if f not in want or want[f]["token"] != r["token"]]
    add = [f for f, r in want.items() if f not in have or have[f]["token"] != r["token"]]
    if not remove and not add:
        return None
    target, filt = key.split("|")[1:]
    label = _label(target, filt)
    try:
        gen, acc = load_accumulator(ledger, outdir, key)
    except (ValueError, OSError) as exc:
        log.warning("least squares %s: %s; rebuilding from the contributions", key, exc)
        ledger.event("warning", f"least squares {key}: {exc}; rebuilt from the cube contributions")
        gen = next((r["gen"] for r in ledger.lsq_accumulators() if r["key"] == key), 0)
        acc = _rebuild(ledger, outdir, name, key, have, pcfg)
    acc = acc if acc is not None else LeastSqAccumulator()
    work = LeastSqAccumulator()  # copy: the cached generation stays valid until the commit
    work.a, work.b, work.n, work.c = (None if x is None else x.copy() for x in (acc.a, acc.b, acc.n, acc.c))
    work.tint, work.ncubes = acc.tint, acc.ncubes
    dropped = []
    for f in remove:
        r = have[f]
        if r["error"] is None:
            work.add(_load_contrib(r["contrib"]), sign=-1)
        dropped.append(r["contrib"])
    rows, errors, fields = [], [], None
    for f in add:
        rec = want[f]
        row = {
            "file": f,
            "token": rec["token"],
            "gen": gen + 1,
            "camera": rec["camera"],
            "flc": rec["flc"],
            "hwp": rec["hwp"],
            "mjd": rec["mjd"],
            "contrib": None,
            "error": None,
        }
        try:
            c, fields_f, _h = cube_contribution(rec["product"], pcfg)
            if work.shape is not None and work.shape != c.w.shape:
                raise ValueError(f"cube of shape {c.w.shape}, the {target} {filt} accumulator holds {work.shape}")
            cpath = _contrib_path(outdir, name, rec["product"], rec["token"])
            save_npz_atomic(cpath, compress=False, sync_dir=False, **c.arrays())
            work.add(c)
            row["contrib"] = str(cpath)
            fields = fields_f
        except Exception as exc:  # noqa: BLE001 -- one bad cube is reported, the rest go on
            row["error"] = f"{Path(f).name}: {exc}"
            errors.append(row["error"])
            ledger.event("error", f"least squares: {row['error']}")
        rows.append(row)
    if fields is None:
        old = next((r for r in ledger.lsq_accumulators() if r["key"] == key), None)
        fields = json.loads(old["fields"]) if old is not None and old["fields"] else []
    path = _gen_path(outdir, name, label, gen + 1)
    save_npz_atomic(path, compress=False, **work.arrays())
    ledger.lsq_commit(
        key,
        {
            "name": name,
            "target": target,
            "filter": filt,
            "gen": gen + 1,
            "path": str(path),
            "digest": work.digest(),
            "ncubes": work.ncubes,
            "fields": json.dumps(fields),
            "shape": json.dumps(work.shape),
        },
        rows,
        [f for f in remove if f not in add],
    )
    _CACHE[(str(outdir), key)] = (gen + 1, work)
    _gc(outdir, name, label, path, [c for c in dropped if c])
    return {"key": key, "added": len(add), "removed": len(remove), "errors": errors, "ncubes": work.ncubes}


def sync(ledger, cfg, outdir, final: bool = False, refresh: bool = True) -> dict:
    """Apply every pending change to the accumulators, then solve/refresh (see the module docstring).

    Returns ``{"changed": [...], "solved": [...]}``.
    """
    from vampd.engine.leastsq_products import refresh_group

    if not lsq_enabled(cfg):
        return {}
    ledger.lsq_schema()
    name = _name(cfg)
    want = _desired(ledger, name, _config_hash(cfg.polarimetry))
    have: dict[str, dict] = {}
    for r in ledger.lsq_members():
        if r["key"].startswith(name + "|"):
            have.setdefault(r["key"], {})[r["file"]] = dict(r)
    changed = []
    for key in sorted(set(want) | set(have)):
        ch = _apply(ledger, cfg, outdir, key, want.get(key, {}), have.get(key, {}))
        if ch is not None:
            changed.append(ch)
    out = {"changed": changed, "solved": []}
    if not refresh:
        return out
    keys = [c["key"] for c in changed] if not final else [r["key"] for r in ledger.lsq_accumulators(name)]
    for key in keys:
        try:
            out["solved"].append(refresh_group(ledger, cfg, outdir, key, force=final))
        except Exception as exc:  # noqa: BLE001 -- the accumulator stands; the next call retries
            log.exception("least squares %s: products not written", key)
            ledger.event("error", f"least squares {key}: products not written: {exc}")
    return out


def on_file_done(ledger, cfg, outdir, path: str) -> dict:
    """Engine hook after ``path`` was recorded (done or parked): add what changed."""
    return sync(ledger, cfg, outdir)


def on_finalize(ledger, cfg, outdir) -> dict:
    """End of night: apply pending changes and write every group's products."""
    return sync(ledger, cfg, outdir, final=True)


def accumulator_age(row) -> float:
    """Seconds since the group's products were last refreshed (inf if never)."""
    t = row["solved_at"] if row is not None else None
    return math.inf if not t else time.time() - float(t)


def tick(ledger, cfg, outdir, idle: bool = False) -> list[dict]:
    """Refresh groups whose products lag their accumulator generation: older than ``leastsq_refresh_seconds``
    (the daemon's reconciliation tick) or at once with ``idle`` (end of a batch run). Never raises."""
    from vampd.engine.leastsq_products import refresh_group

    if not lsq_enabled(cfg):
        return []
    out = []
    try:
        for r in ledger.lsq_accumulators(_name(cfg)):
            if r["gen"] != json.loads(r["stats"] or "{}").get("gen") and (
                idle or accumulator_age(r) >= cfg.polarimetry.leastsq_refresh_seconds
            ):
                out.append(refresh_group(ledger, cfg, outdir, r["key"], force=True))
    except Exception as exc:  # noqa: BLE001 -- advisory refresh; the next file or tick retries
        log.exception("least squares refresh failed")
        ledger.event("error", f"least squares refresh failed: {exc}")
    return out

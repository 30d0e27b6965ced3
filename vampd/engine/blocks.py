"""Streaming ``combine.method = "pdi"``: HWP blocks in the ledger and their coadd jobs (docs/instrument.md §7.1, §14).

Every cube is reduced on arrival as usual (its selected, aligned frames are also kept on disk as
its ``aligned`` product). After each file the trigger rebuilds the blocks of the not yet closed
cubes (:func:`vampd.pdi.blocks.split_blocks`) and records them in the ledger's ``blocks`` table:
``open`` → ``ready`` (closed, to coadd) → ``running`` → ``done`` (product written) or ``failed``.
Ready blocks are coadded as jobs of the worker pool (:func:`pump_blocks`, job function
:func:`coadd_block_job`), never on the ledger thread; the product
``coadded/{name}_{run:03d}_cam{cam}_FLC{flc}_coll.fits`` (the reference's group key, docs/instrument.md §7.1) is the
HWP-set member. Closed blocks are permanent: a kill -9 leaves them ``ready``/``running`` and
the restarted daemon coadds them again from the same cubes in the same order (same bytes).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from astropy.io import fits

from vampd.engine.pool import BLOCK_PREFIX
from vampd.fitsio import output_stem
from vampd.pdi.blocks import Block, block_name, split_blocks

__all__ = [
    "BLOCK_PREFIX",
    "blocks_enabled",
    "update_blocks",
    "pump_blocks",
    "record_block",
    "end_of_batch",
    "run_ready_inline",
    "block_members",
    "coadd_block",
    "coadd_block_job",
]

log = logging.getLogger("vampd.pdi")
_JOB = "vampd.engine.blocks:coadd_block_job"
_CHUNK_BYTES = 64 << 20
_WINDOW_DAYS = 0.01  # taken rows older than the oldest free one by more than this cannot matter


def blocks_enabled(cfg) -> bool:
    """``combine.method = "pdi"`` with polarimetry on."""
    return getattr(cfg, "polarimetry", None) is not None and getattr(cfg.combine, "method", "cube") == "pdi"


def _name(cfg) -> str:
    return cfg.name or "vampd"


def _tol(cfg) -> float:
    return float(cfg.polarimetry.hwp_tolerance)


# ------------------------------------------------------------------------------------------------
# ledger side (parent process)


def update_blocks(ledger, cfg, outdir, final: bool = False, now: float | None = None) -> dict:
    """Rebuild the open blocks from the ledger; record newly closed ones as ``ready``.

    ``now``: the daemon's wall-clock check (:func:`vampd.engine.pdi_trigger.check_timeouts`): a
    block without a new cube for ``polarimetry.set_timeout`` s closes. A new block right after a
    block of the same stream and HWP angle that closed by timeout is a late cube: warned.
    Returns ``{"closed": [keys], "open": n}``.
    """
    old = {r["key"]: r for r in ledger.block_rows("open")}
    cands = [f for f in ledger.pdi_files(_WINDOW_DAYS) if f["state"] == "done" and f["taken"] is None]
    blocks = split_blocks(cands, _tol(cfg), cfg.polarimetry.set_timeout, final, ledger.unfinished_horizon(), now)
    closed, current = [], set()
    for b in blocks:
        if b.key not in old:
            _warn_late(ledger, b)
        row = {
            "camera": b.camera,
            "flc": b.flc,
            "hwp": b.hwp,
            "target": b.target,
            "filter": b.filter,
            "members": b.paths,
            "nframes": _nframes(b),
            "mjd": b.mjd,
            "t_complete": b.t_complete,
            "mtime_ns": max(int(m.get("mtime_ns") or 0) for m in b.members) or None,
        }
        if b.closed:
            run = ledger.next_block_run(b.camera, b.flc)
            product = Path(outdir) / "coadded" / block_name(_name(cfg), run, b.camera, b.flc)
            row.update(state="ready", run=run, reason=b.reason, product=str(product))
            closed.append(b.key)
            # closed blocks are permanent: row and membership in one transaction
            ledger.upsert_block(b.key, row, take=b.paths)
            ledger.event("info", f"HWP block {b.label()} closed with {len(b.members)} cube(s): {b.reason}")
            continue
        current.add(b.key)
        row.update(state="open", reason=None)
        r = old.get(b.key)
        if r is None or json.loads(r["members"] or "[]") != b.paths:
            ledger.upsert_block(b.key, row)
    ledger.delete_blocks([k for k in old if k not in current and k not in closed])
    return {"closed": closed, "open": len(current)}


def _warn_late(ledger, b: Block) -> None:
    """A new block whose stream's previous block (same HWP angle and target) closed by timeout:
    its first cube came too late for that block, which stays as it was (closed blocks are
    permanent); the cube starts a block of its own."""
    prev = [
        r
        for r in ledger.block_rows(("ready", "running", "done", "failed"))
        if (r["camera"], r["flc"]) == (b.camera, b.flc) and (r["mjd"] or 0.0) < b.mjd
    ]
    if not prev:
        return
    p = prev[-1]  # rows are in time order
    if (p["hwp"], p["target"] or "", p["filter"] or "") != (b.hwp, b.target, b.filter):
        return
    if not str(p["reason"] or "").startswith("timeout"):
        return
    name = Path(b.paths[0]).name
    msg = f"late cube {name}: HWP block {b.label()} ({p['key']}) was already closed by {p['reason']}; not added to it"
    log.warning(msg)
    ledger.event("warning", msg)


def _nframes(b: Block) -> int:
    return int(sum(int(m.get("nframes") or 0) for m in b.members))


def _products_of(ledger, paths: list[str], kind: str) -> list[str]:
    out = []
    for p in paths:
        prods = [r["path"] for r in ledger.products(p) if r["kind"] == kind]
        if not prods:
            raise FileNotFoundError(f"{Path(p).name}: no {kind} product recorded")
        out.append(prods[0])
    return out


def _spec_path(outdir, key: str) -> Path:
    return Path(outdir) / ".blocks" / (key.replace(":", "_").replace("/", "_") + ".json")


def _spec(ledger, row, outdir) -> Path:
    """Write the job description of a block (members' products, output path) for a worker."""
    paths = json.loads(row["members"] or "[]")
    spec = {
        "key": row["key"],
        "product": row["product"],
        "run": row["run"],
        "camera": row["camera"],
        "flc": row["flc"],
        "aligned": _products_of(ledger, paths, "aligned"),
        "coadded": _products_of(ledger, paths, "coadded"),
        "members": paths,
    }
    path = _spec_path(outdir, row["key"])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(spec, indent=1))
    os.replace(tmp, path)
    return path


def pump_blocks(runner) -> int:
    """Submit ready blocks (and blocks left ``running`` by a crash) to the pool; returns how many."""
    if not blocks_enabled(runner.cfg):
        return 0
    n = 0
    for row in runner.ledger.block_rows(("ready", "running")):
        job = BLOCK_PREFIX + str(_spec_path(runner.outdir, row["key"]))
        if job in runner.pool.jobs:
            continue
        if len(runner.pool.jobs) >= runner.pool.workers:
            break
        try:
            spec = _spec(runner.ledger, row, runner.outdir)
        except OSError as exc:  # a member's aligned product is missing
            _failed(runner.ledger, row["key"], str(exc))
            continue
        runner.ledger.upsert_block(row["key"], {"state": "running"})
        # memory: the frames stream through the coadder in chunks (disk-backed store)
        runner.pool.submit(BLOCK_PREFIX + str(spec), 4 * _CHUNK_BYTES, runner.cfg, runner.outdir, process=_JOB)
        n += 1
    return n


def _failed(ledger, key: str, error: str) -> None:
    ledger.upsert_block(key, {"state": "failed", "error": error})
    ledger.event("error", f"HWP block {key}: coadd failed: {error}")
    log.error("HWP block %s: coadd failed: %s", key, error)


def record_block(runner, result) -> None:
    """Record a finished block job (``result``: a :class:`vampd.engine.pool.JobResult`), then
    rebuild the sets (the block is now a set member): in the daemon on its trigger thread, where
    every other set rebuild runs (two rebuilds at once could process one set twice)."""
    spec = json.loads(Path(result.path[len(BLOCK_PREFIX) :]).read_text())
    if result.ok:
        runner.ledger.upsert_block(
            spec["key"], {"state": "done", "nframes": int(result.summary.get("ncoadd", 0)), "error": None}
        )
        log.info("HWP block %s coadded: %s", spec["key"], Path(spec["product"]).name)
    else:
        _failed(runner.ledger, spec["key"], result.error)
    if getattr(runner, "trigger_thread", None) is not None:  # the daemon: all set work on one thread
        runner.trigger_thread.put(("sets", None, runner.cfg))
        return
    from vampd.engine import pdi_trigger

    try:
        pdi_trigger.update_sets(runner.ledger, runner.cfg, runner.outdir)
    except Exception as exc:  # noqa: BLE001 -- reported; the next trigger retries
        log.exception("pdi trigger failed after block %s", spec["key"])
        runner.ledger.event("error", f"pdi trigger failed after block {spec['key']}: {exc}")


def end_of_batch(runner) -> bool:
    """End of ``vampd run``: close every open block; True if block jobs are left to run."""
    if not blocks_enabled(runner.cfg):
        return False
    update_blocks(runner.ledger, runner.cfg, runner.outdir, final=True)
    return bool(runner.ledger.block_rows(("ready", "running")))


def run_ready_inline(ledger, cfg, outdir) -> int:
    """Coadd the ready blocks in this process (``vampd finalize`` with no daemon and no pool)."""
    n = 0
    for row in ledger.block_rows(("ready", "running")):
        try:
            res = coadd_block(json.loads(_spec(ledger, row, outdir).read_text()), cfg)
        except (OSError, ValueError) as exc:
            _failed(ledger, row["key"], str(exc))
            continue
        ledger.upsert_block(row["key"], {"state": "done", "nframes": res["ncoadd"], "error": None})
        n += 1
    return n


def block_members(ledger) -> list[dict]:
    """Set-member records of the blocks: done blocks (their product) and failed blocks (they
    break their set, named)."""
    out = []
    for r in ledger.block_members_rows(_WINDOW_DAYS):
        out.append(
            {
                "path": r["product"],
                "product": r["product"],
                "camera": r["camera"],
                "flc": r["flc"],
                "hwp": r["hwp"],
                "mjd": r["mjd"],
                "target": r["target"],
                "filter": r["filter"],
                "t_complete": r["t_complete"],
                "mtime_ns": r["mtime_ns"],
                "ncubes": len(json.loads(r["members"] or "[]")),
                "state": "done" if r["state"] == "done" else "parked",
                "block": r["key"],
                "taken": r["taken"],
            }
        )
    return out


# ------------------------------------------------------------------------------------------------
# worker side


@dataclass
class _BlockResult:
    products: list = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)


def coadd_block_job(path: str, cfg, outdir, force: bool = False) -> _BlockResult:
    """Pool job: ``path`` is ``block:{spec file}`` (see :func:`pump_blocks`)."""
    spec = json.loads(Path(path[len(BLOCK_PREFIX) :]).read_text())
    res = coadd_block(spec, cfg)
    return _BlockResult([("block", spec["product"])], {"ncoadd": res["ncoadd"]}, {})


def _add_aligned(coadder, path: str) -> None:
    """Feed one cube's aligned frames to the coadder chunk by chunk (memory-mapped)."""
    with fits.open(path, memmap=True) as hdul:
        data, err = hdul[0].data, hdul["ERR"].data
        if data.ndim == 3:
            data, err = data[:, None], err[:, None]
        step = max(1, _CHUNK_BYTES // max(1, data[0].nbytes * 2))
        for i in range(0, len(data), step):
            coadder.add(np.asarray(data[i : i + step], np.float32), np.asarray(err[i : i + step], np.float32))


def coadd_block(spec: dict, cfg) -> dict:
    """Coadd the selected, aligned frames of a block's cubes (time order) with the ``[coadd]``
    method and write the block product (docs/instrument.md §6, §7.1). Returns ``{"path", "ncoadd"}``."""
    from vampd.engine.pipeline import _psfs
    from vampd.engine.products import write_product
    from vampd.stages.coadd import Coadder, recenter, recenter_header
    from vampd.stages.combine import combine_headers

    outdir = Path(spec["product"]).parent.parent
    headers, fields = [], None
    for p in spec["coadded"]:
        with fits.open(p) as hdul:
            headers.append(hdul[0].header.copy())
            fields = fields or [h.name for h in hdul[1:] if h.name != "ERR" and h.data is None]
    scratch = outdir / ".scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    coadder = Coadder(cfg.coadd.method, tmpdir=scratch)  # disk-backed frame store: bounded memory
    try:
        for p in spec["aligned"]:
            _add_aligned(coadder, p)
        image, err, ncoadd = coadder.result()
    finally:
        coadder.close()
    hdr = combine_headers(headers)
    fields = fields or [str(hdr.get("FILTER01", "F0"))]
    hdr["HIERARCH DPP COADD NCOADD"] = (int(ncoadd), "frames coadded (all cubes of the HWP block)")
    hdr["NCOADD"] = int(ncoadd)
    hdr["HIERARCH DPP BLOCK NCUBES"] = (len(spec["aligned"]), "cubes in the HWP block")
    hdr["HIERARCH DPP BLOCK KEY"] = (f"{int(spec['run']):03d}_cam{spec['camera']}_FLC{spec['flc']}", "group key")
    hdr["HIERARCH DPP BLOCK FIRST"] = (output_stem(spec["members"][0]), "first cube")
    if cfg.coadd.recenter:
        ws = int(cfg.analysis.window_size)
        shift = (0.0, 0.0)
        psfs = _psfs(cfg, hdr, fields, outdir)
        for j, f in enumerate(fields):
            psf = None if psfs is None else psfs[f]
            image[j], err[j], (dy, dx) = recenter(image[j], err[j], cfg.coadd.recenter_method, ws, psf=psf)
            shift = shift if j else (float(dy[0]), float(dx[0]))
        hdr = recenter_header(hdr, cfg.coadd.recenter_method, shift[0], shift[1], copy=False)
    write_product(Path(spec["product"]), image, err, hdr, fields)
    return {"path": spec["product"], "ncoadd": int(ncoadd)}

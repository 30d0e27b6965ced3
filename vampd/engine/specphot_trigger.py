"""Per-sequence spectrophotometric calibration, triggered from the engine (``run`` and ``watch``).

A *sequence* is a run of consecutive done files of one camera (ordered by MJD) with the same target
and filter string, cut into chunks of ``specphot.sequence_files`` files when that is set. A
sequence is complete when its chunk is full, when a later done file of the camera has another
target or filter, or at finalize.

For a complete sequence the trigger

1. pools the flux metric of all member files' metrics NPZs (median over PSFs and frames, per
   field) and computes one :class:`~vampd.specphot.calibrate.SpecphotResult` per member file and
   field (the zeropoints factor depends on each file's airmass; the Pickles/file factor is the
   sequence's);
2. writes a calibrated copy of each member's coadded product (aligned product without coadd) as
   ``specphot/{product stem}_{unit}.fits`` — the e-/s product is left untouched, so the per-file
   stage stays idempotent and a recalibration only rewrites copies;
3. writes the factors to ``specphot/{name}_{target}_{filter}_cam{n}_{first stem}.json`` (read by
   :func:`vampd.specphot.pdi_unit_factor` for the running Stokes products);
   then the running Stokes products' companions in the unit are brought up to date
   (:func:`vampd.engine.pdi_trigger.refresh_calibrated`), so a calibration that arrives after
   sets were accumulated reaches them at once;
4. records it in the ledger (``specphot`` table; calibrated copies as product kind
   ``calibrated_flux`` of their file) in one transaction.

Restart safety: each sequence record carries a fingerprint of the specphot settings and of its
members (path and ``t_done``). A sequence whose fingerprint is recorded as done is skipped; one
whose members changed (a straggler finished late, a file was redone) is recomputed under the same
key, and any older record overlapping it is marked ``superseded`` and its JSON removed. Finalize
sweeps every sequence again and redoes those whose outputs are missing. All writes are atomic.
Failures are recorded (state ``failed`` plus a ledger event) and never stop the daemon.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "PRODUCT_KIND",
    "Member",
    "specphot_enabled",
    "split_sequences",
    "on_file_done",
    "on_finalize",
]

log = logging.getLogger("vampd.specphot")

PRODUCT_KIND = "calibrated_flux"


@dataclass
class Member:
    """A done file as the trigger sees it."""

    path: str
    target: str | None
    filter: str | None
    camera: int
    mjd: float | None
    t_done: float | None
    products: dict[str, str] = field(default_factory=dict)

    @property
    def stem(self) -> str:
        from vampd.fitsio import output_stem

        return output_stem(self.path)

    @property
    def key(self) -> tuple[str | None, str | None]:
        return (self.target, self.filter)


def specphot_enabled(cfg) -> bool:
    """True if the configuration asks for anything beyond plain e-/s from zero points."""
    sp = getattr(cfg, "specphot", None)
    if sp is None or sp.source_kind is None:
        return False
    return not (sp.unit == "e-/s" and sp.source_kind == "zeropoints")


def split_sequences(keys: list, sequence_files: int | None = None, final: bool = False) -> list[tuple[int, int, bool]]:
    """Cut a time-ordered list of (target, filter) keys into sequences.

    Returns ``(start, stop, complete)`` index ranges: runs of equal keys, cut every
    ``sequence_files`` items; a chunk is complete if it is full, if another key follows it, or
    if ``final``.

    >>> split_sequences(["a", "a", "b", "b", "b"], 2)
    [(0, 2, True), (2, 4, True), (4, 5, False)]
    """
    out = []
    i = 0
    n = len(keys)
    while i < n:
        j = i
        while j < n and keys[j] == keys[i]:
            j += 1
        step = sequence_files or (j - i)
        for s in range(i, j, step):
            e = min(s + step, j)
            full = sequence_files is not None and e - s == sequence_files
            out.append((s, e, bool(full or j < n or final)))
        i = j
    return out


def _stream(ledger, camera: int) -> list[Member]:
    return [
        Member(r["path"], r["target"], r["filter"], int(r["camera"]), r["mjd"], r["t_done"], prods)
        for r, prods in ledger.camera_stream(int(camera))
    ]


def _fingerprint(cfg, members: list[Member]) -> str:
    from vampd.config import resolve_data_dir

    sp = cfg.specphot
    payload = {
        "specphot": sp.model_dump(mode="json") if hasattr(sp, "model_dump") else str(sp),
        "coronagraphic": bool(getattr(cfg, "coronagraphic", False)),
        "data_dir": str(resolve_data_dir(cfg)),
        "members": [(m.path, m.t_done) for m in members],
    }
    return hashlib.sha1(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _seq_key(members: list[Member]) -> str:
    return f"cam{members[0].camera}:{members[0].stem}"


def _image_product(m: Member) -> str | None:
    for kind in ("coadded", "aligned"):
        if kind in m.products:
            return m.products[kind]
    return None


def _fields(npz_fields: list[str], m: Member) -> list[str]:
    if npz_fields:
        return npz_fields
    return [f for f in (m.filter or "").split(",") if f]


def _sequence_metrics(members: list[Member]) -> tuple[list, list[str]]:
    """The members' metrics and their (common) fields; a member without metrics, or with other
    fields, is an error naming its file."""
    from vampd.stages.analyze import load_metrics

    metrics, fields = [], None
    for m in members:
        mpath = m.products.get("metrics")
        if mpath is None:
            raise FileNotFoundError(f"{m.path}: no metrics product recorded")
        mt, flds = load_metrics(mpath)
        flds = _fields(flds, m)
        if fields is None:
            fields = flds
        elif flds != fields:
            raise ValueError(f"{mpath}: fields {flds} differ from the sequence's {fields}")
        metrics.append(mt)
    return metrics, fields


def _member_results(sp, header, metrics, seq_flux, fields: list[str], coronagraphic: bool, data_dir) -> list:
    """One conversion result per field for a member file with primary ``header``.

    ``seq_flux`` is the sequence's pooled flux (None when the source is ``zeropoints``, which
    uses the member's own flux, or none if its metrics lack the flux metric)."""
    from vampd.specphot.calibrate import conversion_factor, instrumental_flux

    if seq_flux is not None:
        flux = seq_flux
    else:
        try:
            flux = instrumental_flux(metrics, sp.flux_metric)
        except ValueError:
            flux = [None] * len(fields)
    return [
        conversion_factor(
            fld,
            flux[j],
            header,
            sp.unit,
            str(sp.source),
            sptype=sp.sptype,
            mag=sp.mag,
            mag_band=sp.mag_band,
            coronagraphic=coronagraphic,
            data_dir=data_dir,
        )
        for j, fld in enumerate(fields)
    ]


def calibrate_sequence(cfg, outdir: Path, members: list[Member]) -> tuple[dict, list[tuple[str, str, str]]]:
    """Compute and write the calibration of one sequence; return (ledger row, products)."""
    # numpy, astropy and the specphot package only here: the engine imports this module in
    # every run to ask specphot_enabled (docs/design.md: the run path's imports)
    from astropy.io import fits

    from vampd.config import resolve_data_dir
    from vampd.fitsio import output_stem, write_fits_atomic
    from vampd.specphot.calibrate import calibrate_hdul, instrumental_flux
    from vampd.specphot.factors import FACTOR_DIR, factor_file_name, save_factor_file, slug

    sp = cfg.specphot
    data_dir = resolve_data_dir(cfg)
    name = cfg.name or "vampd"
    coronagraphic = bool(getattr(cfg, "coronagraphic", False))
    metrics, fields = _sequence_metrics(members)
    need_flux = sp.source_kind != "zeropoints"
    seq_flux = instrumental_flux(metrics, sp.flux_metric) if need_flux else None

    outdir = Path(outdir)
    factors: dict[str, dict[str, float]] = {}
    results_out: dict[str, list[dict]] = {}
    products: list[tuple[str, str, str]] = []
    for m, mt in zip(members, metrics):
        img = _image_product(m)
        if img is None:
            raise FileNotFoundError(f"{m.path}: no coadded or aligned product recorded")
        with fits.open(img) as hdul:
            hdul.verify("silentfix")
            results = _member_results(sp, hdul[0].header, mt, seq_flux, fields, coronagraphic, data_dir)
            extra = {"SEQUENCE": _seq_key(members), "NFILES": len(members)}
            cal = calibrate_hdul(hdul, results, sp.unit, data_dir, extra)
            out = outdir / FACTOR_DIR / f"{output_stem(img)}_{slug(sp.unit)}.fits"
            write_fits_atomic(out, cal)
        products.append((m.path, PRODUCT_KIND, str(out)))
        factors[m.stem] = {r.field: r.factor for r in results}
        results_out[m.stem] = [r.to_dict() for r in results]

    first = members[0]
    record = {
        "key": _seq_key(members),
        "camera": first.camera,
        "target": first.target,
        "filter": first.filter,
        "unit": sp.unit,
        "source": sp.source_kind,
        "flux_metric": sp.flux_metric,
        "fields": fields,
        "members": [m.path for m in members],
        "mjd": [members[0].mjd, members[-1].mjd],
        "inst_flux": None if seq_flux is None else {f: float(v) for f, v in zip(fields, seq_flux)},
        "factors": factors,
        "results": results_out,
    }
    jpath = (
        outdir
        / FACTOR_DIR
        / factor_file_name(name, first.target or "unknown", first.filter or "unknown", first.camera, first.stem)
    )
    save_factor_file(jpath, record)
    row = {
        "camera": first.camera,
        "target": first.target,
        "filter": first.filter,
        "unit": sp.unit,
        "source": sp.source_kind,
        "state": "done",
        "members": record["members"],
        "factors": {"json": str(jpath), "per_file": factors},
        "products": [p[2] for p in products] + [str(jpath)],
        "mjd": first.mjd,
        "error": None,
    }
    return row, products


def _process_camera(ledger, cfg, outdir: Path, camera: int, final: bool, check_files: bool) -> list[dict]:
    stream = _stream(ledger, camera)
    if not stream:
        return []
    seqs = split_sequences([m.key for m in stream], cfg.specphot.sequence_files, final)
    recorded = {r["key"]: r for r in ledger.specphot_rows()}
    done_now = []
    for start, stop, complete in seqs:
        if not complete:
            continue
        members = stream[start:stop]
        key = _seq_key(members)
        fp = _fingerprint(cfg, members)
        rec = recorded.get(key)
        if rec is not None and rec["fingerprint"] == fp:
            if rec["state"] == "done" and not (
                check_files and not all(os.path.exists(p) for p in json.loads(rec["products"] or "[]"))
            ):
                continue
            if rec["state"] == "failed" and not final:
                continue  # already reported; finalize retries once
        try:
            row, products = calibrate_sequence(cfg, outdir, members)
        except Exception as exc:  # noqa: BLE001 - one bad sequence must not stop the night
            msg = f"specphot {key} ({members[0].target}, {members[0].filter}): {exc}"
            log.error("%s", msg)
            ledger.record_specphot(
                key,
                {
                    "camera": camera,
                    "target": members[0].target,
                    "filter": members[0].filter,
                    "unit": cfg.specphot.unit,
                    "source": cfg.specphot.source_kind,
                    "state": "failed",
                    "fingerprint": fp,
                    "members": [m.path for m in members],
                    "mjd": members[0].mjd,
                    "error": str(exc),
                },
            )
            ledger.event("error", msg)
            done_now.append({"key": key, "state": "failed", "error": str(exc)})
            continue
        row["fingerprint"] = fp
        ledger.record_specphot(key, row, products)
        _supersede(ledger, key, set(row["members"]), camera)
        log.info("specphot %s: %d file(s), unit %s", key, len(members), cfg.specphot.unit)
        done_now.append({"key": key, "state": "done", "members": row["members"], "factors": row["factors"]["per_file"]})
    return done_now


def _supersede(ledger, key: str, members: set[str], camera: int) -> None:
    """Older records that share members with a new sequence (boundaries moved) are superseded."""
    for r in ledger.specphot_rows("done"):
        if r["key"] == key or r["camera"] != camera:
            continue
        old = set(json.loads(r["members"] or "[]"))
        if old & members:
            for p in json.loads(r["products"] or "[]"):
                if p.endswith(".json"):
                    Path(p).unlink(missing_ok=True)
            row = {k: r[k] for k in r.keys() if k not in ("key", "updated")}
            row["state"] = "superseded"
            row["members"] = sorted(old)
            ledger.record_specphot(r["key"], row)


def on_file_done(ledger, cfg, outdir, path: str) -> list[dict]:
    """Engine hook after ``path`` was recorded done: calibrate every newly complete sequence of
    its camera. Returns a summary per sequence computed (empty if specphot is off)."""
    if not specphot_enabled(cfg):
        return []
    row = ledger.get(str(path))
    if row is None or row["camera"] is None:
        return []
    done = _process_camera(ledger, cfg, Path(outdir), int(row["camera"]), final=False, check_files=False)
    _refresh_pdi(cfg, outdir, done)
    return done


def _refresh_pdi(cfg, outdir, done: list[dict]) -> None:
    """A newly calibrated sequence changes the factor of the running Stokes products (issue 6):
    rewrite their companions in the specphot unit now, not at the next set."""
    if any(d.get("state") == "done" for d in done):
        from vampd.engine.pdi_trigger import refresh_calibrated

        refresh_calibrated(cfg, outdir)


def on_finalize(ledger, cfg, outdir) -> list[dict]:
    """Engine hook at the end of ``run``/``watch``: calibrate every remaining sequence (open ones
    included) and redo any whose outputs are missing."""
    if not specphot_enabled(cfg):
        return []
    out: list[dict[str, Any]] = []
    for cam in ledger.done_cameras():
        out.extend(_process_camera(ledger, cfg, Path(outdir), int(cam), final=True, check_files=True))
    _refresh_pdi(cfg, outdir, out)
    return out

"""Running (incremental) collapse of the per-set Stokes cubes (docs/instrument.md §9.8, §14).

The accumulator keeps, per pixel of ``(nfields, 4, N, N)``, the sums needed for a plain mean
(``Σx``, ``Σσ²``, count of finite values) and for an inverse-variance mean (``Σx/σ²``,
``Σ1/σ²``), plus the keys of the sets already added (so adding a set twice is a no-op: the
trigger can be re-run after a crash). It lives in one NPZ written atomically, so each new set
costs O(1) sets of work. The final median over sets is the end-of-night job; every set's own
Stokes file is kept for it.

Running products written after every set (docs/instrument.md §9.8, §11.1):

* ``pdi/{name}_stokes_coll.fits``: ``(8, N, N)`` planes ``I_Q, I_U, Q, U, Q_PHI, U_PHI, LP_I,
  AOLP`` (or ``Q_R, U_R``), header ``STOKES`` listing them, ``CTYPE3 = STOKES``, ``ERR``
  extension, one header HDU per field; e-/s per camera (I_Q is the mean single-beam intensity).
  With several fields (MBI) the collapse over fields is their **mean** (error RSS / n), not the
  reference's sum (docs/instrument.md §13.13), and ``pdi/{name}_stokes_cube.fits`` holds ``(nfields, 8, N, N)``.
* ``pdi/{name}_footprint.fits``: fraction of sets with a finite Q per pixel ``(nfields, N, N)``.
* ``pdi/{name}_stokes_table.csv``: one row per set (its primary header), in set order.
"""

from __future__ import annotations

import csv
import io
import math
import os
from pathlib import Path

import numpy as np
from astropy.io import fits

from vampd.fitsio import atomic_write, write_fits_atomic
from vampd.pdi.cards import set_card, strip_structural
from vampd.pdi.stokes import product_names, stokes_products

__all__ = ["RunningStokes", "running_paths", "write_running_products", "append_table_row"]

_WEIGHTINGS = ("mean", "ivar")


def running_paths(outdir, name: str) -> dict[str, Path]:
    """Where the running products and the accumulator go."""
    pdi = Path(outdir) / "pdi"
    return {
        "accumulator": pdi / f".{name}_running.npz",
        "coll": pdi / f"{name}_stokes_coll.fits",
        "cube": pdi / f"{name}_stokes_cube.fits",
        "footprint": pdi / f"{name}_footprint.fits",
        "table": pdi / f"{name}_stokes_table.csv",
    }


class RunningStokes:
    """Running sums over sets of Stokes cubes ``(nfields, 4, N, N)``.

    Use :meth:`load` (an empty accumulator if the file does not exist), :meth:`add`,
    :meth:`save`; :meth:`mean` gives the current collapse.
    """

    _ARRAYS = ("sum", "var_sum", "ivar_sum", "ivar_w", "count")

    def __init__(self, path: os.PathLike | str):
        self.path = Path(path)
        self.keys: list[str] = []
        self.sum = self.var_sum = self.ivar_sum = self.ivar_w = self.count = None
        self.tint = 0.0
        self._unread = False  # sums still on disk (see load)

    # -- persistence ------------------------------------------------------------------------
    @classmethod
    def load(cls, path) -> RunningStokes:
        """The accumulator at ``path`` (empty if absent). Only the set keys and the exposure are
        read now: the sums (~10 MB per field at 536²) are read when first needed, so the
        per-file trigger, which mostly only asks which sets are in, does not pay for them."""
        acc = cls(path)
        if acc.path.exists():
            with np.load(acc.path, allow_pickle=False) as z:
                acc.keys = [str(k) for k in z["keys"]]
                acc.tint = float(z["tint"])
            acc._unread = True
        return acc

    def _read_sums(self) -> None:
        if self._unread:
            with np.load(self.path, allow_pickle=False) as z:
                for name in self._ARRAYS:
                    setattr(self, name, z[name])
            self._unread = False

    def save(self) -> Path:
        self._read_sums()
        arrays = {
            "keys": np.array(self.keys, dtype=str),
            "sum": self.sum,
            "var_sum": self.var_sum,
            "ivar_sum": self.ivar_sum,
            "ivar_w": self.ivar_w,
            "count": self.count,
            "tint": np.float64(self.tint),
        }

        def _write(tmp: Path) -> None:
            with open(tmp, "wb") as fh:
                np.savez(fh, **arrays)  # uncompressed: the sums are noise-like, compression buys little

        return atomic_write(self.path, _write)

    # -- accumulation -----------------------------------------------------------------------
    @property
    def nsets(self) -> int:
        return len(self.keys)

    def __contains__(self, key: str) -> bool:
        return key in self.keys

    def add(self, key: str, stokes: np.ndarray, err: np.ndarray, tint: float = 0.0) -> bool:
        """Add one set's Stokes cube and errors (NaN = no data). Returns False if ``key`` is
        already in, or raises ``ValueError`` if the shape differs from the sets already added."""
        if key in self.keys:
            return False
        self._read_sums()
        x = np.asarray(stokes)
        s = np.asarray(err)
        if self.sum is None:
            self.sum = np.zeros(x.shape)
            self.var_sum = np.zeros(x.shape)
            self.ivar_sum = np.zeros(x.shape)
            self.ivar_w = np.zeros(x.shape)
            self.count = np.zeros(x.shape, np.int32)
        elif x.shape != self.sum.shape:
            raise ValueError(f"set {key}: Stokes cube shape {x.shape}, running products have {self.sum.shape}")
        ok = np.isfinite(x) & np.isfinite(s)
        xz = np.where(ok, x, np.float64(0.0))  # float64 from here on: the sums run over the whole night
        var = np.where(ok, s, np.float64(0.0))
        var *= var
        self.sum += xz
        self.var_sum += var
        self.count += ok
        w = np.divide(1.0, var, out=np.zeros_like(var), where=var > 0)
        self.ivar_w += w
        w *= xz
        self.ivar_sum += w
        self.keys.append(str(key))
        self.tint += float(tint) if math.isfinite(float(tint)) else 0.0
        return True

    def mean(self, weighting: str = "mean") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Current collapse: ``(stokes, err, footprint)``.

        ``"mean"``: ``Σx/n``, ``σ = sqrt(Σσ²)/n``; ``"ivar"``: ``Σ(x/σ²)/Σ(1/σ²)``,
        ``σ = 1/sqrt(Σ1/σ²)``. ``footprint`` = count / number of sets (per plane).
        """
        if weighting not in _WEIGHTINGS:
            raise ValueError(f"weighting = {weighting!r}, expected one of {_WEIGHTINGS}")
        self._read_sums()
        if self.sum is None:
            raise ValueError("no set has been added")
        with np.errstate(divide="ignore", invalid="ignore"):
            if weighting == "mean":
                n = np.where(self.count > 0, self.count, np.nan)
                data = self.sum / n
                err = np.sqrt(self.var_sum) / n
            else:
                w = np.where(self.ivar_w > 0, self.ivar_w, np.nan)
                data = self.ivar_sum / w
                err = 1.0 / np.sqrt(w)
        foot = self.count / max(self.nsets, 1)
        return data.astype(np.float32), err.astype(np.float32), foot.astype(np.float32)


def set_exposure_cards(hdr: fits.Header, ncoadd: float, tint: float, what: str = "") -> fits.Header:
    """Write ``NCOADD``/``TINT`` and their ``DPP COADD`` twins with the same values (in place).

    One meaning in every product: ``NCOADD`` = frames coadded and ``TINT`` = their exposure
    [s] (EXPTIME × NCOADD), per camera in PDI products (the two cameras observe the same
    photons at the same time, so each frame pair counts once), summed over files and sets.
    The raw-file count of a collapse is ``DPP PDI NFILES``.
    """
    n = int(round(float(ncoadd)))
    t = float(tint)
    suffix = f" {what}" if what else ""
    set_card(hdr, "NCOADD", n, f"frames coadded{suffix}")
    set_card(hdr, "TINT", t, f"[s] EXPTIME x NCOADD{suffix}")
    set_card(hdr, "HIERARCH DPP COADD NCOADD", n, f"frames coadded{suffix}")
    set_card(hdr, "HIERARCH DPP COADD TINT", t, f"[s] EXPTIME x NCOADD{suffix}")
    return hdr


def write_running_products(
    outdir,
    name: str,
    acc: RunningStokes,
    header: fits.Header,
    field_headers: list[fits.Header],
    fields: list[str],
    cyl_stokes: str = "azimuthal",
    weighting: str = "mean",
) -> dict[str, Path]:
    """Write the running collapse (coll, cube for MBI, footprint) from the accumulator."""
    paths = running_paths(outdir, name)
    stokes, err, foot = acc.mean(weighting)
    data, errs = stokes_products(stokes, err, cyl_stokes)  # (nf, 8, N, N)
    names = product_names(cyl_stokes)
    hdr = strip_structural(header)
    for key in ("HIERARCH DPP PDI SET INDEX", "HIERARCH DPP PDI SET KEY", "HIERARCH DPP PDI NMEMBERS"):
        hdr.remove(key.replace("HIERARCH ", ""), ignore_missing=True)
    hdr["CTYPE3"] = ("STOKES", "plane axis")
    hdr["STOKES"] = (",".join(names), "Stokes product planes")
    set_card(hdr, "BUNIT", "e-/s", "per camera; I_Q = mean beam; AOLP in rad")
    set_card(hdr, "HIERARCH DPP PDI NSETS", acc.nsets, "sets in the running collapse")
    set_card(hdr, "HIERARCH DPP PDI COLLAPSE", weighting, "running collapse over sets (final: median)")
    exptime = float(hdr.get("EXPTIME", 0.0) or 0.0)
    ncoadd = acc.tint / exptime if exptime > 0 else float(hdr.get("NCOADD", 0) or 0)
    set_exposure_cards(hdr, ncoadd, acc.tint, "(per camera, all sets)")
    fhs = []
    for f, fh in zip(fields, field_headers):
        h = strip_structural(fh)
        h["CTYPE3"] = "STOKES"
        h["STOKES"] = ",".join(names)
        h["FIELD"] = f
        if "NCOADD" in h or "TINT" in h:
            set_exposure_cards(h, hdr["NCOADD"], hdr["TINT"], "(per camera, all sets)")
        fhs.append(fits.ImageHDU(header=h, name=f))
    written = {}
    nf = data.shape[0]
    if nf > 1:
        cube_hdul = fits.HDUList(
            [fits.PrimaryHDU(data, header=hdr), fits.ImageHDU(errs, name="ERR"), *[h.copy() for h in fhs]]
        )
        written["cube"] = write_fits_atomic(paths["cube"], cube_hdul)
        with np.errstate(invalid="ignore", divide="ignore"):
            n = np.sum(np.isfinite(data), axis=0)
            coll = (np.nansum(data, axis=0) / np.where(n > 0, n, np.nan)).astype(np.float32)
            ecoll = (np.sqrt(np.nansum(errs**2, axis=0)) / np.where(n > 0, n, np.nan)).astype(np.float32)
        # the polar products of the mean Q, U (not the mean of per-field AoLP)
        c4 = np.stack([coll[0], coll[1], coll[2], coll[3]])[None]
        e4 = np.stack([ecoll[0], ecoll[1], ecoll[2], ecoll[3]])[None]
        coll, ecoll = (a[0] for a in stokes_products(c4, e4, cyl_stokes))
        chdr = hdr.copy()
        chdr["FIELD"] = ("COMB", "mean over fields")
    else:
        coll, ecoll = data[0], errs[0]
        chdr = hdr
    written["coll"] = write_fits_atomic(
        paths["coll"], fits.HDUList([fits.PrimaryHDU(coll, header=chdr), fits.ImageHDU(ecoll, name="ERR"), *fhs])
    )
    fp = foot[:, 2]
    fhdr = fits.Header()
    fhdr["HIERARCH DPP PDI NSETS"] = acc.nsets
    written["footprint"] = write_fits_atomic(
        paths["footprint"], fits.HDUList([fits.PrimaryHDU(fp[0] if nf == 1 else fp, header=fhdr)])
    )
    return written


def append_table_row(path, header: fits.Header) -> Path:
    """Add the set's primary header as a row of the Stokes table CSV (columns = union)."""
    path = Path(path)
    rows: list[dict] = []
    cols: list[str] = []
    if path.exists():
        with open(path, newline="") as fh:
            reader = csv.DictReader(fh)
            cols = list(reader.fieldnames or [])
            rows = list(reader)
    row = {}
    for card in header.cards:
        k = card.keyword
        if not k or k in ("COMMENT", "HISTORY", "") or k in row:
            continue
        row[k] = card.value
    key = row.get("DPP PDI SET KEY")
    if key is not None:
        rows = [r for r in rows if r.get("DPP PDI SET KEY") != key]
    rows.append(row)
    for k in row:
        if k not in cols:
            cols.append(k)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    text = buf.getvalue()

    def _write(tmp: Path) -> None:
        tmp.write_text(text)

    return atomic_write(path, _write)

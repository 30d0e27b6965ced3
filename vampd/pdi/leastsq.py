"""Least-squares polarimetry (``polarimetry.method = "leastsq"``, issue 13; docs/instrument.md §9.4, §9.5).

Every reduced, derotated cube ``k`` measures, per pixel, ``d_k = m_k · S + noise(σ_k)`` with
``m_k`` the first row of its Mueller matrix restricted to ``(I, Q, U)`` (V is not modulated by
VAMPIRES and is ignored, as in :mod:`vampd.pdi.mueller_correct`) and ``S`` the sky Stokes
vector of that pixel (North up: the derotated frame is the one the model's ``R(PA)`` maps to).
The weighted normal equations

    A = Σ_k m_k m_kᵀ / σ_k²        b = Σ_k m_k d_k / σ_k²

are sums over cubes, so a cube is *added* (or *subtracted*) in O(pixels) and the Stokes image
``S = A⁻¹ b`` with covariance ``A⁻¹`` can be solved at any moment. Nothing is discarded: a cube
without its HWP/FLC/camera partners still adds its rows, and several cubes per HWP position are
simply more rows.

Storage per field: the 6 distinct entries of the symmetric ``A`` (:data:`A_INDEX`), the 3 of
``b`` and the count of cubes per pixel, all float64 (int32 for the count). A cube's
*contribution* (``w = 1/σ²``, ``w·d`` rounded to float32, and its rows) is kept separately so
that it can be subtracted exactly as it was added (a redone file or a changed configuration).

Solve: closed-form inverse of the symmetric 3×3 per pixel (vectorised; no LAPACK call per
pixel). Degenerate pixels (no coverage, ``det ≤ 0`` or Frobenius condition number
``κ_F = ‖A‖_F ‖A⁻¹‖_F`` above ``max_cond``; ``κ₂ ≤ κ_F ≤ 3κ₂``) are NaN and counted.

Scale: the difference methods report per-camera quantities (``I_Q = ½ I``, Q and U on the same
scale, docs/instrument.md §9.3); :func:`half_scale_stokes` gives the solved ``S/2`` in the same plane order
``(I_Q, I_U, Q, U)`` (``I_Q = I_U = ½ I``) so that every product writer applies unchanged.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "A_INDEX",
    "Contribution",
    "contribution",
    "LeastSqAccumulator",
    "Solution",
    "solve_normal",
    "half_scale_stokes",
    "ip_correct_solved",
    "qphi_snr",
]

#: (i, j) of the 6 stored entries of the symmetric 3×3 normal matrix: II, IQ, IU, QQ, QU, UU
A_INDEX = ((0, 0), (0, 1), (0, 2), (1, 1), (1, 2), (2, 2))
_FULL = np.array([[0, 1, 2], [1, 3, 4], [2, 4, 5]])  # 3×3 → index into the 6 entries


@dataclass
class Contribution:
    """One cube's terms: ``w`` = 1/σ² and ``wd`` = w·d per field ``(nf, N, N)`` float32 (0 where the
    pixel has no valid datum), ``rows`` ``(nf, 3)`` the Mueller first rows over (I, Q, U)."""

    w: np.ndarray
    wd: np.ndarray
    rows: np.ndarray
    tint: float = 0.0
    v: np.ndarray | None = None  # w²σ² when w is not 1/σ² (equal weights): for the sandwich covariance

    def arrays(self) -> dict[str, np.ndarray]:
        out = {"w": self.w, "wd": self.wd, "rows": self.rows, "tint": np.float64(self.tint)}
        if self.v is not None:
            out["v"] = self.v
        return out

    @classmethod
    def from_arrays(cls, z) -> Contribution:
        return cls(
            np.asarray(z["w"], np.float32),
            np.asarray(z["wd"], np.float32),
            np.asarray(z["rows"], np.float64),
            float(z["tint"]),
            np.asarray(z["v"], np.float32) if "v" in getattr(z, "files", z) else None,
        )


def contribution(
    data: np.ndarray, var: np.ndarray, rows: np.ndarray, tint: float = 0.0, weights: str = "equal"
) -> Contribution:
    """The least-squares terms of one derotated cube.

    ``weights = "ivar"``: ``w = 1/σ²`` (covariance ``A⁻¹``); ``"equal"``: ``w = 1`` on valid pixels
    and ``v = σ²`` kept for the sandwich covariance ``A⁻¹ C A⁻¹`` with ``C = Σ m mᵀ w²σ²``.

    Parameters
    ----------
    data, var : ndarray (nf, N, N)
        Derotated image and variance (e-/s, (e-/s)²). Pixels with a non-finite datum or a
        non-positive / non-finite variance contribute nothing.
    rows : ndarray (nf, 3) or (nf, 4, 4)
        Mueller first rows over (I, Q, U) per field, or the full matrices.
    """
    d = np.asarray(data, np.float64)
    v = np.asarray(var, np.float64)
    r = np.asarray(rows, np.float64)
    if r.ndim == 3:
        r = r[:, 0, :3]
    if d.ndim != 3 or v.shape != d.shape or r.shape != (d.shape[0], 3):
        raise ValueError(
            f"contribution: data {d.shape}, var {v.shape}, rows {r.shape}; expected (nf, N, N) twice and (nf, 3)"
        )
    ok = np.isfinite(d) & np.isfinite(v) & (v > 0)
    vv = None
    if weights == "equal":
        w = ok.astype(np.float32)
        vv = np.where(ok, v, 0.0).astype(np.float32)
    elif weights == "ivar":
        with np.errstate(divide="ignore", invalid="ignore"):
            w = np.where(ok, 1.0 / np.where(ok, v, 1.0), 0.0).astype(np.float32)
    else:
        raise ValueError(f"polarimetry.leastsq_weights = {weights!r}, expected 'ivar' or 'equal'")
    wd = (w.astype(np.float64) * np.where(ok, d, 0.0)).astype(np.float32)
    return Contribution(w, wd, r, float(tint) if math.isfinite(float(tint)) else 0.0, vv)


class LeastSqAccumulator:
    """Normal equations of one target and filter: ``a`` (nf, 6, N, N), ``b`` (nf, 3, N, N),
    ``n`` (nf, N, N) cubes per pixel, ``tint`` (sum over cubes), ``ncubes``."""

    def __init__(self, shape: tuple[int, int, int] | None = None):
        self.a = self.b = self.n = None
        self.c = None  # Σ m mᵀ w²σ² (6 entries), only for contributions with ``v`` (equal weights)
        self.tint = 0.0
        self.ncubes = 0
        if shape is not None:
            self._alloc(tuple(shape))

    def _alloc(self, shape) -> None:
        nf, ny, nx = shape
        self.a = np.zeros((nf, 6, ny, nx))
        self.b = np.zeros((nf, 3, ny, nx))
        self.n = np.zeros((nf, ny, nx), np.int32)

    @property
    def shape(self) -> tuple[int, int, int] | None:
        return None if self.n is None else tuple(self.n.shape)

    def add(self, c: Contribution, sign: int = 1) -> None:
        """Add (``sign = 1``) or remove (``sign = -1``) one cube's contribution in place.

        Raises ``ValueError`` if its shape differs from the accumulator's.
        """
        if self.n is None:
            self._alloc(c.w.shape)
        if c.w.shape != self.n.shape:
            raise ValueError(f"cube of shape {c.w.shape}, the accumulator holds {self.n.shape}")
        w = c.w.astype(np.float64)
        wd = c.wd.astype(np.float64)
        s = float(sign)
        if c.v is not None and self.c is None:
            self.c = np.zeros_like(self.a)
        v = None if c.v is None else c.v.astype(np.float64)
        for f in range(w.shape[0]):
            r = c.rows[f]
            for k, (i, j) in enumerate(A_INDEX):
                self.a[f, k] += (s * r[i] * r[j]) * w[f]
                if v is not None:
                    self.c[f, k] += (s * r[i] * r[j]) * v[f]
            for i in range(3):
                self.b[f, i] += (s * r[i]) * wd[f]
        self.n += np.int32(sign) * (c.w > 0)
        self.tint += s * c.tint
        self.ncubes += int(sign)

    def arrays(self) -> dict[str, np.ndarray]:
        out = {"a": self.a, "b": self.b, "n": self.n, "tint": np.float64(self.tint), "ncubes": np.int64(self.ncubes)}
        if self.c is not None:
            out["c"] = self.c
        return out

    @classmethod
    def from_arrays(cls, z) -> LeastSqAccumulator:
        acc = cls()
        acc.a, acc.b, acc.n = np.array(z["a"]), np.array(z["b"]), np.array(z["n"])
        acc.c = np.array(z["c"]) if "c" in z.files else None
        acc.tint, acc.ncubes = float(z["tint"]), int(z["ncubes"])
        return acc

    def digest(self) -> str:
        """SHA-1 of the arrays (what the ledger records for the generation it references)."""
        h = hashlib.sha1()
        for k, v in self.arrays().items():
            h.update(k.encode())
            h.update(np.ascontiguousarray(v).tobytes())
        return h.hexdigest()


@dataclass
class Solution:
    """Solved sky Stokes ``s`` (nf, 3, N, N) over (I, Q, U), covariance ``cov`` (nf, 6, N, N)
    (entries :data:`A_INDEX` of A⁻¹), ``degenerate`` mask (nf, N, N) and its count per field."""

    s: np.ndarray
    cov: np.ndarray
    degenerate: np.ndarray
    ndegenerate: list[int] = field(default_factory=list)
    ncovered: list[int] = field(default_factory=list)


def _inverse_sym3(a6: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Closed-form inverse of symmetric 3×3 matrices stored as 6 entries on axis 0.

    Returns ``(inv6, det)``; ``inv6`` is garbage where ``det`` is 0 (masked by the caller)."""
    a, b, c, d, e, f = a6  # [[a, b, c], [b, d, e], [c, e, f]]
    ca = d * f - e * e
    cb = c * e - b * f
    cc = b * e - c * d
    det = a * ca + b * cb + c * cc
    with np.errstate(divide="ignore", invalid="ignore"):
        r = 1.0 / det
        inv = np.stack([ca * r, cb * r, cc * r, (a * f - c * c) * r, (b * c - a * e) * r, (a * d - b * b) * r])
    return inv, det


def _frob(a6: np.ndarray) -> np.ndarray:
    a, b, c, d, e, f = a6
    return np.sqrt(a * a + d * d + f * f + 2.0 * (b * b + c * c + e * e))


def solve_normal(
    a: np.ndarray, b: np.ndarray, n: np.ndarray | None = None, max_cond: float = 100.0, c: np.ndarray | None = None
) -> Solution:
    """``S = A⁻¹ b`` per pixel with the covariance ``A⁻¹`` (vectorised over fields and pixels).

    Parameters
    ----------
    a : ndarray (nf, 6, N, N)
    b : ndarray (nf, 3, N, N)
    n : ndarray (nf, N, N), optional
        Cubes per pixel (pixels with fewer than 3 are degenerate by construction).
    max_cond : float
        Largest Frobenius condition number accepted; worse pixels are NaN.
    c : ndarray (nf, 6, N, N), optional
        ``Σ m mᵀ w²σ²`` for weights other than 1/σ²: covariance ``A⁻¹ C A⁻¹`` instead of ``A⁻¹``.
    """
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    inv, det = _inverse_sym3(np.moveaxis(a, 1, 0))
    with np.errstate(invalid="ignore", over="ignore"):
        kappa = _frob(np.moveaxis(a, 1, 0)) * _frob(inv)
    bad = ~np.isfinite(det) | (det <= 0) | ~np.isfinite(kappa) | (kappa > max_cond)
    if n is not None:
        bad |= np.asarray(n) < 3
    full = inv[_FULL]  # (3, 3, nf, N, N)
    bb = np.moveaxis(b, 1, 0)  # (3, nf, N, N)
    s = np.einsum("ij...,j...->i...", full, bb)
    if c is not None:
        full_c = np.moveaxis(np.asarray(c, np.float64), 1, 0)[_FULL]
        t = np.einsum("ij...,jk...->ik...", full, full_c)  # A⁻¹C, then only the 6 entries of (A⁻¹C)A⁻¹
        inv = np.stack([np.einsum("k...,k...->...", t[i], full[:, j]) for i, j in A_INDEX])
    s = np.where(bad[None], np.nan, s)
    cov = np.where(bad[None], np.nan, inv)
    covered = np.asarray(n) > 0 if n is not None else np.ones(bad.shape, bool)
    return Solution(
        np.moveaxis(s, 0, 1),
        np.moveaxis(cov, 0, 1),
        bad,
        [int(x) for x in (bad & covered).sum(axis=(-2, -1))],
        [int(x) for x in covered.sum(axis=(-2, -1))],
    )


def half_scale_stokes(sol: Solution) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(stokes4, err4, cov_qi_ui)``: planes (I_Q, I_U, Q, U) = ½(I, I, Q, U) (per-camera scale of
    the difference methods), their errors, and ``(cov(Q, I_Q), cov(U, I_U))`` (nf, 2, N, N)."""
    s, c = sol.s, sol.cov
    i, q, u = s[:, 0], s[:, 1], s[:, 2]
    stokes = 0.5 * np.stack([i, i, q, u], axis=1)
    with np.errstate(invalid="ignore"):
        err = 0.5 * np.sqrt(np.stack([c[:, 0], c[:, 0], c[:, 3], c[:, 5]], axis=1))
    cov = 0.25 * np.stack([c[:, 1], c[:, 2]], axis=1)
    return stokes, err, cov


def ip_correct_solved(stokes4: np.ndarray, err4: np.ndarray, cov: np.ndarray, pq: float, pu: float):
    """``Q ← Q − p_Q I_Q``, ``U ← U − p_U I_U`` on one field's ``(4, N, N)`` with exact errors
    (``σ² = σ_Q² + p² σ_I² − 2p cov(Q, I)``, p treated as a constant as in :mod:`vampd.pdi.ip`)."""
    s = np.array(stokes4, np.float64)
    e = np.array(err4, np.float64)
    with np.errstate(invalid="ignore"):
        var_q = e[2] ** 2 + pq * pq * e[0] ** 2 - 2 * pq * cov[0]
        var_u = e[3] ** 2 + pu * pu * e[1] ** 2 - 2 * pu * cov[1]
        s[2] -= pq * s[0]
        s[3] -= pu * s[1]
        e[2] = np.sqrt(np.maximum(var_q, 0.0))
        e[3] = np.sqrt(np.maximum(var_u, 0.0))
    return s, e


def qphi_snr(qphi: np.ndarray, err: np.ndarray, r_in: float, r_out: float) -> float:
    """S/N of the Q_φ flux in the annulus ``r_in ≤ r < r_out`` about the frame centre:
    ``ΣQ_φ / sqrt(Σσ²)`` over its finite pixels (NaN if none)."""
    q = np.asarray(qphi, np.float64)
    e = np.asarray(err, np.float64)
    ny, nx = q.shape[-2:]
    y, x = np.mgrid[0:ny, 0:nx]
    r = np.hypot(y - (ny - 1) / 2, x - (nx - 1) / 2)
    m = (r >= r_in) & (r < r_out) & np.isfinite(q) & np.isfinite(e)
    if not m.any():
        return math.nan
    var = float(np.sum(e[m] ** 2))
    return float(np.sum(q[m]) / math.sqrt(var)) if var > 0 else math.nan


@dataclass
class LeastSqProducts:
    """Solved products of one accumulator: ``stokes``/``err`` (nf, 4, N, N) after IP correction,
    the 8 product planes ``data8``/``err8`` (nf, 8, N, N), the collapse over fields ``coll``/``ecoll``
    (8, N, N), per field IP values and degenerate-pixel counts, and the Q_φ S/N of ``coll``."""

    stokes: np.ndarray
    err: np.ndarray
    data8: np.ndarray
    err8: np.ndarray
    coll: np.ndarray
    ecoll: np.ndarray
    ip: list
    ndegenerate: list
    ncovered: list
    snr: float


def snr_annulus(shape, pcfg) -> tuple[float, float]:
    """``polarimetry.leastsq_snr_annulus`` or (``ip_radius``, N/2)."""
    ann = getattr(pcfg, "leastsq_snr_annulus", None)
    if ann:
        return float(ann[0]), float(ann[1])
    return float(pcfg.ip_radius), 0.5 * min(shape[-2:])


def _solve_ip(acc: LeastSqAccumulator, pcfg):
    """Solve with the configured weighting, then the residual-IP correction per field."""
    from vampd.pdi.ip import measure_ip, region_weights

    equal = getattr(pcfg, "leastsq_weights", "equal") == "equal"
    if equal and acc.c is None:
        raise ValueError("leastsq_weights = 'equal' but the accumulator has no sandwich term (built with 'ivar')")
    sol = solve_normal(acc.a, acc.b, acc.n, float(getattr(pcfg, "leastsq_max_cond", 100.0)), acc.c if equal else None)
    stokes, err, cov = half_scale_stokes(sol)
    ips = []
    if pcfg.ip_correct:
        region = region_weights(stokes.shape[-2:], pcfg.ip_method, pcfg.ip_radius, pcfg.ip_radius2)
        for j in range(stokes.shape[0]):
            pq, pu = measure_ip(stokes[j], region)
            if not (math.isfinite(pq) and math.isfinite(pu)):
                ips.append(None)
                continue
            stokes[j], err[j] = ip_correct_solved(stokes[j], err[j], cov[j], pq, pu)
            ips.append((pq, pu))
    return sol, stokes, err, ips


def solve_products(acc: LeastSqAccumulator, pcfg) -> LeastSqProducts:
    """Solve, IP-correct (``ip_correct``: the residual IP of :func:`vampd.pdi.ip.measure_ip` on the
    solved image) and form the Stokes products (:func:`vampd.pdi.stokes.stokes_products`)."""
    from vampd.pdi.calibrated import mean_over_fields
    from vampd.pdi.stokes import stokes_products

    sol, stokes, err, ips = _solve_ip(acc, pcfg)
    data8, err8 = stokes_products(stokes, err, pcfg.cyl_stokes)
    if data8.shape[0] > 1:
        coll, ecoll = mean_over_fields(data8, err8, pcfg.cyl_stokes)
    else:
        coll, ecoll = data8[0], err8[0]
    r_in, r_out = snr_annulus(coll.shape, pcfg)
    snr = qphi_snr(coll[4] if pcfg.cyl_stokes == "azimuthal" else -coll[4], ecoll[4], r_in, r_out)
    return LeastSqProducts(
        stokes.astype(np.float32),
        err.astype(np.float32),
        data8,
        err8,
        coll,
        ecoll,
        ips,
        sol.ndegenerate,
        sol.ncovered,
        snr,
    )


def solve_snr(acc: LeastSqAccumulator, pcfg) -> float:
    """Only the Q_φ S/N of :func:`solve_products` (no product planes): the per-file live figure."""
    from vampd.pdi.stokes import cylindrical_stokes

    _sol, stokes, err, _ips = _solve_ip(acc, pcfg)
    q, u, eq, eu = stokes[:, 2], stokes[:, 3], err[:, 2], err[:, 3]
    if q.shape[0] > 1:  # mean over fields, as mean_over_fields
        with np.errstate(invalid="ignore", divide="ignore"):
            n = np.sum(np.isfinite(q), axis=0)
            nn = np.where(n > 0, n, np.nan)
            q, u = np.nansum(q, axis=0) / nn, np.nansum(u, axis=0) / nn
            eq, eu = np.sqrt(np.nansum(eq**2, axis=0)) / nn, np.sqrt(np.nansum(eu**2, axis=0)) / nn
    else:
        q, u, eq, eu = q[0], u[0], eq[0], eu[0]
    qphi, _, eqphi, _ = cylindrical_stokes(q, u, eq, eu, mode="azimuthal")
    r_in, r_out = snr_annulus(q.shape, pcfg)
    return qphi_snr(qphi, eqphi, r_in, r_out)

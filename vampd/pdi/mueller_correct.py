"""Mueller-matrix correction of a difference set (docs/instrument.md §9.4).

For a set with member Mueller matrices ``M_i`` (their first rows map the sky Stokes vector to
the measured intensity) and difference weights ``W`` (:func:`vampd.pdi.differences.difference_weights`):

* ``m_Q = 2·Σ_i W_Q,i M_i[0, :]`` and ``m_U = 2·Σ_i W_U,i M_i[0, :]`` (the factor 2 compensates
  the ½ of the combination: ``Q_meas = ½ m_Q·S`` while ``I_Q = ½ I``);
* IP removal ``Q̃ = Q − m_Q[0]·I_Q``, ``Ũ = U − m_U[0]·I_U``;
* cross-talk: solve ``[[m_Q1, m_Q2], [m_U1, m_U2]]·(Q, U)ᵀ = (Q̃, Ũ)ᵀ`` for every pixel (V ignored).

All three steps are linear in the member images, so they are applied to the weight matrix:
the corrected (Q, U) rows are ``A⁻¹·[W_Q − m_Q0 W_IQ; W_U − m_U0 W_IU]``. Errors therefore
propagate exactly through the inversion (``σ² = Σ w_i² σ_i²`` with the final weights), including
the covariance of Q̃ and I_Q that the reference's ``hypot`` ignores; the reference does not
propagate errors through the inversion at all (docs/instrument.md §13.13).
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["MMCorrection", "mueller_rows", "mm_correct_weights", "rotate_qu_weights", "pol_efficiency"]


class MMCorrection(dict):
    """Per-field record of the correction (``m_Q``, ``m_U``, ``ip_pq``, ``ip_pu``, ``poleff``)."""


def mueller_rows(mm: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """``2·W·M[:, 0, :]``: rows (m_IQ, m_IU, m_Q, m_U), each a 4-vector.

    Parameters
    ----------
    mm : ndarray (nmembers, 4, 4)
    weights : ndarray (4, nmembers)
    """
    return 2.0 * np.asarray(weights, float) @ np.asarray(mm, float)[:, 0, :]


def pol_efficiency(m_q: np.ndarray, m_u: np.ndarray) -> float:
    """Mean of hypot(m_Q1, m_U1), hypot(m_Q2, m_U2) and sqrt(½(m_Q1+m_Q2)² + ½(m_U1+m_U2)²) (docs/instrument.md §9.4)."""
    a = math.hypot(m_q[1], m_u[1])
    b = math.hypot(m_q[2], m_u[2])
    c = math.sqrt(0.5 * (m_q[1] + m_q[2]) ** 2 + 0.5 * (m_u[1] + m_u[2]) ** 2)
    return float((a + b + c) / 3.0)


def mm_correct_weights(weights: np.ndarray, mm: np.ndarray, ip: bool = True) -> tuple[np.ndarray, MMCorrection]:
    """Apply the Mueller-matrix correction to the difference weights of one field.

    Parameters
    ----------
    weights : ndarray (4, nmembers)
        Rows I_Q, I_U, Q, U.
    mm : ndarray (nmembers, 4, 4)
        Mueller matrix of each member (same member order).
    ip : bool
        Remove the model IP terms ``m_Q[0]``, ``m_U[0]`` (always done by the reference).

    Returns
    -------
    new_weights : ndarray (4, nmembers)
    info : MMCorrection

    Raises
    ------
    ValueError
        If the 2×2 cross-talk matrix is singular (|det| < 1e-6): the set's HWP angles do not
        modulate Q and U.
    """
    w = np.asarray(weights, float)
    rows = mueller_rows(mm, w)
    m_q, m_u = rows[2], rows[3]
    wq = w[2] - (m_q[0] * w[0] if ip else 0.0)
    wu = w[3] - (m_u[0] * w[1] if ip else 0.0)
    a = np.array([[m_q[1], m_q[2]], [m_u[1], m_u[2]]])
    det = float(np.linalg.det(a))
    if not math.isfinite(det) or abs(det) < 1e-6:
        raise ValueError(
            f"Mueller cross-talk matrix [[{m_q[1]:.3g}, {m_q[2]:.3g}], [{m_u[1]:.3g}, {m_u[2]:.3g}]] is singular "
            "(det ~ 0): the set's HWP angles do not modulate Q and U"
        )
    qu = np.linalg.solve(a, np.stack([wq, wu]))
    out = w.copy()
    out[2], out[3] = qu[0], qu[1]
    info = MMCorrection(
        m_q=m_q.copy(),
        m_u=m_u.copy(),
        ip_pq=float(m_q[0]),
        ip_pu=float(m_u[0]),
        poleff=pol_efficiency(m_q, m_u),
        det=det,
    )
    return out, info


def rotate_qu_weights(weights: np.ndarray, theta_deg: float) -> np.ndarray:
    """Rotate the (Q, U) rows by θ: ``Q′ = Q cos2θ − U sin2θ``, ``U′ = Q sin2θ + U cos2θ``.

    Used without Mueller correction (docs/instrument.md §9.4, θ = ½·PA + ALTITUDE, flagged "TODO check" in the
    reference and kept as is).
    """
    w = np.asarray(weights, float).copy()
    c, s = math.cos(math.radians(2 * theta_deg)), math.sin(math.radians(2 * theta_deg))
    q, u = w[2].copy(), w[3].copy()
    w[2] = q * c - u * s
    w[3] = q * s + u * c
    return w

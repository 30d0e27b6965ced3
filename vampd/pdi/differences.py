"""Single, double and triple differences (docs/instrument.md §9.3) as linear combinations.

Every Stokes plane of a set is a fixed linear combination of the member images,
``P = Σ_i w_i c_i``, so its error is exactly ``σ_P = sqrt(Σ_i w_i² σ_i²)`` (members are
independent exposures or independent cameras). The Mueller-matrix correction and the IP
correction are also linear in the members, so the whole chain is carried as a weight matrix
``W`` of shape ``(4, nmembers)`` (rows I_Q, I_U, Q, U) and the errors stay exact; the reference's
``sqrt(Σσ²)/16`` underestimates the Q/U errors by √2 (docs/instrument.md §13.13).

Triple difference (16 members): ``Q = ⅛[(c0A1 − c0A2) − (c0B1 − c0B2) − (c45A1 − c45A2) + (c45B1 −
c45B2)]``, ``I_Q = ⅛ Σ`` of the same eight; U/I_U likewise with 22.5/67.5. Double difference (8):
``Q = ¼[(c0,1 − c0,2) − (c45,1 − c45,2)]``, ``I_Q = ¼ Σ``. So ``I_Q`` is the mean single-beam
intensity (½ of the total, e-/s per camera) and Q, U are on the same scale.
"""

from __future__ import annotations

import numpy as np

from vampd.pdi.sets import all_slots

__all__ = [
    "STOKES_PLANES",
    "difference_weights",
    "apply_weights",
    "single_difference",
    "double_difference",
]

STOKES_PLANES = ("I_Q", "I_U", "Q", "U")


def difference_weights(mode: str) -> np.ndarray:
    """Weights ``(4, nslots)`` (rows I_Q, I_U, Q, U) over the slots of :func:`all_slots`.

    >>> w = difference_weights("triplediff"); w.shape, w[2, 0], abs(w).sum(axis=1).tolist()
    ((4, 16), 0.125, [1.0, 1.0, 1.0, 1.0])
    """
    slots = all_slots(mode)
    n = len(slots)
    w = np.zeros((4, n))
    scale = 1.0 / (n // 2)  # 1/8 (triple) or 1/4 (double)
    for i, slot in enumerate(slots):
        hwp, cam = slot[0], slot[-1]
        s_cam = 1.0 if cam == 1 else -1.0
        s_flc = 1.0 if len(slot) == 2 or slot[1] == "A" else -1.0
        if hwp in (0.0, 45.0):
            s_hwp = 1.0 if hwp == 0.0 else -1.0
            w[0, i] = scale
            w[2, i] = scale * s_cam * s_flc * s_hwp
        else:
            s_hwp = 1.0 if hwp == 22.5 else -1.0
            w[1, i] = scale
            w[3, i] = scale * s_cam * s_flc * s_hwp
    return w


def apply_weights(weights: np.ndarray, images: np.ndarray, variances: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``P = W·c`` and ``σ_P = sqrt(W²·σ²)`` over the member axis.

    Parameters
    ----------
    weights : ndarray (..., nplanes, nmembers)
        Leading axes (e.g. fields) broadcast against the images' leading axes.
    images, variances : ndarray (nmembers, ..., ny, nx)
        Member images and their variances (NaN where undefined).

    Returns
    -------
    data, err : ndarray (..., nplanes, ny, nx)
    """
    images = np.asarray(images)
    variances = np.asarray(variances)
    w = np.asarray(weights, dtype=np.float64)
    lead = images.shape[1:-2]
    wb = np.broadcast_to(w, lead + w.shape[-2:])
    # move members last on the images: (..., ny, nx, nmembers) then contract
    img = np.moveaxis(images, 0, -1)
    var = np.moveaxis(variances, 0, -1)
    data = np.einsum("...pm,...yxm->...pyx", wb, img, optimize=True)
    err = np.sqrt(np.einsum("...pm,...yxm->...pyx", wb * wb, var, optimize=True))
    return data.astype(np.float32), err.astype(np.float32)


def single_difference(c1, c2, e1, e2):
    """``½(c1 − c2)``, ``½(c1 + c2)`` and their common error ``½·hypot(σ1, σ2)`` (docs/instrument.md §10)."""
    c1, c2 = np.asarray(c1, np.float64), np.asarray(c2, np.float64)
    err = 0.5 * np.hypot(e1, e2)
    return (0.5 * (c1 - c2)).astype(np.float32), (0.5 * (c1 + c2)).astype(np.float32), err.astype(np.float32)


def double_difference(c1a, c2a, c1b, c2b, e1a, e2a, e1b, e2b):
    """``½[(c1A − c2A) − (c1B − c2B)]``, the sum ``½Σ`` and the error ``½·sqrt(Σσ²)`` (docs/instrument.md §10)."""
    diff = 0.5 * ((np.asarray(c1a, np.float64) - c2a) - (np.asarray(c1b, np.float64) - c2b))
    tot = 0.5 * (np.asarray(c1a, np.float64) + c2a + c1b + c2b)
    err = 0.5 * np.sqrt(np.square(e1a) + np.square(e2a) + np.square(e1b) + np.square(e2b))
    return diff.astype(np.float32), tot.astype(np.float32), err.astype(np.float32)

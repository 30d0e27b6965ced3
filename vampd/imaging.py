"""Array geometry shared by the stages, PDI and the simulator.

Conventions: arrays are ``(..., y, x)``; pixel (0, 0) is the centre of the first pixel;
images are displayed with the origin at the lower left. Positions are ``(y, x)``.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["frame_center", "window_slices"]


def frame_center(shape) -> tuple[float, float]:
    """Geometric centre ``((ny - 1) / 2, (nx - 1) / 2)`` of the last two axes.

    Accepts a shape tuple or an array. ``(10, 10) -> (4.5, 4.5)``, ``(11, 11) -> (5, 5)``,
    ``(10, 100, 16, 11) -> (7.5, 5)``.
    """
    if hasattr(shape, "shape"):
        shape = shape.shape
    ny, nx = shape[-2], shape[-1]
    return (ny - 1) / 2, (nx - 1) / 2


def window_slices(center, size, shape) -> tuple[slice, slice]:
    """Slices of a square (or ``(h, w)``) window around ``center = (y, x)``.

    Uses astropy's Cutout2D "partial" rule: the origin along each axis is
    ``ceil(c - w / 2)``, then clipped to the frame, so edge windows are smaller.
    A 101x101 frame, centre (80, 50), window 31 gives rows 65:96 and cols 35:66.
    """
    if np.isscalar(size):
        size = (int(size), int(size))
    hy, hx = int(size[0]), int(size[1])
    ny, nx = shape[-2], shape[-1]
    y0 = math.ceil(center[0] - hy / 2)
    x0 = math.ceil(center[1] - hx / 2)
    return (slice(max(y0, 0), min(y0 + hy, ny)), slice(max(x0, 0), min(x0 + hx, nx)))

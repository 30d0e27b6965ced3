"""Unicode sparklines for the live view's trends."""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["BARS", "sparkline"]

BARS = "▁▂▃▄▅▆▇█"


def sparkline(
    values: Sequence[float | None], width: int | None = None, lo: float | None = None, hi: float | None = None
) -> str:
    """One character per value (the last ``width`` values), scaled between ``lo`` and ``hi``.

    Missing or non-finite values are a space; a constant series is drawn at mid-height.

    >>> sparkline([0, 1, 2, 3, 4, 5, 6, 7])
    '▁▂▃▄▅▆▇█'
    """
    vals = list(values)[-width:] if width else list(values)
    good = [v for v in vals if v is not None and math.isfinite(v)]
    if not good:
        return " " * len(vals)
    lo = min(good) if lo is None else lo
    hi = max(good) if hi is None else hi
    out = []
    for v in vals:
        if v is None or not math.isfinite(v):
            out.append(" ")
        elif hi <= lo:
            out.append(BARS[len(BARS) // 2 - 1])
        else:
            k = int(round((min(max(v, lo), hi) - lo) / (hi - lo) * (len(BARS) - 1)))
            out.append(BARS[k])
    return "".join(out)

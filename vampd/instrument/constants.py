"""Fixed optical facts of Subaru/SCExAO used across vampd (one definition each, docs/instrument.md §3.6).

The parametric SCExAO pupil of the reference pipeline (metres, degrees) and unit conversions.
:mod:`vampd.instrument.pupil` builds the pupil model from these; the filter table's resolution
element, the simulator's diffraction scale and the specphot ``DIAMETER`` card use
:data:`PUPIL_DIAMETER`.
"""

from __future__ import annotations

import math

__all__ = [
    "PUPIL_DIAMETER",
    "OBSTRUCTION_DIAMETER",
    "SPIDER_WIDTH",
    "SPIDER_OFFSET",
    "SPIDER_ANGLE",
    "ACTUATOR_DIAMETER",
    "ACTUATOR_CENTERS",
    "ACTUATOR_SPIDER_WIDTH",
    "ACTUATOR_SPIDER_START",
    "MAS_TO_RAD",
]

#: outer diameter of the telescope pupil [m]
PUPIL_DIAMETER = 7.92
#: central obstruction diameter [m]
OBSTRUCTION_DIAMETER = 2.403
#: spider width [m]
SPIDER_WIDTH = 0.1735
#: x of the spider intersections [m]
SPIDER_OFFSET = 0.639
#: spider angle from the x axis [deg]
SPIDER_ANGLE = 51.75
#: diameter of the two dead-actuator masks [m]
ACTUATOR_DIAMETER = 0.632
#: (x, y) centres of the dead-actuator masks [m]
ACTUATOR_CENTERS = ((1.765, 1.431), (-0.498, -2.331))
#: width of the dead-actuator "spider" [m]
ACTUATOR_SPIDER_WIDTH = 0.089
#: (x, y) start of the dead-actuator spider [m]
ACTUATOR_SPIDER_START = (0.521, -1.045)

#: milliarcseconds to radians
MAS_TO_RAD = math.pi / 180.0 / 3.6e6

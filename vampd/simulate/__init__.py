"""Simulated VAMPIRES nights: analytic scene, instrument forward model, raw writer, streamer.

Public entry points: :class:`SimConfig`, :func:`simulate_night` and :func:`stream_night`
(imported lazily so that ``import vampd.simulate`` stays cheap).
"""

from __future__ import annotations

__all__ = ["SimConfig", "simulate_night", "stream_night", "Scene"]


def __getattr__(name):
    if name in ("SimConfig", "simulate_night"):
        from vampd.simulate import night

        return getattr(night, name)
    if name == "stream_night":
        from vampd.simulate.stream import stream_night

        return stream_night
    if name == "Scene":
        from vampd.simulate.scene import Scene

        return Scene
    raise AttributeError(f"module 'vampd.simulate' has no attribute {name!r}")

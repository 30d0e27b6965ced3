"""VAMPIRES detector constants (docs/instrument.md §1.2) and the one NBS predicate (§1.4).

Three detector generations share the same keys: the EMCCDs (Andor iXon Ultra 897, until
June 2023), the qCMOS cameras before the October-2025 non-polarising beamsplitter (NBS)
install, and the same qCMOS cameras after it (new pupil offset, pixel scale and flipped
camera). :func:`detector_from_header` picks one from a header.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from vampd.instrument.headers import HeaderError, camera_number, header_mjd

__all__ = [
    "NBS_INSTALL_MJD",
    "FULLWELL_HALVED_MJD",
    "is_post_nbs",
    "flipped_camera",
    "Detector",
    "emccd_detector",
    "cmos_detector",
    "detector_from_header",
]

#: 2025-10-01T00:00 UTC: the NBS install. Post-NBS means ``mjd >= NBS_INSTALL_MJD``.
NBS_INSTALL_MJD = 60949.0

#: Open interval (2023-06-01, 2023-07-24) in which files were saved with a 2**15 limit
#: ("milk savefits" bug), so the usable full well is halved.
FULLWELL_HALVED_MJD = (60096.0, 60149.0)

_UINT16_MAX = 65535.0

# Per-camera CMOS constants, indexed by camera number.
_CMOS_GAIN = {"fast": 0.103, "slow": 0.105}
_CMOS_READNOISE = {"fast": {1: 0.403, 2: 0.399}, "slow": {1: 0.245, 2: 0.220}}
_CMOS_PXSCALE = {False: {1: 5.91, 2: 5.895}, True: {1: 5.952, 2: 5.938}}
_CMOS_PUPIL_OFFSET = {False: {1: -38.40, 2: -38.58}, True: {1: 129.44, 2: 129.99}}
_CMOS_DEFAULT_PAP = {False: -39.0, True: -37.0}


def is_post_nbs(mjd: float) -> bool:
    """True when ``mjd`` is on or after the NBS install (``mjd >= 60949``).

    This is the only NBS test in vampd: calibration flip, field centres and constants all
    use it, so MJD = 60949.0 exactly is post-NBS everywhere (the reference used ``<`` in
    one place and ``>`` in another).
    """
    return float(mjd) >= NBS_INSTALL_MJD


def flipped_camera(mjd: float) -> int:
    """Camera whose frames are flipped along y during calibration: 1 before NBS, 2 after."""
    return 2 if is_post_nbs(mjd) else 1


def _fullwell_factor(mjd: float) -> float:
    lo, hi = FULLWELL_HALVED_MJD
    return 0.5 if lo < float(mjd) < hi else 1.0


@dataclass(frozen=True)
class Detector:
    """Constants of one VAMPIRES camera in one readout configuration.

    Attributes
    ----------
    kind : str
        ``"emccd"`` or ``"cmos"``.
    cam_num : int
        Camera number, 1 or 2.
    readmode : str
        ``"fast"`` or ``"slow"`` for CMOS; ``"em"`` (EM gain > 0) or ``"conventional"`` for
        the EMCCD.
    emgain : float
        EM gain (``U_EMGAIN``); 0 for CMOS (no EM register).
    gain : float
        Conversion gain [e-/adu].
    effgain : float
        Effective gain [e-/adu] = gain / max(emgain, 1).
    readnoise : float
        Read noise [e- rms].
    enf : float
        Excess noise factor.
    dark_current : float
        Dark current [e-/s/px].
    bias : float
        Bias level [adu].
    fullwell : float
        Full well [e-] (already halved for June–July 2023 files).
    pixel_scale : float
        Plate scale [mas/px].
    pupil_offset : float
        Pupil (instrument) offset angle [deg], written as ``INST-PA``.
    default_pap : float
        Image-rotator pupil position used when a header has no ``D_IMRPAP`` [deg].
    post_nbs : bool
        Whether the post-NBS constants apply.
    """

    kind: str
    cam_num: int
    readmode: str
    emgain: float
    gain: float
    effgain: float
    readnoise: float
    enf: float
    dark_current: float
    bias: float
    fullwell: float
    pixel_scale: float
    pupil_offset: float
    default_pap: float
    post_nbs: bool

    @property
    def satlevel(self) -> float:
        """Full well in adu, ``fullwell / gain`` (may be 65536, i.e. above uint16)."""
        return self.fullwell / self.gain

    @property
    def saturation_adu(self) -> float:
        """Raw level [adu] at or above which a pixel is saturated.

        ``min(bias + fullwell / gain, 65535)``: the full well holds the signal above the bias and
        the 16-bit converter clips at 65535 (first, on the CMOS). The reference's
        ``fullwell / gain`` = 65536 can never be reached by a uint16 pixel (docs/instrument.md §13.4). CMOS
        files of June–July 2023 (full well halved) were written with a 2¹⁵ limit: their level
        is ``fullwell / gain`` = 32768.
        """
        if self.kind == "cmos" and self.fullwell < min(7000.0, 2.0**16 * self.gain) - 1e-6:
            return min(self.satlevel, _UINT16_MAX)
        return min(self.bias + self.satlevel, _UINT16_MAX)

    @property
    def pixel_area(self) -> float:
        """Pixel area [arcsec^2], ``(pixel_scale / 1000) ** 2``."""
        return (self.pixel_scale / 1000.0) ** 2

    @property
    def name(self) -> str:
        """``DETECTOR`` value written when the raw header lacks it."""
        model = "Ultra 897" if self.kind == "emccd" else "ORCA-Quest"
        return f"VCAM{self.cam_num} - {model}"


def _check_cam(cam_num: int) -> int:
    cam_num = int(cam_num)
    if cam_num not in (1, 2):
        raise HeaderError("U_CAMERA", f"value {cam_num!r}, expected 1 or 2")
    return cam_num


def emccd_detector(cam_num: int, emgain: float, mjd: float = 0.0) -> Detector:
    """EMCCD constants (docs/instrument.md §1.2) for camera ``cam_num`` at EM gain ``emgain``."""
    cam_num = _check_cam(cam_num)
    emgain = float(emgain)
    gain = 4.5
    em = emgain > 0
    fullwell = min(800_000.0, 2.0**16 * gain) if em else 180_000.0
    return Detector(
        kind="emccd",
        cam_num=cam_num,
        readmode="em" if em else "conventional",
        emgain=emgain,
        gain=gain,
        effgain=gain / max(emgain, 1.0),
        readnoise=89.0 if em else 9.6,
        enf=math.sqrt(2.0) if em else 1.0,
        dark_current=1.5e-4,
        bias=150.0,
        fullwell=fullwell * _fullwell_factor(mjd),
        pixel_scale=6.24,
        pupil_offset=140.4,
        default_pap=-39.0,
        post_nbs=is_post_nbs(mjd),
    )


def cmos_detector(cam_num: int, readmode: str, mjd: float) -> Detector:
    """qCMOS constants (docs/instrument.md §1.2) for camera ``cam_num``, mode ``fast``/``slow``, at ``mjd``."""
    cam_num = _check_cam(cam_num)
    mode = str(readmode).strip().lower()
    if mode not in _CMOS_GAIN:
        raise HeaderError("U_DETMOD", f"value {readmode!r}, expected 'FAST' or 'SLOW'")
    post = is_post_nbs(mjd)
    gain = _CMOS_GAIN[mode]
    return Detector(
        kind="cmos",
        cam_num=cam_num,
        readmode=mode,
        emgain=0.0,
        gain=gain,
        effgain=gain,
        readnoise=_CMOS_READNOISE[mode][cam_num],
        enf=1.0,
        dark_current=3.6e-3,
        bias=200.0,
        fullwell=min(7000.0, 2.0**16 * gain) * _fullwell_factor(mjd),
        pixel_scale=_CMOS_PXSCALE[post][cam_num],
        pupil_offset=_CMOS_PUPIL_OFFSET[post][cam_num],
        default_pap=_CMOS_DEFAULT_PAP[post],
        post_nbs=post,
    )


def detector_from_header(header, path=None) -> Detector:
    """The detector that wrote ``header`` (docs/instrument.md §1.2).

    ``U_EMGAIN`` present → EMCCD; else ``U_DETMOD`` present → CMOS (pre/post NBS from
    ``MJD``); else :class:`HeaderError`. Needs ``U_CAMERA`` and an MJD (``MJD`` or
    ``MJD-STR``/``MJD-END``); evaluate it on the header returned by ``fix_header``.
    """
    cam = camera_number(header, path)
    if "U_EMGAIN" in header:
        try:
            emgain = float(header["U_EMGAIN"])
        except (TypeError, ValueError):
            raise HeaderError("U_EMGAIN", f"value {header['U_EMGAIN']!r}, expected a number", path) from None
        mjd = header_mjd(header, path, required=False)
        return emccd_detector(cam, emgain, 0.0 if mjd is None else mjd)
    if "U_DETMOD" in header:
        mjd = header_mjd(header, path)
        try:
            return cmos_detector(cam, header["U_DETMOD"], mjd)
        except HeaderError as err:
            raise HeaderError(err.keyword, err.problem, path) from None
    raise HeaderError("U_EMGAIN/U_DETMOD", "could not determine detector: neither U_EMGAIN nor U_DETMOD", path)

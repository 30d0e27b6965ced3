"""Mueller-matrix model of VAMPIRES (docs/instrument.md §9.5, §1.5, §13.14).

Elementary matrices act on Stokes vectors ``(I, Q, U, V)``; with ``C = cos 2θ`` and
``S = sin 2θ`` they are exactly those of docs/instrument.md §9.5 and accept arrays of angles (returning
``(..., 4, 4)``). The instrument chain (right-most acts first) is

    M = PBS(camera) · [D] · FLC · Optics · IMR · HWP · R(-alt) · G_M3 · R(PA)

where ``D`` (dichroic) exists in the CMOS model only and the FLC is the identity when it is out of
the beam (CMOS ``U_FLCST`` != "IN"). The simulator uses :func:`instrument_mueller` as its forward
model and PDI inverts the same function, so all sign conventions live here.

FLC fast-axis angles (docs/instrument.md §1.5): state A at 0° and state B at 45° on the EMCCD instrument, B at
**43°** on the CMOS instrument — the measured switching angle of the CMOS-era FLC, used by the
reference in its ideal model and assumed by its fitted CMOS calibrations. Both the ideal model and
table rows follow this; a table may override the angles with optional ``flc_theta_a`` /
``flc_theta_b`` columns (degrees).

Differences from the reference (docs/instrument.md §13.14):

* The model (EMCCD vs CMOS) is chosen by the detector (``U_EMGAIN`` present → EMCCD, docs/instrument.md §1.2), not
  by ``U_MBI``.
* All retardances are in waves and converted with ``2π`` — including the dichroic's, which the
  reference converts as if degrees (suspected unit bug).
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass, fields, replace

import numpy as np

from vampd.instrument.angles import SUBARU_LAT_DEG
from vampd.instrument.headers import HeaderError, header_float

__all__ = [
    "MuellerParams",
    "MuellerTableError",
    "rotator",
    "linear_retarder",
    "diattenuating_retarder",
    "wollaston",
    "hwp_sync_angle",
    "FLC_THETA_B",
    "instrument_mueller",
    "mueller_from_header",
    "mm_table_key",
]

MBI_FIELDS = ("F610", "F670", "F720", "F760")

#: FLC state-B fast-axis angle [deg] per instrument (docs/instrument.md §1.5); state A is at 0°
FLC_THETA_B = {"emccd": 45.0, "cmos": 43.0}


class MuellerTableError(ValueError):
    """A Mueller-parameter table is malformed or lacks the requested row."""


# ----------------------------------------------------------------------------------------------
# elementary matrices


def _empty(*arrays) -> tuple[list[np.ndarray], np.ndarray]:
    arrs = np.broadcast_arrays(*[np.asarray(a, dtype=float) for a in arrays])
    return arrs, np.zeros(arrs[0].shape + (4, 4))


def rotator(theta_rad) -> np.ndarray:
    """Rotation of the Stokes reference frame by ``theta`` (rad): ``Q' = CQ + SU``, ``U' = -SQ + CU``."""
    (t,), m = _empty(theta_rad)
    c, s = np.cos(2 * t), np.sin(2 * t)
    m[..., 0, 0] = 1
    m[..., 1, 1] = c
    m[..., 1, 2] = s
    m[..., 2, 1] = -s
    m[..., 2, 2] = c
    m[..., 3, 3] = 1
    return m


def linear_retarder(theta_rad, delta_rad) -> np.ndarray:
    """Linear retarder, fast axis at ``theta`` (rad), retardance ``delta`` (rad)."""
    (t, d), m = _empty(theta_rad, delta_rad)
    c, s = np.cos(2 * t), np.sin(2 * t)
    cd, sd = np.cos(d), np.sin(d)
    m[..., 0, 0] = 1
    m[..., 1, 1] = c * c + s * s * cd
    m[..., 1, 2] = (1 - cd) * s * c
    m[..., 1, 3] = -s * sd
    m[..., 2, 1] = (1 - cd) * s * c
    m[..., 2, 2] = s * s + c * c * cd
    m[..., 2, 3] = c * sd
    m[..., 3, 1] = s * sd
    m[..., 3, 2] = -c * sd
    m[..., 3, 3] = cd
    return m


def diattenuating_retarder(theta_rad, epsilon, delta_rad) -> np.ndarray:
    """Diattenuating retarder (e.g. a mirror): axis ``theta`` (rad), diattenuation ``epsilon``,
    retardance ``delta`` (rad); ``f = sqrt(1 - epsilon²)``."""
    (t, e, d), m = _empty(theta_rad, epsilon, delta_rad)
    c, s = np.cos(2 * t), np.sin(2 * t)
    f = np.sqrt(1 - e * e)
    fcd, fsd = f * np.cos(d), f * np.sin(d)
    m[..., 0, 0] = 1
    m[..., 0, 1] = e * c
    m[..., 0, 2] = e * s
    m[..., 1, 0] = e * c
    m[..., 1, 1] = c * c + s * s * fcd
    m[..., 1, 2] = c * s * (1 - fcd)
    m[..., 1, 3] = -s * fsd
    m[..., 2, 0] = e * s
    m[..., 2, 1] = c * s * (1 - fcd)
    m[..., 2, 2] = s * s + c * c * fcd
    m[..., 2, 3] = c * fsd
    m[..., 3, 1] = s * fsd
    m[..., 3, 2] = -c * fsd
    m[..., 3, 3] = fcd
    return m


def wollaston(eta: float = 1.0, ordinary: bool = True) -> np.ndarray:
    """Polarising beam splitter beam: ``½[[1, ±η, 0, 0], [±η, 1, 0, 0], [0, 0, r, 0], [0, 0, 0, r]]``
    with ``r = sqrt(1 - η²)``; "+" is the ordinary beam (camera 1)."""
    sign = 1.0 if ordinary else -1.0
    r = math.sqrt(max(0.0, 1.0 - eta * eta))
    return 0.5 * np.array([[1, sign * eta, 0, 0], [sign * eta, 1, 0, 0], [0, 0, r, 0], [0, 0, 0, r]], dtype=float)


# ----------------------------------------------------------------------------------------------
# parameters

# table column -> MuellerParams field (reference names first, then our own as aliases)
_TABLE_COLUMNS = {
    "m3_diat": "m3_diat",
    "m3_theta": "m3_offset",
    "hwp_delta": "hwp_offset",
    "hwp_phi": "hwp_phi",
    "imr_delta": "imr_offset",
    "imr_phi": "imr_phi",
    "optics_diat": "optics_diat",
    "optics_theta": "optics_theta",
    "optics_phi": "optics_phi",
    "flc_theta": "flc_theta",
    "flc_phi": "flc_phi",
    "dichroic_diat": "dichroic_diat",
    "dichroic_theta": "dichroic_theta",
    "dichroic_phi": "dichroic_phi",
}
_ALIASES = {"m3_offset": "m3_theta", "hwp_offset": "hwp_delta", "imr_offset": "imr_delta"}


@dataclass(frozen=True)
class MuellerParams:
    """Parameters of the Mueller model (docs/instrument.md §9.5). Angles in degrees, retardances in waves.

    Defaults are the ideal EMCCD model (FLC B at 45°); :meth:`ideal` gives the CMOS one (43°).
    """

    m3_diat: float = 0.0
    m3_offset: float = 0.0
    hwp_offset: float = 0.0
    hwp_phi: float = 0.5
    imr_offset: float = 0.0
    imr_phi: float = 0.5
    optics_diat: float = 0.0
    optics_theta: float = 0.0
    optics_phi: float = 0.0
    flc_theta_a: float = 0.0
    flc_theta_b: float = 45.0
    flc_phi: float = 0.5
    dichroic_diat: float = 0.0
    dichroic_theta: float = 0.0
    dichroic_phi: float = 0.0

    @classmethod
    def ideal(cls, detector_kind: str = "cmos") -> MuellerParams:
        """Ideal components: half-wave HWP, IMR and FLC, no diattenuation.

        FLC A at 0°; B at 45° for the EMCCD and at 43° for the CMOS instrument (docs/instrument.md §1.5: the
        CMOS-era FLC switches by 43°, and the reference's ideal CMOS model uses that too).
        """
        return cls(flc_theta_b=FLC_THETA_B[_check_kind(detector_kind)])

    @classmethod
    def from_table(cls, path: str | os.PathLike, key: str, detector_kind: str = "cmos") -> MuellerParams:
        """Fitted parameters: the row ``key`` (see :func:`mm_table_key`) of a CSV table.

        The first column holds the key; the others are the docs/instrument.md §9.5 columns ``m3_diat, m3_theta,
        hwp_delta, hwp_phi, imr_delta, imr_phi, optics_diat, optics_theta, optics_phi,
        flc_theta, flc_phi, dichroic_diat, dichroic_theta, dichroic_phi`` (``m3_offset``,
        ``hwp_offset``, ``imr_offset`` are accepted as aliases; missing dichroic columns
        default to 0). EMCCD: ``flc_theta`` is an offset added to (0°, 45°) and ``flc_phi`` is
        used; CMOS keeps the FLC angles (0°, 43°) and ½ wave, as the reference does. Optional
        vampd columns ``flc_theta_a`` and ``flc_theta_b`` (absolute angles [deg], either
        detector) override the FLC angles when the cell is not empty.

        Raises
        ------
        MuellerTableError
            Missing columns, non-numeric values, or no row for ``key`` (the message lists the
            keys present).
        """
        kind = _check_kind(detector_kind)
        with open(path, newline="") as fh:
            rows = [r for r in csv.reader(fh) if r and any(c.strip() for c in r)]
        if len(rows) < 2:
            raise MuellerTableError(f"{path}: Mueller table has no data rows")
        header = [h.strip() for h in rows[0]]
        cols = {}
        for i, h in enumerate(header[1:], start=1):
            name = _ALIASES.get(h, h)
            if name in _TABLE_COLUMNS:
                cols[name] = i
        required = [c for c in _TABLE_COLUMNS if not c.startswith("dichroic")]
        missing = [c for c in required if c not in cols]
        if missing:
            raise MuellerTableError(f"{path}: Mueller table lacks column(s) {', '.join(missing)}")
        row = next((r for r in rows[1:] if _same_key(r[0], key)), None)
        if row is None:
            keys = ", ".join(r[0].strip() for r in rows[1:])
            raise MuellerTableError(f"{path}: no Mueller-table row {key!r}; rows are: {keys}")
        values = {}
        for name, i in cols.items():
            try:
                values[_TABLE_COLUMNS[name]] = float(row[i])
            except (ValueError, IndexError):
                cell = row[i] if i < len(row) else "<missing>"
                raise MuellerTableError(f"{path}: row {key!r} column {name} = {cell!r}, expected a number") from None
        flc_theta = values.pop("flc_theta")
        flc_phi = values.pop("flc_phi")
        if kind == "emccd":
            values.update(flc_theta_a=flc_theta, flc_theta_b=FLC_THETA_B[kind] + flc_theta, flc_phi=flc_phi)
        else:
            values.update(flc_theta_a=0.0, flc_theta_b=FLC_THETA_B[kind], flc_phi=0.5)
        values.update(_flc_overrides(path, key, header, row))
        return cls(**values)

    def replace(self, **changes) -> MuellerParams:
        """Copy with some parameters changed."""
        return replace(self, **changes)

    def as_dict(self) -> dict[str, float]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _flc_overrides(path, key, header: list[str], row: list[str]) -> dict[str, float]:
    """Optional absolute FLC angles from ``flc_theta_a`` / ``flc_theta_b`` columns."""
    out = {}
    for name in ("flc_theta_a", "flc_theta_b"):
        if name not in header[1:]:
            continue
        i = header.index(name)
        cell = row[i].strip() if i < len(row) else ""
        if not cell:
            continue
        try:
            out[name] = float(cell)
        except ValueError:
            raise MuellerTableError(f"{path}: row {key!r} column {name} = {cell!r}, expected a number") from None
    return out


def _same_key(cell: str, key) -> bool:
    a, b = str(cell).strip(), str(key).strip()
    if a.lower() == b.lower():
        return True
    try:
        return float(a) == float(b)
    except ValueError:
        return False


def _check_kind(detector_kind: str) -> str:
    kind = str(detector_kind).lower()
    if kind not in ("emccd", "cmos"):
        raise ValueError(f"detector_kind={detector_kind!r}, expected 'emccd' or 'cmos'")
    return kind


def mm_table_key(filter_name_or_field: str) -> str:
    """Row key of the Mueller table: MBI fields as is, ``Open`` → ``"675"``, else "-50" removed.

    >>> mm_table_key("750-50"), mm_table_key("Open"), mm_table_key("F720")
    ('750', '675', 'F720')
    """
    name = str(filter_name_or_field).strip()
    if name.upper() in MBI_FIELDS:
        return name.upper()
    if name.lower() == "open":
        return "675"
    return name.replace("-50", "")


# ----------------------------------------------------------------------------------------------
# chain


def hwp_sync_angle(azimuth_deg, altitude_deg):
    """HWP angle added in pupil-tracking ("ADI sync") mode, in radians (docs/instrument.md §9.5).

    ``θ_sync = ½·atan2(sin A, sin h cos A + cos h tan φ) + h`` with ``A = rad(AZIMUTH - 180)``,
    ``h = rad(ALTITUDE)`` and φ the Subaru latitude. Reproduces the reference formula (its
    validation against observatory documentation is an open item, docs/instrument.md §13.14).
    """
    a = np.deg2rad(np.asarray(azimuth_deg, dtype=float) - 180.0)
    h = np.deg2rad(np.asarray(altitude_deg, dtype=float))
    phi = math.radians(SUBARU_LAT_DEG)
    return 0.5 * np.arctan2(np.sin(a), np.sin(h) * np.cos(a) + np.cos(h) * math.tan(phi)) + h


def _flc_angle(flc_state, params: MuellerParams) -> float:
    state = str(flc_state).strip().upper()
    if state in ("A", "1"):
        return params.flc_theta_a
    if state in ("B", "2"):
        return params.flc_theta_b
    raise ValueError(f"FLC state {flc_state!r}, expected 'A' or 'B' when the FLC is in the beam")


def instrument_mueller(
    pa_deg,
    altitude_deg,
    azimuth_deg,
    hwp_deg,
    imr_deg,
    flc_state,
    camera: int,
    params: MuellerParams | None = None,
    detector_kind: str = "cmos",
    flc_in: bool = True,
    hwp_adi_sync: bool = True,
) -> np.ndarray:
    """Mueller matrix from sky Stokes parameters to the intensity on one camera (docs/instrument.md §9.5).

    Parameters
    ----------
    pa_deg, altitude_deg, azimuth_deg : float or array
        Parallactic angle (header ``PA``), telescope ``ALTITUDE`` and ``AZIMUTH`` (degrees).
    hwp_deg, imr_deg : float or array
        HWP angle ``RET-ANG1`` and image-rotator angle ``D_IMRANG`` (degrees).
    flc_state : {"A", "B"}
        FLC state; ignored when the FLC is out of the beam (CMOS, ``flc_in=False``).
    camera : {1, 2}
        Camera 1 receives the ordinary ("+") beam of the beam splitter.
    params : MuellerParams, optional
        Model parameters; default :meth:`MuellerParams.ideal`.
    detector_kind : {"cmos", "emccd"}
        EMCCD model (no dichroic, FLC always in) or CMOS model (dichroic, optional FLC).
    flc_in : bool
        CMOS only: FLC in the beam (``U_FLCST == "IN"``).
    hwp_adi_sync : bool
        Add :func:`hwp_sync_angle` to the HWP angle (pupil-tracking HWP).

    Returns
    -------
    ndarray
        ``(..., 4, 4)`` with ``...`` the broadcast shape of the angle arguments (``(4, 4)`` for
        scalars). Row 0 maps the sky Stokes vector to the measured intensity.
    """
    p = MuellerParams.ideal(detector_kind) if params is None else params
    kind = _check_kind(detector_kind)
    if int(camera) not in (1, 2):
        raise ValueError(f"camera={camera!r}, expected 1 or 2")
    pa, alt, az, hwp, imr = np.broadcast_arrays(
        *(np.asarray(v, dtype=float) for v in (pa_deg, altitude_deg, azimuth_deg, hwp_deg, imr_deg))
    )
    telescope = (
        rotator(-np.deg2rad(alt))
        @ diattenuating_retarder(math.radians(p.m3_offset), p.m3_diat, math.pi)
        @ rotator(np.deg2rad(pa))
    )
    theta_hwp = np.deg2rad(hwp + p.hwp_offset)
    if hwp_adi_sync:
        theta_hwp = theta_hwp + hwp_sync_angle(az, alt)
    hwp_m = linear_retarder(theta_hwp, 2 * math.pi * p.hwp_phi)
    imr_m = linear_retarder(np.deg2rad(imr + p.imr_offset), 2 * math.pi * p.imr_phi)
    optics = diattenuating_retarder(math.radians(p.optics_theta), p.optics_diat, 2 * math.pi * p.optics_phi)
    common = optics @ imr_m @ hwp_m @ telescope
    pbs = wollaston(1.0, ordinary=int(camera) == 1)
    if kind == "emccd" or flc_in:
        flc = linear_retarder(math.radians(_flc_angle(flc_state, p)), 2 * math.pi * p.flc_phi)
    else:
        flc = np.eye(4)
    if kind == "emccd":
        return pbs @ flc @ common
    dichroic = diattenuating_retarder(math.radians(p.dichroic_theta), p.dichroic_diat, 2 * math.pi * p.dichroic_phi)
    return pbs @ dichroic @ flc @ common


def _header_float(header, key: str, path=None) -> float:
    return header_float(header, key, path, purpose="needed for the Mueller matrix")


def mueller_from_header(
    header, params: MuellerParams | None = None, hwp_adi_sync: bool = True, path=None
) -> np.ndarray:
    """:func:`instrument_mueller` for one (normalised) file header.

    Reads ``PA``, ``ALTITUDE``, ``AZIMUTH``, ``RET-ANG1``, ``D_IMRANG``, ``U_FLC``,
    ``U_CAMERA`` and ``U_FLCST``; the model is EMCCD when ``U_EMGAIN`` is present, else CMOS.
    For CMOS the FLC is in the beam when ``U_FLCST == "IN"`` (or, without ``U_FLCST``, when
    ``U_FLC`` is A or B).

    Raises
    ------
    HeaderError
        A keyword is missing or unusable (the message names it and the value found).
    """
    pa = _header_float(header, "PA", path)
    alt = _header_float(header, "ALTITUDE", path)
    az = _header_float(header, "AZIMUTH", path)
    hwp = _header_float(header, "RET-ANG1", path)
    imr = _header_float(header, "D_IMRANG", path)
    camera = int(_header_float(header, "U_CAMERA", path))
    if camera not in (1, 2):
        raise HeaderError("U_CAMERA", f"value {header['U_CAMERA']!r}, expected 1 or 2", path)
    kind = "emccd" if "U_EMGAIN" in header else "cmos"
    flc = str(header.get("U_FLC", "NA")).strip().upper()
    if kind == "emccd":
        flc_in = True
    elif "U_FLCST" in header:
        flc_in = str(header["U_FLCST"]).strip().upper() == "IN"
    else:
        flc_in = flc in ("A", "B")
    if flc_in and flc not in ("A", "B", "1", "2"):
        raise HeaderError("U_FLC", f"value {header.get('U_FLC')!r}, expected 'A' or 'B'", path)
    return instrument_mueller(
        pa, alt, az, hwp, imr, flc, camera, params, kind, flc_in=flc_in, hwp_adi_sync=hwp_adi_sync
    )

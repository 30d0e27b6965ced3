"""Shared test constants, markers and fixtures.

The instrument/catalogue data and the reference documents are kept next to the checkout, in
``../shared`` (see the README): ``../shared/data`` is the data directory (``VAMPD_DATA_DIR``) and
``../shared/docs/reference-config-example.toml`` the reference pipeline's example configuration.
Tests that need them are skipped when they are absent.

Modules import the constants directly (``from conftest import DATA_DIR, needs_data``); pytest puts
this directory on ``sys.path`` (default ``prepend`` import mode, no ``__init__.py`` here).

Test tiers: tests that take more than ~5 s are marked ``@pytest.mark.slow``; the fast tier is
``pytest -m "not slow"``. The marker is registered in ``pyproject.toml`` (``--strict-markers``).
"""

from __future__ import annotations

from pathlib import Path

import pytest

#: The repository root (the checkout).
REPO = Path(__file__).resolve().parents[1]
#: ``../shared`` next to the checkout: instrument data and reference documents (not in the repository).
SHARED = (REPO.parent / "shared").resolve()
#: The instrument/catalogue data directory used by the tests (``VAMPD_DATA_DIR``).
DATA_DIR = SHARED / "data"
#: The reference pipeline's example configuration (vampires_dpp 0.14).
REFERENCE_CONFIG = SHARED / "docs" / "reference-config-example.toml"

#: True when the data directory is present (its filter table is the file every data test reads).
HAVE_DATA = (DATA_DIR / "vampires_filters.csv").is_file()

#: Skip a test (or module, via ``pytestmark``) when ``../shared/data`` is absent.
needs_data = pytest.mark.skipif(not HAVE_DATA, reason="../shared/data not present")
#: Skip a test when the reference example configuration is absent.
needs_reference_config = pytest.mark.skipif(
    not REFERENCE_CONFIG.is_file(), reason="../shared/docs/reference-config-example.toml not present"
)


@pytest.fixture
def data_env(monkeypatch) -> Path:
    """``VAMPD_DATA_DIR`` points at ``../shared/data`` for this test (skipped if it is absent)."""
    if not HAVE_DATA:
        pytest.skip("../shared/data not present")
    monkeypatch.setenv("VAMPD_DATA_DIR", str(DATA_DIR))
    return DATA_DIR


@pytest.fixture
def no_data_dir(monkeypatch) -> None:
    """No ``VAMPD_DATA_DIR`` in the environment for this test (built-in tables, top-hat filters)."""
    monkeypatch.delenv("VAMPD_DATA_DIR", raising=False)


@pytest.fixture(scope="module")
def no_data_dir_module():
    """Module-scoped :func:`no_data_dir`, for module-scoped fixtures that reduce a whole night."""
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("VAMPD_DATA_DIR", raising=False)
        yield


@pytest.fixture(scope="session", autouse=True)
def offline():
    """No test may reach the network: astropy's downloads (IERS, data files) are off for the whole
    session, whatever the import order. vampd's entry points do the same; the subprocess tests check
    those."""
    from vampd._offline import configure_offline

    configure_offline()


#: ``[watch]`` options for daemons under test: short settle/complete/reconcile times, sidecars
#: expected, two tries (so a fault parks quickly).
FAST_WATCH = dict(
    settle_time=0.1,
    complete_timeout=3.0,
    reconcile_interval=2.0,
    stop_timeout=20.0,
    expect_sidecar=True,
    workers=2,
    max_tries=2,
)


def apply_fast_watch(cfg, **watch):
    """Set :data:`FAST_WATCH` on ``cfg.watch``, overridden by ``watch``; return ``cfg``."""
    for k, v in {**FAST_WATCH, **watch}.items():
        setattr(cfg.watch, k, v)
    return cfg


def simulate_pdi_night(sim_dir: Path, name: str, crop_width: int, steady_strehl: float | None = None, **sim):
    """A noise-free simulated night without calibration files, and a ``pdi-triplediff`` config for it.

    Parameters
    ----------
    sim_dir : Path
        Where :func:`vampd.simulate.night.simulate_night` writes (``sim_dir/raw``).
    name : str
        The config's ``name`` (product file prefix).
    crop_width : int
        ``align.crop_width`` [px].
    steady_strehl : float, optional
        If given, a steady AO: this Strehl ratio for every frame, no jitter, no flux variation.
    **sim
        Further :class:`~vampd.simulate.night.SimConfig` fields.

    Returns
    -------
    sim, truth, cfg
        The simulator config, its truth dict, and the pipeline config (ideal Mueller matrices).
    """
    from vampd.config.presets import preset_config
    from vampd.simulate.night import SimConfig, simulate_night

    if steady_strehl is not None:
        sim.update(strehl_range=(steady_strehl, steady_strehl), jitter_rms_px=0.0, flux_rms=0.0)
    sim_cfg = SimConfig(noise_free=True, calib=False, **sim)
    truth = simulate_night(sim_dir, sim_cfg)
    cfg = preset_config("pdi-triplediff")
    cfg.name = name
    cfg.align.crop_width = crop_width
    cfg.polarimetry.use_ideal_mm = True
    return sim_cfg, truth, cfg

"""The vampd-only configuration sections: [watch] (watcher and workers), [alerts] (live-view
alert thresholds) and [cluster] (reprocess on Dask)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import ClassVar

from pydantic import (
    Field,
    field_validator,
)

from vampd.config.base import NonNegFloat, PositiveFloat, PositiveFraction, PositiveInt, _Model

# ---------------------------------------------------------------------------------------------------------
# vampd-only sections


class WatchConfig(_Model):
    """vampd: the directory watcher, worker pool and its resource limits."""

    _section: ClassVar[str] = "watch"

    inputs: list[Path] = Field(default_factory=list, description="Directories to watch for raw files")
    outdir: Path | None = Field(None, description="Output directory (default: the config file's directory)")
    patterns: list[str] = Field(
        default_factory=lambda: ["*.fits", "*.fits.fz"], description="Glob patterns of raw files"
    )
    recursive: bool = Field(False, description="Also watch sub-directories")
    poll: bool = Field(False, description="Poll the directories instead of inotify (NFS/CIFS mounts)")
    poll_interval: PositiveFloat = Field(2.0, description="Seconds between polls")
    complete_timeout: PositiveFloat = Field(
        120.0, description="Seconds after which a file that never becomes complete is failed"
    )
    settle_time: NonNegFloat = Field(0.5, description="Seconds a file's size must stay constant before reading")
    workers: PositiveInt = Field(2, description="Worker processes")
    expect_sidecar: bool = Field(
        False, description="Require a NAME.txt sidecar with NAXIS3 lines before a file counts as complete"
    )
    max_tries: PositiveInt = Field(3, description="Attempts per file before it is marked failed")
    memory_factor: PositiveFloat = Field(6.0, description="Memory reserved per job = cube bytes x this factor")
    memory_limit_gb: PositiveFloat | None = Field(
        None, description="Memory budget of all jobs in GB (default: 50 % of the machine's RAM)"
    )
    queue_size: PositiveInt = Field(64, description="Maximum number of queued jobs")
    reconcile_interval: PositiveFloat = Field(
        30.0, description="Seconds between directory re-scans that catch missed events"
    )
    stop_timeout: PositiveFloat = Field(60.0, description="Seconds to wait for running jobs on shutdown")

    @field_validator("patterns")
    @classmethod
    def _check_patterns(cls, v: list[str]) -> list[str]:
        if not v or any(not p.strip() for p in v):
            raise ValueError('must be a non-empty list of glob patterns, e.g. ["*.fits", "*.fits.fz"]')
        return v

    def effective_memory_limit_gb(self) -> float:
        """``memory_limit_gb`` or, if unset, half of the physical memory (GB)."""
        if self.memory_limit_gb is not None:
            return float(self.memory_limit_gb)
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
            total = 8 * 1024**3
        return 0.5 * total / 1024**3


class AlertsConfig(_Model):
    """vampd: thresholds of the live view's alerts."""

    _section: ClassVar[str] = "alerts"

    lag_seconds: PositiveFloat = Field(60.0, description="Seconds a camera may lag the other before an alert")
    flc_imbalance: PositiveFraction = Field(
        0.2, description="Fractional difference of FLC A/B file counts that raises an alert"
    )
    hwp_grid_tolerance: PositiveFloat = Field(
        0.5, description="Degrees an HWP angle may be off the 0/22.5/45/67.5 grid"
    )
    idle_seconds: PositiveFloat = Field(120.0, description="Seconds without a new file before an idle alert")
    strehl_drop: PositiveFraction = Field(0.3, description="Fractional Strehl drop versus the running median")
    flux_drop: PositiveFraction = Field(0.5, description="Fractional flux drop versus the running median")
    disk_free_gb: NonNegFloat = Field(20.0, description="Alert when the output disk has less free space (GB)")


class ClusterConfig(_Model):
    """vampd: ``vampd reprocess`` on Dask distributed (optional extra ``[cluster]``)."""

    _section: ClassVar[str] = "cluster"

    scheduler: str | None = Field(
        None, description="Dask scheduler address, e.g. tcp://host:8786 (default: start a local cluster)"
    )
    local_workers: PositiveInt | None = Field(
        None, description="Worker processes of the local cluster (default: [watch].workers)"
    )
    oversubscribe: PositiveInt = Field(2, description="Tasks in flight per worker thread")
    memory_fraction: PositiveFraction = Field(
        0.5, description="Share of a worker's memory limit for task estimates when workers declare no MEMORY resource"
    )
    dashboard_address: str = Field(":8787", description="Dashboard address of the local cluster (':0' = any free port)")

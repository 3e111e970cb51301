"""What a flow run needs beyond the method's specs: the stage cache, the task runner, tracking."""

from __future__ import annotations

from dataclasses import dataclass

from dtr_core.specs import SpecError

TASK_RUNNERS = ("thread", "dask")
DASK_CLUSTERS = ("cpu", "cuda")


@dataclass(frozen=True)
class PipelineOptions:
    """What the flow needs beyond the method's specs."""

    cache_dir: str
    refresh: frozenset[str]
    task_runner: str
    max_workers: int
    dask_address: str | None
    dask_workers: int
    dask_cluster: str
    tracking_enabled: bool
    tracking_uri: str
    experiment: str
    artifact_location: str | None = None  # where a new experiment keeps its files (None: the store's default)

    def __post_init__(self) -> None:
        if self.task_runner not in TASK_RUNNERS:
            raise SpecError(f"runtime.task_runner={self.task_runner!r}: must be one of {list(TASK_RUNNERS)}")
        if self.dask_cluster not in DASK_CLUSTERS:
            raise SpecError(f"runtime.dask_cluster={self.dask_cluster!r}: must be one of {list(DASK_CLUSTERS)}")
        if self.max_workers < 1 or self.dask_workers < 1:
            raise SpecError("runtime.max_workers and runtime.dask_workers must be >= 1")

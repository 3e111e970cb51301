"""MLflow as a ``dtr_core.tracking.Tracker``: one MLflow run per flow run."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from dtr_core.tracking import NoTracking, Tracker

from .options import PipelineOptions

# MLflow accepts at most 1000 metrics in one batch.
BATCH = 900


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """{"a": {"b": 1}, "g": [{"k": 2}]} → {"a.b": "1", "g.0.k": "2"} (MLflow params are flat strings)."""
    flat = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, list) and value and all(isinstance(item, Mapping) for item in value):
            value = {str(index): item for index, item in enumerate(value)}  # e.g. the guards
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = str(value)
    return flat


class MlflowTracker:
    """Logs into one MLflow run by its id, through a client of its own: picklable, so stages on
    Dask workers log into the same run."""

    def __init__(self, tracking_uri: str, run_id: str) -> None:
        self.tracking_uri, self.run_id = tracking_uri, run_id
        self._client = None

    def __getstate__(self) -> dict:
        return {"tracking_uri": self.tracking_uri, "run_id": self.run_id, "_client": None}

    @property
    def client(self):
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(self.tracking_uri)
        return self._client

    def _log_batch(self, metrics: list) -> None:
        for start in range(0, len(metrics), BATCH):
            self.client.log_batch(self.run_id, metrics=metrics[start:start + BATCH])

    def log_params(self, params: Mapping[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(key, value) for key, value in params.items()]
        for start in range(0, len(items), 100):  # MLflow's limit for params in one batch
            self.client.log_batch(self.run_id, params=items[start:start + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._log_batch([Metric(key, float(value), now, step or 0) for key, value in metrics.items()])

    def log_series(self, name: str, values: Sequence[float], first_step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._log_batch([Metric(name, float(value), now, first_step + i) for i, value in enumerate(values)])

    def log_tags(self, tags: Mapping[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, value)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_artifacts(self, folder: str | Path, artifact_path: str) -> None:
        self.client.log_artifacts(self.run_id, str(folder), artifact_path)


@contextmanager
def open_tracker(options: PipelineOptions, run_name: str, tags: Mapping[str, str]) -> Iterator[Tracker]:
    """The flow run's tracker: an MLflow run (ended FINISHED, or FAILED on an error), or no tracking."""
    if not options.tracking_enabled:
        yield NoTracking()
        return
    import mlflow

    # mlflow sets its own logger to INFO on import: its store set-up is not the user's business.
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    mlflow.set_tracking_uri(options.tracking_uri)
    mlflow.set_experiment(options.experiment)
    run = mlflow.start_run(run_name=run_name, tags=dict(tags))
    status = "FAILED"
    try:
        yield MlflowTracker(options.tracking_uri, run.info.run_id)
        status = "FINISHED"
    finally:
        mlflow.end_run(status=status)

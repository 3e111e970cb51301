"""MLflow as a ``dtr_core.tracking.Tracker``: one MLflow run per flow run."""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from dtr_core.io import is_running
from dtr_core.locks import file_lock
from dtr_core.tracking import NoTracking, Tracker

from .options import PipelineOptions

log = logging.getLogger(__name__)

# MLflow accepts at most 1000 metrics in one batch.
BATCH = 900
RUN_NAME_LIMIT = 250  # characters of a run name that every MLflow store keeps
# Tags of each run: the config it ran (a run started again with it continues), and its process.
CONFIG_TAG, HOST_TAG, PID_TAG = "dtr.config_digest", "dtr.host", "dtr.pid"
# Read by MLflow 3 UIs before 3.x's sidebar switch (GenAI / Machine learning) to open the experiment
# on its runs rather than on traces; later UIs follow the switch (README, "Inspecting runs").
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


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
        self._series_logged: dict[str, float] = {}  # when each series' last chunk was logged

    def __getstate__(self) -> dict:
        return {"tracking_uri": self.tracking_uri, "run_id": self.run_id, "_client": None, "_series_logged": {}}

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
        """A curve arrives in chunks (every ``distill.CURVE_LOG_EVERY`` steps): a chunk's points are
        spread evenly since the series' previous chunk, so the wall-time axis is not a staircase (a
        first chunk's points share its time)."""
        from mlflow.entities import Metric

        if not values:
            return
        now = time.time()
        spacing = (now - self._series_logged.get(name, now)) / len(values)
        self._series_logged[name] = now
        last = len(values) - 1
        self._log_batch([Metric(name, float(value), int((now - spacing * (last - i)) * 1000), first_step + i)
                         for i, value in enumerate(values)])

    def log_tags(self, tags: Mapping[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, value)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_artifacts(self, folder: str | Path, artifact_path: str) -> None:
        self.client.log_artifacts(self.run_id, str(folder), artifact_path)


def store_lock(tracking_uri: str) -> AbstractContextManager[None]:
    """An inter-process lock beside a store on this machine's filesystem (an SQLite file, or a
    folder of runs); none for a tracking server, which serialises its own set-up."""
    if tracking_uri.startswith("sqlite:///"):
        return file_lock(tracking_uri[len("sqlite:///"):] + ".lock")
    parsed = urlparse(tracking_uri)
    if parsed.scheme in ("", "file"):
        folder = Path(parsed.path)
        return file_lock(folder.parent / f".{folder.name}.lock")
    return nullcontext()


@contextmanager
def open_tracker(options: PipelineOptions, run_name: str, tags: Mapping[str, str],
                 resume_key: str = "") -> Iterator[Tracker]:
    """The flow run's tracker: an MLflow run (ended FINISHED, FAILED on an error, KILLED on Ctrl-C),
    or no tracking.

    With a ``resume_key`` (the config's digest), the last run of that key is continued when it did
    not finish (it was killed, or failed): a run started again keeps its run id and its curves.
    Runs of this machine left RUNNING by a process that is gone are marked KILLED.
    """
    if not options.tracking_enabled:
        yield NoTracking()
        return
    from mlflow.tracking import MlflowClient

    # mlflow sets its own logger to INFO on import: its store set-up is not the user's business.
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    # Flow runs started together on a new store would each create its tables (one failed on
    # "duplicate column name") and the experiment: one at a time, the others find them made. Two
    # runs of one config would also both continue the same killed run.
    with store_lock(options.tracking_uri):
        client = MlflowClient(options.tracking_uri)
        experiment_id = _experiment_id(client, options)
        run_id, continued = _start_run(client, experiment_id, run_name, tags, resume_key)
    log.info("MLflow run %r (%s) in experiment %r%s", run_name, run_id, options.experiment,
             ", continued: its last attempt did not finish" if continued else "")
    status = "FAILED"
    try:
        yield MlflowTracker(options.tracking_uri, run_id)
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        client.set_terminated(run_id, status)


def run_name_of(overrides: Sequence[str]) -> str:
    """What the run changed from the defaults ("student=gated_deltanet,search.tolerance=0.02"), or
    "default"; cut to the length a store keeps."""
    name = ",".join(overrides) or "default"
    return name if len(name) <= RUN_NAME_LIMIT else name[:RUN_NAME_LIMIT - 1] + "…"


def _experiment_id(client, options: PipelineOptions) -> str:
    experiment = client.get_experiment_by_name(options.experiment)
    if experiment is None:
        return client.create_experiment(options.experiment, artifact_location=options.artifact_location,
                                        tags=EXPERIMENT_KIND)
    if options.artifact_location and not experiment.artifact_location.startswith(options.artifact_location):
        log.warning("MLflow experiment %r keeps its files in %s (it was made before DtR kept them under the "
                    "output folder); tracking.experiment=<a new name> starts one that keeps them in %s",
                    options.experiment, experiment.artifact_location, options.artifact_location)
    return experiment.experiment_id


def _start_run(client, experiment_id: str, run_name: str, tags: Mapping[str, str], resume_key: str
               ) -> tuple[str, bool]:
    """The run to log into (continued or new) and whether it was continued; marks dead runs KILLED."""
    host = socket.gethostname()
    owner = {HOST_TAG: host, PID_TAG: str(os.getpid())}
    killed = {run.info.run_id for run in client.search_runs(
        [experiment_id], f"attributes.status = 'RUNNING' and tags.`{HOST_TAG}` = '{host}'", max_results=1000)
        if not is_running(int(run.data.tags.get(PID_TAG, "0")))}
    continued = None
    if resume_key:
        for run in client.search_runs([experiment_id], f"tags.`{CONFIG_TAG}` = '{resume_key}'",
                                      order_by=["attributes.start_time DESC"], max_results=100):
            if run.info.status == "RUNNING" and run.info.run_id not in killed:
                continue  # alive here, or on another machine: not this run's to take over
            if run.info.status != "FINISHED":
                continued = run.info.run_id
            break
    for run_id in killed - {continued}:
        client.set_terminated(run_id, "KILLED")
    if continued is None:
        run = client.create_run(experiment_id, run_name=run_name, tags={**tags, CONFIG_TAG: resume_key, **owner})
        return run.info.run_id, False
    client.update_run(continued, status="RUNNING")
    for key, value in {**tags, **owner}.items():
        client.set_tag(continued, key, value)
    return continued, True

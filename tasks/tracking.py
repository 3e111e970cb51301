"""MLflow tracking of one DtR flow run: params, per-layer curves, every evaluation, scores, artefacts."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dtr_core.pipeline import RunSummary, SearchOutcome


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """{"a": {"b": 1}} → {"a.b": "1"} (MLflow params are flat strings)."""
    flat = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = str(value)
    return flat


class RunTracker:
    """One MLflow run per flow run; jobs of one sweep share the ``sweep`` tag and the experiment."""

    def __init__(self, tracking_uri: str, experiment: str, run_name: str, tags: Mapping[str, str]) -> None:
        self.tracking_uri, self.experiment = tracking_uri, experiment
        self.run_name, self.tags = run_name, dict(tags)
        self.run_id: str | None = None

    def __enter__(self) -> RunTracker:
        import mlflow

        mlflow.set_tracking_uri(self.tracking_uri)
        mlflow.set_experiment(self.experiment)
        self.run_id = mlflow.start_run(run_name=self.run_name, tags=self.tags).info.run_id
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        import mlflow

        mlflow.end_run(status="FAILED" if exc_type else "FINISHED")

    def log_config(self, config: Mapping[str, Any], config_yaml: str) -> None:
        import mlflow

        mlflow.log_params(flatten(config))
        mlflow.log_text(config_yaml, "config.yaml")

    def log_distillation(self, records: Sequence[Mapping]) -> None:
        import mlflow
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        client = mlflow.tracking.MlflowClient()
        for record in records:
            layer = record["layer_idx"]
            metrics = [Metric(f"distill/layer_{layer:02d}/loss", value, now, step)
                       for step, value in enumerate(record["loss_curve"])]
            metrics += [Metric(f"distill/layer_{layer:02d}/rel_error_init", record["rel_error_init"], now, 0),
                        Metric(f"distill/layer_{layer:02d}/rel_error_final", record["rel_error_final"], now, 0)]
            for start in range(0, len(metrics), 900):  # MLflow's batch limit is 1000 entries
                client.log_batch(self.run_id, metrics=metrics[start:start + 900])

    def log_search(self, outcome: SearchOutcome) -> None:
        import mlflow

        result = outcome.result
        for index, evaluation in enumerate(result.evaluations):
            mlflow.log_metric("search/evaluation_score", evaluation.score, step=index)
        for step in result.trajectory:
            mlflow.log_metric("search/trajectory_score", step.score, step=len(step.linear_layers))
        mlflow.log_metrics({"search/layer_forwards": outcome.layer_forwards,
                            "search/layer_forwards_without_reuse": outcome.layer_forwards_without_reuse})

    def log_summary(self, summary: RunSummary, report_dir: str | Path) -> None:
        import mlflow

        for split, scores in summary.scores.items():
            mlflow.log_metrics({f"{split}/{name}": value for name, value in scores.items()})
        mlflow.log_metrics({"linear_layers": len(summary.linear_layers), "evaluations": summary.evaluations})
        mlflow.log_metrics({f"seconds/{stage}": seconds for stage, seconds in summary.stage_seconds.items()})
        mlflow.set_tags({"linear_layer_set": str(list(summary.linear_layers)), "export_dir": summary.export_dir})
        mlflow.log_artifacts(str(report_dir), artifact_path="report")

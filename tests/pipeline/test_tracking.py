"""MLflow as the run's Tracker (tasks/tracking.py), against a local SQLite store."""

import pickle

import pytest

from dtr_core.tracking import NoTracking
from flows.config import build_specs, compose
from tasks.tracking import open_tracker


@pytest.fixture
def options(tmp_path):
    return build_specs(compose([f"output_dir={tmp_path}"]), str(tmp_path / "run"))[1]


def test_a_flow_run_is_one_mlflow_run_with_its_series_params_and_files(options, tmp_path):
    from mlflow.tracking import MlflowClient

    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "report.md").write_text("# report")
    with open_tracker(options, "run-a", {"sweep": ""}) as tracker:
        # What a Dask worker receives: the run's id and store, not a live client.
        tracker = pickle.loads(pickle.dumps(tracker))
        tracker.log_params({f"p{i}": str(i) for i in range(150)})  # more than one MLflow batch
        tracker.log_series("distill/layer_00/loss", [0.5, 0.4], first_step=0)
        tracker.log_series("distill/layer_00/loss", [0.3], first_step=2)  # a later chunk continues it
        tracker.log_metrics({"validation/full": 0.9})
        tracker.log_tags({"linear_layer_set": "[1, 2]"})
        tracker.log_text("a: 1\n", "config.yaml")
        tracker.log_artifacts(tmp_path / "report", "report")
        run_id = tracker.run_id
    client = MlflowClient(options.tracking_uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "run-a"
    assert len(run.data.params) == 150 and run.data.tags["linear_layer_set"] == "[1, 2]"
    curve = client.get_metric_history(run_id, "distill/layer_00/loss")
    assert [(m.step, m.value) for m in curve] == [(0, 0.5), (1, 0.4), (2, 0.3)]
    assert {f.path for f in client.list_artifacts(run_id)} >= {"config.yaml", "report"}


def test_a_failed_run_is_marked_failed(options):
    from mlflow.tracking import MlflowClient

    with pytest.raises(RuntimeError):
        with open_tracker(options, "run-b", {}) as tracker:
            run_id = tracker.run_id
            raise RuntimeError("a stage failed")
    assert MlflowClient(options.tracking_uri).get_run(run_id).info.status == "FAILED"


def test_tracking_off_logs_nowhere(tmp_path):
    options = build_specs(compose([f"output_dir={tmp_path}", "tracking=off"]), str(tmp_path / "run"))[1]
    with open_tracker(options, "run-c", {}) as tracker:
        assert isinstance(tracker, NoTracking)
    assert not (tmp_path / "mlflow.db").exists()

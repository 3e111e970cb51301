"""MLflow as the run's Tracker (tasks/tracking.py), against a local SQLite store."""

import pickle
import time
from pathlib import Path

import pytest

from dtr_core.tracking import NoTracking
from flows.config import build_specs, compose
from tasks.tracking import open_tracker, run_name_of


@pytest.fixture
def options(tmp_path):
    return build_specs(compose([f"output_dir={tmp_path}"]), str(tmp_path / "run"))[1]


def test_a_flow_run_is_one_mlflow_run_with_its_series_params_and_files(options, tmp_path):
    from mlflow.tracking import MlflowClient

    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "report.md").write_text("# report")
    with open_tracker(options, "run-a", {"dtr.sweep": "2026-12-02_16-15-13"}) as tracker:
        # What a Dask worker receives: the run's id and store, not a live client.
        tracker = pickle.loads(pickle.dumps(tracker))
        tracker.log_params({f"p{i}": str(i) for i in range(150)})  # more than one MLflow batch
        tracker.log_series("distill/layer_00/loss", [0.5, 0.4], first_step=0)
        time.sleep(0.2)
        tracker.log_series("distill/layer_00/loss", [0.3, 0.2], first_step=2)  # a later chunk continues it
        tracker.log_metrics({"validation/full": 0.9})
        tracker.log_tags({"linear_layer_set": "[1, 2]"})
        tracker.log_text("a: 1\n", "config.yaml")
        tracker.log_artifacts(tmp_path / "report", "report")
        run_id = tracker.run_id
    client = MlflowClient(options.tracking_uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "run-a"
    assert len(run.data.params) == 150 and run.data.tags["linear_layer_set"] == "[1, 2]"
    curve = sorted(client.get_metric_history(run_id, "distill/layer_00/loss"), key=lambda m: m.step)
    assert [(m.step, m.value) for m in curve] == [(0, 0.5), (1, 0.4), (2, 0.3), (3, 0.2)]
    # A chunk's points share no single time: they spread over the 0.2 s since the previous chunk
    # (the first chunk has nothing before it).
    times = [m.timestamp for m in curve]
    assert times[0] == times[1] and times[2] - times[1] >= 80 and times[3] - times[2] >= 80
    assert {f.path for f in client.list_artifacts(run_id)} >= {"config.yaml", "report"}
    # The files lie under the output folder beside the store, not in ./mlruns of the current folder,
    # and the experiment is a model-development one (MLflow's UI then opens it on its runs).
    (stored,) = (tmp_path / "mlartifacts").rglob("config.yaml")
    assert run_id in stored.parts
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"


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



OPEN_TRACKER = """
import sys
import mlflow
from tasks.options import PipelineOptions
from tasks.tracking import open_tracker
options = PipelineOptions(cache_dir="", refresh=frozenset(), task_runner="thread", max_workers=1, dask_address=None,
                          dask_workers=1, dask_cluster="cpu", tracking_enabled=True, tracking_uri=sys.argv[1],
                          experiment="dtr")
print("ready", flush=True)
sys.stdin.readline()  # every process reaches the new store at once
with open_tracker(options, "concurrent", {}) as tracker:
    tracker.log_metrics({"m": 1.0})
"""


@pytest.mark.integration
def test_flow_runs_started_together_on_a_new_store_all_get_their_run(tmp_path):
    """Without the store lock, one of two flow runs starting together on a new SQLite store failed
    in set_experiment ("duplicate column name": both created its tables)."""
    import subprocess
    import sys

    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    processes = [subprocess.Popen([sys.executable, "-c", OPEN_TRACKER, uri], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    assert [p.stdout.readline() for p in processes] == ["ready\n"] * 2
    for process in processes:
        process.stdin.write("go\n")
        process.stdin.flush()
    errors = [p.communicate(timeout=120)[1] for p in processes]
    assert [p.returncode for p in processes] == [0, 0], "\n".join(errors)[-3000:]
    client = MlflowClient(uri)
    (experiment,) = [e for e in client.search_experiments() if e.name == "dtr"]
    assert len(client.search_runs([experiment.experiment_id])) == 2


def test_run_names_say_what_the_run_changed():
    assert run_name_of([]) == "default"
    assert run_name_of(["student=gated_deltanet", "search.tolerance=0.02"]) == \
        "student=gated_deltanet,search.tolerance=0.02"
    long = run_name_of([f"target.dataset=/data/{'x' * 300}.jsonl"])
    assert len(long) == 250 and long.endswith("…")


KILLED_RUNS = """
import os, signal, sys
from tasks.options import PipelineOptions
from tasks.tracking import open_tracker
options = PipelineOptions(cache_dir="", refresh=frozenset(), task_runner="thread", max_workers=1, dask_address=None,
                          dask_workers=1, dask_cluster="cpu", tracking_enabled=True, tracking_uri=sys.argv[1],
                          experiment="dtr")
with open_tracker(options, "a", {}, resume_key="config-a") as a, open_tracker(options, "b", {}, resume_key="config-b") as b:
    a.log_series("distill/layer_00/loss", [0.5, 0.4], first_step=0)
    print(a.run_id, b.run_id, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_killed_run_started_again_continues_its_mlflow_run_and_other_killed_runs_are_marked(options):
    import subprocess
    import sys

    from mlflow.tracking import MlflowClient

    killed = subprocess.run([sys.executable, "-c", KILLED_RUNS, options.tracking_uri], capture_output=True, text=True,
                            timeout=120, cwd=Path(__file__).resolve().parents[2])
    assert killed.returncode == -9, killed.stderr[-2000:]
    same, other = killed.stdout.split()
    client = MlflowClient(options.tracking_uri)
    assert client.get_run(same).info.status == "RUNNING"  # SIGKILL left no chance to end them
    with open_tracker(options, "a", {"dtr.run_dir": "again"}, resume_key="config-a") as tracker:
        assert tracker.run_id == same and client.get_run(same).info.status == "RUNNING"
        tracker.log_series("distill/layer_00/loss", [0.3], first_step=2)
    run = client.get_run(same)
    assert run.info.status == "FINISHED" and run.data.tags["dtr.run_dir"] == "again"
    assert [m.value for m in client.get_metric_history(same, "distill/layer_00/loss")] == [0.5, 0.4, 0.3]
    assert client.get_run(other).info.status == "KILLED"
    # A finished run is not continued: the next run of that config is a new one.
    with open_tracker(options, "a", {}, resume_key="config-a") as tracker:
        assert tracker.run_id != same

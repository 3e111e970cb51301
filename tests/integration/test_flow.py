"""The Prefect flow: cached stages, resume after SIGKILL, Hydra sweeps sharing the cache, bad input."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dtr_core.io import sha256_file
from dtr_core.run import RUN_FOLDER

# Every test runs the flow as a process, against the session's Prefect server (conftest.py) unless it asks
# for a temporary one.
pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("on_shared_prefect_server")]

REPO = Path(__file__).resolve().parents[2]


def flow_env(tmp_path, temporary_server: bool = False) -> dict:
    """The environment of a flow process; ``temporary_server``: no PREFECT_API_URL, so the flow starts Prefect's
    temporary server as a user's first run does."""
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"), "HF_HUB_OFFLINE": "1",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", "PYTHONUNBUFFERED": "1"}
    if temporary_server:
        env.pop("PREFECT_API_URL", None)
    return env


def overrides(model, data, out, **extra) -> list[str]:
    values = {
        "model": "local", "model.path": model, "target": "local_jsonl", "target.dataset": data,
        "target.kind": "perplexity", "target.max_length": 32, "capture.token_budget": 3000,
        "capture.max_length": 32, "capture.batch_size": 16, "distill.epochs": 6, "distill.batch_size": 8,
        "search.run_to_end": "true", "search.tolerance": 0.5, "card.lengths": "[128]", "card.examples": 2,
        "card.general_examples": 4, "card.general_max_length": 32, "output_dir": str(out), **extra,
    }
    return [f"{k}={v}" for k, v in values.items()]


def run_flow(args, tmp_path, timeout=600, temporary_server=False) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.dtr", *args], cwd=REPO,
                          env=flow_env(tmp_path, temporary_server), capture_output=True, text=True, timeout=timeout)


def exported_weights(out: Path) -> str:
    (summary,) = [json.loads(p.read_text()) for p in (out / "runs").glob("*/report/report.json")][-1:]
    return sha256_file(Path(summary["export_dir"]) / "model.safetensors")


def test_second_run_reuses_every_stage(tmp_path, tiny_setup):
    out = tmp_path / "out"
    # The README's first run: no Prefect server running, so the flow starts its temporary one.
    first = run_flow(overrides(*tiny_setup, out), tmp_path, temporary_server=True)
    assert first.returncode == 0, first.stderr[-3000:]
    # A quiet console: no API requests, routine task states, store set-up, progress bars or font fallbacks; one
    # summary.
    console = first.stderr + first.stdout
    for noise in ("HTTP Request:", "Finished in state Completed", "Creating initial MLflow database", "it/s]",
                  "temporary server", "findfont", "Traceback"):
        assert noise not in console, noise
    assert console.count("DtR summary") == 1 and len(console.splitlines()) < 100
    # Beside the manifests, only folders: a stage's own file there could take a manifest's name.
    assert all(p.is_dir() or p.suffix == ".json" for p in (out / "cache").glob("*/*"))
    cache_files = {p: p.stat().st_mtime_ns for p in (out / "cache").rglob("*.json")}
    second = run_flow(overrides(*tiny_setup, out) + ["hydra.run.dir=" + str(out / "runs" / "second")], tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    log = second.stderr + second.stdout
    assert "capture: cache hit" in log and "test scores (perplexity): cache hit" in log
    assert log.count("cache hit") >= 1 + 3 + 3  # capture, 3 layers, search, test, export
    assert {p: p.stat().st_mtime_ns for p in (out / "cache").rglob("*.json")} == cache_files  # nothing rewritten
    reports = sorted((out / "runs").glob("*/report/report.json"))
    assert len(reports) == 2
    # The same run-folder layout as the command line's (tests/core/test_run.py), beside Hydra's config and log.
    for report in reports:
        assert {p.name for p in report.parent.parent.iterdir()} == {*RUN_FOLDER, ".hydra", "dtr.log"}
    a, b = (json.loads(p.read_text()) for p in reports)
    assert a["scores"] == b["scores"] and a["linear_layers"] == b["linear_layers"]
    # outputs/latest (what the README loads) is the last run's export.
    assert (out / "latest").resolve() == (out / "runs" / "second" / "hybrid").resolve()
    assert (out / "latest" / "config.json").is_file()

    # refresh=[distill] recomputes the students (same result: seeded) and nothing upstream.
    third = run_flow(overrides(*tiny_setup, out) + ["refresh=[distill]", "hydra.run.dir=" + str(out / "runs" / "third")],
                     tmp_path)
    assert third.returncode == 0, third.stderr[-3000:]
    log = third.stderr + third.stdout
    assert "capture: cache hit" in log and "distill layer 0: cache hit" not in log
    distill_records = [p for p in cache_files if p.parent.name == "distill"]
    assert all(p.stat().st_mtime_ns != cache_files[p] for p in distill_records)


def mlflow_runs(out: Path) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    return client.search_runs([client.get_experiment_by_name("dtr").experiment_id])


def start_flow(args, tmp_path, log: Path) -> subprocess.Popen:
    """The flow in its own process group (so SIGKILL takes its workers too), its output in ``log``."""
    with log.open("w") as sink:
        return subprocess.Popen([sys.executable, "-m", "flows.dtr", *args], cwd=REPO, env=flow_env(tmp_path),
                                start_new_session=True, stdout=sink, stderr=subprocess.STDOUT)


def kill_when(process: subprocess.Popen, ready, log: Path, timeout=300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        if ready():
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            return
        time.sleep(0.02)
    raise AssertionError(f"the flow ended (rc={process.returncode}) before the kill point:\n"
                         + log.read_text()[-3000:])


def test_resume_after_sigkill_recomputes_only_unfinished_work(tmp_path, tiny_flow_reference):
    model, data, reference = tiny_flow_reference
    out = tmp_path / "out"
    args = overrides(model, data, out)
    distilled = lambda: len(list((out / "cache" / "distill").glob("*.json")))  # noqa: E731
    evaluated = lambda: len(list((out / "cache" / "evaluate").glob("*.json")))  # noqa: E731

    # Killed during distillation: finished layers stay finished.
    log = tmp_path / "killed-in-distill.log"
    kill_when(start_flow(args, tmp_path, log), lambda: distilled() >= 1, log)
    done_layers = {p: p.stat().st_mtime_ns for p in (out / "cache" / "distill").glob("*.json")}
    assert 1 <= len(done_layers) < 3

    # Killed during the search: finished evaluations stay finished.
    log = tmp_path / "killed-in-search.log"
    kill_when(start_flow(args, tmp_path, log), lambda: evaluated() >= 3, log)
    done_evaluations = {p: p.stat().st_mtime_ns for p in (out / "cache" / "evaluate").glob("*.json")}
    assert {p: p.stat().st_mtime_ns for p in done_layers} == done_layers
    assert 3 <= len(done_evaluations) < 1 + 3 * 4 // 2

    final = run_flow(args, tmp_path)
    assert final.returncode == 0, final.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in done_evaluations} == done_evaluations
    assert exported_weights(out) == exported_weights(reference)
    # The three attempts are one MLflow run: each start continued the killed one.
    (run,) = mlflow_runs(out)
    assert run.info.status == "FINISHED"


def test_stream_mode_resumes_from_its_checkpoint_after_sigkill(tmp_path, tiny_setup):
    out = tmp_path / "out"
    args = overrides(*tiny_setup, out, **{"capture.mode": "stream", "distill.checkpoint_every": 2})
    checkpoints = lambda: list((out / "cache" / "distill").glob("*/checkpoints/*/checkpoint.json"))  # noqa: E731
    log = tmp_path / "killed-in-distill.log"
    kill_when(start_flow(args, tmp_path, log), lambda: len(checkpoints()) == 1, log)
    assert not list((out / "cache" / "distill").glob("*.json"))  # the stage had not finished

    resumed = run_flow(args, tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = resumed.stderr + resumed.stdout
    assert "distillation mode: stream (mode=stream requested" in log and "resuming from the checkpoint at step" in log
    assert not (out / "cache" / "capture").exists()
    (report,) = (out / "runs").glob("*/report/report.json")
    distillation = json.loads(report.read_text())["distillation"]
    assert [r["layer_idx"] for r in distillation] == [0, 1, 2]
    assert all(len(r["loss_curve"]) == r["steps"] > 0 for r in distillation)


def test_sweep_runs_capture_once(tmp_path, tiny_setup):
    out = tmp_path / "out"
    result = run_flow(["-m", "student=gla,gated_deltanet", "search.tolerance=0.1,0.5",
                       *[o for o in overrides(*tiny_setup, out) if not o.startswith("search.tolerance")]], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(list((out / "cache" / "capture").glob("*.json"))) == 1
    assert len(list((out / "cache" / "distill").glob("*.json"))) == 2 * 3  # per student kind, not per job
    assert len(list((out / "sweeps").glob("*/*/report/report.json"))) == 4
    # One MLflow run per job, named after what it changed, grouped by the sweep's folder.
    runs = mlflow_runs(out)
    assert {run.data.tags["dtr.sweep"] for run in runs} == {p.name for p in (out / "sweeps").iterdir()}
    assert {run.info.run_name.split(",")[0] for run in runs} == {"student=gla", "student=gated_deltanet"}
    assert all(",search.tolerance=" in run.info.run_name for run in runs) and len(runs) == 4


# Spec-level errors (tolerance range, unknown keys, bad runtime values) are covered in-process by
# test_config.py; these go through the whole command line.
@pytest.mark.parametrize("extra, message", [
    (["student=mamba"], "student=mamba: no such option"),
    (["search.tolerance=1.5"], "SearchSpec.tolerance=1.5"),
    (["model.path=/no/such/model"], "does not exist"),
    (["target.dataset=/no/such/data.jsonl"], "does not exist"),
], ids=["unknown-option", "tolerance-range", "missing-model", "missing-data"])
def test_bad_input_fails_before_heavy_work(tmp_path, tiny_setup, extra, message):
    out = tmp_path / "out"
    args = [o for o in overrides(*tiny_setup, out) if not any(o.startswith(e.split("=")[0] + "=") for e in extra)]
    result = run_flow(args + extra, tmp_path, timeout=300)
    assert result.returncode != 0
    assert message in result.stderr + result.stdout
    assert not out.exists()  # nothing left behind: no run folder, no cache, no tracking store
    # Refused before Prefect or MLflow started: one line, status 2.
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert [line for line in result.stderr.splitlines() if line.startswith("error: ")] == [
        line for line in result.stderr.splitlines() if line.strip()]
    assert "prefect" not in result.stderr.lower()


def test_unwritable_cache_dir_is_refused(tmp_path, tiny_setup):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder")
    result = run_flow(overrides(*tiny_setup, tmp_path / "out", cache_dir=str(blocker / "cache")), tmp_path)
    assert result.returncode == 2
    assert "choose another cache_dir" in result.stderr

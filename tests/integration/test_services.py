"""The flow against real services on loopback: an MLflow server (read back over REST), a local Dask
cluster (same hybrid as threads), and a Prefect server serving the deployment."""

import json
import re
import subprocess
import sys
import time
import urllib.request

import pytest
from services import VENV_BIN, Service, free_port, wait_http
from test_flow import exported_weights, flow_env, overrides, run_flow

# Every test starts servers or flow processes; flows run against the session's Prefect server (conftest.py)
# unless a test starts its own.
pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("on_shared_prefect_server")]


def api(url: str, payload: dict | None = None) -> dict:
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


@pytest.fixture
def mlflow_server(tmp_path):
    port = free_port()
    service = Service([str(VENV_BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
                       "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
                       "--artifacts-destination", str(tmp_path / "artifacts"), "--workers", "1"],
                      flow_env(tmp_path), tmp_path / "mlflow.log")
    try:
        wait_http(f"http://127.0.0.1:{port}/health", service.process)
        yield f"http://127.0.0.1:{port}"
    finally:
        service.stop()


def test_flow_logs_to_mlflow_server_over_http(tmp_path, tiny_setup, mlflow_server):
    result = run_flow(overrides(*tiny_setup, tmp_path / "out") + [
        f"tracking.tracking_uri={mlflow_server}", "tracking.experiment=served"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    experiment = api(f"{mlflow_server}/api/2.0/mlflow/experiments/get-by-name?experiment_name=served")
    runs = api(f"{mlflow_server}/api/2.0/mlflow/runs/search",
               {"experiment_ids": [experiment["experiment"]["experiment_id"]]})["runs"]
    assert len(runs) == 1
    run = runs[0]
    assert run["info"]["status"] == "FINISHED"
    metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    assert {"validation/perplexity/full", "test/perplexity/m_opt", "linear_layers",
            "search/layer_forwards"} <= set(metrics)
    assert params["student.kind"] == "gla" and params["target.kind"] == "perplexity"
    run_id = run["info"]["run_id"]
    curve = api(f"{mlflow_server}/api/2.0/mlflow/metrics/get-history?run_id={run_id}"
                "&metric_key=distill/layer_00/loss")["metrics"]
    assert len(curve) > 1 and [m["step"] for m in curve] == list(range(len(curve)))
    artifacts = api(f"{mlflow_server}/api/2.0/mlflow/artifacts/list?run_id={run_id}&path=report")
    assert {"report/report.md", "report/search_trajectory.png", "report/recall_vs_length.png"} <= {
        f["path"] for f in artifacts["files"]}
    search = api(f"{mlflow_server}/api/2.0/mlflow/artifacts/list?run_id={run_id}&path=search")
    assert {"search/evaluations.csv", "search/search.json"} <= {f["path"] for f in search["files"]}
    assert "card/passkey_128/m_opt" in metrics


def test_dask_runner_gives_the_same_hybrid(tmp_path, tiny_flow_reference):
    model, data, threads = tiny_flow_reference  # the default runner's (threads) run
    dask = run_flow(overrides(model, data, tmp_path / "dask") + ["tracking=off", "runtime=dask",
                                                                  "runtime.dask_workers=2"], tmp_path)
    assert dask.returncode == 0, dask.stderr[-3000:]
    log = dask.stderr + dask.stdout
    flow_pid = int(re.search(r"flow process (\d+), task runner dask", log).group(1))
    layer_pids = {int(pid) for pid in re.findall(r"distill layer \d+: .*\(process (\d+)\)", log)}
    assert len(layer_pids) >= 1 and flow_pid not in layer_pids  # layers ran in Dask worker processes
    evaluation_pids = {int(pid) for pid in re.findall(r"evaluate [\w-]+ \[[\d, ]*\]: .*\(process (\d+)\)", log)}
    assert len(evaluation_pids) >= 1 and flow_pid not in evaluation_pids  # and so did the search's candidates
    assert exported_weights(tmp_path / "dask") == exported_weights(threads)


def test_deployment_runs_on_a_local_prefect_server(tmp_path, tiny_setup):
    env = flow_env(tmp_path)  # the session's Prefect server (PREFECT_API_URL): a server of its own cost 15-20 s
    worker = None
    try:
        worker = Service([sys.executable, "-m", "flows.serve", "--name", "test"], env, tmp_path / "serve.log")
        deadline = time.time() + 120
        while time.time() < deadline:
            listed = subprocess.run([str(VENV_BIN / "prefect"), "deployment", "ls"], env=env, capture_output=True,
                                    text=True)
            if "dtr/test" in listed.stdout:
                break
            time.sleep(1)
        else:
            raise AssertionError("deployment dtr/test never registered: " + (tmp_path / "serve.log").read_text())
        out = tmp_path / "out"
        params = json.dumps(overrides(*tiny_setup, out) + ["tracking=off"])
        launched = subprocess.run([str(VENV_BIN / "prefect"), "deployment", "run", "dtr/test", "--param",
                                   f"overrides={params}", "--watch", "--watch-timeout", "400"],
                                  env=env, capture_output=True, text=True, timeout=480)
        assert launched.returncode == 0, launched.stdout[-2000:] + launched.stderr[-2000:] + (
            tmp_path / "serve.log").read_text()[-3000:]
        assert "Completed" in launched.stdout + launched.stderr
        assert list(out.glob("runs/*/report/report.json"))
    finally:
        if worker:
            worker.stop()

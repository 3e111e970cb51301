"""The pure parts of tools/docker_smoke.py (the checks of `make docker-smoke`); the smoke itself needs
a Docker engine and runs outside the suite (docker/README.md)."""

import pytest

from tools.docker_smoke import (REQUIRED_ARTIFACTS, SmokeError, check_mlflow_run, check_workers, distilled_layers,
                                flow_run_id, port_problems)

RUN_ID = "c5c7d1d3-43bb-43b7-941e-3dae52d867c8"
# Lines as a Dask worker container logs them (Prefect's task run logger inside the worker).
WORKER_LOG = """2026-12-02 22:20:28,418 - distributed.core - INFO - Starting established connection
22:22:19.443 | INFO    | Task run 'distill layer 0' - distill layer 0: relative error 0.751 → 0.612 in 31.1s (process 13)
22:22:19.467 | INFO    | Task run 'distill layer 0' - Finished in state Completed()
22:22:41.709 | INFO    | Task run 'distill layer 2' - distill layer 2: relative error 1.032 → 0.701 in 22.1s (process 13)
22:22:58.821 | INFO    | Task run 'evaluate retrieval []' - evaluate retrieval []: 0.9412 (process 13)
"""


def test_flow_run_id_from_the_cli_output():
    output = f"Creating flow run for deployment 'dtr/compose'...\nCreated flow run 'rich-hawk'.\n└── UUID: {RUN_ID}\n"
    assert flow_run_id(output) == RUN_ID
    with pytest.raises(SmokeError, match="no flow run id"):
        flow_run_id("Deployment 'dtr/compose' not found!")


def test_distilled_layers_reads_finished_distillations_only():
    assert distilled_layers(WORKER_LOG) == {0, 2}
    assert distilled_layers("Task run 'distill layer 4' - Finished in state Failed()") == set()


def test_check_workers_needs_every_layer_on_the_workers_and_both_workers():
    logs = {"w1": WORKER_LOG, "w2": "distill layer 1: relative error 1 → 0.5\ndistill layer 3: relative error 1 → 0.5"}
    assert check_workers(logs, 4) == {"w1": [0, 2], "w2": [1, 3]}
    with pytest.raises(SmokeError, match=r"layers \[4, 5\] of 6"):
        check_workers(logs, 6)
    with pytest.raises(SmokeError, match=r"workers \['w2'\] distilled no layer"):
        check_workers({"w1": WORKER_LOG, "w2": ""}, 1)
    with pytest.raises(SmokeError, match="expected 2 Dask worker containers"):
        check_workers({"w1": WORKER_LOG}, 1)


def mlflow_run(status="FINISHED", metrics=("linear_layers", "evaluations", "distill/layer_00/loss",
                                           "search/retrieval/evaluation_score")):
    return {"info": {"run_id": "abc", "status": status},
            "data": {"metrics": [{"key": key, "value": 1.0} for key in metrics]}}


def test_check_mlflow_run():
    check_mlflow_run(mlflow_run(), [*REQUIRED_ARTIFACTS, "report/distill_loss.png"])
    with pytest.raises(SmokeError) as failed:
        check_mlflow_run(mlflow_run(status="RUNNING", metrics=("linear_layers",)), ["config.yaml"])
    message = str(failed.value)
    assert "status RUNNING" in message and "no metric 'evaluations'" in message
    assert "no metric under 'distill/'" in message and "no artifact 'report/report.md'" in message


def test_port_problems():
    ports = {"dtr-smoke_prefect-server_1": "127.0.0.1:4200->4200/tcp",
             "dtr-smoke_dask-scheduler_1": "8786/tcp", "dtr-smoke_flow-worker_1": ""}
    assert port_problems(ports) == []
    assert port_problems({"x_mlflow_1": "0.0.0.0:5000->5000/tcp, :::5000->5000/tcp"}) == [
        "x_mlflow_1 publishes 0.0.0.0:5000->5000/tcp beyond 127.0.0.1",
        "x_mlflow_1 publishes :::5000->5000/tcp beyond 127.0.0.1"]
    assert port_problems({"x_dask-scheduler_1": "127.0.0.1:8786->8786/tcp"}) == [
        "x_dask-scheduler_1 publishes ['127.0.0.1:8786->8786/tcp']: the Dask scheduler must stay on the compose network"]

"""The checks of `make docker-smoke` (docker/smoke.sh), made from the host against a running stack:

    .venv/bin/python tools/docker_smoke.py --docker docker --project dtr-smoke

launches the deployment 'dtr/compose' with the quick experiment through the Prefect CLI, waits for the
flow run, then checks that Prefect holds it as completed, that the MLflow server holds its run with
metrics and artifacts, that every layer was distilled on the Dask worker containers (their logs), that
the exported hybrid is in the shared volume (copied out of a Dask worker, not the flow worker that
wrote it) and loads with transformers, and that ports are published on 127.0.0.1 only and none for the
Dask scheduler. The first failed check ends it: one line saying what was expected and found, exit status 1.

Only the standard library, plus transformers and torch for loading the export (the project's .venv).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Mapping
from pathlib import Path

DEPLOYMENT = "dtr/compose"
RUN_OVERRIDES = ["experiment=quick"]
# What a finished DtR run logs to MLflow (dtr_core/run.py, flows/dtr.py): a sample that spans the stages.
REQUIRED_METRICS = ("linear_layers", "evaluations")
REQUIRED_METRIC_PREFIXES = ("distill/", "search/")
REQUIRED_ARTIFACTS = ("config.yaml", "search/evaluations.csv", "search/search.json", "report/report.md")
TERMINAL_STATES = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
DISTILLED = re.compile(r"distill layer (\d+): relative error")


class SmokeError(Exception):
    """A check that failed: its message says what was expected and what was found."""


# ---- pure parts (tests/tools/test_docker_smoke.py) ----

def flow_run_id(cli_output: str) -> str:
    """The flow run's id from `prefect deployment run`'s output ("└── UUID: <id>")."""
    match = re.search(r"UUID:\s*([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})", cli_output)
    if not match:
        raise SmokeError(f"no flow run id in the output of `prefect deployment run`:\n{cli_output.strip()}")
    return match.group(1)


def distilled_layers(log_text: str) -> set[int]:
    """Layers whose distillation a container's log reports as finished."""
    return {int(layer) for layer in DISTILLED.findall(log_text)}


def check_workers(logs: Mapping[str, str], num_layers: int) -> dict[str, list[int]]:
    """Every layer distilled, on the workers only, each worker taking part: {worker: its layers}."""
    by_worker = {name: sorted(distilled_layers(text)) for name, text in logs.items()}
    done = set().union(*map(set, by_worker.values())) if by_worker else set()
    missing = sorted(set(range(num_layers)) - done)
    if len(by_worker) < 2:
        raise SmokeError(f"expected 2 Dask worker containers, found {sorted(by_worker)}")
    if missing:
        raise SmokeError(f"layers {missing} of {num_layers} were not distilled on a Dask worker "
                         f"(distilled per worker: {by_worker})")
    idle = [name for name, layers in by_worker.items() if not layers]
    if idle:
        raise SmokeError(f"Dask workers {idle} distilled no layer (distilled per worker: {by_worker})")
    return by_worker


def check_mlflow_run(run: Mapping, artifacts: Iterable[str]) -> None:
    """The run finished and holds a sample of the metrics and artifacts that span a DtR run."""
    info, metrics = run["info"], {m["key"] for m in run.get("data", {}).get("metrics", [])}
    problems = []
    if info.get("status") != "FINISHED":
        problems.append(f"status {info.get('status')} (expected FINISHED)")
    problems += [f"no metric {name!r}" for name in REQUIRED_METRICS if name not in metrics]
    problems += [f"no metric under {prefix!r}" for prefix in REQUIRED_METRIC_PREFIXES
                 if not any(key.startswith(prefix) for key in metrics)]
    problems += [f"no artifact {path!r}" for path in REQUIRED_ARTIFACTS if path not in set(artifacts)]
    if problems:
        raise SmokeError(f"MLflow run {info.get('run_id')}: " + "; ".join(problems))


def port_problems(ports: Mapping[str, str], unpublished: str = "dask-scheduler") -> list[str]:
    """What breaks the rule "published on 127.0.0.1 only, the Dask scheduler not at all", from each
    container's `docker ps --format {{.Ports}}` column ("127.0.0.1:4200->4200/tcp, 8786/tcp")."""
    problems = []
    for name, column in ports.items():
        published = [part.strip() for part in column.split(",") if "->" in part]
        if unpublished in name and published:
            problems.append(f"{name} publishes {published}: the Dask scheduler must stay on the compose network")
        problems += [f"{name} publishes {mapping} beyond 127.0.0.1" for mapping in published
                     if not mapping.startswith("127.0.0.1:")]
    return problems


# ---- the stack ----

def http_json(url: str, body: Mapping | None = None, timeout: float = 30) -> dict:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.load(response)
    except urllib.error.HTTPError as error:
        raise SmokeError(f"{url}: HTTP {error.code}: {error.read()[:300]!r}") from error
    except urllib.error.URLError as error:
        raise SmokeError(f"{url}: {error.reason}") from error


class Docker:
    def __init__(self, command: str, project: str) -> None:
        self.command, self.project = command, project

    def __call__(self, *args: str) -> str:
        done = subprocess.run([self.command, *args], capture_output=True, text=True)
        if done.returncode:
            raise SmokeError(f"`docker {' '.join(args)}` failed: {done.stderr.strip()}")
        return done.stdout + done.stderr  # a container's log: its stdout and stderr

    def containers(self, service: str | None = None) -> list[str]:
        filters = ["--filter", f"label=com.docker.compose.project={self.project}"]
        if service:
            filters += ["--filter", f"label=com.docker.compose.service={service}"]
        return sorted(self("ps", *filters, "--format", "{{.Names}}").split())


def launch_run(prefect: str, api_url: str) -> str:
    done = subprocess.run([prefect, "deployment", "run", DEPLOYMENT, "--param", f"overrides={json.dumps(RUN_OVERRIDES)}"],
                          capture_output=True, text=True, env={**os.environ, "PREFECT_API_URL": api_url})
    if done.returncode:
        raise SmokeError(f"`prefect deployment run {DEPLOYMENT}` failed:\n{done.stdout}{done.stderr}")
    return flow_run_id(done.stdout)


def wait_flow_run(api_url: str, run_id: str, timeout: float) -> dict:
    """Poll the Prefect server until the flow run ends; a line every 30 s meanwhile."""
    start = last_report = time.monotonic()
    while True:
        run = http_json(f"{api_url}/flow_runs/{run_id}")
        if run["state_type"] in TERMINAL_STATES:
            return run
        now = time.monotonic()
        if now - start > timeout:
            raise SmokeError(f"flow run {run_id} still {run['state_type']} after {timeout:.0f}s "
                             "(--timeout; DTR_SMOKE_TIMEOUT for make docker-smoke)")
        if now - last_report >= 30:
            print(f"  flow run {run['name']}: {run['state_name']} ({now - start:.0f}s)", flush=True)
            last_report = now
        time.sleep(5)


def check_prefect(api_url: str, run: Mapping) -> None:
    if run["state_type"] != "COMPLETED":
        message = (run.get("state") or {}).get("message") or ""
        raise SmokeError(f"flow run {run['name']} ({run['id']}) ended {run['state_type']}: {message} "
                         "(the flow worker's log is in compose.log)")
    deployment = http_json(f"{api_url}/deployments/name/{DEPLOYMENT}")
    if run.get("deployment_id") != deployment["id"]:
        raise SmokeError(f"flow run {run['id']} does not belong to the deployment {DEPLOYMENT}")


def mlflow_artifacts(url: str, run_id: str, path: str = "") -> list[str]:
    """Every artifact file of the run, recursively (the server proxies its artifact store)."""
    query = urllib.parse.urlencode({"run_id": run_id, **({"path": path} if path else {})})
    files = []
    for entry in http_json(f"{url}/api/2.0/mlflow/artifacts/list?{query}").get("files", []):
        files += mlflow_artifacts(url, run_id, entry["path"]) if entry["is_dir"] else [entry["path"]]
    return files


def check_mlflow(url: str) -> dict:
    """The one run of a fresh stack's experiment 'dtr'."""
    experiment = http_json(f"{url}/api/2.0/mlflow/experiments/get-by-name?experiment_name=dtr")["experiment"]
    runs = http_json(f"{url}/api/2.0/mlflow/runs/search",
                     {"experiment_ids": [experiment["experiment_id"]], "max_results": 10}).get("runs", [])
    if len(runs) != 1:
        raise SmokeError(f"expected 1 run in the MLflow experiment 'dtr' of a fresh stack, found {len(runs)}")
    run = runs[0]
    artifacts = mlflow_artifacts(url, run["info"]["run_id"])
    check_mlflow_run(run, artifacts)
    run["artifacts"] = artifacts
    return run


def copy_export(docker: Docker, worker: str, workdir: Path) -> Path:
    """The export, as `<output_dir>/latest` points at it, copied out of a Dask worker's view of the volume."""
    target = workdir / "export"
    shutil.rmtree(target, ignore_errors=True)
    docker("cp", "-L", f"{worker}:/data/outputs/latest", str(target))
    if not (target / "config.json").is_file():
        raise SmokeError(f"{worker}:/data/outputs/latest holds no config.json: not an exported model")
    return target


def load_export(folder: Path) -> dict:
    """Load the hybrid the way a user would (no DtR import) and embed a sentence."""
    import torch
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    batch = tokenizer(["Shares rose after the bank's results."], return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    if not torch.isfinite(hidden).all():
        raise SmokeError(f"the export in {folder} computes non-finite hidden states")
    layer_types = list(getattr(model.config, "layer_types", []) or [])
    return {"class": type(model).__name__, "layers": model.config.num_hidden_layers, "layer_types": layer_types,
            "shape": list(hidden.shape)}


def check_ports(docker: Docker) -> None:
    ports = {name: docker("ps", "--filter", f"name=^{name}$", "--format", "{{.Ports}}")
             for name in docker.containers()}
    problems = port_problems(ports)
    if problems:
        raise SmokeError("; ".join(problems))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python tools/docker_smoke.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docker", default="docker", help="the docker client")
    parser.add_argument("--project", default="dtr", help="the compose project's name")
    parser.add_argument("--prefect", default=str(Path(sys.executable).parent / "prefect"), help="the prefect CLI")
    parser.add_argument("--prefect-api", default="http://127.0.0.1:4200/api")
    parser.add_argument("--mlflow", default="http://127.0.0.1:5000")
    parser.add_argument("--workdir", type=Path, default=Path(".docker-cache/smoke"), help="logs and the copied export")
    parser.add_argument("--timeout", type=float, default=1200, help="seconds the flow run may take")
    args = parser.parse_args(argv)
    docker, args.workdir = Docker(args.docker, args.project), args.workdir.resolve()
    args.workdir.mkdir(parents=True, exist_ok=True)
    try:
        start = time.monotonic()
        run_id = launch_run(args.prefect, args.prefect_api)
        print(f"flow run {run_id} launched ({DEPLOYMENT}, overrides {RUN_OVERRIDES})", flush=True)
        run = wait_flow_run(args.prefect_api, run_id, args.timeout)
        print(f"flow run ended {run['state_type']} after {time.monotonic() - start:.0f}s "
              f"(Prefect: {run.get('total_run_time', 0):.0f}s running)", flush=True)
        check_prefect(args.prefect_api, run)
        print(f"ok  Prefect: flow run {run['name']} of {DEPLOYMENT} COMPLETED")
        mlflow_run = check_mlflow(args.mlflow)
        metrics = {m["key"]: m["value"] for m in mlflow_run["data"]["metrics"]}
        print(f"ok  MLflow: run {mlflow_run['info']['run_id']} FINISHED, {len(metrics)} metrics "
              f"(linear_layers {metrics['linear_layers']:.0f}), {len(mlflow_run['artifacts'])} artifacts")
        workers = docker.containers("dask-worker")
        if not workers:
            raise SmokeError(f"no dask-worker container of the compose project {args.project!r} is running")
        logs = {name: docker("logs", name) for name in workers}
        for name, text in logs.items():
            (args.workdir / f"{name}.log").write_text(text)
        export = copy_export(docker, workers[0], args.workdir)
        loaded = load_export(export)
        by_worker = check_workers(logs, loaded["layers"])
        print(f"ok  Dask: layers distilled per worker container {by_worker}")
        linear = loaded["layer_types"].count("linear_attention")
        if linear != metrics["linear_layers"]:
            raise SmokeError(f"the export has {linear} linear layers, the MLflow run says {metrics['linear_layers']:.0f}")
        print(f"ok  export: copied from {workers[0]}:/data/outputs/latest to {export}, loads as {loaded['class']} "
              f"with transformers, layer types {loaded['layer_types']}, hidden states {loaded['shape']}")
        check_ports(docker)
        print("ok  ports: published on 127.0.0.1 only, none for the Dask scheduler")
    except SmokeError as error:
        print(f"FAILED: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

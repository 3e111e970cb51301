"""Static checks of docker/ (no Docker engine needed): compose services, ports, Dockerfiles, and that every
module, executable, extra and path they name exists in this checkout and environment."""

from __future__ import annotations

import importlib.util
import re
import shlex
import shutil
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
COMPOSE = yaml.safe_load((DOCKER / "compose.yaml").read_text())
SERVICES = COMPOSE["services"]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
DOCKERFILES = sorted(p for p in DOCKER.glob("Dockerfile.*") if p.suffix != ".dockerignore")
ROLES = ("prefect-server", "mlflow", "dask-scheduler", "dask-worker", "flow-worker")
# Executable -> the package that provides it.
TOOLS = {"prefect": "prefect", "mlflow": "mlflow", "dask": "distributed"}


def command(service: dict) -> list[str]:
    cmd = service.get("command", [])
    return shlex.split(cmd) if isinstance(cmd, str) else [str(part) for part in cmd]


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines = [line for line in dockerfile.read_text().splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    return [(parts[0].upper(), parts[1] if len(parts) > 1 else "")
            for parts in (line.strip().split(None, 1) for line in joined.splitlines()) if parts]


def modules() -> list[tuple[str, str]]:
    found = []
    for name, service in SERVICES.items():
        cmd = command(service)
        found += [(name, cmd[i + 1]) for i, part in enumerate(cmd[:-1]) if part == "-m" and "python" in cmd[i - 1]]
    return found


def executables() -> list[tuple[str, str]]:
    return [(name, command(service)[0]) for name, service in SERVICES.items()
            if command(service) and command(service)[0] in TOOLS]


def ports() -> list[tuple[str, object]]:
    return [(name, port) for name, service in SERVICES.items() for port in service.get("ports", [])]


def flow_worker_overrides() -> list[str]:
    cmd = command(SERVICES["flow-worker"])
    return [cmd[i + 1] for i, part in enumerate(cmd[:-1]) if part == "--override"]


@pytest.mark.parametrize("role", ROLES)
def test_role_present(role):
    assert role in SERVICES, f"compose.yaml has no service {role!r}"


def test_two_dask_workers():
    workers = [s for n, s in SERVICES.items() if n.startswith("dask-worker")]
    assert sum(s.get("deploy", {}).get("replicas", 1) for s in workers) >= 2


@pytest.mark.parametrize("name,port", ports(), ids=[f"{n}-{p}" for n, p in ports()])
def test_port_bound_to_localhost(name, port):
    host_ip = port.get("host_ip") if isinstance(port, dict) else str(port)
    assert str(host_ip).startswith("127.0.0.1"), f"{name}: port {port!r} is not bound to 127.0.0.1"


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_project_image_builds_from_existing_dockerfile(name):
    service = SERVICES[name]
    if "build" not in service:
        assert not str(service.get("image", "")).startswith("dtr:"), f"{name} uses the project image without a build"
        return
    build = service["build"]
    build = {"context": build} if isinstance(build, str) else build
    context = (DOCKER / build["context"]).resolve()
    dockerfile = context / build.get("dockerfile", "Dockerfile")
    assert context == ROOT, f"{name}: build context {context} is not the repository root"
    assert dockerfile.is_file(), f"{name}: {dockerfile} does not exist"


def test_compose_file_works_with_docker_compose_1_29():
    """docker-compose 1.29 (Debian 12's) refuses a top-level `name`; docker/.env names the project instead."""
    assert "name" not in COMPOSE
    assert "COMPOSE_PROJECT_NAME=dtr" in (DOCKER / ".env").read_text().splitlines()


def test_dask_scheduler_not_published():
    assert not SERVICES["dask-scheduler"].get("ports"), "the Dask scheduler must be reachable only on the compose network"


def test_shared_data_volume():
    for name in ("flow-worker", "dask-worker"):
        assert "data:/data" in SERVICES[name].get("volumes", []), f"{name} does not mount the data volume at /data"
    assert "data" in COMPOSE.get("volumes", {})


@pytest.mark.parametrize("name,module", modules(), ids=[f"{n}-{m}" for n, m in modules()])
def test_python_module_exists(name, module):
    assert importlib.util.find_spec(module) is not None, f"{name}: no module {module}"


@pytest.mark.parametrize("name,tool", executables(), ids=[f"{n}-{t}" for n, t in executables()])
def test_executable_installed(name, tool):
    assert importlib.util.find_spec(TOOLS[tool]) is not None, f"{name}: package {TOOLS[tool]} not installed"
    assert shutil.which(tool, path=str(Path(sys.executable).parent)), f"{name}: no {tool} next to {sys.executable}"


def test_flow_worker_overrides_compose():
    """The flow worker's default overrides are valid Hydra overrides and point at the compose services."""
    from flows.config import compose

    cfg = compose(flow_worker_overrides())
    assert cfg["runtime"]["task_runner"] == "dask"
    assert cfg["runtime"]["dask_address"] == "tcp://dask-scheduler:8786"
    assert cfg["tracking"]["tracking_uri"] == "http://mlflow:5000"
    assert cfg["output_dir"].startswith("/data/")
    assert "--name" in command(SERVICES["flow-worker"])
    env = SERVICES["flow-worker"]["environment"]
    assert env["PREFECT_API_URL"] == "http://prefect-server:4200/api"


def test_flow_worker_command_parses(monkeypatch):
    """flows.serve accepts the flow worker's arguments (serving itself is stubbed out)."""
    import flows.serve

    cmd = command(SERVICES["flow-worker"])
    assert cmd[:3] == ["python", "-m", "flows.serve"]
    served = {}
    monkeypatch.setattr(flows.serve.dtr_flow, "serve", lambda **kwargs: served.update(kwargs))
    flows.serve.main(cmd[3:])
    assert served["name"] == "compose"
    # The stack's settings are the deployment's base overrides: a run's own overrides add to them.
    assert served["parameters"]["base_overrides"] == flow_worker_overrides()


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_pip_extras_exist(dockerfile):
    extras = set(PYPROJECT["project"]["optional-dependencies"])
    runs = [args for op, args in instructions(dockerfile) if op == "RUN" and re.search(r"pip[ -]install", args)]
    used = [extra.strip() for args in runs for group in re.findall(r"\.\[([^\]]+)\]", args)
            for extra in group.split(",")]
    assert {"assets", "pipeline"} <= set(used), f"{dockerfile.name} does not install the project's extras"
    assert set(used) <= extras, f"{dockerfile.name}: unknown extras {set(used) - extras}"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_torch_pin_matches_makefile(dockerfile):
    pin = re.search(r"^TORCH_CPU := (\S+)", (ROOT / "Makefile").read_text(), re.M).group(1)
    assert pin in dockerfile.read_text(), f"{dockerfile.name} does not pin {pin}"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_copy_paths_exist(dockerfile):
    copies = [args.split() for op, args in instructions(dockerfile) if op == "COPY"]
    sources = [src for parts in copies for src in [p for p in parts if not p.startswith("--")][:-1]]
    for src in sources:
        assert (ROOT / src).exists(), f"{dockerfile.name}: COPY {src} is not in the repository"
    # pip install -e . needs the project file, the readme it names, and every package it finds.
    needed = {"pyproject.toml", PYPROJECT["project"]["readme"], "conf"}
    needed |= {pattern.rstrip("*") for pattern in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert needed <= {src.rstrip("/") for src in sources}, f"{dockerfile.name} does not copy {needed}"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_build_arguments(dockerfile):
    """Base image and torch's source are build arguments (offline builds), the defaults stay as for users with internet."""
    ops = instructions(dockerfile)
    first_from = next(i for i, (op, _) in enumerate(ops) if op == "FROM")
    assert any(op == "ARG" and args.startswith("BASE_IMAGE=") for op, args in ops[:first_from])
    assert ops[first_from][1] == "${BASE_IMAGE}"
    declared = {args.split("=")[0] for op, args in ops if op == "ARG"}
    assert {"TORCH_INDEX_URL", "TORCH_WHEEL"} <= declared


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_pip_steps_take_the_ca_secret(dockerfile):
    """Every pip step can trust the build's CA bundle, mounted as a secret
    (present only while the step runs), and nothing copies a certificate into a layer."""
    ops = instructions(dockerfile)
    pip_steps = [args for op, args in ops if op == "RUN" and "pip-install" in args]
    assert pip_steps and all("--mount=type=secret,id=pip_ca" in args for args in pip_steps)
    assert not [args for op, args in ops if op == "RUN" and re.search(r"\bpip install", args)], \
        "a plain `pip install` step would not see the CA secret: use pip-install (docker/pip-install.sh)"
    assert not [args for op, args in ops if op in ("COPY", "ADD") and re.search(r"\.(pem|crt)\b|cert", args)]
    mounts = [m for _, args in ops for m in re.findall(r"--mount=type=bind,source=([^,\s]+)", args)]
    assert all((ROOT / source).is_dir() for source in mounts), f"{dockerfile.name} binds a missing folder: {mounts}"


def test_cuda_image_keeps_tritons_cache_on_the_data_volume():
    """fla's autotune choices live in Triton's cache: under /data (a directory the image makes and gives to its user)
    they outlast the container."""
    steps = instructions(DOCKER / "Dockerfile.cuda")
    env = " ".join(arguments for instruction, arguments in steps if instruction == "ENV")
    cache = re.search(r"TRITON_CACHE_DIR=(\S+)", env)
    assert cache and cache.group(1).startswith("/data/"), env
    runs = [arguments for instruction, arguments in steps if instruction == "RUN"]
    assert any("mkdir -p" in run and cache.group(1) in run and "chown -R app:app /data" in run for run in runs)


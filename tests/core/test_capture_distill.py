"""Capture (sharded safetensors + manifest, atomic, verified) and distillation of one layer."""

import json

import pytest
import torch
from conftest import synthetic_texts, tiny_model, tiny_tokenizer

from dtr_core.adapters import adapter_for
from dtr_core.capture import CaptureManifest, capture_teacher, load_layer_activations, tokenize_for_capture
from dtr_core.distill import CURVE_LOG_EVERY, distill_layer
from dtr_core.io import IntegrityError
from dtr_core.linear.build import student_from_teacher
from dtr_core.specs import CaptureSpec, DistillSpec, StudentSpec

TEXTS = [text for text, _ in synthetic_texts(400)]


def capture(family, tmp_path, sharpen=1.0, **spec_overrides):
    model = tiny_model(family)
    adapter = adapter_for(model)
    with torch.no_grad():
        for layer_idx in range(adapter.num_layers):
            # Random-init attention is nearly uniform (trivial for a linear student); scaling q and k
            # makes it peaked like a trained model's, so distillation has something to learn.
            weights = adapter.read_attention_weights(model, layer_idx)
            weights.q_weight.mul_(sharpen)
            weights.k_weight.mul_(sharpen)
    spec = CaptureSpec(**{"token_budget": 600, "max_length": 16, "batch_size": 8, "shard_tokens": 200,
                          "dtype": "float32", **spec_overrides})
    batches = tokenize_for_capture(tiny_tokenizer(), TEXTS, spec, pack=adapter.causal)
    manifest = capture_teacher(model, adapter, batches, spec, tmp_path / "capture", "fingerprint")
    return model, adapter, spec, manifest


def test_manifest_describes_shards(family, tmp_path):
    model, adapter, spec, manifest = capture(family, tmp_path)
    assert manifest.num_layers == 2 and manifest.hidden_size == 64
    assert 600 <= manifest.tokens < 600 + spec.max_length  # the budget, counted in real tokens
    assert len(manifest.shards[0]) >= 3  # shard_tokens=200 splits the capture
    on_disk = CaptureManifest.load(tmp_path / "capture")
    assert on_disk == manifest
    for layer_idx in range(2):
        data = load_layer_activations(manifest, layer_idx)
        assert data.inputs.shape[:2] == data.attention_mask.shape == data.outputs.shape[:2]
        assert int(data.attention_mask.sum()) == manifest.tokens
    if adapter.causal:  # packed blocks: no padding at all
        assert bool(load_layer_activations(manifest, 0).attention_mask.all())


def test_captured_pair_is_the_attention_modules_input_and_output(tmp_path):
    model, adapter, _, manifest = capture("llama", tmp_path)
    data = load_layer_activations(manifest, 0)
    ids = tokenize_for_capture(tiny_tokenizer(), TEXTS, CaptureSpec(token_budget=600, max_length=16,
                                                                    batch_size=8), pack=True)
    first = next(iter(ids))["input_ids"]
    with torch.no_grad():
        layer = model.model.layers[0]
        expected_input = layer.input_layernorm(model.model.embed_tokens(first))
    torch.testing.assert_close(data.inputs[: first.shape[0]], expected_input)
    # The output is what the attention module returns for that input (before the residual add).
    with torch.no_grad():
        position = torch.arange(first.shape[1])[None]
        cos_sin = model.model.rotary_emb(expected_input, position)
        out, _ = layer.self_attn(expected_input, position_embeddings=cos_sin, attention_mask=None)
    torch.testing.assert_close(data.outputs[: first.shape[0]], out, rtol=1e-4, atol=1e-5)


def test_tampered_shard_is_refused(tmp_path):
    _, _, _, manifest = capture("bert", tmp_path)
    shard = tmp_path / "capture" / manifest.shards[1][0].file
    shard.write_bytes(shard.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(IntegrityError, match="sha256"):
        load_layer_activations(manifest, 1)
    load_layer_activations(manifest, 0)  # other layers are unaffected


def test_interrupted_capture_leaves_no_manifest(tmp_path):
    model = tiny_model("gpt2")
    adapter = adapter_for(model)
    spec = CaptureSpec(token_budget=600, max_length=16, batch_size=8, shard_tokens=100)

    def failing_batches():
        batches = tokenize_for_capture(tiny_tokenizer(), TEXTS, spec, pack=True)
        yield next(batches)
        yield next(batches)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        capture_teacher(model, adapter, failing_batches(), spec, tmp_path / "capture", "fp")
    assert any((tmp_path / "capture").rglob("*.safetensors"))  # shards were written...
    with pytest.raises(FileNotFoundError, match="did not finish"):
        CaptureManifest.load(tmp_path / "capture")  # ...but nothing vouches for them


def test_capture_of_empty_text_is_an_error(tmp_path):
    model = tiny_model("bert")
    with pytest.raises(ValueError, match="no tokens"):
        capture_teacher(model, adapter_for(model), iter([]), CaptureSpec(), tmp_path / "c", "fp")


@pytest.mark.parametrize("kind", ["gla", "gated_deltanet"])
def test_distillation_lowers_relative_error(family, kind, tmp_path):
    model, adapter, _, manifest = capture(family, tmp_path, sharpen=6.0, token_budget=6000)
    data = load_layer_activations(manifest, 1)
    # No window: the default's 64 tokens would cover these short texts exactly, leaving nothing to learn.
    student = student_from_teacher(StudentSpec(kind=kind, window=0), adapter.read_attention_weights(model, 1),
                                   causal=adapter.causal)
    teacher_before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []
    result = distill_layer(student, data, DistillSpec(epochs=10, batch_size=8, warmup_steps=5), layer_idx=1,
                           token_budget=manifest.tokens, log_curve=lambda *args: calls.append(args))
    assert result.rel_error_final < 0.7 * result.rel_error_init
    assert len(result.loss_curve) == result.steps > CURVE_LOG_EVERY
    # Logged while training ran: every CURVE_LOG_EVERY steps, the rest at the end, in order.
    assert [(layer_idx, first) for layer_idx, first, _ in calls] == [
        (1, first) for first in range(0, result.steps, CURVE_LOG_EVERY)]
    assert [loss for _, _, losses in calls for loss in losses] == result.loss_curve
    assert result.train_tokens == 10 * result.data_tokens  # epochs fixes the passes, whatever the budget
    assert set(result.state_dict) == set(student.state_dict())
    for name, tensor in model.state_dict().items():  # the teacher is frozen
        torch.testing.assert_close(tensor, teacher_before[name])
    json.dumps(result.loss_curve)


def test_distillation_needs_enough_sequences(tmp_path):
    model, adapter, _, manifest = capture("bert", tmp_path, token_budget=10)
    data = load_layer_activations(manifest, 0)
    student = student_from_teacher(StudentSpec(), adapter.read_attention_weights(model, 0), causal=False)
    with pytest.raises(ValueError, match="token_budget"):
        distill_layer(student, data, DistillSpec(), layer_idx=0, token_budget=10)


def test_disk_distillation_trains_on_the_budget(tmp_path):
    """Without epochs a student trains on the budget: the captured data cycled, each pass in a new order."""
    model, adapter, _, manifest = capture("llama", tmp_path, token_budget=600)
    data = load_layer_activations(manifest, 0)
    student = student_from_teacher(StudentSpec(), adapter.read_attention_weights(model, 0), causal=True)
    result = distill_layer(student, data, DistillSpec(batch_size=4), layer_idx=0, token_budget=3000)
    holdout = manifest.tokens - result.data_tokens
    batch_tokens = 4 * manifest.sequence_length
    assert 3000 - holdout <= result.train_tokens < 3000 - holdout + batch_tokens
    assert result.token_budget == 3000 and result.train_tokens / result.data_tokens > 5


def test_mix_texts_keeps_the_share_and_interleaves():
    from dtr_core.capture import mix_texts

    task = [f"t{i}" for i in range(100)]  # 10 tokens each, by the counter below
    general = [f"g{i}" for i in range(100)]
    mixed = mix_texts(task, general, 0.3, budget=500, count_tokens=lambda text: 10)
    assert (mixed.task_tokens, mixed.general_tokens) == (350, 150)  # 70% of the budget, then 3/7 of that
    assert [t for t in mixed.texts if t[0] == "t"] == task[:35] and [t for t in mixed.texts if t[0] == "g"] == general[:15]
    for end in (10, 20, 30, 50):  # every stretch from the start holds about the share
        assert abs(sum(t[0] == "g" for t in mixed.texts[:end]) / end - 0.3) <= 0.1
    assert mixed.describe("python_docs") == "350 tokens of the run's text + 150 of python_docs (30% general)"
    # Little task text: general text keeps the share of what there is; little general text: all of it.
    assert mix_texts(task[:5], general, 0.5, 500, lambda text: 10).general_tokens == 50
    assert mix_texts(task, general[:2], 0.5, 500, lambda text: 10).general_tokens == 20

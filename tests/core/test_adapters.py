"""Adapters: locating attention, reading q/k/v/o (GQA, biases, fused Conv1D), unknown families."""

import pytest
import torch
from conftest import tiny_model

from dtr_core.adapters import UnsupportedModelError, adapter_for, supported_model_types

EXPECTED_PATHS = {
    "llama": "model.layers.1.self_attn",
    "qwen2": "model.layers.1.self_attn",
    "gpt2": "transformer.h.1.attn",
    "bert": "encoder.layer.1.attention.self",
}


def test_attention_paths_and_direction(family):
    model = tiny_model(family)
    adapter = adapter_for(model)
    assert adapter.attention_path(model, 1) == EXPECTED_PATHS[family]
    assert adapter.causal == (family != "bert")
    assert len(adapter.layer_stack(model)) == adapter.num_layers == 2


def test_weights_reproduce_teacher_projections(family):
    """q/k/v read by the adapter give the same projections the teacher computes."""
    model = tiny_model(family)
    adapter = adapter_for(model)
    weights = adapter.read_attention_weights(model, 0)
    x = torch.randn(3, 64)
    q = x @ weights.q_weight.T + (weights.q_bias if weights.q_bias is not None else 0)
    k = x @ weights.k_weight.T + (weights.k_bias if weights.k_bias is not None else 0)
    attn = adapter.attention_module(model, 0)
    if family in ("llama", "qwen2"):
        torch.testing.assert_close(q, attn.q_proj(x))
        torch.testing.assert_close(k, attn.k_proj(x))
        assert weights.num_kv_heads == 2 and weights.num_heads == 4
        assert (weights.q_bias is not None) == (family == "qwen2")  # Qwen2 has q/k/v biases
    elif family == "gpt2":
        fused = attn.c_attn(x)
        torch.testing.assert_close(q, fused[:, :64])
        torch.testing.assert_close(k, fused[:, 64:128])
        out = torch.randn(3, 64)
        torch.testing.assert_close(out @ weights.o_weight.T + weights.o_bias, attn.c_proj(out))
    else:
        torch.testing.assert_close(q, attn.query(x))
        assert weights.o_weight is None  # BERT's output dense stays in the teacher


def test_gqa_expansion_repeats_each_kv_head_for_its_query_group():
    model = tiny_model("llama")
    weights = adapter_for(model).read_attention_weights(model, 0)
    expanded = weights.with_expanded_kv()
    d = weights.head_dim
    assert expanded.k_weight.shape == (4 * d, 64) and expanded.num_kv_heads == 4
    for head in range(4):
        kv_head = head // 2  # repeat_kv: query head h reads K/V head h // groups
        torch.testing.assert_close(expanded.k_weight[head * d:(head + 1) * d],
                                   weights.k_weight[kv_head * d:(kv_head + 1) * d])
        torch.testing.assert_close(expanded.v_weight[head * d:(head + 1) * d],
                                   weights.v_weight[kv_head * d:(kv_head + 1) * d])


def test_unknown_family_names_supported_ones():
    from transformers import T5Config

    with pytest.raises(UnsupportedModelError) as err:
        adapter_for(T5Config())
    message = str(err.value)
    assert "'t5'" in message
    for family, types in supported_model_types().items():
        assert family in message and all(t in message for t in types)


def test_layer_index_out_of_range():
    model = tiny_model("bert")
    with pytest.raises(IndexError, match="outside 0..1"):
        adapter_for(model).attention_module(model, 2)


def test_fingerprint_follows_weights_not_location(tmp_path):
    from transformers import AutoModelForCausalLM

    from dtr_core.teacher import model_fingerprint

    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "a")
    model.save_pretrained(tmp_path / "b")
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "a")
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "b")
    assert model_fingerprint(a) == model_fingerprint(b)
    with torch.no_grad():
        b.model.layers[1].self_attn.k_proj.weight[0, 0] += 1e-3
    assert model_fingerprint(a) != model_fingerprint(b)

"""Hybrid decoders generate: linear layers carry a recurrent state in the cache, full layers a KV cache.

Checked on exported folders (loaded with trust_remote_code, as users do) and on in-memory hybrids
(what the search's generation metrics run): with the cache, greedy decoding gives the same tokens
and logits as recomputing the whole sequence at every step.
"""

import inspect

import pytest
import torch
from conftest import tiny_model, tiny_tokenizer

from dtr_core.adapters import adapter_for
from dtr_core.export import export_hybrid
from dtr_core.hybrid import hybrid_view
from dtr_core.linear.build import student_from_teacher
from dtr_core.specs import ExportSpec, StudentSpec

DECODERS = ("llama", "qwen2", "gpt2")
PAD = 0
# Two prompts, the second left-padded: batched generation must not let padding leak in.
PROMPTS = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12], [PAD, PAD, PAD, 13, 14, 15, 16, 17]])


def perturbed_students(model, adapter, kind, layers, **options):
    """Students whose every parameter is moved off its initial value (as after distillation); ``options``:
    further StudentSpec fields."""
    torch.manual_seed(42)
    students = {}
    for i in layers:
        student = student_from_teacher(StudentSpec(kind=kind, **options), adapter.read_attention_weights(model, i),
                                       causal=True, seed=i)
        with torch.no_grad():
            for param in student.parameters():
                param.add_(0.05 * torch.randn_like(param))
        students[i] = student.eval()
    return students


def exported_hybrid(family, kind, linear_layers, folder, num_layers=3, **options):
    from transformers import AutoModelForCausalLM

    model = tiny_model(family, num_layers=num_layers)
    adapter = adapter_for(model)
    students = perturbed_students(model, adapter, kind, linear_layers, **options)
    export_hybrid(model, adapter, tiny_tokenizer(), students, folder, ExportSpec())
    return AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()


def greedy(model, input_ids, use_cache, max_new_tokens=10, **kwargs):
    out = model.generate(input_ids, attention_mask=(input_ids != PAD).long(), max_new_tokens=max_new_tokens,
                         do_sample=False, use_cache=use_cache, pad_token_id=PAD, output_logits=True,
                         return_dict_in_generate=True, **kwargs)
    return out.sequences[:, input_ids.shape[1]:], torch.stack(out.logits, dim=1)


def assert_cache_matches_recompute(model, input_ids=PROMPTS, **kwargs):
    cached_tokens, cached_logits = greedy(model, input_ids, use_cache=True, **kwargs)
    tokens, logits = greedy(model, input_ids, use_cache=False, **kwargs)
    assert torch.equal(cached_tokens, tokens)
    assert (cached_logits - logits).abs().max() <= 1e-4


@pytest.mark.parametrize("kind", ["gla", "gated_deltanet"])
@pytest.mark.parametrize("family", DECODERS)
def test_exported_hybrid_generates_with_recurrent_cache(family, kind, tmp_path):
    # Layer 0 linear: transformers reads the sequence length from layer 0's cache.
    model = exported_hybrid(family, kind, (0, 2), tmp_path / "hybrid")
    assert_cache_matches_recompute(model)


# Students that keep recall: a softmax window shorter than the prompts, short convolutions, both.
RECALL_OPTIONS = [dict(window=3), dict(short_conv=4), dict(window=3, short_conv=4)]


@pytest.mark.parametrize("options", RECALL_OPTIONS)
@pytest.mark.parametrize("kind", ["gla", "gated_deltanet"])
def test_window_and_convolution_students_generate_with_their_cache(kind, options, tmp_path):
    model = exported_hybrid("qwen2", kind, (0, 2), tmp_path / "hybrid", **options)
    configs = [entry["student_config"] for entry in model.config.dtr_hybrid["students"]]
    assert len(configs) == 2 and all(config[key] == value for config in configs for key, value in options.items())
    assert_cache_matches_recompute(model)


def test_all_linear_hybrid_generates_with_cache(tmp_path):
    model = exported_hybrid("llama", "gla", (0, 1, 2), tmp_path / "hybrid")
    assert_cache_matches_recompute(model)


def test_in_memory_hybrid_generates_with_recurrent_cache():
    model = tiny_model("llama", num_layers=3)
    adapter = adapter_for(model)
    students = perturbed_students(model, adapter, "gated_deltanet", (0, 1))
    with hybrid_view(model, adapter, students, (0, 1)):
        assert_cache_matches_recompute(model)


@pytest.mark.parametrize("family", DECODERS)
def test_left_padded_batch_generates_like_each_prompt_alone(family, tmp_path):
    model = exported_hybrid(family, "gla", (0, 2), tmp_path / "hybrid")
    batch_tokens, batch_logits = greedy(model, PROMPTS, use_cache=True)
    for row, prompt in enumerate(PROMPTS):
        alone_tokens, alone_logits = greedy(model, prompt[prompt != PAD][None], use_cache=True)
        assert torch.equal(batch_tokens[row], alone_tokens[0])
        assert (batch_logits[row] - alone_logits[0]).abs().max() <= 1e-4


def test_beam_search_reorders_recurrent_states(tmp_path):
    model = exported_hybrid("llama", "gla", (0, 2), tmp_path / "hybrid")
    with_cache = model.generate(PROMPTS[:1], max_new_tokens=6, num_beams=3, do_sample=False, pad_token_id=PAD)
    without = model.generate(PROMPTS[:1], max_new_tokens=6, num_beams=3, do_sample=False, pad_token_id=PAD,
                             use_cache=False)
    assert torch.equal(with_cache, without)


def cache_bytes_per_layer(cache) -> list[int]:
    """Bytes of every tensor each layer of a transformers cache holds (keys, values, states)."""
    return [sum(t.numel() * t.element_size() for t in vars(layer).values() if isinstance(t, torch.Tensor))
            for layer in cache.layers]


def prefill_cache(model, length):
    from transformers import DynamicCache

    cache = DynamicCache()
    # The cache argument's name changed within transformers 5.x.
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    input_ids = torch.arange(length)[None] % 90 + 5
    with torch.no_grad():
        model(input_ids, use_cache=True, **{cache_arg: cache})
    return cache


def test_cache_memory_grows_only_with_full_attention_layers(tmp_path):
    num_layers, linear = 4, (0, 1, 3)
    full = tiny_model("llama", num_layers=num_layers)
    hybrid = exported_hybrid("llama", "gla", linear, tmp_path / "hybrid", num_layers=num_layers)
    short, long = 32, 128
    full_short, full_long = (cache_bytes_per_layer(prefill_cache(full, n)) for n in (short, long))
    hybrid_short, hybrid_long = (cache_bytes_per_layer(prefill_cache(hybrid, n)) for n in (short, long))
    assert all(b == 4 * a for a, b in zip(full_short, full_long))  # KV cache: linear in length
    for i in range(num_layers):
        if i in linear:  # one fixed-size state, whatever the length
            assert hybrid_short[i] == hybrid_long[i] > 0
        else:
            assert hybrid_long[i] == full_long[i]
    # Here: 1 full layer's KV + 3 fixed states vs 4 layers' KV at 128 tokens.
    assert sum(hybrid_long) < 0.6 * sum(full_long)
    assert sum(hybrid_long) - sum(hybrid_short) == full_long[2] - full_short[2]


def decode_logits(model, cache, input_ids, steps):
    """Prefill ``input_ids`` into ``cache``, then ``steps`` greedy single-token steps; the logits each
    step was chosen from."""
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    logits = []
    with torch.no_grad():
        out = model(input_ids, use_cache=True, **{cache_arg: cache})
        for _ in range(steps):
            logits.append(out.logits[:, -1])
            out = model(logits[-1].argmax(-1, keepdim=True), use_cache=True, **{cache_arg: cache})
    return torch.stack(logits, dim=1)


@pytest.mark.parametrize("capacity", [PROMPTS.shape[1] + 6, 3])  # enough, and one that must grow
def test_preallocated_cache_decodes_like_dynamic_cache_in_place(capacity):
    from transformers import DynamicCache

    from dtr_core.linear.cache import PreallocatedLayer, RecurrentStateLayer, preallocated_cache

    model = tiny_model("llama", num_layers=3)
    adapter = adapter_for(model)
    students = perturbed_students(model, adapter, "gla", (1,))
    ids = PROMPTS[:1]
    with hybrid_view(model, adapter, students, (1,)):
        expected = decode_logits(model, DynamicCache(), ids, steps=6)
        cache = preallocated_cache(3, capacity)
        got = decode_logits(model, cache, ids, steps=6)
    assert (got - expected).abs().max() <= 1e-5
    assert isinstance(cache.layers[1], RecurrentStateLayer)  # the student took its slot
    full = cache.layers[0]
    assert isinstance(full, PreallocatedLayer) and full.get_seq_length() == ids.shape[1] + 6
    # Keys are views of the buffer: written in place, never concatenated into new tensors.
    assert full.keys.untyped_storage().data_ptr() == full.key_buffer.untyped_storage().data_ptr()
    # Too small a capacity: the prefill allocates exactly the prompt, the first step doubles it.
    assert full.key_buffer.shape[-2] == (capacity if capacity >= ids.shape[1] + 6 else 2 * ids.shape[1])


def test_preallocated_layer_batch_operations_match_dynamic_layer():
    import copy

    from transformers.cache_utils import DynamicLayer

    from dtr_core.linear.cache import PreallocatedLayer

    torch.manual_seed(0)
    chunks = [(torch.randn(2, 3, n, 4), torch.randn(2, 3, n, 4)) for n in (5, 1, 1)]
    last = (torch.randn(3, 3, 1, 4), torch.randn(3, 3, 1, 4))  # the batch is 3 after the operations
    plain, preallocated = DynamicLayer(), PreallocatedLayer(capacity=16)
    operations = [
        lambda layer: layer.batch_repeat_interleave(3),
        lambda layer: layer.batch_select_indices(torch.tensor([5, 0, 2])),
        lambda layer: layer.reorder_cache(torch.tensor([2, 2, 1])),
        lambda layer: layer.crop(-2),
    ]
    for layer in (plain, preallocated):
        for keys, values in chunks:
            layer.update(keys, values)
        for operation in operations:
            operation(layer)
        layer.update(*last)  # writes after the cropped length
    copied = copy.deepcopy(preallocated)
    for layer in (preallocated, copied):
        assert layer.get_seq_length() == plain.get_seq_length() == 6
        assert torch.equal(layer.keys, plain.keys) and torch.equal(layer.values, plain.values)
    preallocated.reset()
    assert preallocated.get_seq_length() == 0 and preallocated.key_buffer is None


@pytest.mark.parametrize("family", DECODERS)
def test_exported_generate_preallocates_prompt_plus_new_tokens(family, tmp_path):
    model = exported_hybrid(family, "gla", (0, 2), tmp_path / "hybrid")
    out = model.generate(PROMPTS, attention_mask=(PROMPTS != PAD).long(), max_new_tokens=5, do_sample=False,
                         pad_token_id=PAD, return_dict_in_generate=True)
    layers = out.past_key_values.layers
    assert [type(layer).__name__ for layer in layers] == ["RecurrentStateLayer", "PreallocatedLayer",
                                                          "RecurrentStateLayer"]
    assert layers[1].key_buffer.shape[-2] == PROMPTS.shape[1] + 5


def test_exported_generate_keeps_transformers_cache_under_a_sliding_window(tmp_path):
    model = exported_hybrid("llama", "gla", (0, 2), tmp_path / "hybrid")
    model.config.sliding_window = 4  # a windowed model's layers must not see the whole preallocated cache
    out = model.generate(PROMPTS, attention_mask=(PROMPTS != PAD).long(), max_new_tokens=2, do_sample=False,
                         pad_token_id=PAD, return_dict_in_generate=True)
    assert "PreallocatedLayer" not in {type(layer).__name__ for layer in out.past_key_values.layers}

"""Static decoding (dtr_core.linear.decoding): steps that read no host-side length, so a CUDA graph can
replay them. On the CPU the same steps run eagerly; they must give what ordinary cached decoding gives.
The Triton kernels run here in Triton's CPU interpreter (a subprocess: TRITON_INTERPRET is read at import).
"""

import textwrap

import pytest
import torch
from conftest import run_in_triton_interpreter, tiny_model
from test_generation import PROMPTS, exported_hybrid, perturbed_students

from dtr_core.adapters import adapter_for
from dtr_core.hybrid import hybrid_view
from dtr_core.linear.cache import PreallocatedLayer, RecurrentStateLayer, preallocated_cache
from dtr_core.linear.decoding import (
    StaticDecoder,
    cache_keyword,
    decode_attention,
    left_padding,
    prompt_positions,
    static_generate,
)
from dtr_core.linear.gated_deltanet import gated_delta_recurrent, gated_delta_step_
from dtr_core.linear.gla import gla_recurrent, gla_step_

STEPS = 5


def greedy_steps(model, cache, first_logits, steps, decoder=None, fed=None, attention_mask=None):
    """Logits of ``steps`` steps after the prompt, by plain cached calls or by ``decoder``; each step feeds
    the previous step's argmax, or the given tokens ``fed`` [B, steps]. ``attention_mask``: the prompt's left
    padding, which plain calls extend and count positions from, as generate() does."""
    logits, last = [], first_logits
    with torch.no_grad():
        for step in range(steps):
            tokens = last.argmax(-1, keepdim=True) if fed is None else fed[:, step:step + 1]
            if decoder is None:
                padding = {}
                if attention_mask is not None:
                    attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(tokens), 1)], dim=1)
                    padding = dict(attention_mask=attention_mask, position_ids=prompt_positions(attention_mask)[:, -1:])
                last = model(tokens, use_cache=True, **padding, **{cache_keyword(model): cache}).logits[:, -1]
            else:
                last = decoder.step(tokens)[:, -1].clone()
            logits.append(last)
    return torch.stack(logits, dim=1)


def prefill(model, prompt, capacity, attention_mask=None):
    cache = preallocated_cache(model.config.num_hidden_layers, capacity)
    positions = None if attention_mask is None else prompt_positions(attention_mask)
    with torch.no_grad():
        logits = model(prompt, attention_mask=attention_mask, position_ids=positions, use_cache=True,
                       **{cache_keyword(model): cache}).logits[:, -1]
    return cache, logits


@pytest.mark.parametrize("padded", [False, True], ids=["equal", "left-padded"])
@pytest.mark.parametrize("family, options", [("llama", {}), ("qwen2", {}), ("llama", dict(window=3, short_conv=4))])
@pytest.mark.parametrize("kind", ["gla", "gated_deltanet"])
def test_static_steps_decode_like_cached_decoding(family, kind, options, padded):
    model = tiny_model(family, num_layers=3)
    adapter = adapter_for(model)
    students = perturbed_students(model, adapter, kind, (1,), **options)
    # Left-padded: the second prompt's padding must stay out of its attention, and its positions count
    # from its first token.
    prompt = PROMPTS if padded else PROMPTS[:1].repeat(2, 1)
    mask = (prompt != 0).long() if padded else None
    capacity = prompt.shape[1] + STEPS + 3  # spare room: positions past the length must not be attended
    with hybrid_view(model, adapter, students, (1,)):
        cache, first = prefill(model, prompt, capacity, mask)
        expected = greedy_steps(model, cache, first, STEPS + 2, attention_mask=mask)
        cache, first = prefill(model, prompt, capacity, mask)
        decoder = StaticDecoder(model, cache, max_steps=STEPS + 1, attention_mask=mask)
        assert not decoder.graph  # CPU tensors: the steps run eagerly
        got = greedy_steps(model, cache, first, STEPS, decoder)
        assert (got - expected[:, :STEPS]).abs().max() <= 1e-5
        decoder.close()
        # Lengths are up to date again, and the cache goes on decoding as usual (a window's rings in order again).
        length = prompt.shape[1] + STEPS
        assert all(layer.get_seq_length() == length for layer in cache.layers)
        assert isinstance(cache.layers[1], RecurrentStateLayer) and isinstance(cache.layers[0], PreallocatedLayer)
        assert cache.layers[0].keys.shape[-2] == length
        cached_mask = None if mask is None else torch.cat([mask, mask.new_ones(len(mask), STEPS)], dim=1)
        more = greedy_steps(model, cache, got[:, -1], 2, attention_mask=cached_mask)
        assert (more - expected[:, STEPS:]).abs().max() <= 1e-5
    # The attention implementation was switched only while steps ran.
    assert model.config._attn_implementation == "sdpa"


def test_full_model_static_steps_write_in_place():
    model = tiny_model("llama", num_layers=2)
    prompt = PROMPTS[:1]
    cache, first = prefill(model, prompt, prompt.shape[1] + STEPS)
    expected_cache, _ = prefill(model, prompt, prompt.shape[1] + STEPS)
    expected = greedy_steps(model, expected_cache, first, STEPS)
    buffer = cache.layers[0].key_buffer
    decoder = StaticDecoder(model, cache, max_steps=STEPS)
    got = greedy_steps(model, cache, first, STEPS, decoder)
    assert (got - expected).abs().max() <= 1e-5
    assert cache.layers[0].key_buffer is buffer  # written where it was: a graph replays on the same memory
    with pytest.raises(RuntimeError, match="sized for 5 steps"):
        decoder.step()


def test_static_decoder_refuses_caches_it_cannot_decode():
    from transformers import DynamicCache

    model = tiny_model("llama", num_layers=2)
    prompt = PROMPTS[:1]
    with pytest.raises(ValueError, match="prefilled"):
        StaticDecoder(model, preallocated_cache(2, 16), max_steps=4)
    cache, _ = prefill(model, prompt, prompt.shape[1] + 2)
    with pytest.raises(ValueError, match=r"capacity=\d+"):
        StaticDecoder(model, cache, max_steps=4)
    assert StaticDecoder(model, cache).max_steps == 2  # by default, what the buffers have room for
    with torch.no_grad():
        dynamic = model(prompt, use_cache=True, **{cache_keyword(model): DynamicCache()}).past_key_values
    with pytest.raises(ValueError, match="preallocated_cache"):
        StaticDecoder(model, dynamic, max_steps=4)
    right_padded = torch.ones_like(prompt).index_fill(1, torch.tensor([prompt.shape[1] - 1]), 0)
    with pytest.raises(ValueError, match="not left padding"):
        StaticDecoder(model, cache, attention_mask=right_padded)
    with pytest.raises(ValueError, match=r"\[batch, 8\]"):
        StaticDecoder(model, cache, attention_mask=right_padded[:, 1:])


def test_left_padding_counts_each_rows_padding():
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1], [0, 0, 0, 0]])
    assert left_padding(mask, 4).tolist() == [0, 2, 4] and left_padding(None, 4) is None
    assert prompt_positions(mask).tolist() == [[0, 1, 2, 3], [0, 0, 0, 1], [0, 0, 0, 0]]


def test_decode_attention_torch_matches_sdpa_over_the_length():
    torch.manual_seed(0)
    query, keys, values = torch.randn(3, 6, 1, 16), torch.randn(3, 2, 40, 16), torch.randn(3, 2, 40, 16)
    for length in (1, 17, 40):
        expected = torch.nn.functional.scaled_dot_product_attention(
            query, keys[:, :, :length], values[:, :, :length], enable_gqa=True, scale=0.3).transpose(1, 2)
        # Past the length a buffer holds unwritten memory: NaN there must not reach the output.
        unwritten_keys, unwritten_values = keys.clone(), values.clone()
        unwritten_keys[:, :, length:] = unwritten_values[:, :, length:] = float("nan")
        got = decode_attention(query, unwritten_keys, unwritten_values, torch.tensor([length]), 0.3,
                               backend="torch")
        assert (got - expected).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="one query token"):
        decode_attention(torch.randn(3, 6, 2, 16), keys, values, torch.tensor([3]))


def test_decode_attention_torch_skips_each_sequences_left_padding():
    torch.manual_seed(0)
    query, keys, values = torch.randn(3, 6, 1, 16), torch.randn(3, 2, 40, 16), torch.randn(3, 2, 40, 16)
    start, length = torch.tensor([0, 5, 29]), 30
    got = decode_attention(query, keys, values, torch.tensor([length]), 0.3, backend="torch", start=start)
    for row, first in enumerate(start.tolist()):
        expected = torch.nn.functional.scaled_dot_product_attention(
            query[row:row + 1], keys[row:row + 1, :, first:length], values[row:row + 1, :, first:length],
            enable_gqa=True, scale=0.3).transpose(1, 2)
        assert (got[row:row + 1] - expected).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="one position per sequence"):
        decode_attention(query, keys, values, torch.tensor([length]), start=start[:2])


def step_inputs(kind: str, B=2, H=3, K=8, V=5):
    """One token's q, k, v and gates for ``kind``'s step (positive keys for GLA, unit keys for the delta rule), and
    a random initial state."""
    q, k = (torch.randn(B, 1, H, K) for _ in range(2))
    if kind == "gla":
        q, k = q.softmax(-1), k.softmax(-1)
        gates = (torch.nn.functional.logsigmoid(torch.randn(B, 1, H, K)),)
    else:
        q, k = (torch.nn.functional.normalize(x, dim=-1) for x in (q, k))
        gates = (torch.nn.functional.logsigmoid(torch.randn(B, 1, H)), torch.rand(B, 1, H))
    return q, k, torch.randn(B, 1, H, V), gates, torch.randn(B, H, K, V)


STEP_AND_RECURRENCE = {"gla": (gla_step_, gla_recurrent), "gated_deltanet": (gated_delta_step_, gated_delta_recurrent)}


@pytest.mark.parametrize("kind", sorted(STEP_AND_RECURRENCE))
def test_a_step_in_place_matches_the_recurrence(kind):
    torch.manual_seed(0)
    step, recurrence = STEP_AND_RECURRENCE[kind]
    q, k, v, gates, initial = step_inputs(kind)
    expected_out, expected_state = recurrence(q, k, v, *gates, 0.5, initial, output_final_state=True)
    for state in (initial.clone(), initial.transpose(-1, -2).contiguous().transpose(-1, -2)):
        out = step(q, k, v, *gates, 0.5, state)
        assert (out - expected_out).abs().max() <= 1e-6 and (state - expected_state).abs().max() <= 1e-6
    with pytest.raises(ValueError, match="V-first"):
        step(q, k, v, *gates, 0.5, initial.clone(), backend="triton")
    with pytest.raises(ValueError, match="fp32 state"):
        step(q, k, v, *gates, 0.5, initial.double())
    two = [torch.cat([x, x], dim=1) for x in (q, k, v, *gates)]
    with pytest.raises(ValueError, match="advances one token"):
        step(*two[:3], *two[3:], 0.5, initial.clone())


INTERPRETED_KERNELS = textwrap.dedent("""
    import torch
    import sys
    from dtr_core.linear.decoding import decode_attention
    sys.path.insert(0, "tests/ops")  # this module's own imports (test_generation) sit there
    from test_static_decoding import STEP_AND_RECURRENCE, step_inputs

    torch.manual_seed(0)
    # Grouped-query attention with 3 query heads per key/value head; lengths inside a key block, on a
    # block's edge, past it, and the whole buffer; splits that end up empty.
    query, keys, values = torch.randn(2, 6, 1, 16), torch.randn(2, 2, 100, 16), torch.randn(2, 2, 100, 16)
    worst = 0.0
    for length in (1, 37, 64, 65, 100):
        reference = decode_attention(query, keys, values, torch.tensor([length]), 0.3, backend="torch")
        unwritten_keys, unwritten_values = keys.clone(), values.clone()  # NaN past the length must be masked
        unwritten_keys[:, :, length:] = unwritten_values[:, :, length:] = float("nan")
        for splits in (1, 2, 3):
            got = decode_attention(query, unwritten_keys, unwritten_values, torch.tensor([length]), 0.3,
                                   backend="triton", num_splits=splits)
            worst = max(worst, (got - reference).abs().max().item())
    # Left padding: per-sequence starts inside the first key block, on its edge and in a later split.
    for start in ([0, 37], [64, 99]):
        start = torch.tensor(start)
        reference = decode_attention(query, keys, values, torch.tensor([100]), 0.3, backend="torch", start=start)
        for splits in (1, 2, 3):
            got = decode_attention(query, keys, values, torch.tensor([100]), 0.3, backend="triton",
                                   num_splits=splits, start=start)
            worst = max(worst, (got - reference).abs().max().item())
    assert worst <= 1e-5, worst

    # Both in-place steps, with value rows wider than one program's tile of channels.
    for kind, (step, recurrence) in STEP_AND_RECURRENCE.items():
        q, k, v, gates, initial = step_inputs(kind, B=3, H=2, K=16, V=41)
        expected_out, expected_state = recurrence(q, k, v, *gates, 0.5, initial, output_final_state=True)
        state = initial.transpose(-1, -2).contiguous().transpose(-1, -2)
        out = step(q, k, v, *gates, 0.5, state, backend="triton")
        assert (out - expected_out).abs().max() <= 1e-5 and (state - expected_state).abs().max() <= 1e-5, kind
    print("kernels ok")
""")


@pytest.mark.integration
def test_triton_kernels_in_the_interpreter():
    run_in_triton_interpreter(INTERPRETED_KERNELS, "kernels ok")


@pytest.mark.parametrize("options", [{}, dict(window=3, short_conv=4)])
@pytest.mark.parametrize("kind", ["gla", "gated_deltanet"])
def test_exported_hybrid_generate_static_matches_generate(kind, options, tmp_path):
    model = exported_hybrid("qwen2", kind, (1,), tmp_path / "hybrid", **options)
    prompts = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]])
    # Both stop a sequence at the generation config's eos token and pad it after: make the first
    # sequence's third new token the eos.
    model.generation_config.eos_token_id = int(model.generate_static(prompts, 3, eos_token_id=None)[0, -1])
    expected = model.generate(prompts, max_new_tokens=7, do_sample=False)
    assert (expected[0, 9:] == model.generation_config.pad_token_id).all()
    assert torch.equal(model.generate_static(prompts, 7), expected)
    # Sampling at a vanishing temperature is the argmax.
    assert torch.equal(model.generate_static(prompts, 7, do_sample=True, temperature=1e-4), expected)


def test_static_generate_stops_at_eos():
    model = tiny_model("llama", num_layers=2)
    prompts = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    free = static_generate(model, prompts, 8)[:, 4:]
    eos = int(free[0, 2])  # the first sequence's third new token
    expected, ends = free.clone(), []
    for row in expected:  # each sequence as generated up to its first eos, padded with eos after it
        hits = (row == eos).nonzero()
        ends.append(int(hits[0]) + 1 if len(hits) else 8)
        row[ends[-1]:] = eos
    stopped = static_generate(model, prompts, 8, eos_token_id=eos)[:, 4:]
    assert torch.equal(stopped, expected[:, :max(ends)])
    # Generation stops once every sequence has its eos.
    assert static_generate(model, prompts[:1], 8, eos_token_id=eos).shape[1] == 4 + ends[0]


def test_static_decoding_refuses_sliding_windows_and_bad_arguments():
    model = tiny_model("llama", num_layers=2)
    prompts = torch.tensor([[5, 6, 7, 8]])
    with pytest.raises(ValueError, match="max_new_tokens"):
        static_generate(model, prompts, 0)
    with pytest.raises(ValueError, match="temperature"):
        static_generate(model, prompts, 3, do_sample=True, temperature=0)
    model.config.sliding_window = 4
    with pytest.raises(ValueError, match="sliding-window"):
        static_generate(model, prompts, 3)

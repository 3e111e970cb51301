"""Students' options: a softmax window beside the scan (``window.py``), short convolutions on q/k/v
(``short_conv.py``) and K/V heads shared by groups of query heads (``shared_kv``). Checked against a
step-by-step reading of their definition, against the teacher's own attention where the window covers
the whole sequence, across cached calls of any size, and (identity-initialised convolutions, shared
K/V heads) against the students without them."""

import math

import pytest
import torch
from conftest import tiny_model
from transformers import DynamicCache

from dtr_core.adapters import adapter_for
from dtr_core.linear import base
from dtr_core.linear.build import student_from_teacher
from dtr_core.linear.gated_deltanet import gated_delta_recurrent
from dtr_core.linear.gla import gla_recurrent
from dtr_core.linear.students import build_student
from dtr_core.linear.window import rotary_tables, rotate
from dtr_core.specs import DECODER_WINDOW, StudentSpec

KINDS = ("gla", "gated_deltanet")
WINDOW = 4


def perturbed(student, seed=0):
    """Move every parameter off its initial value, as distillation would."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in student.parameters():
            param.add_(0.1 * torch.randn(param.shape, generator=generator))
    return student.eval()


def window_student(kind, causal, feature_map="hedgehog", short_conv=0, kv_heads=0):
    torch.manual_seed(1)
    student = build_student(dict(kind=kind, hidden_size=32, num_heads=2, head_dim=8, causal=causal,
                                 feature_map=feature_map, gate_rank=4, chunk_size=8, window=WINDOW,
                                 rope=True, short_conv=short_conv, kv_heads=kv_heads), backend="chunked")
    student.rotary_inv_freq.copy_(1.0 / 100.0 ** (torch.arange(0, 8, 2).float() / 8))
    return perturbed(student)


def final_state(kind, k, v, gates):
    """The mechanism's recurrent reference state after the given tokens (zeros for none)."""
    if k.shape[1] == 0:
        return k.new_zeros(k.shape[0], k.shape[2], k.shape[3], v.shape[3])
    q = torch.zeros_like(k)
    if kind == "gla":
        return gla_recurrent(q, k, v, *gates, scale=1.0, output_final_state=True)[1]
    return gated_delta_recurrent(q, k, v, *gates, scale=1.0, output_final_state=True)[1]


def linear_beyond_window(student, q, k, v, gates, t, direction):
    """Query t's read of the state holding only keys at least W tokens away (one direction), decayed by
    the gates of the tokens in between: the definition, one recurrence per query."""
    log_decay = gates[0]
    if direction > 0:  # keys s <= t - W; decay of tokens t-W+1 .. t
        end = t - WINDOW + 1
        state = final_state(student.kind, k[:, :max(end, 0)], v[:, :max(end, 0)],
                            tuple(g[:, :max(end, 0)] for g in gates))
        decay = log_decay[:, max(end, 0):t + 1].sum(1)
    else:  # keys s >= t + W, scanned from the end; decay of tokens t .. t+W-1
        begin = t + WINDOW
        flipped = lambda x: x[:, begin:].flip(1)  # noqa: E731
        state = final_state(student.kind, flipped(k), flipped(v), tuple(flipped(g) for g in gates))
        decay = log_decay[:, t:begin].sum(1)
    factor = decay.exp() if decay.dim() == q.dim() - 1 else decay.exp()[..., None]
    return torch.einsum("bhk,bhkv->bhv", q[:, t].float() * factor, state)


def reference_output(student, x):
    """A window student's output, read off its definition token by token."""
    batch, length, _ = x.shape
    heads, dim = student.num_heads, student.head_dim
    q, k, v, gates = student._scan_inputs(x, student._projections(x), None, None)
    v = student._value_columns(v)
    shape = (batch, length, heads, dim)

    def per_query_head(projection):  # query head h reads K/V head h // groups (transformers' repeat_kv)
        kv = projection(x).view(batch, length, -1, dim)
        return kv.repeat_interleave(heads // kv.shape[2], dim=2)

    cos, sin = rotary_tables(student.rotary_inv_freq, 0, length, 1.0, torch.float32)
    q_window = rotate(student.q_proj(x).view(shape), cos, sin)
    k_window = rotate(per_query_head(student.k_proj), cos, sin)
    v_window = per_query_head(student.v_proj)
    outputs = []
    for t in range(length):
        linear = linear_beyond_window(student, q, k, v, gates, t, +1)
        if not student.causal:
            linear = linear + linear_beyond_window(student, q, k, v, gates, t, -1)
        keys = range(max(0, t - WINDOW + 1), t + 1 if student.causal else min(length, t + WINDOW))
        keys = torch.tensor(list(keys))
        scores = torch.einsum("bhd,bshd->bhs", q_window[:, t], k_window[:, keys]) / math.sqrt(dim)
        if student.normalised_readout:
            weights = (scores - student.window_offset[None, :, None]).exp()
            values = torch.einsum("bhs,bshd->bhd", weights, v_window[:, keys]) + linear[..., :dim]
            out = values / (weights.sum(-1)[..., None] + linear[..., dim:] + 1e-6)
        else:
            windowed = torch.einsum("bhs,bshd->bhd", scores.softmax(-1), v_window[:, keys])
            out = windowed + student._normalised(linear)
        outputs.append(out)
    return student.o_proj(torch.stack(outputs, dim=1).reshape(batch, length, heads * dim))


@pytest.mark.parametrize("kv_heads", [0, 1])  # one K/V head per query head, or one shared by both
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("feature_map", ["hedgehog", "identity"])
@pytest.mark.parametrize("kind", KINDS)
def test_window_student_follows_its_definition(kind, feature_map, causal, kv_heads):
    student = window_student(kind, causal, feature_map, kv_heads=kv_heads)
    x = torch.randn(2, 3 * WINDOW + 3, 32)  # several blocks and a partial one
    with torch.no_grad():
        torch.testing.assert_close(student(x)[0], reference_output(student, x), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("shared_kv", [False, True])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_window_over_the_whole_sequence_is_the_teachers_attention(family, shared_kv):
    model = tiny_model(family)
    adapter = adapter_for(model)
    length = 9
    student = student_from_teacher(StudentSpec(window=length, shared_kv=shared_kv),
                                   adapter.read_attention_weights(model, 0), causal=True)
    assert student.rope
    hidden = torch.randn(2, length, model.config.hidden_size)
    positions = torch.arange(length)[None].expand(2, -1)
    position_embeddings = model.model.rotary_emb(hidden, positions)
    teacher = adapter.attention_module(model, 0)
    with torch.no_grad():
        expected = teacher(hidden, position_embeddings=position_embeddings, attention_mask=None)[0]
        # The model's position embeddings, and the student's own from the teacher's frequencies.
        torch.testing.assert_close(student(hidden, position_embeddings=position_embeddings)[0], expected,
                                   atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(student(hidden)[0], expected, atol=1e-5, rtol=1e-4)


def cached_student(kind, options, seed):
    """A causal student with these options, moved off its initial weights, that a cache can hold (layer 0); the
    global generator seeded for the inputs that follow."""
    torch.manual_seed(seed)
    student = perturbed(build_student(dict(kind=kind, hidden_size=32, num_heads=2, head_dim=8, causal=True,
                                           rope=bool(options.get("window")), **options), backend="chunked"))
    student.layer_idx = 0
    return student


@pytest.mark.parametrize("options", [dict(window=WINDOW), dict(short_conv=3), dict(window=WINDOW, short_conv=3),
                                     dict(window=WINDOW, short_conv=3, kv_heads=1)])
@pytest.mark.parametrize("kind", KINDS)
def test_cached_calls_of_any_size_continue_like_one_forward(kind, options):
    student = cached_student(kind, options, seed=2)
    x = torch.randn(2, 15, 32)
    mask = torch.ones(2, 15, dtype=torch.long)
    mask[1, :3] = 0  # a left-padded prompt
    with torch.no_grad():
        whole = student(x, attention_mask=mask)[0]
        cache, pieces, start = DynamicCache(), [], 0
        for size in (5, 1, 1, 2, 6):  # a prompt shorter than the window, steps, and a longer piece
            end = start + size
            pieces.append(student(x[:, start:end], attention_mask=mask[:, :end], cache=cache)[0])
            start = end
    real = mask.bool()
    torch.testing.assert_close(torch.cat(pieces, dim=1)[real], whole[real], atol=2e-5, rtol=1e-4)
    assert cache.layers[0].get_seq_length() == 15
    held = {name: tuple(history.shape) for name, history in cache.layers[0].histories.items()}
    if "window" in options:  # the cache stays at W tokens however long the sequence
        assert held["window_k"] == (2, WINDOW, 2, 8)
    if "short_conv" in options:
        assert held["k_conv"] == (2, 2, 16)


@pytest.mark.parametrize("options", [dict(), dict(window=WINDOW), dict(window=WINDOW, short_conv=3, kv_heads=1)])
@pytest.mark.parametrize("kind", KINDS)
def test_inference_over_many_tokens_runs_a_few_rows_at_a_time(kind, options, monkeypatch):
    """Prompts over PREFILL_PIECE_TOKENS tokens go through the student a few batch rows at a time (their
    intermediates bounded): the same outputs and cache as one call, and decoding continues alike."""
    student = cached_student(kind, options, seed=3)
    x = torch.randn(5, 12, 32)
    mask = torch.ones(5, 12, dtype=torch.long)
    mask[1, :3] = 0  # left-padded prompts, in the first and the last piece
    mask[4, :7] = 0
    rows_per_call = []
    attend = student._attend
    monkeypatch.setattr(student, "_attend", lambda x, *args: rows_per_call.append(x.shape[0]) or attend(x, *args))

    def prompt_then_steps(cache):
        with torch.no_grad():
            outputs = [student(x[:, :9], attention_mask=mask[:, :9], cache=cache)[0]]
            for end in (10, 11, 12):
                outputs.append(student(x[:, end - 1:end], attention_mask=mask[:, :end], cache=cache)[0])
        return torch.cat(outputs, dim=1)

    whole_cache, pieces_cache = DynamicCache(), DynamicCache()
    whole = prompt_then_steps(whole_cache)
    assert rows_per_call == [5, 5, 5, 5]
    monkeypatch.setattr(base, "PREFILL_PIECE_TOKENS", 2 * 9)
    rows_per_call.clear()
    pieces = prompt_then_steps(pieces_cache)
    assert rows_per_call == [2, 2, 1, 5, 5, 5]  # the 9-token prompt in pieces of 2 rows; 1-token steps whole
    real = mask.bool()
    torch.testing.assert_close(pieces[real], whole[real], atol=1e-6, rtol=1e-5)
    whole_layer, pieces_layer = whole_cache.layers[0], pieces_cache.layers[0]
    assert pieces_layer.get_seq_length() == whole_layer.get_seq_length() == 12
    torch.testing.assert_close(pieces_layer.state, whole_layer.state, atol=1e-6, rtol=1e-5)
    assert pieces_layer.histories.keys() == whole_layer.histories.keys()
    for name, history in whole_layer.histories.items():
        torch.testing.assert_close(pieces_layer.histories[name], history, atol=1e-6, rtol=1e-5)
    rows_per_call.clear()
    student(x, attention_mask=mask)  # training: one call, whatever its size
    assert rows_per_call == [5]


@pytest.mark.parametrize("kind", KINDS)
def test_identity_convolutions_start_as_the_student_without_them(kind):
    model = tiny_model("llama")
    weights = adapter_for(model).read_attention_weights(model, 1)
    # No window: over these 11 tokens a 64-token window would hide what the convolution changes.
    plain = student_from_teacher(StudentSpec(kind=kind, window=0), weights, causal=True, seed=3)
    convolved = student_from_teacher(StudentSpec(kind=kind, window=0, short_conv=4), weights, causal=True, seed=3)
    hidden = torch.randn(2, 11, model.config.hidden_size)
    with torch.no_grad():
        assert torch.equal(convolved(hidden)[0], plain(hidden)[0])
        convolved.k_conv.add_(0.1)  # once trained it mixes earlier tokens, never later ones
        changed = convolved(hidden)[0]
        early = convolved(hidden[:, :6])[0]
    assert not torch.allclose(changed, plain(hidden)[0])
    torch.testing.assert_close(early, changed[:, :6])


@pytest.mark.parametrize("window", [0, 64])
@pytest.mark.parametrize("kind", KINDS)
def test_shared_kv_heads_start_as_one_per_query_head_with_the_teachers_projection_sizes(kind, window):
    """A GQA teacher's K/V heads shared by their query heads: the same student at the start, with the teacher's
    K/V projections (fewer weights); trained, each group's query heads still read one key and one value."""
    model = tiny_model("llama")  # 4 query heads, 2 K/V heads
    weights = adapter_for(model).read_attention_weights(model, 1)
    per_query = student_from_teacher(StudentSpec(kind=kind, window=window, shared_kv=False), weights, causal=True, seed=3)
    shared = student_from_teacher(StudentSpec(kind=kind, window=window), weights, causal=True, seed=3)
    assert shared.k_proj.weight.shape == weights.k_weight.shape and shared.v_proj.weight.shape == weights.v_weight.shape
    assert per_query.k_proj.weight.shape == weights.q_weight.shape
    assert sum(p.numel() for p in shared.parameters()) < sum(p.numel() for p in per_query.parameters())
    assert shared.config_dict()["kv_heads"] == 2 and per_query.config_dict()["kv_heads"] == 4
    hidden = torch.randn(2, 11, model.config.hidden_size)
    with torch.no_grad():
        torch.testing.assert_close(shared(hidden)[0], per_query(hidden)[0], atol=1e-6, rtol=1e-5)
        perturbed(shared)
        keys = shared._projections(hidden)[1].view(2, 11, 2, 2, -1)  # [B, T, K/V head, query head of its group, D]
    assert torch.equal(keys[:, :, :, 0], keys[:, :, :, 1])
    rebuilt = build_student(shared.config_dict())
    assert {name: p.shape for name, p in rebuilt.state_dict().items()} == \
        {name: p.shape for name, p in shared.state_dict().items()}
    with pytest.raises(ValueError, match="kv_heads=3: must divide num_heads=4"):
        build_student({**shared.config_dict(), "kv_heads": 3})


def test_student_spec_checks_window_and_convolutions():
    for bad in (-1, True, "64", 2.0):
        with pytest.raises(ValueError, match="window"):
            StudentSpec(window=bad)
    with pytest.raises(ValueError, match="short_conv"):
        StudentSpec(short_conv=1)
    student = build_student(dict(kind="gla", hidden_size=32, num_heads=2, head_dim=8, causal=True, window=8,
                                 rope=True, short_conv=4))
    rebuilt = build_student(student.config_dict())
    assert rebuilt.config_dict() == student.config_dict()
    assert set(rebuilt.state_dict()) == set(student.state_dict())


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_the_default_window_is_64_tokens_for_decoders_and_none_for_encoders(family):
    model = tiny_model(family)
    adapter = adapter_for(model)
    weights = adapter.read_attention_weights(model, 0)
    student = student_from_teacher(StudentSpec(), weights, causal=adapter.causal)
    expected = DECODER_WINDOW if adapter.causal else 0
    assert (student.window, student.rope) == (expected, expected > 0)  # Llama's rotary positions come along
    assert student_from_teacher(StudentSpec(window=16), weights, causal=adapter.causal).window == 16
    assert StudentSpec(window=0).window_for(True) == 0


@pytest.mark.parametrize("window", [0, 4])
def test_rms_readout_starts_at_the_teachers_output_scale(window):
    """A Gated DeltaNet student's RMS readout starts at the RMS per channel of the teacher's attention
    output (BERT's replaced module returns exactly that: the per-head context), times the share of
    attention beyond the window when the student has one."""
    model = tiny_model("bert")
    adapter = adapter_for(model)
    student = student_from_teacher(StudentSpec(kind="gated_deltanet", window=window),
                                   adapter.read_attention_weights(model, 0), causal=False)
    hidden = torch.randn(3, 10, model.config.hidden_size)
    student.calibrate_readout_scale(hidden)
    with torch.no_grad():
        context = adapter.attention_module(model, 0)(hidden)[0]
    expected = context.reshape(-1, student.num_heads, student.head_dim).pow(2).mean(0).sqrt()
    if window:
        assert (student.out_norm_weight < expected).all() and (student.out_norm_weight > 0).all()
    else:
        torch.testing.assert_close(student.out_norm_weight.detach(), expected, atol=1e-5, rtol=1e-4)

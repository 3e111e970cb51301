"""An exported hybrid's generate() decodes greedy and sampled batches on static steps (decoding.sample_static;
graph replays on CUDA, eager here) by default: left-padded prompts of different lengths, eos and padding,
min_new_tokens, scores, logits and streamers give what transformers' own loop gives (generate with
static_decoding=False), token for token in fp32, random draws included. What it cannot do takes
transformers' loop, and a warning says why once.
"""

import logging
import sys

import pytest
import torch
from test_generation import PAD, exported_hybrid

# Three prompts of 8, 5 and 2 tokens, left-padded.
PADDED = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12], [PAD, PAD, PAD, 13, 14, 15, 16, 17], [PAD] * 6 + [20, 21]])
SAMPLING = dict(do_sample=True, temperature=0.8, top_k=20, top_p=0.9)


def static_steps(model, monkeypatch) -> list:
    """Records the StaticDecoder of every step the exported model takes (in its own copy of decoding.py)."""
    decoding = sys.modules[sys.modules[type(model).__module__].sample_static.__module__]
    steps, step = [], decoding.StaticDecoder.step

    def counted(self, tokens=None):
        steps.append(self)
        return step(self, tokens)

    monkeypatch.setattr(decoding.StaticDecoder, "step", counted)
    return steps


def generate(model, prompts=PADDED, static=True, seed=0, **options):
    torch.manual_seed(seed)  # both loops draw from the global generator
    return model.generate(prompts, attention_mask=(prompts != PAD).long(), pad_token_id=PAD,
                          static_decoding=static, **{"max_new_tokens": 10, **options})


CASES = {
    "llama-gla": ("llama", "gla", (0, 2), {}),
    "llama-gated_deltanet": ("llama", "gated_deltanet", (0, 2), {}),
    "qwen2-gla": ("qwen2", "gla", (0, 2), {}),
    "qwen2-gated_deltanet": ("qwen2", "gated_deltanet", (0, 2), {}),
    "qwen2-gla-window-conv-kv-per-query": ("qwen2", "gla", (0, 2), dict(window=3, short_conv=4, shared_kv=False)),
    "llama-gated_deltanet-window": ("llama", "gated_deltanet", (1,), dict(window=3)),
    "llama-all-linear": ("llama", "gla", (0, 1, 2), {}),
    "qwen2-no-linear": ("qwen2", "gla", (), {}),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_generate_decodes_padded_batches_on_static_steps_like_transformers(case, tmp_path, monkeypatch):
    family, kind, linear, options = case
    model = exported_hybrid(family, kind, linear, tmp_path / "hybrid", **options)
    steps = static_steps(model, monkeypatch)
    for sampling in ({"do_sample": False}, SAMPLING):
        expected = generate(model, static=False, **sampling)
        assert not steps  # static_decoding=False: transformers' loop
        got = generate(model, **sampling)
        assert torch.equal(got, expected), sampling
        assert len(steps) == got.shape[1] - PADDED.shape[1] - 1  # the first new token comes from the prompt
        steps.clear()
    # The seed decides the draws in both loops alike.
    assert not torch.equal(generate(model, seed=1, **SAMPLING), generate(model, seed=2, **SAMPLING))


def test_generate_stops_at_eos_pads_after_it_and_keeps_min_new_tokens(tmp_path, monkeypatch):
    model = exported_hybrid("llama", "gla", (0, 2), tmp_path / "hybrid")
    steps = static_steps(model, monkeypatch)
    free = generate(model, eos_token_id=None)[:, PADDED.shape[1]:]
    eos = int(free[1, 2])  # the second sequence's third new token
    for options in ({}, SAMPLING):
        stopped = generate(model, eos_token_id=eos, **options)
        assert torch.equal(stopped, generate(model, static=False, eos_token_id=eos, **options))
        new = stopped[:, PADDED.shape[1]:]
        for row in new:  # after its first eos a sequence holds padding
            hits = (row == eos).nonzero()
            if len(hits):
                assert (row[int(hits[0]) + 1:] == PAD).all()
    assert (generate(model, eos_token_id=eos)[1, PADDED.shape[1] + 3:] == PAD).all()
    late = generate(model, eos_token_id=eos, min_new_tokens=6)
    assert torch.equal(late, generate(model, static=False, eos_token_id=eos, min_new_tokens=6))
    assert not (late[:, PADDED.shape[1]:PADDED.shape[1] + 6] == eos).any()
    assert steps


def test_generate_returns_scores_and_logits_and_streams_like_transformers(tmp_path, monkeypatch):
    model = exported_hybrid("qwen2", "gated_deltanet", (1,), tmp_path / "hybrid")
    steps = static_steps(model, monkeypatch)

    class Recorder:
        def __init__(self):
            self.put_calls, self.ended = [], False

        def put(self, tokens):
            self.put_calls.append(tokens.tolist())

        def end(self):
            self.ended = True

    outputs, streamed = [], []
    for static in (True, False):
        streamer = Recorder()
        outputs.append(generate(model, static=static, return_dict_in_generate=True, output_scores=True,
                                output_logits=True, streamer=streamer, **SAMPLING))
        streamed.append(streamer)
    got, expected = outputs
    assert len(steps) == got.sequences.shape[1] - PADDED.shape[1] - 1
    assert torch.equal(got.sequences, expected.sequences)
    for name in ("scores", "logits"):
        assert len(getattr(got, name)) == len(getattr(expected, name))
        for ours, theirs in zip(getattr(got, name), getattr(expected, name)):
            finite = torch.isfinite(theirs)  # top-k/top-p leave -inf where both filtered
            assert torch.equal(finite, torch.isfinite(ours)) and (ours[finite] - theirs[finite]).abs().max() <= 1e-4
    assert streamed[0].put_calls == streamed[1].put_calls and streamed[0].ended
    # The cache comes back up to date, as transformers' loop leaves it: every token but the last fed.
    assert got.past_key_values.get_seq_length() == got.sequences.shape[1] - 1


FALLBACKS = {
    "beam search": dict(num_beams=2, do_sample=False),
    "use_cache=False": dict(use_cache=False),
    "output_attentions": dict(output_attentions=True, return_dict_in_generate=True),
    "not left padding": dict(attention_mask=torch.ones_like(PADDED).index_fill(1, torch.tensor([7]), 0)),
}


def test_generate_falls_back_to_transformers_loop_and_says_why_once(tmp_path, monkeypatch, caplog):
    model = exported_hybrid("llama", "gla", (0, 2), tmp_path / "hybrid")
    steps = static_steps(model, monkeypatch)
    caplog.set_level(logging.WARNING)
    for reason, options in FALLBACKS.items():
        for _ in range(2):
            torch.manual_seed(0)
            model.generate(PADDED, **{"attention_mask": (PADDED != PAD).long(), "max_new_tokens": 3,
                                      "pad_token_id": PAD, **options})
        said = [record for record in caplog.records if "step-by-step loop" in record.getMessage()]
        assert len(said) == 1 and reason in said[0].getMessage(), reason
        assert said[0].levelno == logging.WARNING
        caplog.clear()
    model.generate(PADDED, attention_mask=(PADDED != PAD).long(), max_new_tokens=3, pad_token_id=PAD,
                   num_beams=2, static_decoding=False)
    model.config.sliding_window = 4  # its layers must not see every cached position
    generate(model)
    assert [record.getMessage().split("because of ")[1].split(" (")[0] for record in caplog.records] == [
        "the model's sliding-window or chunked attention layers"]
    assert not steps


def test_generate_static_takes_padded_prompts_like_generate(tmp_path):
    model = exported_hybrid("qwen2", "gla", (0, 2), tmp_path / "hybrid")
    mask = (PADDED != PAD).long()
    expected = generate(model, max_new_tokens=7, do_sample=False)
    assert torch.equal(model.generate_static(PADDED, 7, attention_mask=mask), expected)
    with pytest.raises(ValueError, match="left padding"):
        model.generate_static(PADDED, 3, attention_mask=mask.flip(1))


def test_prompts_over_the_piece_size_reach_the_students_a_few_rows_at_a_time(tmp_path, monkeypatch):
    """A prompt batch over PREFILL_PIECE_TOKENS tokens (lowered here to one padded prompt) goes through each student
    a row at a time, and generate() gives the same tokens."""
    model = exported_hybrid("qwen2", "gla", (0, 2), tmp_path / "hybrid", window=3, short_conv=4)
    expected = generate(model)
    student_class = type(model.model.layers[0].self_attn)
    base = sys.modules[student_class.__mro__[1].__module__]  # the export's own copy of base.py
    rows_per_call, attend = [], base.LinearAttentionStudent._attend

    def counted(self, hidden_states, *args):
        rows_per_call.append(hidden_states.shape[0])
        return attend(self, hidden_states, *args)

    monkeypatch.setattr(base.LinearAttentionStudent, "_attend", counted)
    monkeypatch.setattr(base, "PREFILL_PIECE_TOKENS", PADDED.shape[1])
    assert torch.equal(generate(model), expected)
    assert rows_per_call[:6] == [1, 1, 1, 1, 1, 1]  # the prompt: two students, three rows each
    assert set(rows_per_call[6:]) == {3}  # then one-token steps of the whole batch


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_padded_prompts_over_the_group_size_prefill_by_length_and_generate_the_same(case, tmp_path, monkeypatch):
    """A left-padded batch over PREFILL_GROUP_TOKENS tokens (lowered here) prefills a group of similar-length rows at
    a time, each cut to its longest prompt; the cache gathered from the groups decodes the same tokens, greedy and
    sampled, as transformers' loop over the whole padded batch."""
    family, kind, linear, options = case
    model = exported_hybrid(family, kind, linear, tmp_path / "hybrid", **options)
    decoding = sys.modules[sys.modules[type(model).__module__].sample_static.__module__]
    groups, prompt_groups = [], decoding.prompt_groups

    def recorded(*args):
        groups.append([rows.tolist() for rows in prompt_groups(*args)])
        return prompt_groups(*args)

    monkeypatch.setattr(decoding, "prompt_groups", recorded)
    monkeypatch.setattr(decoding, "PREFILL_GROUP_TOKENS", 10)  # the 8-token prompt alone, the 5 and 2 together
    for sampling in ({"do_sample": False}, SAMPLING):
        expected = generate(model, static=False, **sampling)
        assert torch.equal(generate(model, **sampling), expected), sampling
    assert groups == [[[0], [1, 2]]] * 2
    assert torch.equal(model.generate_static(PADDED, attention_mask=(PADDED != PAD).long(), max_new_tokens=10,
                                             pad_token_id=PAD), generate(model, static=False))
    # Prompts of one length (no mask) are grouped too, which bounds the forward's intermediates.
    same_length = torch.arange(4, 28).view(3, 8)
    grouped = model.generate_static(same_length, max_new_tokens=6)
    assert len(groups[-1]) == 3  # 8-token rows: one per group
    monkeypatch.setattr(decoding, "PREFILL_GROUP_TOKENS", 10 ** 9)
    assert torch.equal(grouped, model.generate_static(same_length, max_new_tokens=6))


def test_a_prompt_of_padding_alone_keeps_the_whole_batch_prefill(tmp_path, monkeypatch):
    """A row with no tokens cannot be cut to its prompt: the batch prefills whole, as transformers' loop does."""
    model = exported_hybrid("llama", "gla", (0, 2), tmp_path / "hybrid")
    decoding = sys.modules[sys.modules[type(model).__module__].sample_static.__module__]
    monkeypatch.setattr(decoding, "PREFILL_GROUP_TOKENS", 8)
    monkeypatch.setattr(decoding, "prompt_groups", lambda *args: pytest.fail("grouped a row without tokens"))
    prompts = PADDED.clone()
    prompts[2] = PAD
    assert torch.equal(generate(model, prompts), generate(model, prompts, static=False))

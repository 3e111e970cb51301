"""Synthetic in-context recall probes: pass-key retrieval, multi-key needle and key–value lookup.

The fast tests use a small byte-level BPE trained here on BBC News (with and without a ChatML chat
template) and MiniLM's WordPiece tokenizer; the ``real_weights`` test asks the full SmolLM2."""

import copy
import math
import re

import pytest
import torch

from dtr_core.specs import PROBE_KINDS as SPEC_PROBE_KINDS
from dtr_core.specs import ModelSpec, TargetSpec
from dtr_core.targets.data import load_task_data
from dtr_core.targets.probes import PROBE_KINDS, ProbeExample, probe_examples, probe_max_new_tokens

CHATML = ("{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
NEEDLE = re.compile(r"The special magic number for (\w+) is (\d{5})\.")
PAIR = re.compile(r'"(\w+)": (\d{5}),')


@pytest.fixture(scope="module")
def haystack() -> tuple[str, ...]:
    return load_task_data(TargetSpec(kind="perplexity")).train.texts


@pytest.fixture(scope="module")
def bpe(haystack):
    """Byte-level BPE (4000 tokens) over BBC News whose post-processor adds a BOS, no chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(haystack[:300], trainers.BpeTrainer(
        vocab_size=4000, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", backend.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   additional_special_tokens=specials[3:])


@pytest.fixture(scope="module")
def chat_bpe(bpe):
    """The same BPE with a ChatML template that writes the BOS itself."""
    tokenizer = copy.deepcopy(bpe)
    tokenizer.chat_template = CHATML
    return tokenizer


@pytest.fixture(scope="module")
def wordpiece():
    from transformers import AutoTokenizer

    from dtr_core.teacher import ModelLoadError, resolve_model_path

    try:
        return AutoTokenizer.from_pretrained(resolve_model_path("minilm"))
    except ModelLoadError as err:
        pytest.skip(str(err))


@pytest.fixture(params=["bpe", "chat_bpe", "wordpiece"])
def tokenizer(request):
    return request.getfixturevalue(request.param)


def test_probe_kinds_are_the_specs():
    assert PROBE_KINDS is SPEC_PROBE_KINDS == ("passkey", "multi_key_needle", "kv_lookup")


# (kind, context_tokens, extra keyword arguments): 64 tokens hold a pass key but not 4 needles or
# enough key–value pairs to land within 10% (one pair is ~10 tokens).
LENGTHS = [("passkey", 64, {}), ("passkey", 200, {}), ("passkey", 1000, {}),
           ("multi_key_needle", 128, {"num_needles": 2}), ("multi_key_needle", 200, {}),
           ("multi_key_needle", 1000, {}),
           ("kv_lookup", 128, {}), ("kv_lookup", 200, {}), ("kv_lookup", 1000, {})]


@pytest.mark.parametrize(("kind", "context", "extra"), LENGTHS, ids=[f"{k}-{n}" for k, n, _ in LENGTHS])
def test_every_prompt_fills_90_to_100_percent_of_the_context(tokenizer, haystack, kind, context, extra):
    if context == 64 and getattr(tokenizer, "chat_template", None):
        context = 80  # the template's own tokens
    examples = probe_examples(kind, tokenizer, haystack, context_tokens=context, count=6, seed=3, **extra)
    assert len(examples) == 6
    for example in examples:
        assert isinstance(example, ProbeExample)
        assert math.ceil(0.9 * context) <= len(example.input_ids) <= context
        assert all(isinstance(i, int) for i in example.input_ids)
        assert len(example.answers) == 1 and re.fullmatch(r"\d{5}", example.answers[0])


@pytest.mark.parametrize("kind", PROBE_KINDS)
def test_same_arguments_give_the_same_examples_and_another_seed_others(bpe, haystack, kind):
    def make(seed):
        return probe_examples(kind, bpe, haystack, context_tokens=300, count=5, seed=seed)

    first = make(7)
    assert make(7) == first
    other = make(8)
    assert [e.answers for e in other] != [e.answers for e in first]
    assert all(a.input_ids != b.input_ids for a, b in zip(first, other))
    if kind != "passkey":  # the keys differ too
        def keys(examples):
            pattern = NEEDLE if kind == "multi_key_needle" else PAIR
            return {k for e in examples for k, _ in pattern.findall(bpe.decode(e.input_ids))}
        assert keys(first) != keys(other)


def normalised(texts) -> str:
    return " ".join(" ".join(text.split()) for text in texts)


def documents_covering(piece: str, corpus: str) -> int:
    """How many runs of whole documents' text ``piece`` is made of (it may run from one document into
    the next); fails if some part of it occurs in none. ``corpus``: the documents joined by new lines."""
    words, runs = piece.split(), 0
    while words:
        low, high = 0, len(words)  # the longest prefix of words found in one document (binary search)
        while low < high:
            middle = (low + high + 1) // 2
            if " ".join(words[:middle]) in corpus:
                low = middle
            else:
                high = middle - 1
        assert low > 0, f"not from the haystack: {' '.join(words[:20])!r}"
        words, runs = words[low:], runs + 1
    return runs


def test_passkey_prompt(bpe, haystack):
    examples = probe_examples("passkey", bpe, haystack, context_tokens=400, count=5, seed=0)
    corpus = "\n".join(" ".join(text.split()) for text in haystack)
    depths = []
    for example in examples:
        text = bpe.decode(example.input_ids, skip_special_tokens=True)
        key = example.answers[0]
        assert text.count(key) == 1
        assert text.startswith("There is a pass key hidden in the following text. Remember it.\n\n")
        assert text.endswith("\n\nWhat is the pass key? Give the number.\nThe pass key is")
        body = text.split("\n\n")[1]
        needle = f"The pass key is {key}. Remember it."
        before, after = body.split(needle)
        # The filler around the needle is real text (one or two documents' worth), cut where words end.
        assert documents_covering(before + " " + after, corpus) <= 3
        tail = " ".join((before + " " + after).split()[-3:])
        assert re.search(re.escape(tail) + r"(\s|$)", corpus), tail  # ends where a word ends
        depths.append(len(before) / (len(body) - len(needle)))
    # Five examples put the key at depths 0, 1/4, 1/2, 3/4 and 1 (nearest sentence boundary).
    assert min(depths) < 0.1 and max(depths) > 0.9
    assert len({round(d, 1) for d in depths}) >= 4


def test_multi_key_needle_asks_one_key_among_distractors(bpe, haystack):
    examples = probe_examples("multi_key_needle", bpe, haystack, context_tokens=500, count=4, seed=0,
                              num_needles=5)
    for example in examples:
        text = bpe.decode(example.input_ids, skip_special_tokens=True)
        needles = dict(NEEDLE.findall(text))
        assert len(needles) == 5 and len(set(needles.values())) == 5  # distinct keys and numbers
        asked = re.search(r"What is the special magic number for (\w+)\?\nThe special magic number for \1 is$", text)
        assert asked, text[-200:]
        assert needles[asked.group(1)] == example.answers[0]
        for value in needles.values():  # the answer and every distractor occur once
            assert text.count(value) == 1


def test_kv_lookup_lists_distinct_words_and_numbers(bpe, haystack):
    examples = probe_examples("kv_lookup", bpe, haystack, context_tokens=400, count=5, seed=0)
    corpus_words = set(re.findall(r"[a-z]+", normalised(haystack)))
    positions = []
    for example in examples:
        text = bpe.decode(example.input_ids, skip_special_tokens=True)
        pairs = PAIR.findall(text)
        keys = [k for k, _ in pairs]
        values = [v for _, v in pairs]
        assert len(pairs) > 20 and len(set(keys)) == len(keys) and len(set(values)) == len(values)
        assert set(keys) <= corpus_words  # real words of the haystack
        asked = re.search(r'What is the number for "(\w+)"\?\n"\1":$', text)
        assert asked, text[-200:]
        index = keys.index(asked.group(1))
        assert values[index] == example.answers[0] and text.count(example.answers[0]) == 1
        positions.append(index / (len(pairs) - 1))
    assert sorted(round(p, 2) for p in positions) == pytest.approx([0, 0.25, 0.5, 0.75, 1], abs=0.05)


def test_chat_template_path_writes_one_bos_and_the_lead_in_after_the_generation_prompt(bpe, chat_bpe, haystack):
    bos = bpe.bos_token_id
    plain = probe_examples("passkey", bpe, haystack, context_tokens=200, count=2, seed=0)
    chat = probe_examples("passkey", chat_bpe, haystack, context_tokens=200, count=2, seed=0)
    for example in plain + chat:  # the plain path's BOS from the tokenizer, the chat's from its template
        assert example.input_ids[0] == bos and example.input_ids.count(bos) == 1
    text = chat_bpe.decode(chat[0].input_ids)
    assert text.startswith("<s><|im_start|>user\nThere is a pass key hidden")
    assert text.endswith("Give the number.<|im_end|>\n<|im_start|>assistant\nThe pass key is")
    assert "<|im_start|>" not in bpe.decode(plain[0].input_ids)
    # Same drawing either way: only the wrapping (and so the filler's length) differs.
    assert [e.answers for e in plain] == [e.answers for e in chat]


def test_wordpiece_plain_path_uses_its_own_special_tokens(wordpiece, haystack):
    example = probe_examples("kv_lookup", wordpiece, haystack, context_tokens=200, count=1, seed=0)[0]
    assert example.input_ids[0] == wordpiece.cls_token_id and example.input_ids[-1] == wordpiece.sep_token_id
    assert example.answers[0] in wordpiece.decode(example.input_ids)


def test_max_new_tokens_covers_the_answer(bpe, haystack):
    examples = probe_examples("passkey", bpe, haystack, context_tokens=200, count=2, seed=0)
    answer_tokens = len(bpe(" " + examples[0].answers[0], add_special_tokens=False)["input_ids"])
    assert probe_max_new_tokens(bpe, examples) == answer_tokens + 4
    assert probe_max_new_tokens(bpe, examples, extra=1) == answer_tokens + 1


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"kind": "needle"}, r"unknown probe kind 'needle'"),
    ({"context_tokens": 0}, r"context_tokens=0: must be a positive"),
    ({"count": 0}, r"count=0: must be a positive"),
    ({"kind": "multi_key_needle", "num_needles": 1}, r"num_needles=1: a multi-key needle needs at least 2"),
    ({"context_tokens": 20}, r"context_tokens=20 is too short for a passkey probe .* alone take \d+ tokens"),
    ({"kind": "multi_key_needle", "context_tokens": 60}, r"too short for a multi_key_needle probe"),
    ({"kind": "kv_lookup", "context_tokens": 30}, r"too short for a kv_lookup probe"),
    ({"haystack": []}, r"the haystack holds no text"),
    ({"haystack": ["  \n "]}, r"the haystack holds no text"),
    ({"haystack": "a single string"}, r"a sequence of documents"),
    ({"haystack": ["A short text. It has two sentences."]}, r"too little text: \d+ tokens in all, a context of 200"),
    ({"kind": "kv_lookup", "haystack": ["Seven words, then eight more words written here."]},
     r"distinct key words"),
    ({"kind": "kv_lookup", "haystack": ["Several different words appear within these shorter texts."],
      "context_tokens": 400}, r"only \d+ distinct key words"),
])
def test_bad_input_is_refused_with_a_clear_message(bpe, haystack, kwargs, message):
    arguments = {"kind": "passkey", "tokenizer": bpe, "haystack": haystack, "context_tokens": 200, "count": 3,
                 "seed": 0, **kwargs}
    with pytest.raises(ValueError, match=message):
        probe_examples(arguments.pop("kind"), arguments.pop("tokenizer"), arguments.pop("haystack"), **arguments)


# ---------------------------------------------------------------- the real teacher


@pytest.mark.real_weights
def test_smollm2_finds_the_pass_key_at_256_tokens(haystack):
    """The full SmolLM2-135M-Instruct (float32, CPU, greedy) answers the probe it will guard.
    Measured 1.00 on these 10 examples; the module docstring has every kind at 256/512/1024."""
    from dtr_core.teacher import load_teacher

    teacher = load_teacher(ModelSpec(path="smollm2-135m"))
    model, tokenizer = teacher.model, teacher.tokenizer
    examples = probe_examples("passkey", tokenizer, haystack, context_tokens=256, count=10, seed=0)
    assert tokenizer.decode(examples[0].input_ids).startswith("<|im_start|>system\n")  # its chat template
    new_tokens = probe_max_new_tokens(tokenizer, examples)
    right = 0
    for example in examples:
        ids = torch.tensor([example.input_ids])
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                 do_sample=False, pad_token_id=tokenizer.pad_token_id)
        right += example.answers[0] in tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert right / len(examples) >= 0.9


@pytest.mark.parametrize("kind", PROBE_KINDS)
def test_the_search_scores_probes_as_greedy_decoding_by_hand(bpe, haystack, kind):
    """A probe target's evaluator (left-padded batches, ``generate``, ``contains``) scores what the
    model writes for each prompt alone. The tiny random model cannot find a pass key, so half the
    examples take its own greedy answer as theirs: the expected score is exactly 0.5."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from dtr_core.adapters import adapter_for
    from dtr_core.evaluation import GenerationEvaluator
    from dtr_core.targets.decoder_tasks import Contains, prompt_batches

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(bpe), hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=512)).eval()
    examples = probe_examples(kind, bpe, haystack, context_tokens=160, count=6, seed=3)
    new_tokens = probe_max_new_tokens(bpe, examples)
    answers = []
    for index, example in enumerate(examples):
        ids = torch.tensor([example.input_ids])
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                 do_sample=False, pad_token_id=bpe.pad_token_id)
        written = bpe.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        assert not any(answer in written for answer in example.answers)
        answers.append((written.strip(),) if index % 2 == 0 and written.strip() else example.answers)
    assert sum(1 for a, e in zip(answers, examples) if a != e.answers) == 3
    batches = prompt_batches([e.input_ids for e in examples], answers, bpe.pad_token_id, batch_size=4)
    evaluator = GenerationEvaluator(model, adapter_for(model), {}, batches, Contains(bpe, new_tokens),
                                    pad_token_id=bpe.pad_token_id)
    assert evaluator(frozenset()) == 0.5

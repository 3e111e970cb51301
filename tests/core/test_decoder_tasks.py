"""Prompted decoder tasks: log-likelihood multiple choice and generation scores (exact match,
contains, token F1)."""

import hashlib
import json
from collections import Counter

import pytest
import torch
from conftest import save_tiny_model, synthetic_texts, tiny_model, tiny_tokenizer, write_jsonl

from dtr_core.adapters import adapter_for
from dtr_core.direction import Direction
from dtr_core.evaluation import GenerationEvaluator, PrefixCachingEvaluator
from dtr_core.hybrid import hybrid_view
from dtr_core.linear.build import student_from_teacher
from dtr_core.run import run_dtr
from dtr_core.search import greedy_replace
from dtr_core.specs import (
    CaptureSpec,
    DistillSpec,
    ModelSpec,
    RunSpec,
    SearchSpec,
    SpecError,
    StudentSpec,
    TargetSpec,
)
from dtr_core.targets.data import DataError, TaskData, TextSplit, load_task_data
from dtr_core.targets.decoder_tasks import (
    FEWSHOT_SEPARATOR,
    Contains,
    ExactMatch,
    MultipleChoice,
    TokenF1,
    generation_scorer,
    normalise_answer,
    prompts,
    select_fewshot,
    squad_normalise,
    token_f1,
    tokenize_choices,
    tokenize_prompts,
    truncate_text,
)
from dtr_core.targets.tasks import MODEL_INPUT_KEYS, check_task_fits_model, model_inputs

LABELS = ("w50", "w60", "w70")
# Vocabulary words, so the tiny word-level tokenizer gives every template word its own token.
TEMPLATE = "w10 {text} w11"


def task_data(label_names=LABELS, count=36) -> TaskData:
    """Synthetic texts: 24 train examples, 6 validation, 6 test (labels cycle through 3 classes)."""
    rows = synthetic_texts(count)

    def split(part):
        return TextSplit(tuple(text for text, _ in part), tuple(label for _, label in part))

    return TaskData(split(rows[:24]), split(rows[24:30]), split(rows[30:]), label_names, "synthetic")


def spec_for(kind="multiple_choice", **overrides) -> TargetSpec:
    return TargetSpec(**{"dataset": "synthetic", "kind": kind, "prompt_template": TEMPLATE, "max_length": 8,
                         "num_fewshot": 2, "batch_size": 4, **overrides})


def log_likelihood(model, ids: list[int], start: int) -> float:
    """Summed log-probability of ``ids[start:]`` given what precedes them, one unpadded forward."""
    with torch.no_grad():
        log_probs = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    return sum(float(log_probs[t - 1, ids[t]]) for t in range(start, len(ids)))


# ---------------------------------------------------------------- prompts


def test_fewshot_prompts_are_seeded_balanced_and_from_train():
    data, spec = task_data(), spec_for(num_fewshot=3)
    tokenizer = tiny_tokenizer()
    validation = prompts(tokenizer, data, data.validation, spec)
    test = prompts(tokenizer, data, data.test, spec)
    context = validation[0].rsplit(FEWSHOT_SEPARATOR, 1)[0]
    assert all(p.startswith(context + FEWSHOT_SEPARATOR) for p in validation + test)  # drawn once

    shots = context.split(FEWSHOT_SEPARATOR)
    train_shots = {TEMPLATE.replace("{text}", truncate_text(tokenizer, text, spec.max_length)) + f" {LABELS[label]}"
                   for text, label in zip(data.train.texts, data.train.labels)}
    assert len(shots) == 3 and set(shots) <= train_shots
    assert sorted(shot.rsplit(" ", 1)[1] for shot in shots) == sorted(LABELS)  # one shot per label

    assert prompts(tokenizer, data, data.validation, spec) == validation
    other_seed = prompts(tokenizer, data, data.validation, spec_for(num_fewshot=3, seed=7))
    assert other_seed != validation
    assert [p.rsplit(FEWSHOT_SEPARATOR, 1)[1] for p in other_seed] == [p.rsplit(FEWSHOT_SEPARATOR, 1)[1]
                                                                      for p in validation]


def test_select_fewshot_takes_labels_in_turn():
    labels = [0] * 10 + [1] * 3 + [2] * 5
    picked = select_fewshot(labels, 7, seed=42)
    assert len(set(picked)) == 7
    assert sorted(Counter(labels[i] for i in picked).values()) == [2, 2, 3]
    assert select_fewshot(labels, 7, seed=42) == picked


def test_bbc_prompts_show_every_topic():
    data = load_task_data(TargetSpec(kind="multiple_choice", max_examples_per_split=20))
    spec = TargetSpec(kind="multiple_choice", num_fewshot=5, max_length=6)
    prompt = prompts(tiny_tokenizer(), data, data.test, spec)[0]
    *shots, query = prompt.split(FEWSHOT_SEPARATOR)
    assert all(shot.startswith("Article: ") for shot in [*shots, query])
    assert sorted(shot.rsplit("\nTopic: ", 1)[1] for shot in shots) == sorted(data.label_names)
    assert query.endswith("\nTopic:")
    # Six word-level tokens of the article survive (whitespace collapsed).
    assert query == "Article: " + " ".join(data.test.texts[0].split()[:6]) + "\nTopic:"


def test_truncation_cuts_the_text_but_never_the_answer():
    data, spec = task_data(), spec_for(max_length=3, num_fewshot=0)
    tokenizer = tiny_tokenizer()
    batch = tokenize_choices(tokenizer, data, data.validation, spec)[0]
    text = data.validation.texts[0].split()
    # Row = "w10" + the first 3 text words + "w11" + the answer, with the answer's token scored.
    for row in range(len(LABELS)):
        expected = [10, *(int(w[1:]) for w in text[:3]), 11, int(LABELS[row][1:])]
        assert batch["input_ids"][row].tolist() == expected
        assert batch["continuation_mask"][row].tolist() == [False] * 5 + [True]


def byte_level_bpe():
    """A small byte-level BPE tokenizer (GPT-2 style), trained in code on topic prompts."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    corpus = ["Article: the match ended late\nTopic: sport", "Article: shares fell\nTopic: business",
              "Article: a new phone\nTopic: tech"] * 20
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>")


@pytest.mark.parametrize("prompt_template, answer_template", [
    ("Article: {text}\nTopic:", " {label}"),
    ("Article: {text}\nTopic: ", "{label}"),  # the prompt's trailing space merges into " sport"
], ids=["space-in-answer", "space-in-prompt"])
def test_continuation_is_the_tokenised_answer_after_the_prompt(prompt_template, answer_template):
    tokenizer = byte_level_bpe()
    data = task_data(label_names=("business", "sport", "tech"))
    spec = spec_for(prompt_template=prompt_template, answer_template=answer_template, num_fewshot=1,
                    max_length=50, batch_size=100)
    batch = tokenize_choices(tokenizer, data, data.validation, spec)[0]
    written = prompts(tokenizer, data, data.validation, spec)
    for row in range(len(batch["input_ids"])):
        example, choice = int(batch["example_index"][row]), int(batch["choice_index"][row])
        full = written[example] + answer_template.replace("{label}", data.label_names[choice])
        length = int(batch["attention_mask"][row].sum())
        ids = batch["input_ids"][row, :length]
        assert ids.tolist() == tokenizer(full)["input_ids"]  # the string as the model reads it
        continuation = tokenizer.decode(ids[batch["continuation_mask"][row, :length]])
        assert continuation == " " + data.label_names[choice]


# ---------------------------------------------------------------- multiple choice


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_multiple_choice_matches_hand_computed_log_likelihoods(family):
    model = tiny_model(family)
    data, spec = task_data(), spec_for()
    tokenizer = tiny_tokenizer()
    batches = tokenize_choices(tokenizer, data, data.validation, spec)
    scorer = MultipleChoice()
    with torch.no_grad():
        collected = [scorer.collect(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]), b)
                     for b in batches]

    table = {}
    for prompt_index, prompt in enumerate(prompts(tokenizer, data, data.validation, spec)):
        start = len(tokenizer(prompt)["input_ids"])
        for choice, label in enumerate(LABELS):
            ids = tokenizer(f"{prompt} {label}")["input_ids"]
            table[prompt_index, choice] = log_likelihood(model, ids, start)
    for examples, choices, sums, _ in collected:
        for example, choice, value in zip(examples, choices, sums):
            assert value == pytest.approx(table[example, choice], abs=1e-4)
    predictions = [max(range(len(LABELS)), key=lambda c: table[e, c]) for e in range(len(data.validation.texts))]
    expected = sum(p == y for p, y in zip(predictions, data.validation.labels)) / len(predictions)
    assert scorer.score(collected) == expected
    assert PrefixCachingEvaluator(model, adapter_for(model), {}, batches, scorer)(()) == expected


class RecordingMultipleChoice(MultipleChoice):
    """The real scorer, also keeping each evaluation's summed log-likelihood (continuous, so
    equality is checked far more closely than by accuracy alone)."""

    def __init__(self) -> None:
        self.log_likelihoods = []

    def score(self, collected):
        self.log_likelihoods.append(float(sum(c[2].sum() for c in collected)))
        return super().score(collected)


def test_multiple_choice_prefix_reuse_gives_identical_scores():
    model = tiny_model("llama", num_layers=3)
    adapter = adapter_for(model)
    students = {i: student_from_teacher(StudentSpec(), adapter.read_attention_weights(model, i), causal=True).eval()
                for i in range(3)}
    data, spec = task_data(), spec_for(num_fewshot=1)
    batches = tokenize_choices(tiny_tokenizer(), data, data.validation, spec)
    search = SearchSpec(tolerance=0.5, run_to_end=True)
    scorers = {reuse: RecordingMultipleChoice() for reuse in (True, False)}
    results = {reuse: greedy_replace(3, PrefixCachingEvaluator(model, adapter, students, batches, scorer,
                                                               prefix_reuse=reuse), search, Direction.HIGHER)
               for reuse, scorer in scorers.items()}
    with_reuse, without = ([(e.linear_layers, e.score) for e in results[r].evaluations] for r in (True, False))
    assert with_reuse == without and len(with_reuse) == 7
    assert scorers[True].log_likelihoods == pytest.approx(scorers[False].log_likelihoods, rel=1e-6)


# ---------------------------------------------------------------- exact match


def greedy_without_cache(model, ids: list[int], steps: int, eos_token_id: int) -> list[int]:
    """The reference: argmax of the last position's logits, one full forward per new token."""
    generated = []
    for _ in range(steps):
        with torch.no_grad():
            token = int(model(torch.tensor([ids + generated])).logits[0, -1].argmax())
        if token == eos_token_id:
            break
        generated.append(token)
    return generated


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_exact_match_equals_a_manual_greedy_loop(family):
    model = tiny_model(family)
    tokenizer = tiny_tokenizer()
    spec = spec_for("exact_match", max_new_tokens=2, max_length=12, batch_size=4)
    # Free-form validation answers leave the few-shot prompts (drawn from the labelled train split)
    # unchanged; half of the validation examples then accept what the model writes (among others).
    data = task_data()
    written = [tokenizer.decode(greedy_without_cache(model, tokenizer(p)["input_ids"], 2, 2), skip_special_tokens=True)
               for p in prompts(tokenizer, data, data.validation, spec)]
    golds = tuple(("w99", w + ".") if i % 2 == 0 else ("w50",) for i, w in enumerate(written))
    data = TaskData(data.train, TextSplit(data.validation.texts, None, golds), data.test, data.label_names,
                    data.source)

    batches = tokenize_prompts(tokenizer, data, data.validation, spec)
    assert len({int(m.sum()) for b in batches for m in b["attention_mask"]}) > 1  # left padding is exercised
    assert [a for b in batches for a in b["answers"]] == list(golds) and "labels" not in batches[0]
    scorer = generation_scorer(tokenizer, data, spec)
    assert isinstance(scorer, ExactMatch) and scorer.max_new_tokens == 2
    evaluator = GenerationEvaluator(model, adapter_for(model), {}, batches, scorer, pad_token_id=0)
    expected = sum(normalise_answer(w) in {normalise_answer(a) for a in g} for w, g in zip(written, golds)) / len(golds)
    assert 0.5 <= expected < 1.0
    assert evaluator(()) == expected
    assert evaluator.layer_forwards == evaluator.layer_forwards_full == 2


def test_exact_match_normalises_the_first_line():
    assert normalise_answer(" Sport.\n\nArticle: next one") == "sport"
    assert normalise_answer("\n  Very   Positive! \nx") == "very positive"
    scorer = ExactMatch(tiny_tokenizer(), max_new_tokens=3)
    generated = torch.tensor([[50, 2, 0], [60, 61, 62], [60, 61, 2], [70, 0, 0]])  # 2 = EOS, 0 = padding
    batch = {"answers": [(" W50. ",), ("w60 w61",), ("w99", "w60  W61!"), ("w71", "w7")]}
    assert scorer.collect(generated, batch).tolist() == [1.0, 0.0, 1.0, 0.0]
    assert scorer.score([scorer.collect(generated, batch)]) == 0.5


# Generated text, accepted answers, score: hand-computed.
EXACT_MATCH_CASES = [
    ("Paris", ("paris",), 1.0),
    ("  The Eiffel   Tower!\nmore", ("the eiffel tower",), 1.0),
    ("\n\nParis.", ("London", "PARIS"), 1.0),
    ("Paris, France", ("Paris",), 0.0),
    ("", ("x",), 0.0),
]
CONTAINS_CASES = [
    ("It is Paris, France.", ("paris",), 1.0),
    ("the answer:\n  NEW\n york city", ("New York",), 1.0),  # whitespace collapsed across lines
    ("It is Paris", ("Paris, France",), 0.0),
    ("w14", ("4",), 1.0),  # a plain substring test, no word boundaries
    ("Rome", ("Paris", "London"), 0.0),
    ("Rome", ("Paris", "\"Rome.\""), 1.0),  # punctuation at the answer's ends dropped
    ("said ?!", ("?!",), 1.0),  # a punctuation-only answer is looked for as written
    ("said !", ("?!",), 0.0),
]
TOKEN_F1_CASES = [
    ("Paris", ("paris",), 1.0),
    # Articles and punctuation removed on both sides: "eiffel tower" vs "eiffel tower".
    ("The Eiffel Tower.", ("an Eiffel, tower",), 1.0),
    # prediction {big, red, dog} vs gold {red, dog, barked}: 2 shared; P = R = 2/3.
    ("a big red dog", ("the red dog barked",), 2 / 3),
    # prediction 4 tokens, gold 1 token, 1 shared: P = 1/4, R = 1 → F1 = 2 * 0.25 / 1.25 = 0.4.
    ("in Paris in spring", ("Paris",), 0.4),
    # Several answers: the best F1 counts (0.0, 0.4 and 2/3 → 2/3).
    ("in Paris at noon", ("London", "noon", "Paris noon"), 2 / 3),
    # Repeated tokens count as often as they occur in both: {the:—, go×2} vs {go×1}: P = 1/2, R = 1.
    ("go go", ("go",), 2 / 3),
    ("The.", ("a",), 1.0),  # both empty after normalisation
    ("the", ("Paris",), 0.0),  # prediction empty, answer not
    ("Paris\nsecond line words", ("Paris",), 1.0),  # only the first non-empty line is the prediction
    ("  \n  Paris London", ("paris",), 2 / 3),
]


@pytest.mark.parametrize("scorer_type, cases", [
    (ExactMatch, EXACT_MATCH_CASES), (Contains, CONTAINS_CASES), (TokenF1, TOKEN_F1_CASES),
], ids=["exact_match", "contains", "token_f1"])
def test_generation_metrics_match_hand_computed_values(scorer_type, cases):
    scorer = scorer_type(tiny_tokenizer(), max_new_tokens=4)
    for text, accepted, expected in cases:
        assert scorer.match(text, accepted) == pytest.approx(expected), (text, accepted)
    assert scorer.direction is Direction.HIGHER
    assert scorer.metric_name == {ExactMatch: "exact_match", Contains: "contains", TokenF1: "token_f1"}[scorer_type]


def test_squad_normalisation_and_token_f1():
    assert squad_normalise("The  Cat's hat, an apple & a THEORY!") == ["cats", "hat", "apple", "theory"]
    assert token_f1("", "") == 1.0 and token_f1("cat", "") == 0.0
    assert token_f1("cat dog", "dog cat") == 1.0


def test_generation_scorers_decode_tokens_and_average():
    tokenizer = tiny_tokenizer()
    generated = torch.tensor([[50, 51, 2], [60, 2, 0], [70, 71, 72]])  # 2 = EOS, 0 = padding
    batch = {"answers": [("w51",), ("w61", "w60"), ("w71 w73",)]}
    means = {"exact_match": (0 + 1 + 0) / 3, "contains": (1 + 1 + 0) / 3,
             "token_f1": (2 / 3 + 1 + 0.4) / 3}  # w50 w51 vs w51; w60 vs w60; w70 w71 w72 vs w71 w73
    for kind, expected in means.items():
        scorer = generation_scorer(tokenizer, task_data(), spec_for(kind, max_new_tokens=3))
        assert scorer.score([scorer.collect(generated[:2], {"answers": batch["answers"][:2]}),
                             scorer.collect(generated[2:], {"answers": batch["answers"][2:]})]) == \
            pytest.approx(expected)


def test_default_max_new_tokens_is_the_longest_answer_plus_one():
    data = task_data(label_names=("w50", "w60 w61 w62", "w70"))
    assert generation_scorer(tiny_tokenizer(), data, spec_for("exact_match")).max_new_tokens == 4
    assert generation_scorer(tiny_tokenizer(), data, spec_for("exact_match", max_new_tokens=9)).max_new_tokens == 9
    # Free-form: the longest accepted answer of any split, written with answer_template.
    split = TextSplit(data.train.texts[:2], None, (("w5",), ("w6", "w6 w7")))
    longest = TextSplit(data.test.texts[:2], None, (("w5",), ("w8 w8 w8 w8 w8",)))
    free = TaskData(split, split, longest, None, "free")
    assert generation_scorer(tiny_tokenizer(), free, spec_for("contains")).max_new_tokens == 6
    spec = spec_for("token_f1", answer_template=" w9 {label} w9")
    assert generation_scorer(tiny_tokenizer(), free, spec).max_new_tokens == 8
    with pytest.raises(ValueError, match="not one of"):
        generation_scorer(tiny_tokenizer(), free, spec_for("multiple_choice"))


def free_form_data(count=36) -> TaskData:
    """The synthetic texts with free-form answers: each example accepts its last word (and w99)."""
    rows = synthetic_texts(count)

    def split(part):
        return TextSplit(tuple(t for t, _ in part), None, tuple((t.split()[-1], "w99") for t, _ in part))

    return TaskData(split(rows[:24]), split(rows[24:30]), split(rows[30:]), None, "free")


def test_free_form_prompts_draw_fewshot_at_random_with_the_first_answer():
    data, tokenizer = free_form_data(), tiny_tokenizer()
    spec = spec_for("token_f1", num_fewshot=3)
    written = prompts(tokenizer, data, data.validation, spec)
    *shots, query = written[0].split(FEWSHOT_SEPARATOR)
    train_shots = {TEMPLATE.replace("{text}", truncate_text(tokenizer, text, spec.max_length)) + f" {answers[0]}"
                   for text, answers in zip(data.train.texts, data.train.answers)}
    assert len(shots) == 3 and set(shots) <= train_shots
    assert all(p.startswith(FEWSHOT_SEPARATOR.join(shots)) for p in written)
    assert prompts(tokenizer, data, data.validation, spec_for("token_f1", num_fewshot=3, seed=7)) != written
    assert prompts(tokenizer, data, data.validation, spec) == written

    batches = tokenize_prompts(tokenizer, data, data.validation, spec)
    assert [a for b in batches for a in b["answers"]] == list(data.validation.answers)
    assert all(isinstance(a, tuple) for b in batches for a in b["answers"])
    # Only the model's inputs reach the model.
    assert set(model_inputs(batches[0], "cpu")) == set(MODEL_INPUT_KEYS)


def test_closed_set_batches_carry_label_names_as_answers():
    data, spec = task_data(), spec_for("exact_match")
    batch = tokenize_prompts(tiny_tokenizer(), data, data.validation, spec)[0]
    assert batch["answers"] == [(LABELS[y],) for y in data.validation.labels[:4]]
    assert batch["labels"].tolist() == list(data.validation.labels[:4])


# Computed with the code before free-form answers, with tiny_tokenizer: every validation and test
# prompt, the few-shot indices and the left-padded validation batches' input_ids and masks.
BBC_PROMPTS_SHA256 = {
    (): ("b7f1f1ae1cdda5b4bfe55e71127c05d6449b09405748334174e82bb05b8f0a33", [320, 265, 1204],
         "c3e204bbebaf86b9a26166a0f1f1641d51f70dec9202be25e406313507922f25"),
    (("seed", 7), ("max_examples_per_split", 50)):
        ("85c3580afc0d698d0e36423e8b9094264bba6ab3be7d8d0454007463b9667d32", [5, 30, 11],
         "728576afef332c9358fdd0468c211ea1e5339be642e3514ebe244c37c3f7501e"),
}


@pytest.mark.parametrize("overrides", list(BBC_PROMPTS_SHA256), ids=["default", "seed7-cap50"])
def test_bbc_exact_match_prompts_are_those_of_before(overrides):
    from dtr_core.targets.decoder_tasks import default_max_new_tokens, fewshot_indices

    spec = TargetSpec(kind="exact_match", **dict(overrides))
    data, tokenizer = load_task_data(spec), tiny_tokenizer()
    written = {s: prompts(tokenizer, data, getattr(data, s), spec) for s in ("validation", "test")}
    digest = hashlib.sha256(json.dumps(written, ensure_ascii=False).encode()).hexdigest()
    batches = tokenize_prompts(tokenizer, data, data.validation, spec)
    ids = hashlib.sha256()
    for batch in batches:
        for key in ("input_ids", "attention_mask"):
            ids.update(batch[key].numpy().tobytes())
    assert (digest, fewshot_indices(data, spec), ids.hexdigest()) == BBC_PROMPTS_SHA256[overrides]
    assert [a for b in batches for a in b["answers"]] == [(data.label_names[y],) for y in data.validation.labels]
    # max_new_tokens as before: the longest label name (with answer_template) + 1.
    bpe = byte_level_bpe()
    assert generation_scorer(bpe, data, spec).max_new_tokens == default_max_new_tokens(bpe, spec, data.label_names) \
        == max(len(bpe(" " + name)["input_ids"]) for name in data.label_names) + 1


@pytest.mark.parametrize("kind", ["gla", "gated_deltanet"])
def test_hybrid_generation_with_cache_matches_without(kind):
    """Needs the students' recurrent-state cache: cached decoding must continue the same state."""
    model = tiny_model("llama", num_layers=3)
    adapter = adapter_for(model)
    students = {i: student_from_teacher(StudentSpec(kind=kind), adapter.read_attention_weights(model, i),
                                        causal=True).eval() for i in range(3)}
    data, spec = task_data(), spec_for("exact_match", max_length=12, batch_size=6)
    batch = tokenize_prompts(tiny_tokenizer(), data, data.validation, spec)[0]
    outputs = {}
    with hybrid_view(model, adapter, students, [0, 2]):
        for use_cache in (True, False):
            outputs[use_cache] = model.generate(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], do_sample=False,
                max_new_tokens=5, pad_token_id=0, use_cache=use_cache, return_dict_in_generate=True,
                output_logits=True)
    assert torch.equal(outputs[True].sequences, outputs[False].sequences)
    for cached, uncached in zip(outputs[True].logits, outputs[False].logits):
        torch.testing.assert_close(cached, uncached, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- errors and whole runs


@pytest.mark.parametrize("overrides, message", [
    ({"prompt_template": "Article:\nTopic:"}, "must contain {text} exactly once"),
    ({"prompt_template": "{text} {text}"}, "must contain {text} exactly once"),
    ({"answer_template": " answer"}, "must contain {label} exactly once"),
    ({"num_fewshot": -1}, "num_fewshot=-1: must be >= 0"),
    ({"max_new_tokens": 0}, "max_new_tokens=0"),
], ids=["no-text", "two-texts", "no-label", "negative-fewshot", "zero-new-tokens"])
def test_bad_templates_and_settings_are_named(overrides, message):
    with pytest.raises(SpecError, match=message.replace("{", r"\{").replace("}", r"\}")):
        spec_for(**overrides)


@pytest.mark.parametrize("kind", ["multiple_choice", "exact_match", "contains", "token_f1"])
def test_prompted_kinds_need_a_decoder_labels_and_enough_train(kind, tmp_path):
    with pytest.raises(DataError, match=f"target kind '{kind}' needs a decoder"):
        check_task_fits_model(spec_for(kind), task_data(), causal=False)
    plain = TextSplit(task_data().train.texts, None)
    unlabelled = TaskData(plain, plain, plain, None, "plain")
    needs = "labels" if kind == "multiple_choice" else "answers"
    with pytest.raises(DataError, match=f"target kind '{kind}' needs {needs}"):
        check_task_fits_model(spec_for(kind), unlabelled, causal=True)
    with pytest.raises(DataError, match="num_fewshot=30 but the train split of synthetic has only 24"):
        check_task_fits_model(spec_for(kind, num_fewshot=30), task_data(), causal=True)
    check_task_fits_model(spec_for(kind), task_data(), causal=True)  # labels only: their names are the answers
    if kind != "multiple_choice":
        check_task_fits_model(spec_for(kind), free_form_data(), causal=True)  # free-form answers, no labels
        with pytest.raises(DataError, match="num_fewshot=30 but the train split of free has only 24"):
            check_task_fits_model(spec_for(kind, num_fewshot=30), free_form_data(), causal=True)
    path = tmp_path / "plain.jsonl"
    path.write_text("".join(f'{{"text": "w{i} w5"}}\n' for i in range(10)))
    with pytest.raises(DataError, match=f"no {'label' if kind == 'multiple_choice' else 'answer'} field 'label'"):
        load_task_data(TargetSpec(dataset=str(path), kind=kind))


@pytest.mark.parametrize("kind", ["perplexity", "passkey", "lm_eval"])
def test_other_decoder_kinds_need_a_decoder(kind):
    spec = spec_for(kind, lm_eval_task="x") if kind == "lm_eval" else spec_for(kind)
    with pytest.raises(DataError, match=f"target kind '{kind}' needs a decoder"):
        check_task_fits_model(spec, task_data(), causal=False)
    check_task_fits_model(spec_for("classification"), task_data(), causal=False)


@pytest.mark.parametrize("kind", ["multiple_choice", "exact_match", "contains", "token_f1"])
def test_tiny_run_with_a_prompted_target(tmp_path, kind):
    # Multiple choice and exact match on a closed label set; contains and token F1 on free-form
    # answers (two accepted answers per example).
    free_form = kind in ("contains", "token_f1")
    data = write_jsonl(tmp_path / "data.jsonl", [(t, [f"w{50 + 10 * y}", "w99"] if free_form else f"w{50 + 10 * y}")
                                                for t, y in synthetic_texts(60)])
    run = RunSpec(
        model=ModelSpec(path=save_tiny_model("llama", tmp_path / "model", num_layers=2)),
        capture=CaptureSpec(token_budget=800, max_length=24, batch_size=16),
        distill=DistillSpec(epochs=1, batch_size=8),
        search=SearchSpec(tolerance=0.5, run_to_end=True),
        target=TargetSpec(dataset=data, kind=kind, prompt_template=TEMPLATE, max_length=8, num_fewshot=2),
        output_dir=str(tmp_path / "out"),
    )
    assert (load_task_data(run.target).label_names is None) == free_form
    summary = run_dtr(run, log=lambda line: None)
    assert summary.primary["metric"] == {"multiple_choice": "mc_accuracy"}.get(kind, kind)
    assert Direction(summary.primary["direction"]) is Direction.HIGHER and summary.evaluations == 1 + 2 * 3 // 2
    assert all(0.0 <= score <= 1.0 for score in summary.scores["test"][kind].values())
    assert (summary.layer_forwards < summary.layer_forwards_without_reuse) == (kind == "multiple_choice")


def test_hydra_target_options_compose_into_specs():
    from flows.config import build_specs, compose

    for option, kind in (("bbc_news_mc", "multiple_choice"), ("bbc_news_generate", "exact_match"),
                         ("bbc_news_ppl", "perplexity")):
        run, _ = build_specs(compose([f"target={option}"]), "/tmp/run")
        assert run.target.kind == kind and run.target.dataset == "bbc_news"
    run, _ = build_specs(compose(["target=bbc_news_mc"]), "/tmp/run")
    assert run.target.prompt_template == "Article: {text}\nTopic:" and run.target.answer_template == " {label}"

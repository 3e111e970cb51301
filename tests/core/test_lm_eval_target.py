"""lm-eval tasks as search targets: the in-process evaluator scores what the hybrid gives by hand.

Two local tasks over jsonl files (as in test_lm_eval.py): multiple choice scored by
log-likelihood (acc) and greedy generation (exact_match). Half the documents' answers are the full
model's and half the hybrid's, so the two score differently; the expected scores come from the
in-memory model run by hand on the evaluator's own documents, one unpadded document at a time.
"""

import sys

import pytest
import torch
from conftest import tiny_tokenizer
from lm_eval_helpers import (
    CHOICE_TASK,
    GENERATE_TASK,
    MAX_GEN_TOKS,
    MIN_LOGIT_GAP,
    STUDENT_KINDS,
    choice_log_likelihood,
    greedy_continuation,
    random_words,
    tiny_hybrid,
    with_cache_dir,
    write_jsonl,
)

from dtr_core.direction import Direction
from dtr_core.hybrid import hybrid_view
from dtr_core.specs import TargetSpec
from dtr_core.targets.lm_eval_target import LmEvalError, LmEvalEvaluator, LmEvalTask, split_indices

NUM_DOCS = 12
HYBRID = tuple(STUDENT_KINDS)  # every layer with a student: 1 and 2
CANDIDATES = {"full": (), "hybrid": HYBRID}

PERPLEXITY_TASK = """\
task: dtr_local_perplexity
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{context}}}}"
metric_list:
  - metric: word_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
"""


def top_two_gap(scores: list[float]) -> float:
    first, second = sorted(scores, reverse=True)[:2]
    return first - second


def argmax(scores: list[float]) -> int:
    return max(range(len(scores)), key=scores.__getitem__)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The tiny hybrid, two local tasks over its documents, and each candidate's answers by hand."""
    model, adapter, students = tiny_hybrid()
    tokenizer = tiny_tokenizer()
    generator = torch.Generator().manual_seed(7)
    choice_docs, generate_docs = [], []
    picks = {name: [] for name in CANDIDATES}        # the choice each candidate ranks first
    generations = {name: [] for name in CANDIDATES}  # each candidate's greedy continuation

    def run_all(fn):
        results = {}
        for name, layers in CANDIDATES.items():
            with hybrid_view(model, adapter, students, layers):
                results[name] = fn()
        return results

    with torch.no_grad():
        for i in range(NUM_DOCS):
            # Both candidates must rank the choices clearly (far from float noise), for the
            # expected scores to be what any correct batching computes.
            while True:
                context = random_words(generator, 3, 8)
                choices = [random_words(generator, 1, 3) for _ in range(3)]
                context_ids = tokenizer.encode(context)
                scores = run_all(lambda: [choice_log_likelihood(model, context_ids, tokenizer.encode(c))
                                          for c in choices])
                if min(top_two_gap(s) for s in scores.values()) > MIN_LOGIT_GAP:
                    break
            owner = "full" if i % 2 == 0 else "hybrid"
            choice_docs.append({"context": context, "choices": choices, "answer": argmax(scores[owner])})
            for name in CANDIDATES:
                picks[name].append(argmax(scores[name]))

            while True:
                context = random_words(generator, 3, 8)
                decoded = run_all(lambda: greedy_continuation(model, tokenizer, tokenizer.encode(context)))
                if min(gap for _, gap in decoded.values()) > MIN_LOGIT_GAP:
                    break
            generate_docs.append({"context": context, "target": decoded[owner][0]})
            for name in CANDIDATES:
                generations[name].append(decoded[name][0])

    root = tmp_path_factory.mktemp("lm_eval_target")
    tasks = root / "tasks"
    tasks.mkdir()
    cache = root / "datasets_cache"
    write_jsonl(tasks / "choice.jsonl", choice_docs)
    write_jsonl(tasks / "generate.jsonl", generate_docs)
    write_jsonl(tasks / "one.jsonl", generate_docs[:1])
    (tasks / "choice.yaml").write_text(with_cache_dir(CHOICE_TASK.format(data=tasks / "choice.jsonl"), cache))
    (tasks / "generate.yaml").write_text(with_cache_dir(
        GENERATE_TASK.format(data=tasks / "generate.jsonl", max_gen_toks=MAX_GEN_TOKS), cache))
    (tasks / "perplexity.yaml").write_text(with_cache_dir(PERPLEXITY_TASK.format(data=tasks / "generate.jsonl"), cache))
    # A task with a single document: too few for a validation and a test split.
    (tasks / "one.yaml").write_text(with_cache_dir(
        GENERATE_TASK.replace("dtr_local_generate", "dtr_local_one").format(
            data=tasks / "one.jsonl", max_gen_toks=MAX_GEN_TOKS), cache))

    return dict(model=model, adapter=adapter, students=students, tokenizer=tokenizer, tasks=str(tasks),
                choice_docs=choice_docs, generate_docs=generate_docs, picks=picks, generations=generations)


def task_for(setup, name: str, **kwargs) -> LmEvalTask:
    kwargs = {"validation_fraction": 0.5, "test_fraction": 0.25, **kwargs}
    return LmEvalTask(name, setup["tasks"], **kwargs)


def evaluator_for(setup, task: LmEvalTask, indices) -> LmEvalEvaluator:
    return LmEvalEvaluator(setup["model"], setup["adapter"], setup["students"], setup["tokenizer"], task, indices,
                           batch_size=4, device="cpu")


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


@pytest.mark.parametrize("task_name", ["dtr_local_choice", "dtr_local_generate"])
def test_scores_equal_hand_computed_scores(setup, task_name):
    task = task_for(setup, task_name)
    indices = task.validation_indices
    evaluator = evaluator_for(setup, task, indices)
    model, adapter = setup["model"], setup["adapter"]
    attention = [adapter.attention_module(model, i) for i in range(adapter.num_layers)]

    if task_name == "dtr_local_choice":
        assert task.metric_name == "acc"
        answers = [doc["answer"] for doc in setup["choice_docs"]]
        expected = {name: mean(setup["picks"][name][i] == answers[i] for i in indices) for name in CANDIDATES}
    else:
        assert task.metric_name == "exact_match"
        targets = [doc["target"] for doc in setup["generate_docs"]]
        expected = {name: mean(setup["generations"][name][i] == targets[i] for i in indices)
                    for name in CANDIDATES}
    assert task.direction is Direction.HIGHER

    scores = {name: evaluator(layers) for name, layers in CANDIDATES.items()}
    assert scores == pytest.approx(expected, abs=1e-12)
    # Per-document values, for the bootstrap rule: 1 where the candidate is right, in document order.
    score, examples = evaluator.evaluate(HYBRID)
    if task_name == "dtr_local_choice":
        right = [float(setup["picks"]["hybrid"][i] == answers[i]) for i in indices]
    else:
        right = [float(setup["generations"]["hybrid"][i] == targets[i]) for i in indices]
    assert examples.values.tolist() == right and examples.weights.tolist() == [1.0] * len(indices)
    assert examples.score() == pytest.approx(score, abs=1e-12)
    # The same candidate again (after another one ran) scores the same.
    assert evaluator(HYBRID) == scores["hybrid"]
    assert evaluator(()) == scores["full"]
    # One pass per layer per candidate; nothing is left swapped in.
    assert evaluator.layer_forwards == evaluator.layer_forwards_full == 5 * adapter.num_layers
    evaluator.rebase(HYBRID)
    assert [adapter.attention_module(model, i) for i in range(adapter.num_layers)] == attention

    # The test split scores its own documents.
    test_indices = task.test_indices
    if task_name == "dtr_local_choice":
        expected_test = mean(setup["picks"]["hybrid"][i] == answers[i] for i in test_indices)
    else:
        expected_test = mean(setup["generations"]["hybrid"][i] == targets[i] for i in test_indices)
    assert evaluator_for(setup, task, test_indices)(HYBRID) == pytest.approx(expected_test, abs=1e-12)


def test_hybrid_scores_differ_from_full_model(setup):
    """The documents tell the candidates apart: otherwise the tests above could not catch a
    swap that never happened."""
    picks, generations = setup["picks"], setup["generations"]
    assert picks["full"] != picks["hybrid"]
    assert generations["full"] != generations["hybrid"]


def test_splits_are_deterministic_disjoint_and_capped(setup):
    task = task_for(setup, "dtr_local_choice")
    again = task_for(setup, "dtr_local_choice")
    validation, test = task.validation_indices, task.test_indices
    assert (validation, test) == (again.validation_indices, again.test_indices)
    assert task.num_docs == NUM_DOCS
    # 0.5 : 0.25 of 12 documents, every document in exactly one split, each in document order.
    assert (len(validation), len(test)) == (8, 4)
    assert sorted(validation + test) == list(range(NUM_DOCS))
    assert list(validation) == sorted(validation) and list(test) == sorted(test)

    other_seed = task_for(setup, "dtr_local_choice", seed=1)
    assert other_seed.validation_indices != validation

    capped = task_for(setup, "dtr_local_choice", max_eval_examples=3)
    assert len(capped.validation_indices) == len(capped.test_indices) == 3
    assert set(capped.validation_indices) <= set(validation) and set(capped.test_indices) <= set(test)

    # Tiny fractions still leave a document on each side.
    assert split_indices(2, 0.01, 0.9, seed=0) in {((0,), (1,)), ((1,), (0,))}
    assert [len(s) for s in split_indices(5, 0.9, 0.01, seed=0)] == [4, 1]


def test_from_spec_and_fingerprint(setup):
    spec = TargetSpec(kind="lm_eval", lm_eval_task="dtr_local_choice", lm_eval_include_path=setup["tasks"],
                      validation_fraction=0.5, test_fraction=0.25, max_eval_examples=5, seed=3)
    task = LmEvalTask.from_spec(spec)
    assert len(task.validation_indices) == 5 and len(task.test_indices) == 4
    # The fingerprint covers the task (config and documents), not how it is split: seed differs here.
    assert task.fingerprint() == task_for(setup, "dtr_local_choice").fingerprint()
    assert task.fingerprint() != task_for(setup, "dtr_local_generate").fingerprint()


def test_lower_is_better_metric(setup):
    task = task_for(setup, "dtr_local_perplexity")
    assert (task.metric_name, task.direction) == ("word_perplexity", Direction.LOWER)
    # A corpus-level metric has no per-document values: the bootstrap rule judges it by its score.
    score, examples = evaluator_for(setup, task, task.validation_indices).evaluate(())
    assert examples is None and score > 1.0


def test_bad_input_errors(setup, tmp_path, monkeypatch):
    with pytest.raises(LmEvalError, match=r"'no_such_task' is not defined.*dtr_local_choice"):
        LmEvalTask("no_such_task", setup["tasks"])
    with pytest.raises(LmEvalError, match="does not exist"):
        LmEvalTask("dtr_local_choice", str(tmp_path / "missing"))
    with pytest.raises(LmEvalError, match="lm_eval_include_path is empty"):
        LmEvalTask("dtr_local_choice", "")
    with pytest.raises(LmEvalError, match="1 evaluation document"):
        LmEvalTask("dtr_local_one", setup["tasks"])

    task = task_for(setup, "dtr_local_choice")
    with pytest.raises(LmEvalError, match=r"indices must be in 0\.\.11"):
        evaluator_for(setup, task, [0, NUM_DOCS])
    with pytest.raises(LmEvalError, match="no document indices"):
        evaluator_for(setup, task, [])

    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(ImportError, match=r"pip install 'dtr\[eval\]'"):
        LmEvalTask("dtr_local_choice", setup["tasks"])

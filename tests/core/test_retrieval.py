"""The retrieval target: query/document pairs from text, recall@1 by cosine similarity, per-query
scores for the bootstrap rule, prefix reuse, and a whole run on a tiny encoder."""

import json

import numpy as np
import pytest
import torch
from conftest import save_tiny_model, tiny_model, tiny_tokenizer

from dtr_core.acceptance import paired_bootstrap_bound
from dtr_core.adapters import adapter_for
from dtr_core.direction import Direction
from dtr_core.evaluation import PrefixCachingEvaluator
from dtr_core.linear.build import student_from_teacher
from dtr_core.report import format_summary
from dtr_core.run import run_dtr
from dtr_core.specs import CaptureSpec, DistillSpec, ModelSpec, RunSpec, SearchSpec, StudentSpec, TargetSpec
from dtr_core.targets.data import DataError, TextSplit, load_task_data, query_and_document
from dtr_core.targets.retrieval import QUERY_KEY, Retrieval, retrieval_pairs, tokenize_retrieval
from dtr_core.targets.tasks import check_task_fits_model


def article(index: int, rng: np.random.Generator) -> str:
    """A headline of 3 words drawn from a body of 16 words from the article's own range of the tiny vocabulary."""
    own = 4 + (index * 7) % 90
    body = [f"w{own + int(w)}" for w in rng.integers(0, 10, 16)]
    return " ".join(rng.choice(body, 3)) + "\n" + " ".join(body)


def write_articles(path, count: int, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    with open(path, "w") as handle:
        for index in range(count):
            handle.write(json.dumps({"text": article(index, rng)}) + "\n")
    return str(path)


def test_first_line_is_the_query_and_the_rest_its_document():
    assert query_and_document("  Ad sales boost profit \n\nQuarterly profits jumped.\nMore.\n") == \
        ("Ad sales boost profit", "Quarterly profits jumped.\nMore.")
    assert query_and_document("a headline alone") is None
    assert query_and_document("\n\nbody only") is None  # its first line would be the whole body


def test_bbc_news_gives_headline_and_body_pairs():
    data = load_task_data(TargetSpec(kind="retrieval", max_eval_examples=50))
    pairs = retrieval_pairs(data.validation)
    assert len(pairs.queries) == len(pairs.documents) <= 50
    assert all(len(q) < 120 and "\n" not in q for q in pairs.queries)
    assert all(len(d) > len(q) for q, d in zip(pairs.queries, pairs.documents))


def test_a_repeated_document_is_kept_once():
    split = TextSplit(("t1\nsame body", "t2\nother body", "t3\nsame body"), None)
    pairs = retrieval_pairs(split)
    assert pairs.queries == ("t1", "t2") and pairs.documents == ("same body", "other body")


def test_a_text_without_a_document_is_named(tmp_path):
    path = tmp_path / "validation.jsonl"
    path.write_text(json.dumps({"text": "w5 w6\nw5 w6 w7"}) + "\n" + json.dumps({"text": "w8 w9 headline only"}) + "\n")
    # Train texts are only distilled from: they need no document.
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps({"text": f"w{i} w{i + 1}"}) for i in range(4, 10)))
    (tmp_path / "test.jsonl").write_text(json.dumps({"text": "w5\nw5 w6"}) + "\n" + json.dumps({"text": "w7\nw7 w8"}))
    with pytest.raises(DataError, match=r"validation split, example 2 \('w8 w9 headline only'.*needs a first line"):
        load_task_data(TargetSpec(dataset=str(tmp_path), kind="retrieval"))


def test_retrieval_needs_an_encoder():
    data = load_task_data(TargetSpec(kind="retrieval", max_eval_examples=4))
    with pytest.raises(DataError, match="kind 'retrieval' ranks documents by pooled encoder embeddings"):
        check_task_fits_model(TargetSpec(kind="retrieval"), data, causal=True)
    check_task_fits_model(TargetSpec(kind="retrieval"), data, causal=False)


def unit(*rows):
    rows = np.asarray(rows, dtype=np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def test_recall_at_1_counts_queries_whose_own_document_is_nearest():
    queries = unit([1, 0], [0, 1], [1, 1])
    # Query 0 finds document 0, query 1 is nearer document 2 than its own, query 2 ties documents 0 and 2.
    documents = unit([1, 0.1], [1, 0.2], [1, 1])
    collected = [(True, queries[:2]), (True, queries[2:]), (False, documents)]
    scorer = Retrieval()
    assert scorer.hits(collected).tolist() == [1.0, 0.0, 1.0]
    assert scorer.score(collected) == pytest.approx(2 / 3)
    tied = [(True, queries[2:]), (False, unit([1, 1], [1, 1]))]
    assert scorer.hits(tied).tolist() == [0.0]  # a tie is not a hit
    examples = scorer.examples(collected)
    assert examples.score() == pytest.approx(scorer.score(collected)) and examples.values.shape == (3,)


def test_per_query_scores_drive_the_bootstrap_bound():
    scorer = Retrieval()
    full = scorer.examples([(True, unit(*np.eye(4))), (False, unit(*np.eye(4)))])
    # The candidate loses queries 0 and 1 (each now nearest another document).
    worse = scorer.examples([(True, unit([0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1])),
                             (False, unit(*np.eye(4) + 0.01))])
    assert full.score() == 1.0 and worse.score() == 0.5
    assert paired_bootstrap_bound(full, worse, Direction.HIGHER, 0.9, 1000, 0) < worse.score()


def tiny_retrieval_batches(count: int = 12):
    rng = np.random.default_rng(0)
    pairs = retrieval_pairs(TextSplit(tuple(article(i, rng) for i in range(count)), None))
    return tokenize_retrieval(tiny_tokenizer(), pairs, TargetSpec(kind="retrieval", batch_size=5, max_length=32))


def test_queries_and_documents_are_batched_apart():
    batches = tiny_retrieval_batches()
    roles = [bool(b[QUERY_KEY]) for b in batches]
    assert roles == [True] * 3 + [False] * 3  # 12 queries, then 12 documents, 5 per batch
    assert max(b["input_ids"].shape[1] for b in batches[:3]) < min(b["input_ids"].shape[1] for b in batches[3:])


def test_prefix_reuse_scores_retrieval_as_full_recomputation():
    model = tiny_model("bert", num_layers=3)
    adapter = adapter_for(model)
    students = {i: student_from_teacher(StudentSpec(), adapter.read_attention_weights(model, i), causal=False).eval()
                for i in range(3)}
    torch.manual_seed(0)
    for student in students.values():  # move the students off their init so swaps change the embeddings
        for parameter in student.parameters():
            parameter.data.add_(0.3 * torch.randn_like(parameter))
    batches = tiny_retrieval_batches()
    reused = PrefixCachingEvaluator(model, adapter, students, batches, Retrieval(), prefix_reuse=True)
    recomputed = PrefixCachingEvaluator(model, adapter, students, batches, Retrieval(), prefix_reuse=False)
    for layers in (frozenset(), frozenset({2}), frozenset({1}), frozenset({0, 1, 2})):
        (score, examples), (expected, expected_examples) = reused.evaluate(layers), recomputed.evaluate(layers)
        assert score == expected and examples.values.tolist() == expected_examples.values.tolist()
    assert reused.layer_forwards < recomputed.layer_forwards


def test_a_tiny_encoder_run_on_a_retrieval_target(tmp_path):
    run = RunSpec(
        model=ModelSpec(path=save_tiny_model("bert", tmp_path / "model", num_layers=3)),
        capture=CaptureSpec(token_budget=1500, max_length=24, batch_size=16),
        distill=DistillSpec(epochs=1, batch_size=8),
        search=SearchSpec(tolerance=0.5, run_to_end=True),
        target=TargetSpec(dataset=write_articles(tmp_path / "articles.jsonl", 100), kind="retrieval", max_length=24),
        output_dir=str(tmp_path / "out"),
    )
    summary = run_dtr(run, log=lambda line: None)
    assert summary.primary["metric"] == "recall@1" and summary.primary["direction"] == "higher"
    full = summary.scores["validation"]["retrieval"]["full"]
    assert full > 0.5  # headlines share words with their own body only
    evaluations = summary.search["result"]["evaluations"]
    assert len(evaluations) == 1 + 3 * 4 // 2 and all(e["bounds"] is not None for e in evaluations)
    assert summary.layer_forwards < summary.layer_forwards_without_reuse
    assert (tmp_path / "out" / "hybrid" / "model.safetensors").exists()
    assert "trade-off: validation recall@1 (higher is better)" in format_summary(summary)

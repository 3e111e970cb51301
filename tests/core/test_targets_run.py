"""Whole runs with several targets: guards, free-form and lm-eval targets, the capability card,
scores cached per target, and bad targets refused before any distillation."""

import dataclasses
import json
from pathlib import Path

import pytest
from conftest import save_tiny_model, synthetic_texts, write_jsonl
from lm_eval_helpers import CHOICE_TASK, random_words, with_cache_dir
from lm_eval_helpers import write_jsonl as write_docs

from dtr_core.card import loss, warnings
from dtr_core.direction import Direction
from dtr_core.run import run_dtr
from dtr_core.runner import PlainRunner
from dtr_core.specs import (
    CaptureSpec,
    CardSpec,
    DistillSpec,
    ModelSpec,
    RunSpec,
    SearchSpec,
    SpecError,
    StudentSpec,
    TargetSpec,
)
from dtr_core.stage_cache import StageCache
from dtr_core.targets.data import DataError

QUIET = dict(log=lambda line: None)
NO_CARD = CardSpec(enabled=False)


class RecordingRunner(PlainRunner):
    """A plain runner that remembers which stages it had to compute (not found in the cache)."""

    def __init__(self, cache_dir):
        super().__init__(StageCache(cache_dir), lambda line: None)
        self.computed = []

    def run(self, stage):
        if stage.key is not None and self.cache.lookup(stage.name, stage.key) is None:
            self.computed.append(stage.label)
        return super().run(stage)


def tiny_decoder_run(tmp_path, target: TargetSpec, guards=(), card=NO_CARD, **search) -> RunSpec:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(" ".join(text for text, _ in synthetic_texts(120)))
    return RunSpec(
        model=ModelSpec(path=save_tiny_model("llama", tmp_path / "model", num_layers=3)),
        capture=CaptureSpec(source="text_files", text_files=(str(corpus),), token_budget=1500,
                            max_length=24, batch_size=16),
        distill=DistillSpec(epochs=1, batch_size=8),
        # No window: the default's 64 tokens would cover these 24-token texts, every hybrid the full model.
        student=StudentSpec(window=0),
        search=SearchSpec(**{"tolerance": 0.5, "run_to_end": True, **search}),
        target=target, guards=tuple(guards), card=card, output_dir=str(tmp_path / "out"))


def perplexity_target(tmp_path) -> TargetSpec:
    return TargetSpec(dataset=str(write_jsonl(tmp_path / "data.jsonl", synthetic_texts(120))), kind="perplexity",
                      max_length=24)


PASSKEY = TargetSpec(kind="passkey", context_tokens=64, num_examples=4, batch_size=4, tolerance=0.1,
                     tolerance_mode="absolute")


def test_a_guard_is_scored_reported_and_adding_it_reuses_the_primary_scores(tmp_path):
    run = tiny_decoder_run(tmp_path, perplexity_target(tmp_path))
    runner = RecordingRunner(tmp_path / "cache")
    alone = run_dtr(run, runner, **QUIET)
    assert any(label.startswith("evaluate perplexity") for label in runner.computed)

    runner.computed.clear()
    guarded = run_dtr(dataclasses.replace(run, guards=(PASSKEY,)), runner, **QUIET)
    # Distillation and every perplexity score came from the cache; only the guard's scores are new.
    evaluated = [label for label in runner.computed if label.startswith("evaluate")]
    assert evaluated and all(label.startswith("evaluate passkey") for label in evaluated)
    assert not any(label.startswith(("capture", "distill")) for label in runner.computed)
    # The tiny model never finds a pass key (0 everywhere), so the guard holds and the path is the same.
    assert guarded.linear_layers == alone.linear_layers
    assert [t["name"] for t in guarded.targets] == ["perplexity", "passkey"]
    assert guarded.targets[1]["tolerance"] == 0.1 and not guarded.targets[1]["primary"]
    assert guarded.scores["validation"]["perplexity"] == alone.scores["validation"]["perplexity"]
    assert set(guarded.scores["test"]["passkey"]) == {"full", "m_opt", "m_best"}
    search = json.loads((tmp_path / "out" / "search.json").read_text())
    assert all(set(e["scores"]) == {"perplexity", "passkey"} for e in search["result"]["evaluations"])
    report = (tmp_path / "out" / "report" / "report.md").read_text()
    assert "| passkey (contains) |" in report and "guard" in report


def test_a_guard_that_breaks_stops_the_search(tmp_path):
    """A guard on the primary's own data with no tolerance: every hybrid of this tiny model has a
    higher perplexity than the full model, so the first round stops the search."""
    primary = perplexity_target(tmp_path)
    strict = dataclasses.replace(primary, name="strict", tolerance=0.0, tolerance_mode="absolute")
    runner = RecordingRunner(tmp_path / "cache")
    summary = run_dtr(tiny_decoder_run(tmp_path, primary, guards=(strict,), run_to_end=False), runner, **QUIET)
    result = summary.search["result"]
    assert summary.m_opt == () and not result["trajectory"]
    assert result["stopped_because"].startswith("round 1: the best candidate misses P_min: strict")
    assert all(e["scores"]["strict"] > result["full_scores"]["strict"] for e in result["evaluations"][1:])
    # Same data, same scoring: the guard's scores are the primary's, computed once.
    assert not any(label.startswith("evaluate strict") for label in runner.computed)
    unguarded = run_dtr(tiny_decoder_run(tmp_path, primary, run_to_end=False), runner, **QUIET)
    assert len(unguarded.m_opt) == 3


def test_free_form_target_guides_a_run(tmp_path):
    rows = [{"question": f"w{10 + i % 50} w{20 + i % 30} ?", "answer": [f"w{30 + i % 40}", "w5"]} for i in range(40)]
    write_docs(tmp_path / "qa.jsonl", rows)
    target = TargetSpec(dataset=str(tmp_path / "qa.jsonl"), kind="token_f1", text_field="question", label_field="answer",
                        prompt_template="Q: {text}\nA:", num_fewshot=1, max_length=16, batch_size=8)
    summary = run_dtr(tiny_decoder_run(tmp_path, target, guards=[perplexity_target(tmp_path)]), **QUIET)
    assert summary.primary["metric"] == "token_f1" and summary.primary["direction"] == "higher"
    assert all(0.0 <= v <= 1.0 for v in summary.scores["test"]["token_f1"].values())


def test_lm_eval_target_guides_a_run(tmp_path):
    import torch

    generator = torch.Generator().manual_seed(3)
    docs = [{"context": random_words(generator, 3, 6), "choices": [random_words(generator, 1, 2) for _ in range(3)],
             "answer": i % 3} for i in range(12)]
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    write_docs(tasks / "choice.jsonl", docs)
    (tasks / "choice.yaml").write_text(with_cache_dir(CHOICE_TASK.format(data=tasks / "choice.jsonl"),
                                                      tmp_path / "datasets_cache"))
    target = TargetSpec(kind="lm_eval", lm_eval_task="dtr_local_choice", lm_eval_include_path=str(tasks),
                        batch_size=4)
    summary = run_dtr(tiny_decoder_run(tmp_path, target), **QUIET)
    assert summary.targets[0]["metric"] == "acc"
    assert summary.evaluations == 1 + 3 * 4 // 2
    # 6 validation documents: accuracies are multiples of 1/6.
    for value in summary.scores["validation"]["lm_eval"].values():
        assert abs(value * 6 - round(value * 6)) < 1e-9


def test_capability_card_on_a_tiny_decoder(tmp_path):
    card = CardSpec(lengths=(64, 128, 512), examples=2, batch_size=2, general_examples=4, general_max_length=32)
    summary = run_dtr(tiny_decoder_run(tmp_path, perplexity_target(tmp_path), card=card), **QUIET)
    names = [entry["name"] for entry in summary.card["entries"]]
    # 512 is above the tiny model's 256 positions less room for the answer: capped at 224.
    assert names == [f"{kind}_{n}" for kind in ("passkey", "multi_key_needle", "kv_lookup") for n in (64, 128, 224)] \
        + ["python_docs_perplexity"]
    assert summary.card["context_limit"] == 256
    report = tmp_path / "out" / "report"
    assert (report / "recall_vs_length.png").stat().st_size > 0
    assert "## Capability card" in (report / "report.md").read_text()


def test_card_warns_on_a_large_unguarded_loss():
    spec = CardSpec()
    entry = {"name": "passkey_1024", "metric": "contains", "direction": "higher",
             "scores": {"full": 0.65, "m_opt": 0.0, "m_best": 0.3}}
    ppl = {"name": "python_docs_perplexity", "metric": "perplexity", "direction": "lower",
           "scores": {"full": 20.0, "m_opt": 21.0, "m_best": 20.5}}
    assert loss(entry["scores"], Direction.HIGHER) == pytest.approx(0.65)
    assert loss(ppl["scores"], Direction.LOWER) == pytest.approx(0.05)
    lines = warnings({"entries": [entry, ppl]}, spec)
    assert lines == ["M_opt loses 65 points on passkey_1024 (0.65 → 0), which the run did not guard"]
    worse_ppl = {**ppl, "scores": {"full": 20.0, "m_opt": 25.0, "m_best": 20.0}}
    assert "+25% perplexity" in warnings({"entries": [worse_ppl]}, spec)[0]


@pytest.mark.parametrize("guard, error, message", [
    (TargetSpec(dataset="/no/such/qa.jsonl", kind="exact_match"), DataError, "does not exist"),
    (TargetSpec(kind="passkey", context_tokens=4000), DataError, "context limit of 256"),
    (TargetSpec(kind="lm_eval", lm_eval_task="no_such_task", lm_eval_include_path="/no/such/tasks"), ValueError,
     "no_such_task"),
], ids=["missing-data", "probe-too-long", "unknown-lm-eval-task"])
def test_a_bad_guard_fails_before_any_distillation(tmp_path, guard, error, message):
    run = tiny_decoder_run(tmp_path, perplexity_target(tmp_path), guards=(guard,))
    with pytest.raises(error, match=message):
        run_dtr(run, **QUIET)
    assert not (tmp_path / "out" / "cache" / "capture").exists()


@pytest.mark.parametrize("fields, message", [
    (dict(kind="bleu"), "TargetSpec.kind='bleu'"),
    (dict(kind="passkey", tolerance=-0.05, tolerance_mode="absolute"), "TargetSpec.tolerance=-0.05"),
    (dict(kind="passkey", tolerance=1.5, tolerance_mode="relative"), "TargetSpec.tolerance=1.5"),
    (dict(kind="passkey", tolerance=0.05), "give both tolerance and tolerance_mode"),
    (dict(kind="lm_eval"), "TargetSpec.lm_eval_task=''"),
], ids=["unknown-kind", "negative-absolute", "relative-over-1", "tolerance-without-mode", "lm-eval-without-task"])
def test_bad_target_fields_are_named(fields, message):
    with pytest.raises(SpecError, match=message.replace("(", r"\(").replace("[", r"\[")):
        TargetSpec(**fields)


def test_two_targets_need_two_names():
    with pytest.raises(SpecError, match=r"targets \['passkey'\] share a name"):
        RunSpec(guards=(TargetSpec(kind="passkey"), TargetSpec(kind="passkey", context_tokens=1024)))
    RunSpec(guards=(TargetSpec(kind="passkey"), TargetSpec(kind="passkey", name="passkey_1k", context_tokens=1024)))


def test_encoder_with_a_decoder_guard_is_refused(tmp_path):
    run = RunSpec(model=ModelSpec(path=save_tiny_model("bert", tmp_path / "model", num_layers=2)),
                  target=TargetSpec(dataset=str(write_jsonl(tmp_path / "d.jsonl", synthetic_texts(60)))),
                  guards=(TargetSpec(kind="passkey", context_tokens=64),), output_dir=str(tmp_path / "out"))
    with pytest.raises(DataError, match="needs a decoder"):
        run_dtr(run, **QUIET)


def test_command_line_guards_and_target_fields():
    from dtr_core.__main__ import parse_args

    run, _ = parse_args(["--target-kind", "exact_match", "--target", "name=qa,prompt_template=Q: {text}\\nA:,num_fewshot=0",
                         "--guard", "kind=passkey,context_tokens=256,tolerance=0.05,tolerance_mode=absolute",
                         "--guard", "kind=perplexity,name=docs,dataset=python_docs,max_eval_examples=none"])
    assert run.target.label == "qa" and run.target.prompt_template == "Q: {text}\nA:" and run.target.num_fewshot == 0
    assert [g.label for g in run.guards] == ["passkey", "docs"]
    assert run.guards[0].context_tokens == 256 and run.guards[0].tolerance == 0.05
    assert run.guards[1].max_eval_examples is None
    with pytest.raises(SpecError, match=r"--guard .*'length=5' is not FIELD=VALUE"):
        parse_args(["--guard", "kind=passkey,length=5"])
    with pytest.raises(SpecError, match=r"--guard context_tokens='many': expected int"):
        parse_args(["--guard", "kind=passkey,context_tokens=many"])


class RecordingTracker:
    """A Tracker that keeps what it is given."""

    def __init__(self):
        self.series, self.metrics, self.texts = {}, {}, {}

    def log_params(self, params):
        pass

    def log_metrics(self, metrics, step=None):
        for name, value in metrics.items():
            self.metrics.setdefault(name, []).append((step, value))

    def log_series(self, name, values, first_step):
        self.series.setdefault(name, []).extend(values)

    def log_tags(self, tags):
        pass

    def log_text(self, text, artifact_file):
        self.texts[artifact_file] = text

    def log_artifacts(self, folder, artifact_path):
        pass


def test_every_evaluation_of_every_target_is_tracked(tmp_path):
    tracker = RecordingTracker()
    run = tiny_decoder_run(tmp_path, perplexity_target(tmp_path), guards=(PASSKEY,),
                           card=CardSpec(lengths=(64,), examples=2, batch_size=2, general_text=""))
    summary = run_dtr(run, tracker=tracker, **QUIET)
    evaluations = summary.search["result"]["evaluations"]
    for name in ("perplexity", "passkey"):
        assert tracker.series[f"search/{name}/evaluation_score"] == [e["scores"][name] for e in evaluations]
        assert [step for step, _ in tracker.metrics[f"search/{name}/trajectory_score"]] == [1, 2, 3]
        assert {f"validation/{name}/full", f"test/{name}/m_opt"} <= set(tracker.metrics)
    table = tracker.texts["search/evaluations.csv"].splitlines()
    assert table[0] == "round,linear_layers,layer_set,perplexity,passkey,seconds"
    assert len(table) == 1 + len(evaluations) and table[-1].startswith('3,3,"0 1 2",')
    assert json.loads(tracker.texts["search/search.json"])["result"]["targets"][1]["name"] == "passkey"
    assert "card/passkey_64/m_opt" in tracker.metrics


def test_candidate_layers_limit_what_disk_mode_distils(tmp_path):
    run = tiny_decoder_run(tmp_path, perplexity_target(tmp_path), candidate_layers=(0, 2))
    run = dataclasses.replace(run, capture=dataclasses.replace(run.capture, mode="disk"))
    summary = run_dtr(run, **QUIET)
    assert [r["layer_idx"] for r in summary.distillation] == [0, 2]
    assert summary.evaluations == 1 + 2 + 1 and set(summary.linear_layers) <= {0, 2}
    with pytest.raises(SpecError, match=r"candidate_layers: \[5\] are not layers"):
        run_dtr(dataclasses.replace(run, search=SearchSpec(candidate_layers=(0, 5))), **QUIET)


def test_bootstrap_acceptance_runs_end_to_end(tmp_path):
    """Every candidate gets a pessimistic bound per target; the rule is never looser than the point rule."""
    primary = dataclasses.replace(perplexity_target(tmp_path), max_eval_examples=40)
    point = run_dtr(tiny_decoder_run(tmp_path, primary, guards=(PASSKEY,), tolerance=0.002,
                                     acceptance="point"), **QUIET)
    assert "- Acceptance: point" in (Path(point.report_dir) / "report.md").read_text()
    bootstrap = run_dtr(tiny_decoder_run(tmp_path, primary, guards=(PASSKEY,), tolerance=0.002), **QUIET)
    evaluations = bootstrap.search["result"]["evaluations"]
    assert all(set(e["bounds"]) == {"perplexity", "passkey"} for e in evaluations)
    assert evaluations[0]["bounds"] == evaluations[0]["scores"]  # the full model is its own bound
    assert all(e["bounds"]["perplexity"] >= e["scores"]["perplexity"] for e in evaluations[1:])
    assert len(bootstrap.m_opt) <= len(point.m_opt)
    assert bootstrap.search["result"]["acceptance"] == "bootstrap"  # the default
    report = (Path(bootstrap.report_dir) / "report.md").read_text()
    assert "- Acceptance: bootstrap (each target's pessimistic bound" in report and "confidence 0.9" in report

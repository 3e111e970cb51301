"""Whole runs: tiny models through every stage, bad input at the door, and the real MiniLM."""

import dataclasses
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import save_tiny_model, synthetic_texts, write_jsonl

from dtr_core.direction import Direction
from dtr_core.report import format_summary
from dtr_core.targets.data import DataError
from dtr_core.run import RUN_FOLDER, evaluations_table, run_dtr
from dtr_core.search import SearchResult
from dtr_core.specs import (CaptureSpec, CardSpec, DistillSpec, ModelSpec, RunSpec, SearchSpec, StudentSpec,
                             TargetSpec)


def tiny_run(tmp_path, family, kind, **overrides) -> RunSpec:
    data = write_jsonl(tmp_path / "data.jsonl", synthetic_texts(120))
    spec = dict(
        model=ModelSpec(path=save_tiny_model(family, tmp_path / "model", num_layers=3)),
        capture=CaptureSpec(token_budget=1500, max_length=24, batch_size=16),
        distill=DistillSpec(epochs=2, batch_size=8),
        search=SearchSpec(tolerance=0.5, run_to_end=True),
        target=TargetSpec(dataset=data, kind=kind, max_length=24),
        card=CardSpec(lengths=(128,), examples=2, batch_size=2, general_examples=4, general_max_length=32),
        output_dir=str(tmp_path / "out"),
    )
    return RunSpec(**{**spec, **overrides})


@pytest.mark.parametrize("family, kind", [("bert", "classification"), ("llama", "perplexity"),
                                          ("gpt2", "perplexity")])
def test_tiny_run_produces_every_artefact(tmp_path, family, kind):
    summary = run_dtr(tiny_run(tmp_path, family, kind), log=lambda line: None)
    out = tmp_path / "out"
    assert summary.num_layers == 3
    assert summary.evaluations == 1 + 3 * 4 // 2  # run_to_end: the whole trajectory
    assert summary.layer_forwards < summary.layer_forwards_without_reuse
    for name in ("report.json", "report.md", "search_trajectory.png", "distill_loss.png"):
        assert (out / "report" / name).stat().st_size > 0
    report = json.loads((out / "report" / "report.json").read_text())
    assert report["scores"]["test"].keys() == {kind} and report["scores"]["test"][kind].keys() == {"full", "m_opt", "m_best"}
    assert len(report["distillation"]) == 3
    # The budget and what came of it, in the report and the summary (tiny_run fixes 2 passes).
    record = report["distillation"][0]
    assert record["train_tokens"] == 2 * record["data_tokens"] and record["token_budget"] == 1500
    plan_line = f"{record['data_tokens']:,} tokens of data, budget 1,500, 2.00 passes"
    assert f"Every student: {plan_line}" in (out / "report" / "report.md").read_text()
    text = format_summary(summary)
    assert "distillation" in text and plan_line in text
    # Which students, with the window "auto" resolved: 64 tokens on a decoder, none on an encoder.
    students = "gla (hedgehog features, " + {"bert": "no softmax window)", "gpt2": "64-token softmax window)",
                                              "llama": "64-token softmax window, 2 shared K/V heads)"}[family]
    assert f"Students: {students}." in (out / "report" / "report.md").read_text() and students in text
    assert all(f"WARNING: {w}" in text for w in summary.distillation_warnings)
    config = json.loads((out / "hybrid" / "config.json").read_text())
    assert config["layer_types"].count("linear_attention") == len(summary.linear_layers)
    assert {p.name for p in out.iterdir()} == {*RUN_FOLDER, "cache"}
    assert (Direction(summary.primary["direction"]) is Direction.HIGHER) == (kind == "classification")


def test_a_second_run_reuses_every_stage(tmp_path):
    """The command line caches its stages like the flow: started again, it computes nothing."""
    run = tiny_run(tmp_path, "llama", "perplexity")
    first = run_dtr(run, log=lambda line: None)
    lines = []
    second = run_dtr(run, log=lines.append)
    hits = [line.split(":")[0] for line in lines if "cache hit" in line]
    assert hits == ["capture", "distill layer 0", "distill layer 1", "distill layer 2", "search",
                    "test scores (perplexity)", *["card"] * len(first.card["entries"]), "export"]
    assert (second.scores, second.linear_layers, second.search) == (first.scores, first.linear_layers, first.search)


@pytest.mark.parametrize("mode", ["stream", "disk"])
def test_bfloat16_teacher_runs_every_stage(tmp_path, mode):
    """Students are distilled in float32 and evaluated in the teacher's dtype (``--model-dtype``)."""
    run = tiny_run(tmp_path, "llama", "perplexity", model=ModelSpec(
        path=save_tiny_model("llama", tmp_path / "model", num_layers=3), dtype="bfloat16"))
    run = dataclasses.replace(run, capture=dataclasses.replace(run.capture, mode=mode))
    summary = run_dtr(run, log=lambda line: None)
    assert summary.evaluations == 1 + 3 * 4 // 2
    for split in ("validation", "test"):
        assert all(math.isfinite(score) for score in summary.scores[split]["perplexity"].values())


@pytest.mark.parametrize("mode, student", [("disk", StudentSpec(kind="gla", window=4, short_conv=3, shared_kv=False)),
                                           ("stream", StudentSpec(kind="gated_deltanet", window=4))])
def test_window_and_convolution_students_run_every_stage(tmp_path, mode, student):
    """Students that keep recall (one K/V projection per query head, or shared like the teacher's) go through capture,
    distillation, search and export like any other, and the exported hybrid decodes with their windows and convolution
    histories in its cache."""
    from transformers import AutoModelForCausalLM

    run = tiny_run(tmp_path, "llama", "perplexity", student=student)
    run = dataclasses.replace(run, capture=dataclasses.replace(run.capture, mode=mode))
    summary = run_dtr(run, log=lambda line: None)
    assert len(summary.distillation) == 3 and all(math.isfinite(r["rel_error_final"]) for r in summary.distillation)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "hybrid", trust_remote_code=True).eval()
    configs = [entry["student_config"] for entry in model.config.dtr_hybrid["students"]]
    kv_heads = 2 if student.shared_kv else 4  # the tiny Llama's K/V heads, or one per query head
    assert configs and all((config["window"], config["short_conv"], config["rope"], config["kv_heads"]) ==
                           (student.window, student.short_conv, True, kv_heads) for config in configs)
    if student.shared_kv:
        assert "2 shared K/V heads" in (tmp_path / "out" / "report" / "report.md").read_text()
    prompt = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12, 13]])
    cached = model.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=True)
    assert torch.equal(cached, model.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=False))


@pytest.mark.parametrize("mode", ["disk", "stream"])
def test_the_search_offers_every_layer_with_each_kind_of_student(tmp_path, mode):
    """student.kind=auto: every layer gets a GLA and a Gated DeltaNet student (disk mode: from one
    capture; stream mode: on the same teacher pass); every round of the search scores each remaining
    layer with each kind, each hybrid is scored once (the cache holds one evaluation per scored
    hybrid, and a rerun scores nothing), and the export runs the kinds the search kept."""
    from transformers import AutoModelForCausalLM

    run = tiny_run(tmp_path, "llama", "perplexity", student=StudentSpec(kind="auto"))
    run = dataclasses.replace(run, capture=dataclasses.replace(run.capture, mode=mode))
    summary = run_dtr(run, log=lambda line: None)
    assert sorted((r["layer_idx"], r["student_config"]["kind"]) for r in summary.distillation) == sorted(
        (layer, kind) for layer in range(3) for kind in ("gla", "gated_deltanet"))
    stages = {stage: len(list((tmp_path / "out" / "cache" / stage).glob("*.json"))) for stage in ("capture", "distill")}
    assert stages == ({"capture": 1, "distill": 2 * 3} if mode == "disk" else {"capture": 0, "distill": 1})

    result = SearchResult.from_json(json.loads((tmp_path / "out" / "search.json").read_text())["result"])
    assert result.kinds == ("gla", "gated_deltanet")
    per_round = [sum(e.round == r for e in result.evaluations) for r in range(4)]
    assert per_round == [1, 3 * 2, 2 * 2, 1 * 2]  # run to the end: each remaining layer with each kind
    assert {(e.linear_layers, e.kinds) for e in result.evaluations if e.round == 1} == {
        ((layer,), (kind,)) for layer in range(3) for kind in ("gla", "gated_deltanet")}
    for step in result.trajectory:  # each round keeps its best candidate (lower perplexity), kinds included
        round_scores = [e.score for e in result.evaluations if e.round == step.round]
        assert step.score == min(round_scores)
    for e in result.evaluations[1 + 6:]:  # later rounds build on the kept layers, with their kinds
        kept = result.trajectory[e.round - 2]
        assert dict(zip(kept.linear_layers, kept.kinds)).items() <= dict(zip(e.linear_layers, e.kinds)).items()
    evaluated = tmp_path / "out" / "cache" / "evaluate"
    assert len(list(evaluated.glob("*.json"))) == len(result.evaluations) == summary.evaluations

    kinds = summary.student_kinds
    chosen = result.selection.m_opt if run.export.which == "opt" else result.selection.m_best
    assert summary.linear_layers == chosen
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "hybrid", trust_remote_code=True)
    exported = {entry["layer_idx"]: entry["student_config"]["kind"] for entry in model.config.dtr_hybrid["students"]}
    assert exported == {int(layer): kind for layer, kind in kinds["kinds"].items()}
    assert kinds["one_kind_evaluations"] == 1 + 3 + 2 + 1 and kinds["evaluations"] == 13
    assert kinds["scores"]["gla"].keys() == {"0", "1", "2"}
    prompt = torch.tensor([[5, 6, 7, 8, 9, 10, 11]])
    cached = model.eval().generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True)
    assert torch.equal(cached, model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False))
    text = format_summary(summary)
    assert "student kinds" in text and "13 evaluations, 7 with one kind" in text
    report = (tmp_path / "out" / "report" / "report.md").read_text()
    assert "| layer | exported as |" in report
    first = result.trajectory[0]
    assert f"| 1 | {first.added_layer} ({first.kinds[0]}) |" in report  # the trajectory names the kind added
    assert evaluations_table(result).splitlines()[:2] == [
        "round,linear_layers,layer_set,kinds,perplexity,seconds",
        f"0,0,\"\",\"\",{result.full_score:.6g},{result.evaluations[0].seconds:.3f}"]

    # Started again: every stage is found in the cache, the same hybrid comes out.
    again = run_dtr(run, log=lambda line: None)
    assert len(list(evaluated.glob("*.json"))) == len(result.evaluations)
    assert again.linear_layers == summary.linear_layers and again.student_kinds == summary.student_kinds


def test_worker_scored_rounds_choose_kinds_as_the_in_process_search_does(tmp_path):
    """A distributed runner scores each round's (layer, kind) candidates as worker stages (no prefix
    reuse, each candidate's students chosen by kind in the worker's evaluator): same search."""
    from dtr_core.runner import PlainRunner
    from dtr_core.stage_cache import StageCache

    class RoundsRunner(PlainRunner):
        distributed = True

    results = []
    for name, runner_class in (("local", PlainRunner), ("rounds", RoundsRunner)):
        (tmp_path / name).mkdir()
        run = tiny_run(tmp_path / name, "llama", "perplexity", student=StudentSpec(kind="auto"))
        summary = run_dtr(run, runner_class(StageCache(tmp_path / name / "cache"), lambda line: None),
                          log=lambda line: None)
        results.append(SearchResult.from_json(summary.search["result"]))
    local, rounds = results
    assert [(e.linear_layers, e.kinds) for e in rounds.evaluations] == [
        (e.linear_layers, e.kinds) for e in local.evaluations]
    assert [e.score for e in rounds.evaluations] == pytest.approx([e.score for e in local.evaluations], rel=1e-5)
    assert rounds.trajectory[0].kinds == local.trajectory[0].kinds


@pytest.mark.parametrize("args, message", [
    (["--tolerance", "1.5"], "SearchSpec.tolerance=1.5"),
    (["--student", "mamba"], "StudentSpec.kind='mamba'"),
    (["--model", "/no/such/model"], "does not exist"),
    (["--dataset", "/no/such/data.jsonl"], "does not exist"),
    (["--target-kind", "perplexity"], "needs a decoder"),
    (["--guard", "kind=passkey,tolerance=-1,tolerance_mode=absolute"], "TargetSpec.tolerance=-1.0: an absolute"),
    (["--guard", "kind=exact_match,dataset=/no/such/qa.jsonl"], "does not exist"),
    (["--guard", "kind=bleu"], "TargetSpec.kind='bleu'"),
], ids=["tolerance", "student", "model-path", "dataset-path", "encoder-perplexity", "guard-tolerance-sign",
        "guard-without-data", "guard-unknown-metric"])
@pytest.mark.integration
def test_cli_rejects_bad_input_before_heavy_work(tmp_path, args, message):
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, "-m", "dtr_core", "--output-dir", str(out), *args],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 2, run.stderr[-2000:]
    assert message in run.stderr
    assert not out.exists()  # nothing left behind


def test_unwritable_output_dir_is_refused(tmp_path):
    from dtr_core.stages import OutputDirError, check_output_dir

    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(OutputDirError, match="choose another output_dir"):
        check_output_dir(blocker / "out")


def test_unsupported_model_family_is_named(tmp_path):
    from transformers import T5Config

    from dtr_core.adapters import UnsupportedModelError
    from dtr_core.teacher import load_teacher

    T5Config(d_model=32, num_layers=1, num_heads=2, d_kv=16, d_ff=32, vocab_size=100).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match="llama-like"):
        load_teacher(ModelSpec(path=str(tmp_path)))


@pytest.mark.real_weights
def test_minilm_end_to_end_on_a_small_budget(tmp_path):
    """The real teacher and the built-in BBC task: every layer's student improves on its init."""
    run = RunSpec(
        capture=CaptureSpec(token_budget=20_000),
        distill=DistillSpec(epochs=2),
        # 40 of the 80 validation/test examples: the search and test scores cost half (16 s of 100 on 2 cores).
        target=TargetSpec(max_examples_per_split=80, max_eval_examples=40),
        search=SearchSpec(tolerance=0.02),
        output_dir=str(tmp_path / "out"),
    )
    summary = run_dtr(run, log=lambda line: None)
    assert summary.num_layers == 6 and summary.family == "bert"
    assert summary.scores["validation"]["classification"]["full"] > 0.85  # the frozen probe on MiniLM works
    for record in summary.distillation:
        assert record["rel_error_final"] < 0.8 * record["rel_error_init"], record["layer_idx"]
    assert (tmp_path / "out" / "hybrid" / "model.safetensors").exists()


def test_capture_from_general_text_files(tmp_path):
    """Distillation data can come from local text instead of the task's train split."""
    from dtr_core.capture import CaptureManifest, load_layer_activations
    from dtr_core.stages import capture_stage, run_context

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(" ".join(f"w{4 + i % 90}" for i in range(3000)))
    capture = CaptureSpec(source="text_files", text_files=(str(corpus),), token_budget=1500, max_length=24,
                          batch_size=16, dtype="float32")
    run = tiny_run(tmp_path, "llama", "perplexity", capture=capture)
    ctx = run_context(run)
    manifest = CaptureManifest.from_json(capture_stage(run, tmp_path / "capture", print))
    assert 1500 <= manifest.tokens < 1500 + 24
    data = load_layer_activations(manifest, 0)
    first_block = ctx.teacher.tokenizer(corpus.read_text(), add_special_tokens=False)["input_ids"][:24]
    with torch.no_grad():
        embedded = ctx.teacher.model.model.embed_tokens(torch.tensor([first_block]))
        expected = ctx.teacher.model.model.layers[0].input_layernorm(embedded)
    torch.testing.assert_close(data.inputs[:1], expected)


def test_general_text_is_mixed_into_the_distillation_data(tmp_path):
    """capture.general_share of the tokens come from the general text, interleaved with the task's;
    the capture's key follows the mix, and a missing general text is refused before any work."""
    from dtr_core.stages import capture_key, capture_stage, capture_texts, run_context

    general = write_jsonl(tmp_path / "general.jsonl", [(f"g{i} " + "zz " * 30, "x") for i in range(40)])
    run = tiny_run(tmp_path, "llama", "perplexity")
    mixed = dataclasses.replace(run, capture=dataclasses.replace(run.capture, general_share=0.25,
                                                                 general_text=str(general)))
    lines = []
    texts = capture_texts(run_context(mixed), lines.append)
    (line,) = lines
    assert line.startswith("distillation data:") and "(2" in line and "% general)" in line
    assert any(t.startswith("g") for t in texts[:8])  # interleaved from the start, not appended
    own = capture_texts(run_context(run), lines.append)
    assert [t for t in texts if not t.startswith("g")] == own[:len([t for t in texts if not t.startswith("g")])]
    assert capture_key(run_context(mixed)) != capture_key(run_context(run))
    assert capture_stage(mixed, tmp_path / "capture", print)["tokens"] >= 1500
    with pytest.raises(DataError, match=r"capture.general_text='/no/such.jsonl'"):
        run_context(dataclasses.replace(mixed, capture=dataclasses.replace(mixed.capture,
                                                                          general_text="/no/such.jsonl")))


def test_cli_help_names_every_default():
    from dtr_core.__main__ import HelpWithDefaults, build_parser

    parser = build_parser()
    formatter = HelpWithDefaults("python -m dtr_core")
    for action in parser._actions:
        if action.option_strings and action.nargs != 0:  # every option that takes a value
            assert "default" in formatter._get_help_string(action), action.option_strings
    text = parser.format_help()
    assert "(default: 128)" in text and "(default: bootstrap)" in text and "(default: none)" in text
    assert "(default: 1,000,000 with --device cuda, 192,000 elsewhere)" in " ".join(text.split())


def test_cli_flags_reach_the_specs():
    from dtr_core.__main__ import parse_args

    run, cache_dir = parse_args(["--model", "smollm2-135m", "--model-dtype", "bfloat16", "--target-kind", "exact_match",
                      "--eval-examples", "200", "--eval-batch-size", "100", "--mode", "stream",
                      "--token-budget", "1000", "--epochs", "3", "--run-to-end", "--window", "64",
                      "--short-conv", "4", "--no-shared-kv"])
    assert (run.model.path, run.model.dtype) == ("smollm2-135m", "bfloat16")
    assert (run.target.kind, run.target.max_eval_examples, run.target.batch_size) == ("exact_match", 200, 100)
    assert (run.capture.mode, run.capture.token_budget, run.distill.epochs) == ("stream", 1000, 3)
    assert run.search.run_to_end and cache_dir is None
    assert (run.student.window, run.student.short_conv, run.student.shared_kv) == (64, 4, False)
    assert parse_args([])[0].student.shared_kv
    assert parse_args(["--cache-dir", "/shared/cache"])[1] == "/shared/cache"
    assert parse_args([])[0].student.window == parse_args(["--window", "auto"])[0].student.window == "auto"
    with pytest.raises(SystemExit):
        parse_args(["--window", "-1"])  # argparse's error: "neither 'auto' nor a whole number"
    # The budget's default follows the device: a GPU distils a million tokens in about a minute.
    assert parse_args([])[0].capture.token_budget == 192_000
    assert parse_args(["--device", "cuda:1"])[0].capture.token_budget == 1_000_000

"""One DtR run, written once: capture → distill (per layer) → probe → search (one evaluation per
candidate) → test → export → report.

Both entry points run this sequence: ``python -m dtr_core`` with ``runner.PlainRunner`` (each stage a
plain call) and the Prefect flow with ``tasks.runner.PrefectRunner`` (each stage a Prefect task).
Either way every stage goes through the content-keyed stage cache, so a killed run started again
redoes only what had not finished, and the outputs land in the same layout::

    <cache>/<stage>/<key>.json, <key>/    each stage's manifest and files (shared by runs and sweeps)
    <run folder>/search.json              every evaluation and the trajectory
    <run folder>/hybrid/                  the exported Hugging Face folder (hard links into the cache)
    <run folder>/report/                  report.json, report.md, plots

In stream mode one stage ("stream distill") replaces capture and distill: the teacher streams and
every layer trains together, resuming from ``<cache>/distill/<key>/checkpoints/``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from .export import ExportManifest, export_hybrid
from .io import link_tree, write_json
from .linear.base import LinearAttentionStudent
from .report import RunSummary, write_report
from .runner import Log, PlainRunner, Stage, StageRunner
from .search import greedy_replace
from .specs import RunSpec, spec_to_dict
from .stage_cache import StageCache, code_version, content_key
from .stages import (
    PreparedTarget,
    RunContext,
    SearchOutcome,
    capture_key,
    capture_stage,
    describe_capture,
    describe_record,
    describe_worker_score,
    distill_key,
    distill_mode,
    distill_stage,
    evaluation_key,
    export_key,
    fit_probe_stage,
    load_students,
    prepare_target,
    record_files,
    run_context,
    split_evaluator,
    stream_distill_key,
    stream_distill_stage,
    target_key,
    worker_evaluation_stage,
)
from .tracking import NoTracking, Tracker
from .training import CurveLogger

T = TypeVar("T")
# What every run folder holds, from either entry point (the cache may live elsewhere).
RUN_FOLDER = ("search.json", "hybrid", "report")
SEARCH_PROGRESS_EVERY = 10  # evaluations between two search progress lines


def default_cache_dir(run: RunSpec) -> Path:
    """Where ``python -m dtr_core`` keeps stage results unless told otherwise: inside the run folder."""
    return Path(run.output_dir) / "cache"


class StageTimer:
    """Seconds per stage name, summed over the calls that share a name."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def __call__(self, name: str, fn: Callable[..., T], *args: Any) -> T:
        started = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started


class TrackedCurves:
    """A ``CurveLogger`` that hands each curve to the tracker while it grows (picklable: stages on
    Dask workers log too)."""

    def __init__(self, tracker: Tracker) -> None:
        self.tracker = tracker

    def __call__(self, layer_idx: int, first_step: int, losses: Sequence[float]) -> None:
        self.tracker.log_series(f"distill/layer_{layer_idx:02d}/loss", losses, first_step)


def log_stored_curves(log_curve: CurveLogger, records: Sequence[Mapping]) -> None:
    """A cached student's curve, logged whole: this run did not train it but its tracking shows it."""
    for record in records:
        log_curve(record["layer_idx"], 0, record["loss_curve"])


def run_dtr(run: RunSpec, runner: StageRunner | None = None, tracker: Tracker | None = None,
            log: Log = print) -> RunSummary | None:
    """Every stage in order; returns (and reports) the summary.

    Args:
        run: the run's specs; ``run.output_dir`` is the run folder.
        runner: executes each stage (default: plain calls, cache under ``<run.output_dir>/cache``).
        tracker: where parameters, curves and scores are logged (default: nowhere).
        log: one line of progress at a time.

    Under torchrun (stream mode, data-parallel) every rank distils; then ranks other than 0 return
    None and rank 0 runs the remaining stages alone.
    """
    runner = runner or PlainRunner(StageCache(default_cache_dir(run)), log)
    tracker = tracker or NoTracking()
    timer = StageTimer()
    ctx = timer("load", run_context, run)
    adapter = ctx.teacher.adapter
    log(f"teacher {ctx.teacher.path} ({adapter.family}, {adapter.num_layers} layers); data {ctx.data.source}")

    records, capture_tokens = _distill(ctx, runner, tracker, timer, log)
    if records is None:
        return None
    probe = None
    if run.target.kind == "classification":
        probe = timer("target", runner.run, Stage(
            "target", "probe", target_key(ctx), partial(fit_probe_stage, run),
            files=lambda value: {value["file"]: value["sha256"]}))
    target = timer("target", prepare_target, ctx, probe)
    students = timer("target", load_students, records, run)

    outcome = timer("search", _search, ctx, runner, records, probe, students, target, log)
    write_json(Path(run.output_dir) / "search.json", outcome.to_json())
    _track_search(tracker, outcome)
    selection = outcome.result.selection
    log(f"search: {len(outcome.result.evaluations)} evaluations; M_opt {list(selection.m_opt)}, "
        f"M_best {list(selection.m_best)}")

    layer_sets = {"full": (), "m_opt": selection.m_opt, "m_best": selection.m_best}
    tests = timer("test", runner.run, Stage(
        "test", "test scores", content_key("test", evaluation_key(ctx, records), sorted(layer_sets.items())),
        lambda folder, stage_log: _test_scores(ctx, students, target, layer_sets),
        describe=lambda scores: ", ".join(f"{name} {score:.4f}" for name, score in scores.items())))

    chosen = selection.m_opt if run.export.which == "opt" else selection.m_best
    by_layer = {r["layer_idx"]: r for r in records}
    export = ExportManifest(**timer("export", runner.run, Stage(
        "export", "export", export_key(ctx, by_layer, chosen),
        lambda folder, stage_log: export_hybrid(ctx.teacher.model, adapter, ctx.teacher.tokenizer,
                                                {i: students[i] for i in chosen}, folder, run.export).to_json(),
        files=lambda value: {str(Path(value["directory"]) / name): digest for name, digest in value["files"].items()})))
    hybrid_dir = link_tree(export.directory, Path(run.output_dir) / "hybrid")

    report_dir = Path(run.output_dir) / "report"
    summary = RunSummary(
        output_dir=run.output_dir, model=ctx.teacher.path, family=adapter.family, num_layers=adapter.num_layers,
        metric=target.scorer.metric_name, direction=target.scorer.direction, exported=run.export.which,
        linear_layers=tuple(export.linear_layers),
        scores={"validation": {"full": outcome.result.full_score, "m_opt": selection.m_opt_score,
                               "m_best": selection.m_best_score},
                "test": dict(tests)},
        m_opt=selection.m_opt, m_best=selection.m_best, evaluations=len(outcome.result.evaluations),
        layer_forwards=outcome.layer_forwards, layer_forwards_without_reuse=outcome.layer_forwards_without_reuse,
        stage_seconds=dict(timer.seconds), distillation=list(records), capture_tokens=capture_tokens,
        export_dir=str(hybrid_dir), report_dir=str(report_dir), search=outcome.to_json(),
    )
    runner.run(Stage("report", "report", None, lambda folder, stage_log: str(write_report(summary, report_dir))))
    _track_summary(tracker, summary)
    return summary


def _distill(ctx: RunContext, runner: StageRunner, tracker: Tracker, timer: StageTimer,
             log: Log) -> tuple[list[dict] | None, int]:
    """Every layer's student record, and the distinct tokens distilled from; (None, 0) on a
    data-parallel rank other than 0."""
    run, num_layers = ctx.run, ctx.teacher.adapter.num_layers
    log_curve = TrackedCurves(tracker)
    choice = distill_mode(ctx)
    log(f"distillation mode: {choice.mode} ({choice.reason})")
    if choice.mode == "stream":
        streamed = timer("distill", runner.run, Stage(
            "distill", "stream distill", stream_distill_key(ctx),
            partial(stream_distill_stage, run, "distill" in runner.cache.refresh, log_curve),
            files=lambda value: {f: d for r in value["records"] for f, d in record_files(r).items()},
            describe=lambda value: "; ".join(f"layer {r['layer_idx']}: {describe_record(r)}" for r in value["records"]),
            on_cached=lambda value: log_stored_curves(log_curve, value["records"])))
        if streamed is None:
            return None, 0
        records, capture_tokens = streamed["records"], streamed["tokens"]
    else:
        key = capture_key(ctx)
        capture = timer("capture", runner.run, Stage("capture", "capture", key, partial(capture_stage, run),
                                                     describe=describe_capture))
        records = timer("distill", runner.run_all, [
            Stage("distill", f"distill layer {layer_idx}", distill_key(ctx, key, layer_idx),
                  partial(distill_stage, run, capture, layer_idx, log_curve), files=record_files,
                  describe=describe_record, on_cached=partial(_log_stored_curve, log_curve))
            for layer_idx in range(num_layers)])
        capture_tokens = capture["tokens"]
    for record in records:
        layer = record["layer_idx"]
        tracker.log_metrics({f"distill/layer_{layer:02d}/rel_error_init": record["rel_error_init"],
                             f"distill/layer_{layer:02d}/rel_error_final": record["rel_error_final"]})
    return records, capture_tokens


def _log_stored_curve(log_curve: CurveLogger, record: Mapping) -> None:
    log_stored_curves(log_curve, [record])


class StagedEvaluator:
    """``search.Evaluator`` whose every candidate is a cached "evaluate" stage run by the runner.

    In this process the candidates share ``evaluator`` (and its prefix cache); a distributed runner
    instead gets each round's candidates at once (``evaluate_round``), scored on its workers."""

    def __init__(self, ctx: RunContext, runner: StageRunner, evaluator, records: Sequence[Mapping],
                 probe: Mapping | None, log: Log) -> None:
        self.ctx, self.runner, self.evaluator = ctx, runner, evaluator
        self.records, self.probe, self.log = records, probe, log
        self.key = evaluation_key(ctx, records)
        num_layers = ctx.teacher.adapter.num_layers
        self.most = num_layers * (num_layers + 1) // 2 + 1
        self.done, self.started = 0, time.perf_counter()

    def _stage(self, layers: frozenset[int], compute, describe=None) -> Stage:
        return Stage("evaluate", f"evaluate {sorted(layers)}", content_key(self.key, sorted(layers)), compute,
                     quiet=True, describe=describe)

    def _progress(self, layers: frozenset[int], score: float) -> None:
        self.done += 1
        if self.done % SEARCH_PROGRESS_EVERY == 0:
            elapsed = time.perf_counter() - self.started
            self.log(f"search: {self.done} evaluations of at most {self.most} ({elapsed:.0f}s); "
                     f"{len(layers)} linear {sorted(layers)} → {score:.4f}")

    def __call__(self, linear_layers: frozenset[int]) -> float:
        score = self.runner.run(self._stage(linear_layers, lambda folder, log: self.evaluator(linear_layers)))
        self._progress(linear_layers, score)
        return score

    def rebase(self, linear_layers: frozenset[int]) -> None:
        self.evaluator.rebase(linear_layers)


class RoundStagedEvaluator(StagedEvaluator):
    """``StagedEvaluator`` that hands each round to the runner's workers (``search.RoundEvaluator``)."""

    def evaluate_round(self, layer_sets: Sequence[frozenset[int]]) -> list[tuple[float, float]]:
        started = time.perf_counter()
        scores = self.runner.run_all([
            self._stage(layers, partial(worker_evaluation_stage, self.ctx.run, self.records, self.probe, layers),
                        describe=describe_worker_score)
            for layers in layer_sets])
        # The workers score in parallel: each candidate is credited an equal share of the round's time.
        seconds = (time.perf_counter() - started) / len(layer_sets)
        for layers, score in zip(layer_sets, scores):
            self._progress(layers, score)
        return [(score, seconds) for score in scores]


def _search(ctx: RunContext, runner: StageRunner, records: Sequence[Mapping], probe: Mapping | None,
            students: Mapping[int, LinearAttentionStudent], target: PreparedTarget, log: Log) -> SearchOutcome:
    """The greedy search as one cached stage, its candidates as cached stages inside it."""
    run = ctx.run

    def search(folder: Path | None, stage_log: Log) -> dict:
        started = time.perf_counter()
        evaluator = split_evaluator(ctx, students, target, target.validation, run.search.prefix_reuse)
        staged_class = RoundStagedEvaluator if runner.distributed else StagedEvaluator
        staged = staged_class(ctx, runner, evaluator, records, probe, log)
        result = greedy_replace(ctx.teacher.adapter.num_layers, staged, run.search, target.scorer.direction)
        return SearchOutcome(result, evaluator.layer_forwards, evaluator.layer_forwards_full,
                             time.perf_counter() - started).to_json()

    key = content_key("search", evaluation_key(ctx, records), spec_to_dict(run.search), code_version())
    return SearchOutcome.from_json(runner.run(Stage("search", "search", key, search, composite=True)))


def _test_scores(ctx: RunContext, students: Mapping[int, LinearAttentionStudent], target: PreparedTarget,
                 layer_sets: Mapping[str, tuple[int, ...]]) -> dict[str, float]:
    """Test-split score of each named layer set (prefix reuse off: each is run once)."""
    evaluator = split_evaluator(ctx, students, target, target.test, prefix_reuse=False)
    return {name: evaluator(frozenset(layers)) for name, layers in layer_sets.items()}


def _track_search(tracker: Tracker, outcome: SearchOutcome) -> None:
    result = outcome.result
    tracker.log_series("search/evaluation_score", [e.score for e in result.evaluations], 0)
    for step in result.trajectory:
        tracker.log_metrics({"search/trajectory_score": step.score}, step=len(step.linear_layers))
    tracker.log_metrics({"search/layer_forwards": outcome.layer_forwards,
                         "search/layer_forwards_without_reuse": outcome.layer_forwards_without_reuse})


def _track_summary(tracker: Tracker, summary: RunSummary) -> None:
    for split, scores in summary.scores.items():
        tracker.log_metrics({f"{split}/{name}": value for name, value in scores.items()})
    tracker.log_metrics({"linear_layers": len(summary.linear_layers), "evaluations": summary.evaluations})
    tracker.log_metrics({f"seconds/{stage}": seconds for stage, seconds in summary.stage_seconds.items()})
    tracker.log_tags({"linear_layer_set": str(list(summary.linear_layers)), "export_dir": summary.export_dir})
    tracker.log_artifacts(summary.report_dir, "report")

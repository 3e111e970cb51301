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

import json
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import partial
from dataclasses import asdict
from pathlib import Path
from typing import Any, TypeVar

from .card import card_entries
from .card import warnings as card_warnings
from .export import ExportManifest, export_hybrid
from .io import link_tree, write_json
from .progress import Progress
from .report import RunSummary, write_report
from .runner import Log, PlainRunner, Stage, StageRunner
from .acceptance import ExampleScores, paired_bootstrap_bound
from .direction import Direction
from .search import CandidateScores, SearchResult, TargetGuard, greedy_replace, hybrid_name, kinds_in_order
from .specs import RunSpec, TargetSpec, spec_to_dict
from .stage_cache import StageCache, code_version, content_key
from .stages import (
    PreparedTarget,
    RunContext,
    SearchOutcome,
    StudentChoice,
    TargetEvaluator,
    capture_files,
    candidate_key,
    capture_key,
    capture_stage,
    context_limit,
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
from .training import CurveLogger, TrainingPlan, distillation_warnings

T = TypeVar("T")
# A hybrid as the stages after the search name it: its linear layers and, when the run distilled
# several kinds of student, each one's kind (in the same order).
Hybrid = tuple[tuple[int, ...], tuple[str, ...] | None]
# What every run folder holds, from either entry point (the cache may live elsewhere).
RUN_FOLDER = ("search.json", "hybrid", "report")


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
    Dask workers log too). ``names[i]``: student ``i``'s curve (default ``distill/layer_<i>``)."""

    def __init__(self, tracker: Tracker, names: Sequence[str] | None = None) -> None:
        self.tracker, self.names = tracker, names

    def __call__(self, index: int, first_step: int, losses: Sequence[float]) -> None:
        name = curve_name(index) if self.names is None else self.names[index]
        self.tracker.log_series(f"{name}/loss", losses, first_step)


def curve_name(layer_idx: int, kind: str | None = None) -> str:
    """Where a student's curve and relative errors are tracked: by layer, and by ``kind`` when the
    layers have students of several kinds."""
    return f"distill{'' if kind is None else '/' + kind}/layer_{layer_idx:02d}"


def log_stored_curves(log_curve: CurveLogger, indexed: Iterable[tuple[int, Mapping]]) -> None:
    """Cached students' curves, logged whole (``(index, record)`` pairs, the index ``log_curve``
    knows each by): this run did not train them but its tracking shows them."""
    for index, record in indexed:
        log_curve(index, 0, record["loss_curve"])


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
    log(f"teacher {ctx.teacher.path} ({adapter.family}, {adapter.num_layers} layers); targets: "
        + "; ".join(f"{name} ({source.source})" for name, source in ctx.sources.items()))

    kinds = run.student.kinds
    by_kind, capture_tokens = _distill(ctx, runner, tracker, timer, log)
    if by_kind is None:
        return None
    # The classification targets' frozen logistic-regression probes (not the recall probes).
    probes = {target.label: timer("target", runner.run, Stage(
        "target", f"probe for {target.label}", target_key(ctx, target), partial(fit_probe_stage, run, target.label),
        files=lambda value: {value["file"]: value["sha256"]}))
        for target in run.targets if target.kind == "classification"}
    targets = [timer("target", prepare_target, ctx, target, probes.get(target.label)) for target in run.targets]
    records = [record for kind in kinds for record in by_kind[kind]]
    students = timer("target", load_students, records, run)

    outcome = timer("search", _search, ctx, runner, records, probes, students, targets, log)
    write_json(Path(run.output_dir) / "search.json", outcome.to_json())
    _track_search(tracker, outcome)
    result, selection = outcome.result, outcome.result.selection
    log(f"search: {len(result.evaluations)} evaluations; M_opt {hybrid_name(selection.m_opt, selection.m_opt_kinds)}, "
        f"M_best {hybrid_name(selection.m_best, selection.m_best_kinds)}")

    # Each hybrid as its layers and, with several kinds of student, their kinds.
    layer_sets = {"full": ((), None), "m_opt": (selection.m_opt, selection.m_opt_kinds),
                  "m_best": (selection.m_best, selection.m_best_kinds)}
    tests = {target.name: timer("test", runner.run, Stage(
        "test", f"test scores ({target.name})",
        content_key("test", evaluation_key(ctx, target.spec, records), sorted(layer_sets.items())),
        partial(_test_scores, ctx, students, target, layer_sets),
        describe=lambda scores: ", ".join(f"{name} {score:.4f}" for name, score in scores.items())))
        for target in targets}

    card = None
    if run.card.enabled and adapter.causal:
        card = timer("card", _capability_card, ctx, runner, records, students, layer_sets, log)

    chosen, chosen_kinds = layer_sets["m_opt" if run.export.which == "opt" else "m_best"]
    students.choose(_kinds_map(chosen, chosen_kinds))
    chosen_students = {i: students[i] for i in chosen}
    export = ExportManifest(**timer("export", runner.run, Stage(
        "export", "export", export_key(ctx, _records_by_layer(records, students.kinds), chosen),
        lambda folder, stage_log: export_hybrid(ctx.teacher.model, adapter, ctx.teacher.tokenizer,
                                                chosen_students, folder, run.export).to_json(),
        files=lambda value: {str(Path(value["directory"]) / name): digest for name, digest in value["files"].items()})))
    hybrid_dir = link_tree(export.directory, Path(run.output_dir) / "hybrid")

    report_dir = Path(run.output_dir) / "report"
    validation = {target.name: {"full": result.full_scores[target.name], "m_opt": selection.m_opt_scores[target.name],
                                "m_best": selection.m_best_scores[target.name]} for target in targets}
    summary = RunSummary(
        output_dir=run.output_dir, model=ctx.teacher.path, family=adapter.family, num_layers=adapter.num_layers,
        targets=[_describe_target(run, target) for target in targets], exported=run.export.which,
        linear_layers=tuple(export.linear_layers), scores={"validation": validation, "test": tests},
        m_opt=selection.m_opt, m_best=selection.m_best, evaluations=len(result.evaluations),
        layer_forwards=outcome.layer_forwards, layer_forwards_without_reuse=outcome.layer_forwards_without_reuse,
        stage_seconds=dict(timer.seconds), distillation=list(records), capture_tokens=capture_tokens,
        export_dir=str(hybrid_dir), report_dir=str(report_dir), search=outcome.to_json(), card=card,
        distillation_warnings=distillation_warnings(records),
        student_kinds=_student_kinds(result, chosen, chosen_kinds) if len(kinds) > 1 else None,
    )
    runner.run(Stage("report", "report", None, lambda folder, stage_log: str(write_report(summary, report_dir))))
    _track_summary(tracker, summary)
    return summary


def _capability_card(ctx: RunContext, runner: StageRunner, records: Sequence[Mapping], students: StudentChoice,
                     layer_sets: Mapping[str, Hybrid], log: Log) -> dict:
    """Each card capability's test scores for the full model, M_opt and M_best (a cached stage each)."""
    limit = context_limit(ctx.teacher)
    entries = []
    for entry in card_entries(ctx.run, limit):
        target = entry.target
        key = content_key("card", evaluation_key(ctx, target, records), sorted(layer_sets.items()))
        scored = runner.run(Stage(
            "card", f"card: {target.label}", key, partial(_card_scores, ctx, students, target, layer_sets),
            describe=lambda value: ", ".join(f"{name} {score:.4f}" for name, score in value["scores"].items())))
        entries.append({"name": target.label, "kind": target.kind, "length": entry.length, **scored})
    card = {"context_limit": limit, "entries": entries}
    card["warnings"] = card_warnings(card, ctx.run.card)
    return card


def _card_scores(ctx: RunContext, students: StudentChoice, target: TargetSpec, layer_sets: Mapping[str, Hybrid],
                 folder: Path | None, log: Log) -> dict:
    prepared = prepare_target(ctx, target, None)
    return {"metric": prepared.scorer.metric_name, "direction": prepared.scorer.direction.value,
            "scores": _test_scores(ctx, students, prepared, layer_sets, folder, log)}


def _kinds_map(layers: Sequence[int], kinds: Sequence[str] | None) -> dict[int, str] | None:
    """A hybrid's layer → kind of student (None when the run had one kind)."""
    return None if kinds is None else dict(zip(layers, kinds))


def _records_by_layer(records: Sequence[Mapping], kinds: Mapping[int, str] | None) -> dict[int, Mapping]:
    """Each layer's record of the kind ``kinds`` gives it (the first kind distilled elsewhere)."""
    first = records[0]["student_config"]["kind"]
    return {r["layer_idx"]: r for r in records
            if r["student_config"]["kind"] == (kinds or {}).get(r["layer_idx"], first)}


def _student_kinds(result: SearchResult, layers: Sequence[int], kinds: Sequence[str]) -> dict:
    """What the report says of a search over several kinds of student: the exported layers' kinds
    (str keys, as in JSON), every single swap's validation score by kind (the search's first round),
    and what offering every kind cost: the evaluations made, and those one kind would have needed."""
    primary = result.targets[0].name
    alone = {kind: {} for kind in result.kinds}
    for e in result.evaluations:
        if e.round == 1:
            alone[e.kinds[0]][str(e.linear_layers[0])] = e.scores[primary]
    return {"kinds": {str(layer): kind for layer, kind in zip(layers, kinds)}, "scores": alone,
            "evaluations": len(result.evaluations),
            "one_kind_evaluations": 1 + (len(result.evaluations) - 1) // len(result.kinds)}


def _describe_target(run: RunSpec, target: PreparedTarget) -> dict:
    """How the report names and reads one target."""
    tolerance, mode = run.tolerance_of(target.spec)
    return {"name": target.name, "kind": target.spec.kind, "metric": target.scorer.metric_name,
            "direction": target.scorer.direction.value, "tolerance": tolerance, "tolerance_mode": mode,
            "primary": target.spec is run.target}


def distilled_layers(run: RunSpec, num_layers: int) -> list[int]:
    """Disk mode distils only the layers the search may replace (``SearchSpec.candidate_layers``);
    stream mode trains every layer together in one pass over the teacher."""
    candidates = run.search.candidate_layers
    return sorted(candidates) if candidates is not None else list(range(num_layers))


def _distill(ctx: RunContext, runner: StageRunner, tracker: Tracker, timer: StageTimer,
             log: Log) -> tuple[dict[str, list[dict]] | None, int]:
    """Every layer's student record for each kind of ``ctx.run.student`` ({kind: records}), and the
    distinct tokens distilled from; (None, 0) on a data-parallel rank other than 0. Stream mode trains
    every kind's students on the same teacher pass; disk mode distils every kind from one capture."""
    run, num_layers = ctx.run, ctx.teacher.adapter.num_layers
    kinds = run.student.kinds
    several = len(kinds) > 1
    choice = distill_mode(ctx)
    log(f"distillation mode: {choice.mode} ({choice.reason})")
    if choice.mode == "stream":
        # Students are numbered kind-major (stream_distill_stage): the i-th's curve is named by position.
        names = [curve_name(layer, kind) for kind in kinds for layer in range(num_layers)]
        log_curve = TrackedCurves(tracker, names if several else None)
        streamed = timer("distill", runner.run, Stage(
            "distill", "stream distill", stream_distill_key(ctx),
            partial(stream_distill_stage, run, "distill" in runner.cache.refresh, log_curve),
            files=lambda value: {f: d for r in value["records"] for f, d in record_files(r).items()},
            describe=lambda value: "; ".join(f"layer {r['layer_idx']}: {describe_record(r)}" for r in value["records"]),
            on_cached=lambda value: log_stored_curves(log_curve, enumerate(value["records"]))))
        if streamed is None:
            return None, 0
        records, capture_tokens = streamed["records"], streamed["tokens"]
    else:
        key = capture_key(ctx)
        capture = timer("capture", runner.run, Stage("capture", "capture", key, partial(capture_stage, run),
                                                     files=capture_files, describe=describe_capture))
        stages = []
        for kind in kinds:
            kind_ctx = ctx.for_student_kind(kind)
            log_curve = TrackedCurves(tracker, [curve_name(layer, kind) for layer in range(num_layers)]
                                      if several else None)
            stages += [Stage("distill", f"distill layer {layer_idx}" + (f" ({kind})" if several else ""),
                             distill_key(kind_ctx, key, layer_idx),
                             partial(distill_stage, kind_ctx.run, capture, layer_idx, log_curve), files=record_files,
                             describe=describe_record, on_cached=partial(_log_stored_curve, log_curve))
                       for layer_idx in distilled_layers(run, num_layers)]
        records = timer("distill", runner.run_all, stages)
        capture_tokens = capture["tokens"]
    for record in records:
        name = curve_name(record["layer_idx"], record["student_config"]["kind"] if several else None)
        tracker.log_metrics({f"{name}/rel_error_init": record["rel_error_init"],
                             f"{name}/rel_error_final": record["rel_error_final"]})
    plan = TrainingPlan.of_record(records[0])
    log(f"distillation: {plan.describe()}")
    tracker.log_metrics({"distill/data_tokens": plan.data_tokens, "distill/train_tokens": plan.train_tokens,
                         "distill/passes": plan.passes})
    by_kind = {kind: [r for r in records if r["student_config"]["kind"] == kind] for kind in kinds}
    return by_kind, capture_tokens


def _log_stored_curve(log_curve: CurveLogger, record: Mapping) -> None:
    log_stored_curves(log_curve, [(record["layer_idx"], record)])


def _evaluated(evaluator: TargetEvaluator, students: StudentChoice, layers: frozenset[int],
               kinds: Mapping[int, str] | None, folder: Path | None, log: Log) -> dict:
    """An evaluate stage's value: the score and, where the target gives them, per-example scores."""
    students.choose(kinds)
    score, examples = evaluator.evaluate(layers)
    return {"score": score, "examples": examples.to_json() if examples is not None else None}


class TargetsEvaluator:
    """``search.Evaluator`` over every target: each candidate's score on each target is its own
    cached "evaluate" stage, so a run that adds a guard reuses every score already made.

    In this process each target's candidates share its evaluator (and its prefix cache); a
    distributed runner instead gets each round's candidates at once (``evaluate_round``), scored on
    its workers."""

    def __init__(self, ctx: RunContext, runner: StageRunner, evaluators: Mapping[str, TargetEvaluator],
                 students: StudentChoice, directions: Mapping[str, Direction], records: Sequence[Mapping],
                 probes: Mapping[str, Mapping], log: Log) -> None:
        self.ctx, self.runner, self.evaluators, self.directions = ctx, runner, evaluators, directions
        self.students = students
        self.full_examples: dict[str, ExampleScores] = {}
        self.records, self.probes, self.log = records, probes, log
        self.specs = {target.label: target for target in ctx.run.targets}
        candidates = len(distilled_layers(ctx.run, ctx.teacher.adapter.num_layers))
        # Every round scores each remaining candidate with each kind of student: this many evaluations
        # when the search runs to the end, at most that many when it may stop early.
        self.progress = Progress("search", len(ctx.run.student.kinds) * candidates * (candidates + 1) // 2 + 1, log,
                                 unit="evaluations", bound=not ctx.run.search.run_to_end)

    def _stage(self, name: str, layers: frozenset[int], kinds: Mapping[int, str] | None, compute, describe=None,
               on_cached=None) -> Stage:
        return Stage("evaluate", f"evaluate {name} {hybrid_name(sorted(layers), kinds_in_order(layers, kinds))}",
                     candidate_key(self.ctx, self.specs[name], _records_by_layer(self.records, kinds), layers),
                     compute, quiet=True, describe=describe, on_cached=on_cached)

    def __call__(self, linear_layers: frozenset[int], kinds: Mapping[int, str] | None = None) -> CandidateScores:
        hits: list = []  # a candidate every target had cached took no time: it must not lower the estimate
        values = {name: self.runner.run(self._stage(name, linear_layers, kinds,
                                                    partial(_evaluated, evaluator, self.students, linear_layers, kinds),
                                                    on_cached=hits.append))
                  for name, evaluator in self.evaluators.items()}
        return self._scored(linear_layers, kinds, values, worked=len(hits) < len(values))

    def _scored(self, layers: frozenset[int], kinds: Mapping[int, str] | None, values: Mapping[str, Mapping],
                worked: bool = True) -> CandidateScores:
        """Each target's score from its evaluate stage's value; under the bootstrap rule also its
        pessimistic bound against the full model (the search's first candidate), for each target
        that gives per-example scores (the others are judged by their score)."""
        scores = {name: value["score"] for name, value in values.items()}
        written = ", ".join(f"{name} {score:.4f}" for name, score in scores.items())
        named = hybrid_name(sorted(layers), kinds_in_order(layers, kinds))
        self.progress.advance(worked=worked, detail=f"{len(layers)} linear {named} → {written}")
        search = self.ctx.run.search
        if search.acceptance == "point":
            return CandidateScores(scores)
        examples = {name: ExampleScores.from_json(value["examples"]) for name, value in values.items()
                    if value["examples"] is not None}
        if not layers:
            self.full_examples = examples
            unbounded = sorted(set(values) - set(examples))
            if unbounded:
                self.log(f"search: bootstrap acceptance judges {', '.join(unbounded)} by the score: "
                         "its metric gives no per-example scores (a corpus-level lm-eval metric)")
            return CandidateScores(scores, {name: scores[name] for name in examples})
        bounds = {name: paired_bootstrap_bound(self.full_examples[name], examples[name],
                                               self.directions[name], search.confidence,
                                               search.bootstrap_samples, self.ctx.run.seed)
                  for name in examples}
        return CandidateScores(scores, bounds)

    def rebase(self, linear_layers: frozenset[int], kinds: Mapping[int, str] | None = None) -> None:
        self.students.choose(kinds)
        for evaluator in self.evaluators.values():
            evaluator.rebase(linear_layers)


class RoundTargetsEvaluator(TargetsEvaluator):
    """``TargetsEvaluator`` that hands each round, every target's candidates together, to the
    runner's workers (``search.RoundEvaluator``)."""

    def evaluate_round(self, layer_sets: Sequence[frozenset[int]], kinds: Sequence[Mapping[int, str]] | None = None
                       ) -> list[tuple[dict[str, float], float]]:
        started = time.perf_counter()
        kinds = kinds or [None] * len(layer_sets)
        triples = [(name, layers, layer_kinds) for layers, layer_kinds in zip(layer_sets, kinds)
                   for name in self.evaluators]
        flat = self.runner.run_all([
            self._stage(name, layers, layer_kinds,
                        partial(worker_evaluation_stage, self.ctx.run, name, self.records, self.probes.get(name),
                                layers, layer_kinds), describe=describe_worker_score)
            for name, layers, layer_kinds in triples])
        # The workers score in parallel: each candidate is credited an equal share of the round's time.
        seconds = (time.perf_counter() - started) / len(layer_sets)
        per_target = len(self.evaluators)
        results = []
        for index, (layers, layer_kinds) in enumerate(zip(layer_sets, kinds)):
            span = slice(index * per_target, (index + 1) * per_target)
            values = {name: value for (name, _, _), value in zip(triples[span], flat[span])}
            results.append((self._scored(layers, layer_kinds, values), seconds))
        return results


def _guards(run: RunSpec, targets: Sequence[PreparedTarget]) -> list[TargetGuard]:
    """Every target as the search judges it, the primary first."""
    return [TargetGuard(target.name, target.scorer.direction, *run.tolerance_of(target.spec)) for target in targets]


def _search(ctx: RunContext, runner: StageRunner, records: Sequence[Mapping], probes: Mapping[str, Mapping],
            students: StudentChoice, targets: Sequence[PreparedTarget], log: Log) -> SearchOutcome:
    """The greedy search as one cached stage, its candidates as cached stages inside it."""
    run = ctx.run
    guards = _guards(run, targets)

    def search(folder: Path | None, stage_log: Log) -> dict:
        started = time.perf_counter()
        evaluators = {target.name: split_evaluator(ctx, students, target, "validation", run.search.prefix_reuse)
                      for target in targets}
        staged_class = RoundTargetsEvaluator if runner.distributed else TargetsEvaluator
        staged = staged_class(ctx, runner, evaluators, students, {guard.name: guard.direction for guard in guards},
                              records, probes, log)
        result = greedy_replace(ctx.teacher.adapter.num_layers, staged, run.search, guards, kinds=run.student.kinds)
        staged.progress.close()
        return SearchOutcome(result, sum(e.layer_forwards for e in evaluators.values()),
                             sum(e.layer_forwards_full for e in evaluators.values()),
                             time.perf_counter() - started).to_json()

    key = content_key("search", [evaluation_key(ctx, target.spec, records) for target in targets],
                      spec_to_dict(run.search), [asdict(guard) for guard in guards], code_version())
    return SearchOutcome.from_json(runner.run(Stage("search", "search", key, search, composite=True)))


def _test_scores(ctx: RunContext, students: StudentChoice, target: PreparedTarget, layer_sets: Mapping[str, Hybrid],
                 folder: Path | None, log: Log) -> dict[str, float]:
    """Test-split score of each named hybrid on one target (prefix reuse off: each distinct hybrid
    is run once)."""
    evaluator = split_evaluator(ctx, students, target, "test", prefix_reuse=False)
    distinct = list(dict.fromkeys(layer_sets.values()))
    progress = Progress(f"test scores ({target.name})", len(distinct), log, unit="layer sets")
    by_set = {}
    for layers, kinds in progress.track(distinct):
        students.choose(_kinds_map(layers, kinds))
        by_set[layers, kinds] = evaluator(frozenset(layers))
    return {name: by_set[hybrid] for name, hybrid in layer_sets.items()}


def _track_search(tracker: Tracker, outcome: SearchOutcome) -> None:
    """Per target: every evaluation's score as a series and the trajectory by linear layers; the
    evaluations with their layer sets as a table; search.json whole."""
    result = outcome.result
    for target in result.targets:
        tracker.log_series(f"search/{target.name}/evaluation_score",
                           [e.scores[target.name] for e in result.evaluations], 0)
        for step in result.trajectory:
            tracker.log_metrics({f"search/{target.name}/trajectory_score": step.scores[target.name]},
                                step=len(step.linear_layers))
    tracker.log_metrics({"search/layer_forwards": outcome.layer_forwards,
                         "search/layer_forwards_without_reuse": outcome.layer_forwards_without_reuse})
    tracker.log_text(evaluations_table(result), "search/evaluations.csv")
    tracker.log_text(json.dumps(outcome.to_json(), indent=1), "search/search.json")


def evaluations_table(result: SearchResult) -> str:
    """One CSV row per evaluation: round, layer count, layer set (and their kinds of student, when the
    search offered several), each target's score, seconds."""
    names = [target.name for target in result.targets]
    kinds = ["kinds"] if result.kinds else []
    rows = [",".join(["round", "linear_layers", "layer_set", *kinds, *names, "seconds"])]
    for e in result.evaluations:
        layer_set = '"' + " ".join(str(i) for i in e.linear_layers) + '"'
        layer_kinds = ['"' + " ".join(e.kinds) + '"'] if result.kinds else []
        rows.append(",".join([str(e.round), str(len(e.linear_layers)), layer_set, *layer_kinds,
                              *(f"{e.scores[name]:.6g}" for name in names), f"{e.seconds:.3f}"]))
    return "\n".join(rows) + "\n"


def _track_summary(tracker: Tracker, summary: RunSummary) -> None:
    for split, per_target in summary.scores.items():
        for target, scores in per_target.items():
            tracker.log_metrics({f"{split}/{target}/{name}": value for name, value in scores.items()})
    for entry in (summary.card or {}).get("entries", ()):
        tracker.log_metrics({f"card/{entry['name']}/{name}": value for name, value in entry["scores"].items()})
    tracker.log_metrics({"linear_layers": len(summary.linear_layers), "evaluations": summary.evaluations})
    tracker.log_metrics({f"seconds/{stage}": seconds for stage, seconds in summary.stage_seconds.items()})
    tracker.log_tags({"linear_layer_set": str(list(summary.linear_layers)), "export_dir": summary.export_dir})
    tracker.log_artifacts(summary.report_dir, "report")

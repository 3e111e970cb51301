"""The DtR stages as functions over a run's folder: capture → distill (per layer) → search → export.

Each stage reads its inputs from files written by the stage before and returns a small manifest,
so an orchestrator (the Prefect flow) can cache and fan them out; ``run_dtr`` runs them in order.

Folder layout under ``RunSpec.output_dir``::

    capture/            teacher activations (see capture.py); absent in stream mode
    checkpoints/        stream mode: the periodic checkpoints a killed run resumes from
    students/layer_NNN.safetensors + .json   distilled students and their curves
    target/probe.safetensors                  the frozen probe (classification targets)
    search/search.json                        every evaluation and the trajectory
    hybrid/                                   the exported Hugging Face folder
    report/                                   report.json, report.md, plots
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .capture import CaptureManifest, capture_teacher, load_layer_activations, tokenize_for_capture
from .distill import DistillResult, distill_layer
from .evaluation import GenerationEvaluator, PrefixCachingEvaluator
from .export import ExportManifest, export_hybrid
from .io import load_tensors, save_tensors, sha256_file, write_json
from .linear.build import student_from_teacher
from .linear.students import LinearAttentionStudent
from .search import SearchResult, greedy_replace
from .specs import PROMPTED_KINDS, RunSpec, spec_digest
from .streaming import ModeChoice, StreamResult, choose_mode, rank_and_world, stream_distill
from .targets.data import TaskData, load_task_data, read_text_files
from .targets.decoder_tasks import (
    ExactMatch,
    MultipleChoice,
    exact_match_for,
    tokenize_choices,
    tokenize_prompts,
)
from .targets.tasks import (
    LinearProbe,
    Perplexity,
    ProbeClassification,
    check_task_fits_model,
    fit_probe,
    tokenize_split,
)
from .teacher import Teacher, load_teacher, model_fingerprint


class OutputDirError(OSError):
    """The run's output folder cannot be used."""


@dataclass
class RunContext:
    """What every stage of one run shares: the spec, the loaded teacher and the task data."""

    run: RunSpec
    teacher: Teacher
    data: TaskData
    fingerprint: str

    @property
    def root(self) -> Path:
        return Path(self.run.output_dir)

    def stage_dir(self, name: str) -> Path:
        return self.root / name


def check_output_dir(path: str | Path) -> Path:
    """The output folder exists (or can be made) and is writable — checked before any heavy work."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputDirError(f"cannot create output folder {path}: {err.strerror}; choose another output_dir") from err
    if not os.access(path, os.W_OK):
        raise OutputDirError(f"output folder {path} is not writable; choose another output_dir")
    return path


def open_run(run: RunSpec) -> RunContext:
    """Validate the run and load what every stage needs; fails fast on bad data, model or folder."""
    check_output_dir(run.output_dir)
    data = load_task_data(run.target)
    teacher = load_teacher(run.model, device=run.device)
    check_task_fits_model(run.target, data, teacher.adapter.causal)
    return RunContext(run=run, teacher=teacher, data=data, fingerprint=model_fingerprint(teacher.model))


# --- capture -----------------------------------------------------------------------------------

def capture_texts(ctx: RunContext) -> list[str]:
    spec = ctx.run.capture
    if spec.source == "text_files":
        return read_text_files(spec.text_files, ctx.run.target.text_field)
    return list(ctx.data.train.texts)


def capture_source_digest(ctx: RunContext) -> str:
    """Identifies the distillation text: the task's data, or the text files' contents."""
    spec = ctx.run.capture
    if spec.source == "task_train":
        return ctx.data.fingerprint()
    return spec_digest([sha256_file(path) for path in spec.text_files])


def capture_stage(ctx: RunContext, out_dir: str | Path) -> CaptureManifest:
    spec = ctx.run.capture
    batches = tokenize_for_capture(ctx.teacher.tokenizer, capture_texts(ctx), spec, pack=ctx.teacher.adapter.causal)
    return capture_teacher(ctx.teacher.model, ctx.teacher.adapter, batches, spec, out_dir,
                           ctx.fingerprint, device=ctx.run.device)


# --- distill -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class StudentRecord:
    """One distilled layer: weights file + what its distillation measured."""

    layer_idx: int
    weights_file: str
    weights_sha256: str
    student_config: dict
    rel_error_init: float
    rel_error_final: float
    loss_curve: list[float]
    steps: int
    train_tokens: int
    seconds: float

    def to_json(self) -> dict:
        return asdict(self)


def new_student(ctx: RunContext, layer_idx: int) -> LinearAttentionStudent:
    adapter = ctx.teacher.adapter
    weights = adapter.read_attention_weights(ctx.teacher.model, layer_idx)
    return student_from_teacher(ctx.run.student, weights, causal=adapter.causal, seed=ctx.run.seed + layer_idx)


def write_student(student: LinearAttentionStudent, result: DistillResult, weights_file: str | Path) -> StudentRecord:
    """Writes ``weights_file`` and, beside it, the layer's record as ``.json`` (last)."""
    weights_file = Path(weights_file)
    digest = save_tensors(weights_file, result.state_dict)
    record = StudentRecord(
        layer_idx=result.layer_idx, weights_file=str(weights_file), weights_sha256=digest,
        student_config=student.config_dict(), rel_error_init=result.rel_error_init,
        rel_error_final=result.rel_error_final, loss_curve=result.loss_curve, steps=result.steps,
        train_tokens=result.train_tokens, seconds=result.seconds,
    )
    write_json(weights_file.with_suffix(".json"), record.to_json())
    return record


def describe_record(record: StudentRecord) -> str:
    return (f"layer {record.layer_idx}: relative error {record.rel_error_init:.3f} → {record.rel_error_final:.3f} "
            f"({record.seconds:.1f}s)")


def distill_stage(ctx: RunContext, capture: CaptureManifest, layer_idx: int, weights_file: str | Path) -> StudentRecord:
    """Distil one layer from the capture; writes its weights and record (see ``write_student``)."""
    student = new_student(ctx, layer_idx)
    result = distill_layer(student, load_layer_activations(capture, layer_idx), ctx.run.distill, layer_idx,
                           device=ctx.run.device)
    return write_student(student, result, weights_file)


def distill_mode(ctx: RunContext) -> ModeChoice:
    """Disk or stream for this run (see ``streaming.choose_mode``)."""
    return choose_mode(ctx.run.capture, ctx.teacher.adapter.num_layers, ctx.teacher.model.config.hidden_size,
                       world_size=rank_and_world()[1])


def stream_distill_stage(ctx: RunContext, students_dir: str | Path, checkpoint_root: str | Path,
                         log: Callable[[str], None] = print) -> tuple[list[StudentRecord], StreamResult]:
    """Every layer's student from the streamed teacher (see ``streaming.stream_distill``), resuming
    from ``checkpoint_root``. Rank 0 writes ``students_dir/layer_NNN.safetensors`` + ``.json`` per
    layer (as ``distill_stage``) and returns their records; other data-parallel ranks return none."""
    spec, adapter = ctx.run.capture, ctx.teacher.adapter
    texts = capture_texts(ctx)
    students = [new_student(ctx, layer_idx) for layer_idx in range(adapter.num_layers)]
    result = stream_distill(
        ctx.teacher.model, adapter, students,
        lambda: tokenize_for_capture(ctx.teacher.tokenizer, texts, spec, pack=adapter.causal),
        spec, ctx.run.distill, checkpoint_root, spec_digest(ctx.fingerprint, capture_source_digest(ctx)),
        device=ctx.run.device, log=log,
    )
    if rank_and_world()[0] != 0:
        return [], result
    records = [write_student(student, layer, Path(students_dir) / f"layer_{layer.layer_idx:03d}.safetensors")
               for student, layer in zip(students, result.layers)]
    return records, result


def load_student(record: StudentRecord, device: str | torch.device = "cpu",
                 dtype: str = "float32") -> LinearAttentionStudent:
    """The distilled student in the teacher's ``dtype`` (ModelSpec.dtype): it replaces one of its layers."""
    student = LinearAttentionStudent(**record.student_config)
    student.load_state_dict(load_tensors(record.weights_file, record.weights_sha256))
    return student.to(device=device, dtype=getattr(torch, dtype)).eval()


# --- target ------------------------------------------------------------------------------------

@dataclass
class PreparedTarget:
    scorer: ProbeClassification | Perplexity | MultipleChoice | ExactMatch
    validation: list[dict[str, torch.Tensor]]
    test: list[dict[str, torch.Tensor]]


def fit_probe_stage(ctx: RunContext, probe_file: str | Path) -> str:
    """Fit the frozen probe on the full model's train embeddings; returns the file's sha256."""
    probe = fit_probe(ctx.teacher.model, tokenize_split(ctx.teacher.tokenizer, ctx.data.train, ctx.run.target),
                      seed=ctx.run.target.seed, device=ctx.run.device)
    return save_tensors(probe_file, probe.to_tensors())


def prepare_target(ctx: RunContext, probe_file: str | Path | None = None, probe_sha256: str | None = None
                   ) -> PreparedTarget:
    """Tokenise validation/test once; classification loads the probe ``fit_probe_stage`` wrote."""
    spec, tokenizer, data = ctx.run.target, ctx.teacher.tokenizer, ctx.data
    if spec.kind in PROMPTED_KINDS:
        # Multiple choice scores prompt + answer rows; exact match generates after left-padded prompts.
        multiple_choice = spec.kind == "multiple_choice"
        tokenize = tokenize_choices if multiple_choice else tokenize_prompts
        scorer = MultipleChoice() if multiple_choice else exact_match_for(tokenizer, data, spec)
        return PreparedTarget(scorer, tokenize(tokenizer, data, data.validation, spec),
                              tokenize(tokenizer, data, data.test, spec))
    validation = tokenize_split(tokenizer, ctx.data.validation, spec)
    test = tokenize_split(tokenizer, ctx.data.test, spec)
    if spec.kind == "perplexity":
        return PreparedTarget(Perplexity(), validation, test)
    probe = LinearProbe.from_tensors(load_tensors(probe_file, probe_sha256))
    return PreparedTarget(ProbeClassification(probe), validation, test)


# --- search ------------------------------------------------------------------------------------

@dataclass
class SearchOutcome:
    result: SearchResult
    layer_forwards: int
    layer_forwards_without_reuse: int
    seconds: float

    def to_json(self) -> dict:
        return {"result": self.result.to_json(), "layer_forwards": self.layer_forwards,
                "layer_forwards_without_reuse": self.layer_forwards_without_reuse, "seconds": self.seconds}


def split_evaluator(ctx: RunContext, students: Mapping[int, LinearAttentionStudent], target: PreparedTarget,
                    batches: Sequence[Mapping[str, torch.Tensor]], prefix_reuse: bool
                    ) -> PrefixCachingEvaluator | GenerationEvaluator:
    """Scores hybrids on ``batches``: exact match generates, every other kind scores forward passes."""
    if ctx.run.target.kind == "exact_match":
        return GenerationEvaluator(ctx.teacher.model, ctx.teacher.adapter, students, batches, target.scorer,
                                   pad_token_id=ctx.teacher.tokenizer.pad_token_id, device=ctx.run.device)
    return PrefixCachingEvaluator(ctx.teacher.model, ctx.teacher.adapter, students, batches, target.scorer,
                                  prefix_reuse=prefix_reuse, device=ctx.run.device)


def candidate_evaluator(ctx: RunContext, students: Mapping[int, LinearAttentionStudent],
                        target: PreparedTarget) -> PrefixCachingEvaluator | GenerationEvaluator:
    return split_evaluator(ctx, students, target, target.validation, ctx.run.search.prefix_reuse)


def search_stage(ctx: RunContext, evaluator: PrefixCachingEvaluator | GenerationEvaluator, out_file: str | Path,
                 evaluate: Callable[[frozenset[int]], float] | None = None) -> SearchOutcome:
    """Greedy search; ``evaluate`` may wrap ``evaluator`` (e.g. with a per-evaluation cache)."""
    started = time.perf_counter()
    result = greedy_replace(ctx.teacher.adapter.num_layers, evaluate or evaluator, ctx.run.search,
                            higher_is_better=evaluator.scorer.higher_is_better)
    outcome = SearchOutcome(result, evaluator.layer_forwards, evaluator.layer_forwards_full,
                            time.perf_counter() - started)
    write_json(out_file, outcome.to_json())
    return outcome


def logged(evaluator: PrefixCachingEvaluator | GenerationEvaluator, log: Callable[[str], None],
           every: int = 10) -> Callable[[frozenset[int]], float]:
    """``evaluator`` for the search, logging every ``every``-th evaluation (a long search shows progress)."""
    started, count = time.perf_counter(), 0

    def evaluate(layers: frozenset[int]) -> float:
        nonlocal count
        score = evaluator(layers)
        count += 1
        if count % every == 0:
            log(f"search: {count} evaluations ({time.perf_counter() - started:.0f}s); "
                f"{len(layers)} linear {sorted(layers)} → {score:.4f}")
        return score

    if hasattr(evaluator, "rebase"):  # keep prefix reuse (see greedy_replace)
        evaluate.rebase = evaluator.rebase
    return evaluate


def test_scores(ctx: RunContext, students: Mapping[int, LinearAttentionStudent], target: PreparedTarget,
                layer_sets: Mapping[str, tuple[int, ...]]) -> dict[str, float]:
    """Test-split score of each named layer set (prefix reuse off: each is run once)."""
    evaluator = split_evaluator(ctx, students, target, target.test, prefix_reuse=False)
    return {name: evaluator(layers) for name, layers in layer_sets.items()}


# --- whole run ---------------------------------------------------------------------------------

@dataclass
class RunSummary:
    output_dir: str
    model: str
    family: str
    num_layers: int
    metric: str
    higher_is_better: bool
    exported: str  # "opt" or "best"
    linear_layers: tuple[int, ...]
    scores: dict[str, dict[str, float]]  # {"validation"|"test": {"full"|"m_opt"|"m_best": score}}
    m_opt: tuple[int, ...]
    m_best: tuple[int, ...]
    evaluations: int
    layer_forwards: int
    layer_forwards_without_reuse: int
    stage_seconds: dict[str, float]
    distillation: list[dict]
    capture_tokens: int
    export_dir: str
    report_dir: str
    search: dict

    def to_json(self) -> dict:
        return asdict(self)


def build_summary(ctx: RunContext, records: Sequence[StudentRecord], outcome: SearchOutcome,
                  target: PreparedTarget, tests: Mapping[str, float], export: ExportManifest, capture_tokens: int,
                  timings: Mapping[str, float], report_dir: str | Path) -> RunSummary:
    selection = outcome.result.selection
    return RunSummary(
        output_dir=str(ctx.root), model=ctx.teacher.path, family=ctx.teacher.adapter.family,
        num_layers=ctx.teacher.adapter.num_layers,
        metric=target.scorer.metric_name, higher_is_better=target.scorer.higher_is_better, exported=ctx.run.export.which, linear_layers=tuple(export.linear_layers),
        scores={
            "validation": {"full": outcome.result.full_score, "m_opt": selection.m_opt_score,
                           "m_best": selection.m_best_score},
            "test": dict(tests),
        },
        m_opt=selection.m_opt, m_best=selection.m_best, evaluations=len(outcome.result.evaluations),
        layer_forwards=outcome.layer_forwards, layer_forwards_without_reuse=outcome.layer_forwards_without_reuse,
        stage_seconds=dict(timings), distillation=[r.to_json() for r in records], capture_tokens=capture_tokens,
        export_dir=export.directory, report_dir=str(report_dir), search=outcome.to_json(),
    )


def run_dtr(run: RunSpec, log: Callable[[str], None] = print) -> RunSummary | None:
    """Every stage in order on one machine; returns (and reports) the summary.

    Under torchrun (stream mode, data-parallel) every rank distils; then ranks other than 0 return
    None and rank 0 runs the remaining stages alone.
    """
    from .report import write_report

    timings: dict[str, float] = {}

    def timed(name: str, fn, *args):
        started = time.perf_counter()
        value = fn(*args)
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - started
        return value

    ctx = timed("load", open_run, run)
    adapter = ctx.teacher.adapter
    log(f"teacher {ctx.teacher.path} ({adapter.family}, {adapter.num_layers} layers); data {ctx.data.source}")
    choice = distill_mode(ctx)
    log(f"distillation mode: {choice.mode} ({choice.reason})")
    if choice.mode == "stream":
        records, streamed = timed("distill", stream_distill_stage, ctx, ctx.stage_dir("students"),
                                  ctx.stage_dir("checkpoints"), log)
        if rank_and_world()[0] != 0:
            return None
        for record in records:
            log(describe_record(record))
        capture_tokens = streamed.tokens_per_pass
    else:
        capture = timed("capture", capture_stage, ctx, ctx.stage_dir("capture"))
        log(f"captured {capture.tokens} tokens ({capture.sequences} sequences) in {capture.seconds:.1f}s")
        records = []
        for layer_idx in range(adapter.num_layers):
            record = timed("distill", distill_stage, ctx, capture, layer_idx,
                           ctx.stage_dir("students") / f"layer_{layer_idx:03d}.safetensors")
            log(describe_record(record))
            records.append(record)
        capture_tokens = capture.tokens
    students = {r.layer_idx: load_student(r, run.device, run.model.dtype) for r in records}
    probe_file = ctx.stage_dir("target") / "probe.safetensors"
    probe_sha = timed("target", fit_probe_stage, ctx, probe_file) if run.target.kind == "classification" else None
    target = timed("target", prepare_target, ctx, probe_file, probe_sha)
    evaluator = candidate_evaluator(ctx, students, target)
    outcome = timed("search", search_stage, ctx, evaluator, ctx.stage_dir("search") / "search.json",
                    logged(evaluator, log))
    selection = outcome.result.selection
    log(f"search: {len(outcome.result.evaluations)} evaluations; M_opt {list(selection.m_opt)}, "
        f"M_best {list(selection.m_best)}")
    chosen = selection.m_opt if run.export.which == "opt" else selection.m_best
    tests = timed("test", test_scores, ctx, students, target,
                  {"full": (), "m_opt": selection.m_opt, "m_best": selection.m_best})
    export = timed("export", export_hybrid, ctx.teacher.model, adapter, ctx.teacher.tokenizer,
                   {i: students[i] for i in chosen}, ctx.stage_dir("hybrid"), run.export)
    summary = build_summary(ctx, records, outcome, target, tests, export, capture_tokens, timings,
                            report_dir=ctx.stage_dir("report"))
    write_report(summary, ctx.stage_dir("report"))
    return summary

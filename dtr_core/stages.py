"""What each DtR stage computes, and the content keys that identify its result.

``run.run_dtr`` puts these together in order and hands them to a ``StageRunner``. The stages that
may run on another process (capture, distillation, a Dask worker's evaluation) are module-level
functions of the ``RunSpec`` and small JSON values: each process loads the teacher and the task
data once (``run_context``) and keeps them for every stage it runs.
"""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from .adapters import UnsupportedModelError
from .card import ANSWER_ROOM, card_entries
from .capture import CaptureManifest, capture_teacher, load_layer_activations, mix_texts, tokenize_for_capture
from .distill import distill_layer
from .distributed import rank_and_world
from .evaluation import GenerationEvaluator, GenerationScorer, PrefixCachingEvaluator
from .io import load_tensors, save_tensors, sha256_file, write_json
from .linear.base import LinearAttentionStudent
from .linear.build import student_from_teacher
from .linear.students import build_student
from .locks import LockError
from .progress import Progress
from .runner import Log
from .search import SearchResult
from .specs import (
    GENERATION_KINDS,
    PROBE_KINDS,
    PROMPTED_KINDS,
    CaptureSpec,
    RunSpec,
    SpecError,
    TargetSpec,
    spec_digest,
    spec_to_dict,
)
from .stage_cache import code_version, content_key
from .streaming import ModeChoice, choose_mode, stream_distill
from .targets.data import DataError, TaskData, TextSplit, load_task_data, read_text_files
from .targets.decoder_tasks import (
    Contains,
    MultipleChoice,
    generation_scorer,
    prompt_batches,
    tokenize_choices,
    tokenize_prompts,
)
from .targets.lm_eval_target import LmEvalError, LmEvalEvaluator, LmEvalTask
from .targets.probes import ProbeExample, probe_examples, probe_max_new_tokens
from .targets.retrieval import Retrieval, retrieval_pairs, tokenize_retrieval
from .targets.tasks import (
    LinearProbe,
    Perplexity,
    ProbeClassification,
    check_task_fits_model,
    fit_probe,
    tokenize_split,
)
from .teacher import ModelLoadError, Teacher, check_model_path, load_teacher, model_fingerprint
from .training import CurveLogger, DistillResult


class OutputDirError(OSError):
    """The run's output folder cannot be used."""


# Bad input, each with a message that says what is wrong and what to do: entry points print the
# message alone (no traceback) and exit with status 2.
INPUT_ERRORS = (SpecError, DataError, ModelLoadError, UnsupportedModelError, OutputDirError, LmEvalError, LockError)


def check_output_dir(path: str | Path, option: str = "output_dir") -> Path:
    """The folder is writable, or can be made — checked before any heavy work, creating nothing (a run
    refused for bad input leaves nothing behind); ``option`` is the setting that named it, for the message."""
    path = Path(path).absolute()
    existing = next(folder for folder in (path, *path.parents) if folder.exists())
    if not existing.is_dir():
        raise OutputDirError(f"cannot create folder {path}: {existing} is a file; choose another {option}")
    if not os.access(existing, os.W_OK | os.X_OK):
        where = f"folder {path}" if existing == path else f"folder {path}: its parent {existing}"
        raise OutputDirError(f"{where} is not writable; choose another {option}")
    return path


def make_output_dir(path: str | Path, option: str = "output_dir") -> Path:
    """``check_output_dir``, then the folder made: where a run is about to write."""
    path = check_output_dir(path, option)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputDirError(f"cannot create folder {path}: {err.strerror}; choose another {option}") from err
    return path


# --- the loaded run ----------------------------------------------------------------------------

@dataclass
class RunContext:
    """What every stage of one run shares: the spec, the loaded teacher and every target's data."""

    run: RunSpec
    teacher: Teacher
    sources: dict[str, TargetSource]  # per target name, the primary first
    fingerprint: str
    general: TaskData | None = None  # capture.general_text, when capture.general_share > 0
    _card_sources: dict[TargetSpec, TargetSource] = field(default_factory=dict)
    _card_sources_lock: threading.Lock = field(default_factory=threading.Lock)

    def for_student_kind(self, kind: str) -> RunContext:
        """This context with the student spec narrowed to one of its kinds (each kind distils its own)."""
        return replace(self, run=replace(self.run, student=self.run.student.of_kind(kind)))

    @property
    def data(self) -> TaskData | None:
        """The primary target's data (its train split is the default distillation text)."""
        primary = self.sources[self.run.target.label]
        return primary if isinstance(primary, TaskData) else None

    def source(self, target: TargetSpec) -> TargetSource:
        """A run target's data, or (loaded on first use) that of a target built for the report's card."""
        if target in self.run.targets:
            return self.sources[target.label]
        with self._card_sources_lock:
            if target not in self._card_sources:
                self._card_sources[target] = load_target_source(target)
            return self._card_sources[target]


def check_inputs(run: RunSpec) -> tuple[dict[str, TargetSource], TaskData | None]:
    """The cheap part of ``open_run``: the output folder, every target's data, the distillation
    text and the model's folder; returns the targets' data (the primary first) and the general
    text. An orchestrator calls it before it starts anything, so bad input fails in seconds (the
    teacher itself is loaded, and checked, by ``open_run``)."""
    check_output_dir(run.output_dir)
    sources = {target.label: load_target_source(target) for target in run.targets}
    if run.capture.source == "task_train" and not isinstance(sources[run.target.label], TaskData):
        raise DataError(f"the primary target {run.target.label!r} is an lm-eval task, which brings no train text "
                        "to distil from; give capture.text_files (--text-files) or make another target primary")
    if run.capture.source == "text_files":
        read_text_files(run.capture.text_files, run.target.text_field)
    general = load_general_text(run.capture) if run.capture.general_share > 0 else None
    check_model_path(run.model.path)
    return sources, general


def open_run(run: RunSpec) -> RunContext:
    """Validate the run and load what every stage needs; fails fast on bad data, model or folder."""
    sources, general = check_inputs(run)
    teacher = load_teacher(run.model, device=run.device)
    outside = [i for i in run.search.candidate_layers or () if i >= teacher.adapter.num_layers]
    if outside:
        raise SpecError(f"SearchSpec.candidate_layers: {outside} are not layers of this teacher "
                        f"(0..{teacher.adapter.num_layers - 1})")
    for target in run.targets:
        check_target_fits(target, sources[target.label], teacher)
    ctx = RunContext(run=run, teacher=teacher, sources=sources, fingerprint=model_fingerprint(teacher.model),
                     general=general)
    if run.card.enabled and teacher.adapter.causal:
        for entry in card_entries(run, context_limit(teacher)):  # the card's data, checked before the work
            check_target_fits(entry.target, ctx.source(entry.target), teacher)
    return ctx


_contexts: dict[RunSpec, RunContext] = {}
_contexts_lock = threading.Lock()


def run_context(run: RunSpec) -> RunContext:
    """``open_run(run)``, once per process: stages on threads or on one Dask worker share it."""
    with _contexts_lock:
        if run not in _contexts:
            _contexts[run] = open_run(run)
        return _contexts[run]


def distill_mode(ctx: RunContext) -> ModeChoice:
    """Disk or stream for this run (see ``streaming.choose_mode``)."""
    return choose_mode(ctx.run.capture, ctx.teacher.adapter.num_layers, ctx.teacher.model.config.hidden_size,
                       world_size=rank_and_world()[1])


# --- content keys: what a stage's result depends on --------------------------------------------

def load_general_text(spec: CaptureSpec) -> TaskData:
    """The general text mixed into the distillation data (its train split is used)."""
    try:
        return load_task_data(TargetSpec(dataset=spec.general_text, kind="perplexity"))
    except DataError as error:
        raise DataError(f"capture.general_text={spec.general_text!r}: {error}") from None


def capture_texts(ctx: RunContext, log: Log) -> list[str]:
    """The distillation text: the task's train split or the text files, mixed with general text
    when ``capture.general_share`` > 0 (the mix is logged)."""
    spec = ctx.run.capture
    own = (read_text_files(spec.text_files, ctx.run.target.text_field) if spec.source == "text_files"
           else list(ctx.data.train.texts))
    if ctx.general is None:
        return own
    tokenizer = ctx.teacher.tokenizer
    mixed = mix_texts(own, ctx.general.train.texts, spec.general_share, spec.token_budget,
                      lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"]))
    log(f"distillation data: {mixed.describe(spec.general_text)}")
    return mixed.texts


def capture_source_digest(ctx: RunContext) -> str:
    """Identifies the distillation text: the task's data or the text files' contents, and the
    general text mixed in."""
    spec = ctx.run.capture
    own = (ctx.data.fingerprint() if spec.source == "task_train"
           else spec_digest([sha256_file(path) for path in spec.text_files]))
    return own if ctx.general is None else spec_digest(own, ctx.general.fingerprint())


def capture_key(ctx: RunContext) -> str:
    return content_key("capture", spec_to_dict(ctx.run.capture), capture_source_digest(ctx), ctx.fingerprint,
                       code_version())


def distill_key(ctx: RunContext, capture_key_: str, layer_idx: int) -> str:
    return content_key("distill", spec_to_dict(ctx.run.student), spec_to_dict(ctx.run.distill), capture_key_,
                       layer_idx, ctx.fingerprint, code_version())


def stream_distill_key(ctx: RunContext) -> str:
    return content_key("stream distill", spec_to_dict(ctx.run.student), spec_to_dict(ctx.run.distill),
                       spec_to_dict(ctx.run.capture), capture_source_digest(ctx), ctx.fingerprint, code_version())


def target_key(ctx: RunContext, target: TargetSpec) -> str:
    """A target's scores depend on how it is scored and on its data, not on its name or tolerance."""
    return content_key("target", target.scoring_dict(), ctx.source(target).fingerprint(), ctx.fingerprint,
                       code_version())


def evaluation_key(ctx: RunContext, target: TargetSpec, records: Sequence[Mapping]) -> str:
    """Scores depend on the target, the teacher and the students — not on tolerance or prefix reuse."""
    return content_key("evaluate", target_key(ctx, target), [r["weights_sha256"] for r in records],
                       ctx.fingerprint, code_version())


def candidate_key(ctx: RunContext, target: TargetSpec, records: Mapping[int, Mapping], linear_layers) -> str:
    """One candidate's score depends on the target, the teacher and the students of its own linear
    layers only (``records`` by layer): a layer distilled again, or a student of another kind there,
    leaves every candidate without that layer cached."""
    return content_key("evaluate", target_key(ctx, target),
                       [(i, records[i]["weights_sha256"]) for i in sorted(linear_layers)], ctx.fingerprint,
                       code_version())


def export_key(ctx: RunContext, records: Mapping[int, Mapping], linear_layers: Sequence[int]) -> str:
    return content_key("export", spec_to_dict(ctx.run.export), sorted(linear_layers),
                       [records[i]["weights_sha256"] for i in sorted(linear_layers)], ctx.fingerprint,
                       code_version())


# --- capture and distillation ------------------------------------------------------------------

def capture_stage(run: RunSpec, folder: Path, log: Log) -> dict:
    """Teacher activations for every layer into ``folder`` → the capture manifest (json)."""
    ctx = run_context(run)
    spec = run.capture
    batches = tokenize_for_capture(ctx.teacher.tokenizer, capture_texts(ctx, log), spec,
                                   pack=ctx.teacher.adapter.causal)
    # The data may end before the budget does: the budget is what the capture may reach.
    progress = Progress("capture", spec.token_budget, log, unit="tokens", bound=True)
    batches = progress.track(batches, size=lambda batch: int(batch["attention_mask"].sum()))
    return capture_teacher(ctx.teacher.model, ctx.teacher.adapter, batches, spec, folder, ctx.fingerprint,
                           device=run.device).to_json()


def describe_capture(manifest: Mapping) -> str:
    return f"{manifest['tokens']} tokens ({manifest['sequences']} sequences) in {manifest['seconds']:.1f}s"


def capture_files(manifest: Mapping) -> dict[str, str]:
    """Every shard of every layer (path → sha256): a cache hit on the capture checks them all, so a
    damaged shard is captured again rather than failing the distillation of its layer."""
    return {str(Path(manifest["directory"]) / shard["file"]): shard["sha256"]
            for shards in manifest["shards"].values() for shard in shards}


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
    train_tokens: int  # every pass counted
    seconds: float
    data_tokens: int  # distinct training tokens (training.TrainingPlan)
    token_budget: int

    def to_json(self) -> dict:
        return asdict(self)


def new_student(ctx: RunContext, layer_idx: int) -> LinearAttentionStudent:
    adapter = ctx.teacher.adapter
    weights = adapter.read_attention_weights(ctx.teacher.model, layer_idx)
    return student_from_teacher(ctx.run.student, weights, causal=adapter.causal, seed=ctx.run.seed + layer_idx)


def write_student(student: LinearAttentionStudent, result: DistillResult, weights_file: Path) -> StudentRecord:
    """Writes ``weights_file`` and, beside it, the layer's record as ``.json`` (last)."""
    digest = save_tensors(weights_file, result.state_dict)
    record = StudentRecord(
        layer_idx=result.layer_idx, weights_file=str(weights_file), weights_sha256=digest,
        student_config=student.config_dict(), rel_error_init=result.rel_error_init,
        rel_error_final=result.rel_error_final, loss_curve=result.loss_curve, steps=result.steps,
        train_tokens=result.train_tokens, seconds=result.seconds, data_tokens=result.data_tokens,
        token_budget=result.token_budget,
    )
    write_json(weights_file.with_suffix(".json"), record.to_json())
    return record


def describe_record(record: Mapping) -> str:
    return (f"relative error {record['rel_error_init']:.3f} → {record['rel_error_final']:.3f} "
            f"in {record['seconds']:.1f}s (process {os.getpid()})")


def record_files(record: Mapping) -> dict[str, str]:
    return {record["weights_file"]: record["weights_sha256"]}


def distill_stage(run: RunSpec, capture: Mapping, layer_idx: int, log_curve: CurveLogger, folder: Path,
                  log: Log) -> dict:
    """One layer's student from the capture → its StudentRecord (json); weights in ``folder``."""
    ctx = run_context(run)
    student = new_student(ctx, layer_idx)
    activations = load_layer_activations(CaptureManifest.from_json(capture), layer_idx)
    result = distill_layer(student, activations, run.distill, layer_idx, run.capture.token_budget, device=run.device,
                           log_curve=log_curve, log=log)
    return write_student(student, result, folder / "student.safetensors").to_json()


def stream_distill_stage(run: RunSpec, restart: bool, log_curve: CurveLogger, folder: Path, log: Log) -> dict | None:
    """Every layer's student (one per kind of ``run.student``) from the streamed teacher, resuming from
    ``folder/checkpoints`` (dropped first when ``restart``) → {"records": one StudentRecord json per
    student, kind-major, "tokens": distinct tokens streamed}. Under torchrun every rank trains; ranks
    other than 0 return None (nothing to record)."""
    ctx = run_context(run)
    if restart:
        shutil.rmtree(folder / "checkpoints", ignore_errors=True)
    adapter, spec = ctx.teacher.adapter, run.capture
    texts = capture_texts(ctx, log)
    kinds = run.student.kinds
    # Kind-major: every kind's students of layers 0..L-1, all trained on the same teacher pass.
    layers = [layer_idx for _ in kinds for layer_idx in range(adapter.num_layers)]
    students = [new_student(ctx.for_student_kind(kind), layer_idx)
                for kind in kinds for layer_idx in range(adapter.num_layers)]
    result = stream_distill(
        ctx.teacher.model, adapter, students,
        lambda: tokenize_for_capture(ctx.teacher.tokenizer, texts, spec, pack=adapter.causal),
        spec, run.distill, folder / "checkpoints", spec_digest(ctx.fingerprint, capture_source_digest(ctx)),
        device=run.device, log=log, log_curve=log_curve, layers=layers,
    )
    if rank_and_world()[0] != 0:
        return None
    def weights_file(student, layer_idx: int) -> Path:  # named by kind too when the layers have several
        return folder / f"{'' if len(kinds) == 1 else student.kind + '_'}layer_{layer_idx:03d}.safetensors"

    records = [write_student(student, layer, weights_file(student, layer.layer_idx))
               for student, layer in zip(students, result.layers)]
    return {"records": [r.to_json() for r in records], "tokens": result.tokens_per_pass}


def load_student(record: Mapping, device: str | torch.device, dtype: str) -> LinearAttentionStudent:
    """The distilled student in the teacher's ``dtype`` (ModelSpec.dtype): it replaces one of its layers."""
    student = build_student(record["student_config"])
    student.load_state_dict(load_tensors(record["weights_file"], record["weights_sha256"]))
    return student.to(device=device, dtype=getattr(torch, dtype)).eval()


class StudentChoice(Mapping):
    """Every layer's students, one per kind distilled, read as layer → the student of the kind chosen
    for that layer (``choose``; the first kind where none is chosen): what the hybrid being scored runs.
    With one kind, a plain mapping of its students."""

    def __init__(self, by_kind: Mapping[str, Mapping[int, LinearAttentionStudent]]) -> None:
        self.by_kind, self.first = by_kind, next(iter(by_kind))
        self.kinds: dict[int, str] = {}

    def choose(self, kinds: Mapping[int, str] | None) -> StudentChoice:
        """Read layer i as its student of kind ``kinds[i]`` from now on (None: the first kind everywhere)."""
        unknown = {kind for kind in (kinds or {}).values() if kind not in self.by_kind}
        if unknown:
            raise ValueError(f"no students of kind(s) {sorted(unknown)}; distilled: {list(self.by_kind)}")
        self.kinds = dict(kinds or {})
        return self

    def __getitem__(self, layer_idx: int) -> LinearAttentionStudent:
        return self.by_kind[self.kinds.get(layer_idx, self.first)][layer_idx]

    def __iter__(self):
        return iter(self.by_kind[self.first])

    def __len__(self) -> int:
        return len(self.by_kind[self.first])


def load_students(records: Sequence[Mapping], run: RunSpec) -> StudentChoice:
    """Every record's student on the run's device, in the teacher's dtype, by kind."""
    by_kind: dict[str, dict[int, LinearAttentionStudent]] = {}
    for r in records:
        by_kind.setdefault(r["student_config"]["kind"], {})[r["layer_idx"]] = load_student(r, run.device,
                                                                                           run.model.dtype)
    return StudentChoice(by_kind)


# --- the targets ---------------------------------------------------------------------------------

TargetSource = TaskData | LmEvalTask


def load_target_source(target: TargetSpec) -> TargetSource:
    """A target's data: its documents (lm-eval) or its texts and labels/answers (every other kind)."""
    if target.kind == "lm_eval":
        return LmEvalTask.from_spec(target)
    return load_task_data(target)


def check_target_fits(target: TargetSpec, source: TargetSource, teacher: Teacher) -> None:
    """Reject a target this teacher cannot be scored on, before any distillation."""
    if isinstance(source, TaskData):
        check_task_fits_model(target, source, teacher.adapter.causal)
    elif not teacher.adapter.causal:
        raise DataError(f"target {target.label!r}: kind 'lm_eval' needs a decoder; this teacher is an encoder")
    if target.kind in PROBE_KINDS:
        limit = context_limit(teacher)
        if limit is not None and target.context_tokens + ANSWER_ROOM > limit:
            raise DataError(f"target {target.label!r}: context_tokens={target.context_tokens} leaves no room for the "
                            f"answer within the teacher's context limit of {limit} tokens; use at most "
                            f"{limit - ANSWER_ROOM}")
        probe_split(teacher.tokenizer, target, source.validation, count=1)  # raises on a haystack too short


def context_limit(teacher: Teacher) -> int | None:
    """The longest sequence the teacher's position embeddings cover (None: not stated)."""
    config = teacher.model.config
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def fit_probe_stage(run: RunSpec, target_name: str, folder: Path, log: Log) -> dict:
    """A classification target's frozen probe, fit on the full model's train embeddings → {"file", "sha256"}."""
    ctx = run_context(run)
    target = target_named(run, target_name)
    batches = tokenize_split(ctx.teacher.tokenizer, ctx.source(target).train, target)
    progress = Progress(f"probe for {target_name}", len(batches), log, unit="train batches")
    probe = fit_probe(ctx.teacher.model, progress.track(batches), seed=target.seed, device=run.device)
    probe_file = folder / "probe.safetensors"
    return {"file": str(probe_file), "sha256": save_tensors(probe_file, probe.to_tensors())}


def target_named(run: RunSpec, name: str) -> TargetSpec:
    return next(target for target in run.targets if target.label == name)


Scorer = ProbeClassification | Retrieval | Perplexity | MultipleChoice | GenerationScorer | LmEvalTask


@dataclass
class PreparedTarget:
    """One target ready to score: its scorer and its validation and test data (tokenised batches,
    or for lm-eval the documents' indices)."""

    spec: TargetSpec
    scorer: Scorer
    validation: Sequence
    test: Sequence

    @property
    def name(self) -> str:
        return self.spec.label

    @property
    def generates(self) -> bool:
        return self.spec.kind in GENERATION_KINDS or self.spec.kind in PROBE_KINDS


def probe_split(tokenizer, target: TargetSpec, split: TextSplit, count: int) -> list[ProbeExample]:
    """A recall probe's examples, cut from ``split``'s texts (validation and test use their own)."""
    return probe_examples(target.kind, tokenizer, split.texts, context_tokens=target.context_tokens, count=count,
                          seed=target.seed)


def prepare_target(ctx: RunContext, target: TargetSpec, probe: Mapping | None) -> PreparedTarget:
    """Tokenise validation/test once; classification loads the probe ``fit_probe_stage`` wrote."""
    tokenizer, source = ctx.teacher.tokenizer, ctx.source(target)
    if target.kind == "lm_eval":
        return PreparedTarget(target, source, source.validation_indices, source.test_indices)
    if target.kind in PROBE_KINDS:
        # Scored like "contains": the probe's answer must appear in what the model writes.
        splits = [probe_split(tokenizer, target, getattr(source, name), target.num_examples)
                  for name in ("validation", "test")]
        scorer = Contains(tokenizer, probe_max_new_tokens(tokenizer, [e for split in splits for e in split]))
        validation, test = (prompt_batches([e.input_ids for e in split], [e.answers for e in split],
                                           tokenizer.pad_token_id, target.batch_size) for split in splits)
        return PreparedTarget(target, scorer, validation, test)
    if target.kind in PROMPTED_KINDS:
        # Multiple choice scores prompt + answer rows; the generation kinds generate after left-padded prompts.
        multiple_choice = target.kind == "multiple_choice"
        tokenize = tokenize_choices if multiple_choice else tokenize_prompts
        scorer = MultipleChoice() if multiple_choice else generation_scorer(tokenizer, source, target)
        return PreparedTarget(target, scorer, tokenize(tokenizer, source, source.validation, target),
                              tokenize(tokenizer, source, source.test, target))
    if target.kind == "retrieval":
        validation, test = (tokenize_retrieval(tokenizer, retrieval_pairs(getattr(source, name)), target)
                            for name in ("validation", "test"))
        return PreparedTarget(target, Retrieval(), validation, test)
    validation = tokenize_split(tokenizer, source.validation, target)
    test = tokenize_split(tokenizer, source.test, target)
    if target.kind == "perplexity":
        return PreparedTarget(target, Perplexity(), validation, test)
    probe_tensors = LinearProbe.from_tensors(load_tensors(probe["file"], probe["sha256"]))
    return PreparedTarget(target, ProbeClassification(probe_tensors), validation, test)


# --- evaluation ----------------------------------------------------------------------------------

TargetEvaluator = PrefixCachingEvaluator | GenerationEvaluator | LmEvalEvaluator


def split_evaluator(ctx: RunContext, students: Mapping[int, LinearAttentionStudent], target: PreparedTarget,
                    split: str, prefix_reuse: bool) -> TargetEvaluator:
    """Scores hybrids on ``target``'s ``split`` ("validation" or "test"): lm-eval tasks through
    lm-eval, the generation kinds by generating, every other kind from forward passes."""
    teacher, device = ctx.teacher, ctx.run.device
    data = getattr(target, split)
    if target.spec.kind == "lm_eval":
        return LmEvalEvaluator(teacher.model, teacher.adapter, students, teacher.tokenizer, target.scorer, data,
                               batch_size=target.spec.batch_size, device=device)
    if target.generates:
        return GenerationEvaluator(teacher.model, teacher.adapter, students, data, target.scorer,
                                   pad_token_id=teacher.tokenizer.pad_token_id, device=device)
    return PrefixCachingEvaluator(teacher.model, teacher.adapter, students, data, target.scorer,
                                  prefix_reuse=prefix_reuse, device=device)


_worker_evaluators: dict[tuple, tuple[StudentChoice, TargetEvaluator]] = {}
_worker_evaluators_lock = threading.Lock()


def worker_evaluation_stage(run: RunSpec, target_name: str, records: Sequence[Mapping], probe: Mapping | None,
                            linear_layers: frozenset[int], kinds: Mapping[int, str] | None, folder: Path,
                            log: Log) -> dict:
    """One candidate's validation score on one target with this process's own evaluator, built once
    from the stage files (no prefix reuse: hidden states are not shared between processes). ``kinds``:
    each linear layer's kind of student, when ``records`` hold several per layer."""
    evaluator_key = (run, target_name, tuple(r["weights_sha256"] for r in records), probe and probe["sha256"])
    # One lock for building and scoring: candidates swap modules in the process's one model.
    with _worker_evaluators_lock:
        if evaluator_key not in _worker_evaluators:
            ctx = run_context(run)
            target = prepare_target(ctx, target_named(run, target_name), probe)
            students = load_students(records, run)
            _worker_evaluators[evaluator_key] = students, split_evaluator(ctx, students, target, "validation",
                                                                          prefix_reuse=False)
        students, evaluator = _worker_evaluators[evaluator_key]
        students.choose(kinds)
        score, examples = evaluator.evaluate(linear_layers)
    return {"score": score, "examples": examples.to_json() if examples is not None else None}


def describe_worker_score(value: Mapping) -> str:
    return f"{value['score']:.4f} (process {os.getpid()})"


@dataclass
class SearchOutcome:
    result: SearchResult
    layer_forwards: int
    layer_forwards_without_reuse: int
    seconds: float

    def to_json(self) -> dict:
        return {"result": self.result.to_json(), "layer_forwards": self.layer_forwards,
                "layer_forwards_without_reuse": self.layer_forwards_without_reuse, "seconds": self.seconds}

    @classmethod
    def from_json(cls, data: Mapping) -> SearchOutcome:
        return cls(result=SearchResult.from_json(data["result"]), layer_forwards=data["layer_forwards"],
                   layer_forwards_without_reuse=data["layer_forwards_without_reuse"], seconds=data["seconds"])

"""One Prefect task per DtR stage. Each computes its explicit cache key, returns a cached manifest
when the stage already finished (here or in another run sharing the cache), and otherwise runs the
dtr_core stage and records its manifest."""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from dtr_core.capture import CaptureManifest
from dtr_core.evaluation import GenerationEvaluator, PrefixCachingEvaluator
from dtr_core.export import export_hybrid
from dtr_core.linear.students import LinearAttentionStudent
from dtr_core.pipeline import (
    RunContext,
    StudentRecord,
    capture_source_digest,
    capture_stage,
    describe_record,
    distill_stage,
    fit_probe_stage,
    load_student,
    open_run,
    prepare_target,
    split_evaluator,
    stream_distill_stage,
)
from dtr_core.specs import RunSpec, spec_to_dict

from .cache import StageCache, code_version, content_key

_contexts: dict[RunSpec, RunContext] = {}
_contexts_lock = threading.Lock()


def shared_context(run: RunSpec) -> RunContext:
    """The loaded teacher and data for ``run``, once per process (tasks in threads share it)."""
    with _contexts_lock:
        if run not in _contexts:
            _contexts[run] = open_run(run)
        return _contexts[run]


def capture_key(ctx: RunContext) -> str:
    return content_key("capture", spec_to_dict(ctx.run.capture), capture_source_digest(ctx), ctx.fingerprint,
                       code_version())


def distill_key(ctx: RunContext, capture: Mapping, layer_idx: int) -> str:
    return content_key("distill", spec_to_dict(ctx.run.student), spec_to_dict(ctx.run.distill), capture["key"],
                       layer_idx, ctx.fingerprint, code_version())


def stream_distill_key(ctx: RunContext) -> str:
    return content_key("stream distill", spec_to_dict(ctx.run.student), spec_to_dict(ctx.run.distill),
                       spec_to_dict(ctx.run.capture), capture_source_digest(ctx), ctx.fingerprint, code_version())


def target_key(ctx: RunContext) -> str:
    return content_key("target", spec_to_dict(ctx.run.target), ctx.data.fingerprint(), ctx.fingerprint,
                       code_version())


@task(name="capture", cache_policy=NO_CACHE)
def capture_task(run: RunSpec, cache: StageCache) -> dict:
    """Teacher activations for every layer → {"key", "manifest"}."""
    ctx = shared_context(run)
    key = capture_key(ctx)
    cached = cache.lookup("capture", key)
    logger = get_run_logger()
    if cached is not None:
        logger.info("capture: cache hit %s (%d tokens)", key[:12], cached["manifest"]["tokens"])
        return cached
    manifest = capture_stage(ctx, cache.folder("capture", key))
    logger.info("capture: %d tokens in %.1fs", manifest.tokens, manifest.seconds)
    return cache.store("capture", key, {"key": key, "manifest": manifest.to_json()})


@task(name="distill", task_run_name="distill layer {layer_idx}", cache_policy=NO_CACHE)
def distill_task(run: RunSpec, capture: dict, layer_idx: int, cache: StageCache) -> dict:
    """One layer's student → its StudentRecord (weights file + curve + relative errors)."""
    ctx = shared_context(run)
    key = distill_key(ctx, capture, layer_idx)
    cached = cache.lookup("distill", key)
    logger = get_run_logger()
    if cached is not None:
        logger.info("distill layer %d: cache hit %s", layer_idx, key[:12])
        return cached
    weights_file = cache.folder("distill", key) / "student.safetensors"
    record = distill_stage(ctx, CaptureManifest.from_json(capture["manifest"]), layer_idx, weights_file)
    logger.info("distill layer %d: relative error %.3f → %.3f in %.1fs (process %d)", layer_idx,
                record.rel_error_init, record.rel_error_final, record.seconds, os.getpid())
    return cache.store("distill", key, record.to_json(), files={record.weights_file: record.weights_sha256})


@task(name="stream distill", cache_policy=NO_CACHE)
def stream_distill_task(run: RunSpec, cache: StageCache) -> dict:
    """Every layer's student from the streamed teacher, as one task (the layers train together) →
    {"records": one StudentRecord json per layer, "tokens": distinct tokens streamed}.

    Run again after a kill, it resumes from its checkpoints; ``refresh=[distill]`` starts afresh.
    """
    ctx = shared_context(run)
    key = stream_distill_key(ctx)
    cached = cache.lookup("distill", key)
    logger = get_run_logger()
    if cached is not None:
        logger.info("stream distill: cache hit %s", key[:12])
        return cached
    folder = cache.folder("distill", key)
    if "distill" in cache.refresh:
        shutil.rmtree(folder / "checkpoints", ignore_errors=True)
    records, result = stream_distill_stage(ctx, folder, folder / "checkpoints", log=logger.info)
    for record in records:
        logger.info("stream distill %s", describe_record(record))
    value = {"records": [r.to_json() for r in records], "tokens": result.tokens_per_pass}
    return cache.store("distill", key, value, files={r.weights_file: r.weights_sha256 for r in records})


@task(name="fit probe", cache_policy=NO_CACHE)
def probe_task(run: RunSpec, cache: StageCache) -> dict:
    """The frozen classification probe, fit on the full model → {"file", "sha256", "key"}."""
    ctx = shared_context(run)
    key = target_key(ctx)
    cached = cache.lookup("target", key)
    if cached is not None:
        get_run_logger().info("probe: cache hit %s", key[:12])
        return cached
    probe_file = cache.folder("target", key) / "probe.safetensors"
    digest = fit_probe_stage(ctx, probe_file)
    return cache.store("target", key, {"file": str(probe_file), "sha256": digest, "key": key},
                       files={str(probe_file): digest})


def evaluation_key(ctx: RunContext, target: Mapping | None, records: Sequence[Mapping]) -> str:
    """Scores depend on the task, the teacher and the students — not on tolerance or prefix reuse."""
    return content_key("evaluate", target["key"] if target else target_key(ctx),
                       [r["weights_sha256"] for r in records], ctx.fingerprint, code_version())


def _cached_score(cache: StageCache, key: str, linear_layers: frozenset[int],
                  evaluator: PrefixCachingEvaluator | GenerationEvaluator) -> tuple[float, float]:
    """(score, seconds) of one candidate; a cached score costs nothing."""
    layers_key = content_key(key, sorted(linear_layers))
    cached = cache.lookup("evaluate", layers_key)
    if cached is not None:
        return cached, 0.0
    started = time.perf_counter()
    score = evaluator(linear_layers)
    return cache.store("evaluate", layers_key, score), time.perf_counter() - started


@task(name="evaluate", task_run_name="evaluate {label}", cache_policy=NO_CACHE)
def evaluate_task(evaluator: PrefixCachingEvaluator | GenerationEvaluator, linear_layers: frozenset[int], label: str,
                  key: str, cache: StageCache) -> tuple[float, float]:
    """Validation score of one candidate hybrid, in the flow's process (sharing its prefix cache)."""
    return _cached_score(cache, key, linear_layers, evaluator)


_worker_evaluators: dict[tuple, PrefixCachingEvaluator | GenerationEvaluator] = {}
_worker_evaluators_lock = threading.Lock()


def score_on_worker(run: RunSpec, records: Sequence[Mapping], probe: Mapping | None, linear_layers: frozenset[int],
                    key: str, cache: StageCache) -> tuple[float, float]:
    """Score with this process's own evaluator, built once from the stage files (no prefix reuse:
    hidden states are not shared between processes)."""
    evaluator_key = (run, tuple(r["weights_sha256"] for r in records), probe and probe["sha256"])
    # One lock for building and scoring: candidates swap modules in the process's one model.
    with _worker_evaluators_lock:
        if evaluator_key not in _worker_evaluators:
            ctx = shared_context(run)
            target = prepare_target(ctx, probe and probe["file"], probe and probe["sha256"])
            _worker_evaluators[evaluator_key] = split_evaluator(
                ctx, load_students(records, run), target, target.validation, prefix_reuse=False)
        return _cached_score(cache, key, linear_layers, _worker_evaluators[evaluator_key])


@task(name="evaluate on worker", task_run_name="evaluate {label}", cache_policy=NO_CACHE)
def evaluate_on_worker_task(run: RunSpec, records: Sequence[Mapping], probe: Mapping | None,
                            linear_layers: frozenset[int], label: str, key: str,
                            cache: StageCache) -> tuple[float, float]:
    """Validation score of one candidate hybrid on whichever worker the task runner picks."""
    score, seconds = score_on_worker(run, records, probe, linear_layers, key, cache)
    get_run_logger().info("evaluate %s: %.4f in %.1fs (process %d)", label, score, seconds, os.getpid())
    return score, seconds


@task(name="export", cache_policy=NO_CACHE)
def export_task(run: RunSpec, students: Mapping[int, LinearAttentionStudent], records: Mapping[int, Mapping],
                linear_layers: Sequence[int], cache: StageCache) -> dict:
    """The hybrid as a Hugging Face folder → ExportManifest json."""
    ctx = shared_context(run)
    key = content_key("export", spec_to_dict(run.export), sorted(linear_layers),
                      [records[i]["weights_sha256"] for i in sorted(linear_layers)], ctx.fingerprint, code_version())
    cached = cache.lookup("export", key)
    if cached is not None:
        get_run_logger().info("export: cache hit %s", key[:12])
        return cached
    folder = cache.folder("export", key)
    manifest = export_hybrid(ctx.teacher.model, ctx.teacher.adapter, ctx.teacher.tokenizer,
                             {i: students[i] for i in linear_layers}, folder, run.export)
    files = {str(Path(folder) / name): digest for name, digest in manifest.files.items()}
    return cache.store("export", key, manifest.to_json(), files=files)


def load_students(records: Sequence[Mapping], run: RunSpec) -> dict[int, LinearAttentionStudent]:
    """The stage's students on the run's device, in the teacher's dtype."""
    return {r["layer_idx"]: load_student(StudentRecord(**r), run.device, run.model.dtype) for r in records}

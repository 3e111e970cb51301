"""The DtR flow: capture → distill (one task per layer, fanned out) → greedy search (one task per
evaluation) → export → report, with MLflow tracking. In stream mode (``capture.mode``) one task
replaces capture and distill: the teacher streams and every layer trains together.

    python -m flows.dtr [hydra overrides]            one run
    python -m flows.dtr -m student=gla,gated_deltanet search.tolerance=0.01,0.05   a sweep
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from dtr_core.capture import CaptureManifest
from dtr_core.pipeline import (
    RunSummary,
    SearchOutcome,
    StudentRecord,
    build_summary,
    candidate_evaluator,
    check_output_dir,
    distill_mode,
    prepare_target,
    search_stage,
    test_scores,
)
from dtr_core.export import ExportManifest
from dtr_core.report import format_summary, write_report
from dtr_core.specs import RunSpec, SpecError
from flows.config import PipelineOptions, build_specs, compose
from tasks.cache import StageCache
from tasks.stages import (
    capture_task,
    distill_task,
    evaluate_on_worker_task,
    evaluate_task,
    evaluation_key,
    export_task,
    load_students,
    probe_task,
    shared_context,
    stream_distill_task,
)
from tasks.tracking import RunTracker


def task_runner_for(options: PipelineOptions, dask_address: str | None = None):
    """Threads, or Dask workers at ``dask_address`` (a cluster from ``dask_cluster``)."""
    if options.task_runner == "dask":
        from prefect_dask import DaskTaskRunner

        return DaskTaskRunner(address=dask_address or options.dask_address)
    from prefect.task_runners import ThreadPoolTaskRunner

    return ThreadPoolTaskRunner(max_workers=options.max_workers)


@contextmanager
def dask_cluster(options: PipelineOptions) -> Iterator[str | None]:
    """The scheduler address for this flow run: the configured one, or a local cluster started here
    (one per flow run, so workers keep the loaded teacher across stages) and closed at the end."""
    if options.task_runner != "dask" or options.dask_address:
        yield options.dask_address
        return
    from distributed import LocalCluster

    if options.dask_cluster == "cuda":
        try:
            from dask_cuda import LocalCUDACluster
        except ImportError as err:
            raise SpecError("runtime.dask_cluster=cuda needs dask-cuda: pip install -e '.[gpu]'") from err
        # One worker per visible GPU, each pinned to its own device.
        cluster = LocalCUDACluster(host="127.0.0.1", dashboard_address=None)
    else:
        cluster = LocalCluster(n_workers=options.dask_workers, threads_per_worker=1, host="127.0.0.1",
                               dashboard_address=None)
    with cluster:
        yield cluster.scheduler_address


@flow(name="distill layers")
def distill_layers(run: RunSpec, capture: dict, num_layers: int, cache: StageCache) -> list[dict]:
    """Every layer's distillation submitted at once to the task runner (threads or Dask workers)."""
    logger = get_run_logger()
    started = time.perf_counter()
    futures = [distill_task.submit(run, capture, layer_idx, cache) for layer_idx in range(num_layers)]
    records = []
    for done, future in enumerate(futures, start=1):
        records.append(future.result())
        elapsed = time.perf_counter() - started
        logger.info("distill: %d/%d layers done, ETA %.0fs", done, num_layers, elapsed / done * (num_layers - done))
    return records


@flow(name="evaluate candidates")
def evaluate_candidates(run: RunSpec, records: list[dict], probe: dict | None, layer_sets: list[frozenset[int]],
                        key: str, cache: StageCache) -> list[tuple[float, float]]:
    """One search round's candidates (independent of each other) scored in parallel on the workers."""
    futures = [evaluate_on_worker_task.submit(run, records, probe, layers, str(sorted(layers)), key, cache)
               for layers in layer_sets]
    return [future.result() for future in futures]


def run_stages(run: RunSpec, options: PipelineOptions, tracker: RunTracker | None) -> dict[str, Any]:
    """Wire the stage tasks; returns the run summary as JSON."""
    with dask_cluster(options) as address:
        runner = task_runner_for(options, address)
        return _run_stages(run, options, tracker, runner)


def _run_stages(run: RunSpec, options: PipelineOptions, tracker: RunTracker | None, runner) -> dict[str, Any]:
    logger = get_run_logger()
    logger.info("flow process %d, task runner %s", os.getpid(), options.task_runner)
    timings: dict[str, float] = {}
    cache = StageCache(options.cache_dir, options.refresh)
    started = time.perf_counter()
    ctx = shared_context(run)
    timings["load"] = time.perf_counter() - started
    num_layers = ctx.teacher.adapter.num_layers

    choice = distill_mode(ctx)
    logger.info("distillation mode: %s (%s)", choice.mode, choice.reason)
    if choice.mode == "stream":
        started = time.perf_counter()
        streamed = stream_distill_task(run, cache)
        records, capture_tokens = streamed["records"], streamed["tokens"]
        timings["distill"] = time.perf_counter() - started
    else:
        started = time.perf_counter()
        capture = capture_task(run, cache)
        capture_tokens = CaptureManifest.from_json(capture["manifest"]).tokens
        timings["capture"] = time.perf_counter() - started

        started = time.perf_counter()
        records = distill_layers.with_options(task_runner=runner)(run, capture, num_layers, cache)
        timings["distill"] = time.perf_counter() - started
    if tracker:
        tracker.log_distillation(records)

    started = time.perf_counter()
    probe = probe_task(run, cache) if run.target.kind == "classification" else None
    target = prepare_target(ctx, probe and probe["file"], probe and probe["sha256"])
    students = load_students(records, run)
    timings["target"] = time.perf_counter() - started

    started = time.perf_counter()
    evaluator = candidate_evaluator(ctx, students, target)
    key = evaluation_key(ctx, probe, records)
    total = num_layers * (num_layers + 1) // 2 + 1
    done = 0

    def report(layer_sets, results) -> None:
        nonlocal done
        for layers, (score, _) in zip(layer_sets, results):
            done += 1
            elapsed = time.perf_counter() - started
            logger.info("search: evaluation %d (at most %d) %s → %.4f; ETA at most %.0fs", done, total,
                        sorted(layers), score, elapsed / done * (total - done))

    def evaluate(linear_layers: frozenset[int]) -> float:
        result = evaluate_task(evaluator, linear_layers, str(sorted(linear_layers)), key, cache)
        report([linear_layers], [result])
        return result[0]

    def evaluate_round(layer_sets: list[frozenset[int]]) -> list[tuple[float, float]]:
        """Dask: a round's candidates are independent, so workers score them in parallel."""
        results = evaluate_candidates.with_options(task_runner=runner)(run, records, probe, layer_sets, key, cache)
        report(layer_sets, results)
        return results

    if hasattr(evaluator, "rebase"):  # a generation evaluator keeps no hidden states to move
        evaluate.rebase = evaluator.rebase
    if options.task_runner == "dask":
        evaluate.evaluate_round = evaluate_round
    outcome: SearchOutcome = search_stage(ctx, evaluator, Path(run.output_dir) / "search.json", evaluate)
    timings["search"] = time.perf_counter() - started
    if tracker:
        tracker.log_search(outcome)

    selection = outcome.result.selection
    chosen = selection.m_opt if run.export.which == "opt" else selection.m_best
    started = time.perf_counter()
    tests = test_scores(ctx, students, target, {"full": (), "m_opt": selection.m_opt, "m_best": selection.m_best})
    timings["test"] = time.perf_counter() - started
    started = time.perf_counter()
    export = ExportManifest(**export_task(run, students, {r["layer_idx"]: r for r in records}, chosen, cache))
    timings["export"] = time.perf_counter() - started

    report_dir = Path(run.output_dir) / "report"
    summary = build_summary(ctx, [StudentRecord(**r) for r in records], outcome, target, tests, export,
                            capture_tokens, timings, report_dir)
    write_report(summary, report_dir)
    if tracker:
        tracker.log_summary(summary, report_dir)
    logger.info("\n%s", format_summary(summary))
    return summary.to_json()


@flow(name="dtr")
def dtr_flow(overrides: list[str] | None = None, run_dir: str | None = None, sweep: str = "",
             config: dict[str, Any] | None = None, base_overrides: list[str] | None = None) -> dict[str, Any]:
    """Run DtR for a Hydra config given as overrides (e.g. ["student=gated_deltanet"]).

    ``base_overrides`` come first (a deployment's defaults), then the run's ``overrides``.
    ``config`` (already composed, as by ``python -m flows.dtr``) takes precedence over both.
    """
    from omegaconf import OmegaConf

    overrides = [*(base_overrides or []), *(overrides or [])]
    config = config or compose(overrides)
    run_dir = run_dir or str(Path(config["output_dir"]) / "runs" / datetime.now().strftime("%Y-%m-%d_%H-%M-%S-%f"))
    run, options = build_specs(config, run_dir)
    check_output_dir(run_dir)
    check_output_dir(options.cache_dir)
    if not options.tracking_enabled:
        return run_stages(run, options, None)
    tags = {"sweep": sweep, "overrides": " ".join(overrides or []), "run_dir": run_dir}
    with RunTracker(options.tracking_uri, options.experiment, Path(run_dir).name, tags) as tracker:
        tracker.log_config(config, OmegaConf.to_yaml(config))
        return run_stages(run, options, tracker)


def main() -> None:
    """Command line: hydra parses overrides (and -m sweeps); each job runs the flow."""
    import hydra
    from hydra.core.hydra_config import HydraConfig

    from omegaconf import OmegaConf

    @hydra.main(config_path="../conf", config_name="config", version_base="1.3")
    def job(cfg) -> None:
        hydra_cfg = HydraConfig.get()
        sweep = hydra_cfg.sweep.dir if hydra_cfg.mode.name == "MULTIRUN" else ""
        summary = dtr_flow(overrides=list(hydra_cfg.overrides.task), run_dir=hydra_cfg.runtime.output_dir,
                           sweep=sweep, config=OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True))
        print(format_summary(RunSummary(**summary)), flush=True)

    job()


if __name__ == "__main__":
    sys.exit(main())

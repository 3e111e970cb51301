"""The Prefect side of a run: every ``dtr_core`` stage as a Prefect task (composite stages, the
search, as a subflow), independent stages fanned out on the flow's task runner (threads or Dask)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from dtr_core.runner import Stage, execute_stage
from dtr_core.specs import SpecError
from dtr_core.stage_cache import StageCache

from .options import PipelineOptions


@task(cache_policy=NO_CACHE)
def stage_task(stage: Stage, cache: StageCache) -> Any:
    """One stage, cached by its own content key (Prefect's cache policies cannot identify a model)."""
    return execute_stage(stage, cache, get_run_logger().info)


@flow(validate_parameters=False)
def stage_subflow(stage: Stage, cache: StageCache) -> Any:
    """A stage that runs further stages inside it: its tasks then nest under it in the Prefect UI."""
    return execute_stage(stage, cache, get_run_logger().info)


@flow(validate_parameters=False)
def fan_out(stages: Sequence[Stage], cache: StageCache) -> list[Any]:
    """Independent stages submitted at once to the subflow's task runner."""
    futures = [stage_task.with_options(name=stage.name, task_run_name=stage.label).submit(stage, cache)
               for stage in stages]
    return [future.result() for future in futures]


class PrefectRunner:
    """``dtr_core.runner.StageRunner`` for the Prefect flow: call it inside a flow run."""

    def __init__(self, cache: StageCache, task_runner, distributed: bool) -> None:
        self.cache, self.task_runner, self.distributed = cache, task_runner, distributed

    def run(self, stage: Stage) -> Any:
        if stage.composite:
            return stage_subflow.with_options(name=stage.label)(stage, self.cache)
        return stage_task.with_options(name=stage.name, task_run_name=stage.label)(stage, self.cache)

    def run_all(self, stages: Sequence[Stage]) -> list[Any]:
        name = f"{stages[0].name} ×{len(stages)}" if stages else "nothing"
        return fan_out.with_options(name=name, task_runner=self.task_runner)(stages, self.cache)


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


@contextmanager
def prefect_runner(options: PipelineOptions) -> Iterator[PrefectRunner]:
    """The runner for one flow run, with its Dask cluster (when asked for) up while it is used."""
    with dask_cluster(options) as address:
        yield PrefectRunner(StageCache(options.cache_dir, options.refresh), task_runner_for(options, address),
                            distributed=options.task_runner == "dask")

"""How a run executes its stages: the ``Stage`` description, the runner interface, the plain runner.

``run.run_dtr`` writes the sequence of stages once and hands each ``Stage`` to a ``StageRunner``.
``PlainRunner`` (the command line) calls it in this process; the Prefect flow's runner
(``tasks/runner.py``) runs it as a Prefect task, on threads or Dask workers. Both go through
``execute_stage``, so a stage is cached, resumed and logged the same way from either entry point.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from .distributed import rank_and_world
from .stage_cache import StageCache

Log = Callable[[str], None]


def _no_files(value: Any) -> Mapping[str, str]:
    return {}


@dataclass(frozen=True)
class Stage:
    """One unit of work: ``compute(folder, log)`` writes its files inside ``folder`` and returns a
    JSON-serialisable value (the stage's manifest), or None when this process has nothing to record
    (a data-parallel rank other than 0).

    Stages handed to ``StageRunner.run_all`` may run in another process (Dask): their ``compute``
    must then be a module-level function bound to small picklable arguments (``functools.partial``).
    """

    name: str  # the cache folder, and what ``refresh`` names: one of stage_cache.STAGES, or "report"
    label: str  # what logs and the Prefect UI call this instance ("distill layer 3")
    key: str | None  # content key of everything the value depends on; None: not cached, always runs
    compute: Callable[[Path | None, Log], Any]
    files: Callable[[Any], Mapping[str, str]] = _no_files  # the files (path → sha256) the value points at
    describe: Callable[[Any], str] | None = None  # one log line about a computed value
    on_cached: Callable[[Any], None] | None = None  # what a cache hit still reports (e.g. a loss curve)
    quiet: bool = False  # one of many small stages (evaluations): no line per cache hit
    composite: bool = False  # runs further stages inside (the search): Prefect shows it as a subflow


def execute_stage(stage: Stage, cache: StageCache, log: Log) -> Any:
    """The stage's cached value when it finished before (here or in a run sharing the cache),
    otherwise its computed value, recorded in the cache.

    A miss takes the stage's lock and looks again, so of several runs (or threads) after the same
    stage and key one computes and the others wait, then read its result. Locks nest only from a
    composite stage (the search) to the stages it runs, which take none: no cycle, no deadlock.
    A cached result whose manifest or files are damaged is reported and computed again."""
    if stage.key is None:
        return stage.compute(None, log)
    cached = cache.lookup(stage.name, stage.key)
    if cached is None:
        with _stage_lock(stage, cache, log):
            cached = cache.lookup(stage.name, stage.key,
                                  warn=lambda problem: log(f"{stage.label}: WARNING: {problem}; computing it again"))
            if cached is None:
                return _compute(stage, cache, log)
    if not stage.quiet:
        log(f"{stage.label}: cache hit {stage.key[:12]}")
    if stage.on_cached is not None:
        stage.on_cached(cached)
    return cached


def _stage_lock(stage: Stage, cache: StageCache, log: Log) -> AbstractContextManager[None]:
    if rank_and_world()[1] > 1:
        # Under torchrun every rank runs the stage together: a rank waiting on the lock would leave
        # the others blocked in a collective. (Two torchrun groups on one key are not serialised.)
        return nullcontext()
    return cache.lock(stage.name, stage.key,
                      on_wait=lambda: log(f"{stage.label}: waiting for another run computing it"))


def _compute(stage: Stage, cache: StageCache, log: Log) -> Any:
    value = stage.compute(cache.folder(stage.name, stage.key), log)
    if value is None:
        return None
    if stage.describe is not None:
        log(f"{stage.label}: {stage.describe(value)}")
    return cache.store(stage.name, stage.key, value, files=dict(stage.files(value)))


class StageRunner(Protocol):
    """Executes the stages ``run_dtr`` hands it."""

    cache: StageCache
    # True when ``run_all`` runs stages in other processes: evaluations then cannot share the
    # in-process prefix cache, so each round's candidates are scored independently in parallel.
    distributed: bool

    def run(self, stage: Stage) -> Any:
        """One stage, in this process; returns its value."""

    def run_all(self, stages: Sequence[Stage]) -> list[Any]:
        """Independent stages, in parallel where the runner can; values in order."""


class PlainRunner:
    """Every stage a plain call in this process, one after the other."""

    distributed = False

    def __init__(self, cache: StageCache, log: Log = print) -> None:
        self.cache, self.log = cache, log

    def run(self, stage: Stage) -> Any:
        return execute_stage(stage, self.cache, self.log)

    def run_all(self, stages: Sequence[Stage]) -> list[Any]:
        return [self.run(stage) for stage in stages]

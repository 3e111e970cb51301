"""The stage runner contract (dtr_core/runner.py), the search's round trip through the cache, and
Direction: the pieces run_dtr is written against, without a model."""

import json

import pytest

from dtr_core.direction import Direction
from dtr_core.io import sha256_file
from dtr_core.runner import PlainRunner, Stage, execute_stage
from dtr_core.search import greedy_replace
from dtr_core.specs import SearchSpec
from dtr_core.stage_cache import StageCache
from dtr_core.stages import SearchOutcome


class Counted:
    """A stage body that writes one file and counts its calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, folder, log):
        self.calls += 1
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "out.txt").write_text("result")
        log("computing")
        return {"file": str(folder / "out.txt"), "sha256": sha256_file(folder / "out.txt")}


def stage_of(body, **extra):
    return Stage("capture", "capture", "k" * 64, body, files=lambda v: {v["file"]: v["sha256"]}, **extra)


def test_a_finished_stage_is_computed_once_and_then_read(tmp_path):
    body, lines, hits = Counted(), [], []
    stage = stage_of(body, describe=lambda v: "one file", on_cached=hits.append)
    first = execute_stage(stage, StageCache(tmp_path), lines.append)
    second = execute_stage(stage, StageCache(tmp_path), lines.append)
    assert first == second and body.calls == 1 and hits == [first]
    assert lines == ["computing", "capture: one file", f"capture: cache hit {'k' * 12}"]


def test_a_damaged_result_is_reported_and_computed_again(tmp_path):
    body, lines = Counted(), []
    value = execute_stage(stage_of(body), StageCache(tmp_path), lines.append)
    with open(value["file"], "a") as file:
        file.write("!")
    lines.clear()
    assert execute_stage(stage_of(body), StageCache(tmp_path), lines.append) == value and body.calls == 2
    assert lines[0].startswith("capture: WARNING: the cached result") and lines[0].endswith("; computing it again")
    assert "does not match its sha256" in lines[0]


def test_threads_after_one_stage_compute_it_once(tmp_path):
    """The flow's fan-outs run stages on threads: a second thread after the same stage and key
    waits for the first, then reads its result."""
    import threading
    import time

    class Slow(Counted):
        def __call__(self, folder, log):
            time.sleep(0.5)
            return super().__call__(folder, log)

    body, lines, values = Slow(), [], []
    threads = [threading.Thread(target=lambda: values.append(execute_stage(stage_of(body), StageCache(tmp_path),
                                                                            lines.append)))
               for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert body.calls == 1 and len(values) == 4 and all(v == values[0] for v in values)
    assert lines.count("capture: waiting for another run computing it") == 3
    assert len(StageCache(tmp_path).journal()) == 1


HOLD_LOCK = """
import sys, time
from dtr_core.stage_cache import StageCache
with StageCache(sys.argv[1]).lock("capture", "k" * 64):
    print("held", flush=True)
    time.sleep(600)
"""


def test_a_killed_run_does_not_hold_the_stage_forever(tmp_path):
    """A run killed while computing a stage leaves its lock to the kernel: the next run waits only
    while the first is alive, then computes the stage itself."""
    import subprocess
    import sys
    import threading

    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        body, lines = Counted(), []
        waiting = threading.Event()

        def log(line):
            lines.append(line)
            if "waiting" in line:
                waiting.set()

        runner = threading.Thread(target=execute_stage, args=(stage_of(body), StageCache(tmp_path), log))
        runner.start()
        assert waiting.wait(timeout=30) and body.calls == 0
    finally:
        holder.kill()
        holder.wait()
    runner.join(timeout=30)
    assert not runner.is_alive() and body.calls == 1


def test_a_cache_on_a_filesystem_without_locks_is_named(tmp_path, monkeypatch):
    """An NFS mount without a lock daemon answers flock with ENOLCK: one clear line, not a traceback
    from deep inside a stage (dtr_core.stages.INPUT_ERRORS holds LockError)."""
    import errno
    import fcntl

    from dtr_core.locks import LockError
    from dtr_core.stages import INPUT_ERRORS

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with pytest.raises(LockError, match=r"cannot lock .*k{64}\.lock \(No locks available\): its filesystem does "
                                        r"not support file locks \(flock\); use a folder on a local disk or on NFSv4"):
        execute_stage(stage_of(Counted()), StageCache(tmp_path), print)
    assert issubclass(LockError, INPUT_ERRORS)


def test_refresh_recomputes_and_quiet_stages_say_nothing_on_a_hit(tmp_path):
    body, lines = Counted(), []
    execute_stage(stage_of(body, quiet=True), StageCache(tmp_path), lines.append)
    execute_stage(stage_of(body, quiet=True), StageCache(tmp_path), lines.append)
    assert lines == ["computing"]
    execute_stage(stage_of(body), StageCache(tmp_path, frozenset({"capture"})), lines.append)
    assert body.calls == 2


def test_nothing_is_recorded_for_a_stage_that_returns_none(tmp_path):
    """A data-parallel rank other than 0 trains but records nothing: rank 0's manifest is the one."""
    stage = Stage("distill", "stream distill", "d" * 64, lambda folder, log: None)
    assert execute_stage(stage, StageCache(tmp_path), print) is None
    assert not (tmp_path / "distill" / f"{'d' * 64}.json").exists()


def test_uncached_stages_run_every_time_without_a_folder(tmp_path):
    folders = []
    stage = Stage("report", "report", None, lambda folder, log: folders.append(folder) or len(folders))
    runner = PlainRunner(StageCache(tmp_path), print)
    assert [runner.run(stage), runner.run(stage)] == [1, 2] and folders == [None, None]
    assert runner.run_all([stage, stage]) == [3, 4] and not runner.distributed
    assert not any(tmp_path.iterdir())


class Costs:
    def __call__(self, layers):
        return 1.0 - 0.01 * len(layers) - 0.1 * (0 in layers)

    def rebase(self, layers):
        pass


@pytest.mark.parametrize("direction", list(Direction))
def test_a_search_outcome_survives_the_cache(direction):
    result = greedy_replace(4, Costs(), SearchSpec(tolerance=0.5, run_to_end=True), direction)
    outcome = SearchOutcome(result, layer_forwards=7, layer_forwards_without_reuse=11, seconds=1.5)
    restored = SearchOutcome.from_json(json.loads(json.dumps(outcome.to_json())))
    assert restored == outcome and restored.result.selection == result.selection


def test_direction_orders_scores_both_ways():
    assert Direction.HIGHER.better(0.9, 0.8) and Direction.LOWER.better(30.0, 31.0)
    assert Direction.HIGHER.meets(0.8, 0.8) and not Direction.LOWER.meets(31.5, 31.0)
    assert Direction.HIGHER.best([0.1, 0.3]) == 0.3 and Direction.LOWER.best([30.0, 29.0]) == 29.0
    assert json.dumps(Direction.LOWER) == '"lower"' and Direction("higher").higher_is_better

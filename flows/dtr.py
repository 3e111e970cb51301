"""The DtR flow: composes the Hydra config and hands ``dtr_core.run.run_dtr`` a Prefect runner
(every stage a cached Prefect task, fanned out on threads or Dask) and an MLflow tracker.

    python -m flows.dtr [hydra overrides]            one run
    python -m flows.dtr -m student=gla,gated_deltanet search.tolerance=0.01,0.05   a sweep
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from dtr_core.io import point_symlink
from dtr_core.report import format_summary
from dtr_core.run import run_dtr
from dtr_core.stage_cache import content_key
from dtr_core.stages import INPUT_ERRORS, check_inputs, check_output_dir, make_output_dir
from flows.config import CONF_DIR, build_specs, compose, error_line
from flows.run_folders import register_resolvers
from tasks.runner import prefect_runner
from tasks.tracking import flatten, open_tracker, run_name_of

# <output_dir>/latest: the last successful run's exported hybrid, what the README loads.
LATEST = "latest"


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
    make_output_dir(run_dir)
    make_output_dir(options.cache_dir, "cache_dir")
    logger = get_run_logger()
    logger.info("flow process %d, task runner %s", os.getpid(), options.task_runner)
    tags = {"dtr.overrides": " ".join(overrides), "dtr.run_dir": run_dir}
    if sweep:  # the jobs of one sweep share it: the runs page groups by it
        tags["dtr.sweep"] = Path(sweep).name
    with (open_tracker(options, run_name_of(overrides), tags, resume_key=content_key("config", config)) as tracker,
          prefect_runner(options) as runner):
        tracker.log_params(flatten(config))
        tracker.log_text(OmegaConf.to_yaml(config), "config.yaml")
        summary = run_dtr(run, runner, tracker, log=logger.info)
    point_latest(config["output_dir"], summary.export_dir)
    logger.info("\n%s", format_summary(summary))
    return summary.to_json()


def point_latest(output_dir: str | Path, export_dir: str | Path) -> Path:
    """``<output_dir>/latest`` → ``export_dir``, switched at once (a reader never finds it missing)."""
    return point_symlink(Path(output_dir) / LATEST, export_dir)


class _DropRoutineRecords(logging.Filter):
    """Prefect logs "Finished in state Completed()" for every task and subflow (a third of a run's
    console lines), and bad input with its traceback, which the command line reports in one line;
    failures and every other state still show."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], INPUT_ERRORS):
            return False
        return not record.getMessage().startswith("Finished in state Completed")


def _warnings_only(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING


def quiet_console() -> None:
    """DtR's own lines at INFO, the libraries' routine chatter off. Hydra's job logging lets INFO
    through from every library: Prefect's client would log each API request through httpx (about
    40% of a run's lines); transformers draws a progress bar per load (MLflow: tasks/tracking.py)."""
    logging.getLogger("httpx").setLevel(logging.WARNING)
    # Prefect's own logger (not its run loggers, which carry DtR's lines): the temporary server's
    # start and stop.
    logging.getLogger("prefect").addFilter(_warnings_only)
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logging.getLogger(name).addFilter(_DropRoutineRecords())
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()


def preflight(config: dict[str, Any], run_dir: str) -> None:
    """Every check that needs no orchestration: the config's values, the folders, the data and the
    model's folder. Raises one of ``INPUT_ERRORS``."""
    run, options = build_specs(config, run_dir)
    check_inputs(run)
    check_output_dir(options.cache_dir, "cache_dir")


def remove_empty_parents(folder: str, top: str) -> None:
    """Remove the empty folders above ``folder``, up to ``top`` included: Hydra made them for a job that
    was refused before it ran (a folder holding anything, or outside ``top``, stays)."""
    top_path = Path(top).resolve()
    for parent in Path(folder).resolve().parents:
        if parent != top_path and top_path not in parent.parents:
            return
        try:
            parent.rmdir()
        except OSError:  # not empty
            return
        if parent == top_path:
            return


def main() -> None:
    """Command line: hydra parses overrides (and -m sweeps); each job checks its config and inputs,
    then runs the flow. Bad input ends the job before Prefect or MLflow start: one line on stderr,
    exit status 2, and the job's run folder removed. Bad input found later (the teacher lacks a
    candidate layer) ends it the same way, the run folder kept."""
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    register_resolvers()

    # An absolute path: a relative one is read against the caller's package when main() is called
    # from a module (a test, an entry point) rather than run as a script, and conf/ is no package.
    @hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
    def job(cfg) -> None:
        quiet_console()
        hydra_cfg = HydraConfig.get()
        sweep = hydra_cfg.sweep.dir if hydra_cfg.mode.name == "MULTIRUN" else ""
        run_dir = hydra_cfg.runtime.output_dir
        try:
            config = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
            preflight(config, run_dir)
        except (*INPUT_ERRORS, OmegaConfBaseException) as error:
            shutil.rmtree(run_dir, ignore_errors=True)  # Hydra made it for this job; nothing ran in it
            remove_empty_parents(run_dir, cfg.get("output_dir", "outputs"))
            fail(error)
        try:
            dtr_flow(overrides=list(hydra_cfg.overrides.task), run_dir=run_dir, sweep=sweep, config=config)
        except INPUT_ERRORS as error:
            fail(error)

    # Hydra prints its own config errors (an unknown key or option, a bad override) over several
    # lines and exits with status 1; told to raise them, it lets them become one line and status 2.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        job()
    except (HydraException, OmegaConfBaseException) as error:
        fail(error)


def fail(error: Exception) -> None:
    """Bad input's one line on stderr, exit status 2."""
    print(f"error: {error_line(error)}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    sys.exit(main())

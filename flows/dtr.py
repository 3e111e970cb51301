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

from dtr_core.report import format_summary
from dtr_core.run import run_dtr
from dtr_core.stages import INPUT_ERRORS, check_inputs, check_output_dir
from flows.config import build_specs, compose
from tasks.runner import prefect_runner
from tasks.tracking import flatten, open_tracker


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
    check_output_dir(options.cache_dir, "cache_dir")
    logger = get_run_logger()
    logger.info("flow process %d, task runner %s", os.getpid(), options.task_runner)
    tags = {"sweep": sweep, "overrides": " ".join(overrides), "run_dir": run_dir}
    with open_tracker(options, Path(run_dir).name, tags) as tracker, prefect_runner(options) as runner:
        tracker.log_params(flatten(config))
        tracker.log_text(OmegaConf.to_yaml(config), "config.yaml")
        summary = run_dtr(run, runner, tracker, log=logger.info)
    logger.info("\n%s", format_summary(summary))
    return summary.to_json()


class _DropRoutineStates(logging.Filter):
    """Prefect logs "Finished in state Completed()" for every task and subflow (a third of a run's
    console lines); failures and every other state still show."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Finished in state Completed")


def quiet_console() -> None:
    """DtR's own lines at INFO, the libraries' routine chatter off. Hydra's job logging lets INFO
    through from every library: Prefect's client would log each API request through httpx (about
    40% of a run's lines); transformers draws a progress bar per load (MLflow: tasks/tracking.py)."""
    logging.getLogger("httpx").setLevel(logging.WARNING)
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logging.getLogger(name).addFilter(_DropRoutineStates())
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()


def preflight(config: dict[str, Any], run_dir: str) -> None:
    """Every check that needs no orchestration: the config's values, the folders, the data and the
    model's folder. Raises one of ``INPUT_ERRORS``."""
    run, options = build_specs(config, run_dir)
    check_inputs(run)
    check_output_dir(options.cache_dir, "cache_dir")


def main() -> None:
    """Command line: hydra parses overrides (and -m sweeps); each job checks its config and inputs,
    then runs the flow. Bad input ends the job before Prefect or MLflow start: one line on stderr,
    exit status 2, and the job's run folder removed."""
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    @hydra.main(config_path="../conf", config_name="config", version_base="1.3")
    def job(cfg) -> None:
        quiet_console()
        hydra_cfg = HydraConfig.get()
        sweep = hydra_cfg.sweep.dir if hydra_cfg.mode.name == "MULTIRUN" else ""
        run_dir = hydra_cfg.runtime.output_dir
        config = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
        try:
            preflight(config, run_dir)
        except INPUT_ERRORS as error:
            shutil.rmtree(run_dir, ignore_errors=True)  # Hydra made it for this job; nothing ran in it
            print(f"error: {error}", file=sys.stderr)
            sys.exit(2)
        dtr_flow(overrides=list(hydra_cfg.overrides.task), run_dir=run_dir, sweep=sweep, config=config)

    job()


if __name__ == "__main__":
    sys.exit(main())

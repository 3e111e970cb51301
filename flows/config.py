"""Hydra config → dtr_core specs (validated) + the orchestration's own options."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dtr_core.specs import (
    CardSpec,
    CaptureSpec,
    DistillSpec,
    ExportSpec,
    ModelSpec,
    RunSpec,
    SearchSpec,
    StudentSpec,
    SpecError,
    TargetSpec,
    spec_from_dict,
)
from tasks.options import PipelineOptions

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def compose(overrides: list[str] | None = None) -> dict[str, Any]:
    """The resolved config for ``overrides`` (as on the command line), as a plain dict."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=list(overrides or []))
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)


def build_guard(entry: dict[str, Any], seed: int) -> TargetSpec:
    """One ``guards`` entry: TargetSpec fields, optionally on top of a ``conf/target`` option named
    by ``preset`` (e.g. ``{preset: passkey, context_tokens: 256}``)."""
    from omegaconf import OmegaConf

    fields = dict(entry)
    preset = fields.pop("preset", None)
    if preset is not None:
        path = CONF_DIR / "target" / f"{preset}.yaml"
        if not path.is_file():
            options = sorted(p.stem for p in (CONF_DIR / "target").glob("*.yaml"))
            raise SpecError(f"guards: preset {preset!r} is not a conf/target option; options are {options}")
        fields = {**OmegaConf.to_container(OmegaConf.load(path)), **fields}
    return spec_from_dict(TargetSpec, {"seed": seed, **fields})


def build_specs(cfg: dict[str, Any], run_dir: str) -> tuple[RunSpec, PipelineOptions]:
    """Validate every group into its spec; unknown keys and bad values raise SpecError naming them."""
    runtime, tracking = dict(cfg["runtime"]), dict(cfg["tracking"])
    run = RunSpec(
        model=spec_from_dict(ModelSpec, cfg["model"]),
        student=spec_from_dict(StudentSpec, cfg["student"]),
        capture=spec_from_dict(CaptureSpec, cfg["capture"]),
        distill=spec_from_dict(DistillSpec, {**cfg["distill"], "seed": cfg["seed"]}),
        search=spec_from_dict(SearchSpec, cfg["search"]),
        target=spec_from_dict(TargetSpec, {**cfg["target"], "seed": cfg["seed"]}),
        guards=tuple(build_guard(guard, cfg["seed"]) for guard in cfg.get("guards") or ()),
        card=spec_from_dict(CardSpec, cfg["card"]),
        export=spec_from_dict(ExportSpec, cfg["export"]),
        output_dir=run_dir,
        device=runtime.pop("device", "cpu"),
        seed=cfg["seed"],
    )
    root = Path(cfg["output_dir"])
    options = PipelineOptions(
        cache_dir=str(cfg["cache_dir"]),
        refresh=frozenset(cfg["refresh"]),
        task_runner=runtime.get("task_runner", "thread"),
        max_workers=int(runtime.get("max_workers", 1)),
        dask_address=runtime.get("dask_address"),
        dask_workers=int(runtime.get("dask_workers", 2)),
        dask_cluster=runtime.get("dask_cluster", "cpu"),
        tracking_enabled=bool(tracking["enabled"]),
        tracking_uri=tracking["tracking_uri"] or f"sqlite:///{(root / 'mlflow.db').resolve()}",
        experiment=tracking["experiment"],
    )
    return run, options

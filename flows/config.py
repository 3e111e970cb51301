"""Hydra config → dtr_core specs (validated) + the orchestration's own options."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

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
REMOTE_STORES = ("http", "https", "databricks")  # tracking URIs whose server decides where files go


def compose(overrides: list[str] | None = None) -> dict[str, Any]:
    """The resolved config for ``overrides`` (as on the command line), as a plain dict."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=list(overrides or []))
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)


def error_line(error: Exception) -> str:
    """One line for a config error, naming the key or option: Hydra's and OmegaConf's span several
    (search paths, hints); DtR's own are one line already."""
    from hydra.errors import HydraException, MissingConfigException
    from omegaconf import DictConfig
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

    cause = error.__cause__
    if isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and cause.full_key:  # an override of a missing key
        known = sorted(cause.parent_node) if isinstance(cause.parent_node, DictConfig) else []
        close = difflib.get_close_matches(str(cause.key), known, n=1)
        prefix = cause.full_key[:len(cause.full_key) - len(str(cause.key))]
        return (f"{cause.full_key}: no such config key" + (f" (did you mean {prefix}{close[0]}?)" if close else "")
                + (f"; {prefix.rstrip('.') or 'the config'} has {known}" if known else ""))
    if isinstance(error, MissingConfigException) and error.missing_cfg_file:
        group, _, option = error.missing_cfg_file.rpartition("/")
        return f"{group}={option}: no such option; conf/{group} has {sorted(error.options or [])}"
    if isinstance(error, (HydraException, OmegaConfBaseException)):  # a bad override, a missing value, …
        first = str(error).strip().splitlines()[0]
        named = getattr(error, "full_key", None) or getattr(error, "override", None)
        return f"{named}: {first}" if named else first
    return str(error)


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
    tracking_uri = tracking["tracking_uri"] or f"sqlite:///{(root / 'mlflow.db').resolve()}"
    options = PipelineOptions(
        cache_dir=str(cfg["cache_dir"]),
        refresh=frozenset(cfg["refresh"]),
        task_runner=runtime.get("task_runner", "thread"),
        max_workers=int(runtime.get("max_workers", 1)),
        dask_address=runtime.get("dask_address"),
        dask_workers=int(runtime.get("dask_workers", 2)),
        dask_cluster=runtime.get("dask_cluster", "cpu"),
        tracking_enabled=bool(tracking["enabled"]),
        tracking_uri=tracking_uri,
        experiment=tracking["experiment"],
        # A local store's default is ./mlruns of whatever folder the flow started in: keep the files
        # under output_dir beside the store instead. A tracking server keeps its own.
        artifact_location=None if urlparse(tracking_uri).scheme in REMOTE_STORES
        else (root / "mlartifacts").resolve().as_uri(),
    )
    return run, options

"""Write config.json (+ ``layer_types``), model.safetensors, tokenizer files and the modeling code.

The modeling code is ``dtr_core.linear`` without ``build.py``: ``modeling_dtr_hybrid.py`` with the
hybrid's class for this base architecture appended (``hybrid_class_source``), and the files it imports,
copied as they are. They import only torch, transformers, each other and (inside try) fla and Triton,
so the folder loads anywhere transformers does.
"""

from __future__ import annotations

import copy
import shutil
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from ..adapters import ModelAdapter
from ..hybrid import hybrid_view, layer_types
from ..io import sha256_file, staging_dir
from ..linear import modeling_dtr_hybrid
from ..specs import ExportSpec

FORMAT_VERSION = 1
MODELING_FILE = "modeling_dtr_hybrid.py"
# Copied next to the modeling file unchanged: everything it imports, directly or through each other.
COPIED_SOURCES = ("students.py", "base.py", "gla.py", "gated_deltanet.py", "feature_maps.py", "backends.py",
                  "cache.py", "kernels.py", "decoding.py", "window.py", "short_conv.py",
                  "prefill_graphs.py")


@dataclass(frozen=True)
class ExportManifest:
    directory: str
    linear_layers: tuple[int, ...]
    layer_types: tuple[str, ...]
    class_name: str
    auto_class: str
    files: dict[str, str]  # file name → sha256
    seconds: float

    def to_json(self) -> dict:
        return asdict(self)


def hybrid_class_source(class_name: str, base_class: type) -> str:
    """The class ``class_name`` that export appends to the modeling file for models of ``base_class`` (a
    transformers model class): the generation mixin only where the base class can generate."""
    mixin = (modeling_dtr_hybrid.DtrHybridGenerationMixin if hasattr(base_class, "generate")
             else modeling_dtr_hybrid.DtrHybridMixin)
    base = base_class.__name__
    return (f"\n\nclass {class_name}({mixin.__name__}, transformers.{base}):\n"
            f'    """DtR hybrid of transformers.{base}."""\n')


def _auto_class(model: nn.Module) -> str:
    return "AutoModelForCausalLM" if hasattr(model, "lm_head") else "AutoModel"


def export_hybrid(model: nn.Module, adapter: ModelAdapter, tokenizer, students: Mapping[int, nn.Module],
                  out_dir: str | Path, spec: ExportSpec) -> ExportManifest:
    """Write the hybrid (``model`` with ``students`` installed) to ``out_dir``, replacing it atomically.

    ``model`` itself is left as it was. ``tokenizer`` is saved beside it (None: no tokenizer files, as for
    the benchmarks' random-weight models).
    """
    started = time.perf_counter()
    out_dir = Path(out_dir)
    base_class = type(model).__name__
    class_name = f"DtrHybrid{base_class}"
    auto_class = _auto_class(model)
    linear_layers = tuple(sorted(students))
    types = tuple(layer_types(adapter.num_layers, linear_layers))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Staged beside the destination so the final rename stays on one filesystem (atomic).
    staging = staging_dir(out_dir.parent, prefix=f".{out_dir.name}.tmp-")
    try:
        with hybrid_view(model, adapter, students, linear_layers):
            config = copy.deepcopy(model.config)
            config.layer_types = list(types)
            config.dtr_hybrid = {
                "format_version": FORMAT_VERSION,
                "base_class": base_class,
                "base_layer_types": getattr(model.config, "layer_types", None),
                "students": [
                    {
                        "layer_idx": i,
                        "module_path": adapter.attention_path(model, i),
                        "student_type": students[i].kind,
                        "student_config": students[i].config_dict(),
                    }
                    for i in linear_layers
                ],
            }
            config.auto_map = {auto_class: f"{MODELING_FILE[:-3]}.{class_name}"}
            exported = copy.deepcopy(model).to(getattr(torch, spec.dtype))
            exported.config = config
            exported.save_pretrained(staging)
        source_dir = Path(modeling_dtr_hybrid.__file__).parent
        for name in COPIED_SOURCES:
            shutil.copyfile(source_dir / name, staging / name)
        modeling = (source_dir / MODELING_FILE).read_text() + hybrid_class_source(class_name, type(model))
        (staging / MODELING_FILE).write_text(modeling)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    files = {p.name: sha256_file(p) for p in sorted(out_dir.iterdir()) if p.is_file()}
    return ExportManifest(
        directory=str(out_dir), linear_layers=linear_layers, layer_types=types, class_name=class_name,
        auto_class=auto_class, files=files, seconds=time.perf_counter() - started,
    )

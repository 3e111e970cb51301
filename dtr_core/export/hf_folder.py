"""Write config.json (+ ``layer_types``), model.safetensors, tokenizer files and the modeling code.

The modeling code is four files: a generated ``modeling_dtr_hybrid.py`` that subclasses the base
model's transformers class, plus ``students.py``, ``ops.py`` and ``decoding.py`` copied from
``dtr_core.linear`` (they import only torch and transformers, and fla and Triton inside a try) — so the
folder loads anywhere transformers does.
"""

from __future__ import annotations

import copy
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from .. import linear
from ..adapters import ModelAdapter
from ..hybrid import hybrid_view, layer_types
from ..io import sha256_file
from ..specs import ExportSpec

FORMAT_VERSION = 1
MODELING_FILE = "modeling_dtr_hybrid.py"
COPIED_SOURCES = ("students.py", "ops.py", "decoding.py")

MODELING_TEMPLATE = '''"""DtR hybrid of {base_class}: linear-attention students in the layers listed in
``config.dtr_hybrid["students"]``, the base model's own attention everywhere else.

Written by DtR's export. Needs only torch and transformers (fla, if installed, speeds the students
up on CUDA); load with ``from_pretrained(folder, trust_remote_code=True)``.
"""

import copy
import importlib.util
import inspect

import torch
from transformers import {base_class} as _BaseModel
from transformers.cache_utils import DynamicCache

from .decoding import static_generate
from .students import LinearAttentionStudent, attends_globally, preallocated_cache


def _base_view(config):
    """The config as the base architecture expects it: its own ``layer_types`` (or none)."""
    base = copy.deepcopy(config)
    original = config.dtr_hybrid.get("base_layer_types")
    if original is None:
        if "layer_types" in base.__dict__:
            del base.layer_types
    else:
        base.layer_types = original
    return base


def _preferred_attention(dtype):
    """flash-attn 2 for the full-attention layers where it can run: installed, CUDA present and 16-bit
    weights requested; None leaves transformers' default (SDPA)."""
    half = (torch.float16, torch.bfloat16, "float16", "bfloat16")
    if importlib.util.find_spec("flash_attn") is None or not torch.cuda.is_available() or dtype not in half:
        return None
    return "flash_attention_2"


def _generation_cache(config, default_generation_config, args, kwargs):
    """The cache generate() starts from: preallocated for prompt + new tokens where every full-attention
    layer is global (a sliding window keeps transformers' own layers)."""
    if not attends_globally(config):
        return DynamicCache()
    generation_config = kwargs.get("generation_config") or default_generation_config
    prompt = kwargs.get("input_ids", args[0] if args and torch.is_tensor(args[0]) else None)
    new_tokens = kwargs.get("max_new_tokens", generation_config.max_new_tokens)
    if prompt is not None and new_tokens is not None:
        capacity = prompt.shape[-1] + new_tokens
    else:  # the total length, or unknown (0: the buffers grow as needed)
        capacity = kwargs.get("max_length", generation_config.max_length) or 0
    return preallocated_cache(config.num_hidden_layers, capacity)


class {class_name}(_BaseModel):
    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        # The students run on fla on CUDA; the full-attention layers get flash-attn when it is usable. An
        # explicit attn_implementation wins; config._attn_implementation records what was chosen.
        if "attn_implementation" not in kwargs:
            preferred = _preferred_attention(kwargs.get("dtype", kwargs.get("torch_dtype")))
            if preferred is not None:
                kwargs["attn_implementation"] = preferred
        return super().from_pretrained(*args, **kwargs)

    def __init__(self, config):
        # The base architecture is built from its own view of the config (Qwen2, for one, reads
        # layer_types to pick attention masks); the hybrid's config stays the model's public one.
        base = _base_view(config)
        super().__init__(base)
        # transformers resolved the attention implementation on the config the model was built
        # with; the public config must agree, since the top-level forward reads it for masks.
        config._attn_implementation = base._attn_implementation
        self.config = config
        for entry in config.dtr_hybrid["students"]:
            parent_path, _, name = entry["module_path"].rpartition(".")
            parent = self.get_submodule(parent_path) if parent_path else self
            student = LinearAttentionStudent(**entry["student_config"])
            student.layer_idx = entry["layer_idx"]
            setattr(parent, name, student)

    if hasattr(_BaseModel, "generate"):
        def generate(self, *args, **kwargs):
            # transformers would build the cache from config.layer_types and then fail to find a
            # sequence length when every layer is linear; our own cache lets each student put its
            # recurrent-state layer in (students.RecurrentStateLayer), and the full-attention layers
            # write into buffers sized for the prompt + new tokens instead of re-concatenating their
            # keys and values at every step (students.PreallocatedLayer).
            cache_arg = "cache" if "cache" in inspect.signature(super().forward).parameters else "past_key_values"
            if kwargs.get(cache_arg) is None and kwargs.get("use_cache", True):
                kwargs[cache_arg] = _generation_cache(self.config, self.generation_config, args, kwargs)
            return super().generate(*args, **kwargs)

        def generate_static(self, input_ids, max_new_tokens, **kwargs):
            """Generation for unpadded, equal-length prompts whose every decoding step, on CUDA, replays one
            captured CUDA graph (much faster at long context; decoding.static_generate has the options:
            do_sample, temperature, eos_token_id, pad_token_id, which default to the generation config's).
            Returns prompts + new tokens."""
            for name in ("eos_token_id", "pad_token_id"):
                kwargs.setdefault(name, getattr(self.generation_config, name, None))
            return static_generate(self, input_ids, max_new_tokens, **kwargs)
'''


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


def _auto_class(model: nn.Module) -> str:
    return "AutoModelForCausalLM" if hasattr(model, "lm_head") else "AutoModel"


def export_hybrid(model: nn.Module, adapter: ModelAdapter, tokenizer, students: Mapping[int, nn.Module],
                  out_dir: str | Path, spec: ExportSpec) -> ExportManifest:
    """Write the hybrid (``model`` with ``students`` installed) to ``out_dir``, replacing it atomically.

    ``model`` itself is left as it was.
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
    staging = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
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
        source_dir = Path(linear.__file__).parent
        for name in COPIED_SOURCES:
            shutil.copyfile(source_dir / name, staging / name)
        (staging / MODELING_FILE).write_text(MODELING_TEMPLATE.format(base_class=base_class, class_name=class_name))
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

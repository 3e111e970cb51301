"""Model-family adapters: where attention lives in a Hugging Face model and how to read it.

Each family gets one small adapter class; ``adapter_for`` picks it from ``config.model_type``.
Nothing here guesses module paths by string matching: every adapter names its modules explicitly.
Adding a family means writing its adapter and listing it in ``ADAPTERS``.
"""

from .base import AttentionWeights, ModelAdapter, UnsupportedModelError
from .bert import BertAdapter
from .gpt2 import GPT2Adapter
from .llama import LlamaLikeAdapter

ADAPTERS: tuple[type[ModelAdapter], ...] = (BertAdapter, GPT2Adapter, LlamaLikeAdapter)


def supported_model_types() -> dict[str, tuple[str, ...]]:
    """Family name → the ``config.model_type`` values it covers."""
    return {cls.family: cls.model_types for cls in ADAPTERS}


def adapter_for(model_or_config) -> ModelAdapter:
    """The adapter for a model (or its config); unknown families fail with the supported list."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    for cls in ADAPTERS:
        if model_type in cls.model_types:
            adapter = cls(config)
            adapter.check_supported()
            return adapter
    families = "; ".join(f"{cls.family} ({', '.join(cls.model_types)})" for cls in ADAPTERS)
    raise UnsupportedModelError(
        f"model_type {model_type!r} is not supported. Supported families: {families}. "
        "Adding a family means writing one adapter in dtr_core/adapters/ and listing it in ADAPTERS."
    )


__all__ = [
    "ADAPTERS",
    "AttentionWeights",
    "ModelAdapter",
    "UnsupportedModelError",
    "adapter_for",
    "supported_model_types",
]

"""Model-family adapters: where attention lives in a Hugging Face model and how to read it.

Each family gets one small adapter class; ``adapter_for`` picks it from ``config.model_type``.
Nothing here guesses module paths by string matching: every adapter names its modules explicitly.
"""

from .base import AttentionWeights, ModelAdapter, UnsupportedModelError, adapter_for, supported_model_types

__all__ = [
    "AttentionWeights",
    "ModelAdapter",
    "UnsupportedModelError",
    "adapter_for",
    "supported_model_types",
]

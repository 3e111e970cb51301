"""The adapter contract: what every model family's adapter says about its attention."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn


class UnsupportedModelError(ValueError):
    """The model's family has no adapter."""


@dataclass(frozen=True)
class AttentionWeights:
    """A teacher attention layer's projections, as ``nn.Linear`` weights (``[out, in]``).

    ``o_weight`` is None for families whose replaced module ends before the output projection
    (BERT's self-attention returns the per-head context; its output dense stays in the teacher).
    """

    q_weight: torch.Tensor  # [H*D, hidden]
    k_weight: torch.Tensor  # [H_kv*D, hidden]
    v_weight: torch.Tensor  # [H_kv*D, hidden]
    o_weight: torch.Tensor | None  # [hidden, H*D]
    q_bias: torch.Tensor | None
    k_bias: torch.Tensor | None
    v_bias: torch.Tensor | None
    o_bias: torch.Tensor | None
    num_heads: int
    num_kv_heads: int
    head_dim: int
    # The rotary embedding the layer's queries and keys get (None: the family has none): its inverse
    # frequencies [head_dim / 2] and the attention scaling its cos/sin are multiplied by.
    rotary_inv_freq: torch.Tensor | None = None
    rotary_scaling: float = 1.0

    @property
    def hidden_size(self) -> int:
        return self.q_weight.shape[1]

    def with_expanded_kv(self) -> AttentionWeights:
        """Repeat each K/V head for the query heads that share it (GQA → one K/V head per query head).

        Query head h uses K/V head h // (H / H_kv), as in ``repeat_kv`` of transformers' Llama.
        """
        groups = self.num_heads // self.num_kv_heads
        if groups == 1:
            return self

        def expand(tensor: torch.Tensor | None) -> torch.Tensor | None:
            if tensor is None:
                return None
            per_head = tensor.reshape(self.num_kv_heads, self.head_dim, *tensor.shape[1:])
            return per_head.repeat_interleave(groups, dim=0).reshape(-1, *tensor.shape[1:])

        return replace(
            self,
            k_weight=expand(self.k_weight),
            v_weight=expand(self.v_weight),
            k_bias=expand(self.k_bias),
            v_bias=expand(self.v_bias),
            num_kv_heads=self.num_heads,
        )


class ModelAdapter:
    """Where one family keeps its attention, and how to read it.

    Subclasses set ``family`` and ``model_types`` and implement the four locating methods.
    ``causal`` tells whether the teacher's attention is causal (decoders) or bidirectional.
    """

    family: str = ""
    model_types: tuple[str, ...] = ()

    def __init__(self, config) -> None:
        self.config = config

    @property
    def causal(self) -> bool:
        return True

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    def backbone(self, model: nn.Module) -> nn.Module:
        """The model without its task head (``model.base_model`` follows ``base_model_prefix``)."""
        return model.base_model

    def layer_stack(self, model: nn.Module) -> nn.ModuleList:
        raise NotImplementedError

    def attention_module(self, model: nn.Module, layer_idx: int) -> nn.Module:
        raise NotImplementedError

    def embedding_output_module(self, model: nn.Module) -> nn.Module:
        """The module whose output is the hidden state entering layer 0."""
        raise NotImplementedError

    def read_attention_weights(self, model: nn.Module, layer_idx: int) -> AttentionWeights:
        raise NotImplementedError

    def check_supported(self) -> None:
        """Raise UnsupportedModelError for configurations of the family the method cannot handle."""

    # Derived helpers shared by every family.
    def attention_path(self, model: nn.Module, layer_idx: int) -> str:
        """Dotted path of layer ``layer_idx``'s attention inside ``model`` (for export and swaps)."""
        target = self.attention_module(model, layer_idx)
        for name, module in model.named_modules():
            if module is target:
                return name
        raise LookupError(f"attention module of layer {layer_idx} is not inside the model")

    def check_layer_idx(self, layer_idx: int) -> None:
        if not 0 <= layer_idx < self.num_layers:
            raise IndexError(f"layer_idx={layer_idx} is outside 0..{self.num_layers - 1}")

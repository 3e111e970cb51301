"""BERT encoders (MiniLM): post-norm, bidirectional; the replaced unit is the self-attention.

BertSelfAttention returns the per-head context before the output dense, which stays with the
teacher's BertSelfOutput (dense + residual + LayerNorm); so the student has no output projection.
"""

from __future__ import annotations

from torch import nn

from .base import AttentionWeights, ModelAdapter, UnsupportedModelError


class BertAdapter(ModelAdapter):
    family = "bert"
    model_types = ("bert",)

    @property
    def causal(self) -> bool:
        return bool(getattr(self.config, "is_decoder", False))

    def check_supported(self) -> None:
        if getattr(self.config, "add_cross_attention", False):
            raise UnsupportedModelError("BERT with cross-attention is not supported; only self-attention")

    def layer_stack(self, model: nn.Module) -> nn.ModuleList:
        return self.backbone(model).encoder.layer

    def attention_module(self, model: nn.Module, layer_idx: int) -> nn.Module:
        self.check_layer_idx(layer_idx)
        return self.layer_stack(model)[layer_idx].attention.self

    def embedding_output_module(self, model: nn.Module) -> nn.Module:
        return self.backbone(model).embeddings

    def read_attention_weights(self, model: nn.Module, layer_idx: int) -> AttentionWeights:
        attn = self.attention_module(model, layer_idx)
        heads = self.config.num_attention_heads
        return AttentionWeights(
            q_weight=attn.query.weight.detach(),
            k_weight=attn.key.weight.detach(),
            v_weight=attn.value.weight.detach(),
            o_weight=None,
            q_bias=attn.query.bias.detach(),
            k_bias=attn.key.bias.detach(),
            v_bias=attn.value.bias.detach(),
            o_bias=None,
            num_heads=heads, num_kv_heads=heads, head_dim=self.config.hidden_size // heads,
        )

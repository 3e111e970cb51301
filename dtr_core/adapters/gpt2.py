"""GPT-2: fused Conv1D qkv projection (weights stored ``[in, out]``), learned positions."""

from __future__ import annotations

from torch import nn

from .base import AttentionWeights, ModelAdapter, UnsupportedModelError


class GPT2Adapter(ModelAdapter):
    family = "gpt2"
    model_types = ("gpt2",)

    def check_supported(self) -> None:
        if getattr(self.config, "add_cross_attention", False):
            raise UnsupportedModelError("GPT-2 with cross-attention is not supported; only self-attention")

    def layer_stack(self, model: nn.Module) -> nn.ModuleList:
        return self.backbone(model).h

    def attention_module(self, model: nn.Module, layer_idx: int) -> nn.Module:
        self.check_layer_idx(layer_idx)
        return self.layer_stack(model)[layer_idx].attn

    def embedding_output_module(self, model: nn.Module) -> nn.Module:
        # GPT2Model adds token and position embeddings inline; its dropout is the first module
        # that sees the sum.
        return self.backbone(model).drop

    def read_attention_weights(self, model: nn.Module, layer_idx: int) -> AttentionWeights:
        attn = self.attention_module(model, layer_idx)
        hidden = self.config.hidden_size
        # Conv1D computes x @ W + b with W [in, out]; nn.Linear wants [out, in].
        qkv_weight = attn.c_attn.weight.detach().t()
        qkv_bias = attn.c_attn.bias.detach()
        q_w, k_w, v_w = qkv_weight.split(hidden, dim=0)
        q_b, k_b, v_b = qkv_bias.split(hidden, dim=0)
        heads = self.config.num_attention_heads
        return AttentionWeights(
            q_weight=q_w, k_weight=k_w, v_weight=v_w,
            o_weight=attn.c_proj.weight.detach().t(),
            q_bias=q_b, k_bias=k_b, v_bias=v_b,
            o_bias=attn.c_proj.bias.detach(),
            num_heads=heads, num_kv_heads=heads, head_dim=hidden // heads,
        )

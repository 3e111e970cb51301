"""Llama-like decoders: Llama, Qwen2, Mistral (SmolLM2, Qwen2.5 and Llama 3 are in this family)."""

from __future__ import annotations

from torch import nn

from .base import AttentionWeights, ModelAdapter, UnsupportedModelError


class LlamaLikeAdapter(ModelAdapter):
    family = "llama-like"
    model_types = ("llama", "qwen2", "mistral")

    def check_supported(self) -> None:
        # Students read padding from the last query row of the 4D mask, which a sliding window
        # would also mask; refuse rather than silently treat old tokens as padding.
        cfg = self.config
        window = getattr(cfg, "sliding_window", None)
        window_used = cfg.model_type == "mistral" or getattr(cfg, "use_sliding_window", False)
        if window is not None and window_used:
            raise UnsupportedModelError(
                f"{cfg.model_type} with sliding_window={window} is not supported yet; set "
                "config.sliding_window=None if the checkpoint attends to its whole context."
            )

    def layer_stack(self, model: nn.Module) -> nn.ModuleList:
        return self.backbone(model).layers

    def attention_module(self, model: nn.Module, layer_idx: int) -> nn.Module:
        self.check_layer_idx(layer_idx)
        return self.layer_stack(model)[layer_idx].self_attn

    def embedding_output_module(self, model: nn.Module) -> nn.Module:
        return self.backbone(model).embed_tokens

    def read_attention_weights(self, model: nn.Module, layer_idx: int) -> AttentionWeights:
        attn = self.attention_module(model, layer_idx)
        cfg = self.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return AttentionWeights(
            q_weight=attn.q_proj.weight.detach(),
            k_weight=attn.k_proj.weight.detach(),
            v_weight=attn.v_proj.weight.detach(),
            o_weight=attn.o_proj.weight.detach(),
            q_bias=_bias(attn.q_proj),
            k_bias=_bias(attn.k_proj),
            v_bias=_bias(attn.v_proj),
            o_bias=_bias(attn.o_proj),
            num_heads=cfg.num_attention_heads,
            num_kv_heads=getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
            head_dim=head_dim,
            rotary_inv_freq=self.backbone(model).rotary_emb.inv_freq.detach(),
            rotary_scaling=float(self.backbone(model).rotary_emb.attention_scaling),
        )


def _bias(linear: nn.Linear):
    return None if linear.bias is None else linear.bias.detach()

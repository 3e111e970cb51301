"""Linear-attention students: drop-in replacements for one softmax attention module.

This file is copied unchanged next to every exported hybrid (with ``ops.py``), so it imports only
torch, transformers and its sibling ``ops``; it must never import dtr_core.

A student keeps the teacher's ``q_proj/k_proj/v_proj/o_proj`` names so teacher weights load
directly, and is called exactly like the attention module it replaces:
``student(hidden_states, attention_mask=..., cache=..., **ignored) -> (output, None)``.

Decoding: a causal student given a transformers ``Cache`` (``cache=``, or ``past_key_values=`` in
older transformers) continues from the recurrent state it left there and stores the new one, so a
linear layer's cache stays one fixed-size state however long the sequence grows.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from transformers.cache_utils import DynamicCache, DynamicLayer

from .ops import gated_delta, gla, gla_step_, needs_grad, resolve_backend, resolve_step_backend

# Per-step log-decay floor: keeps the chunked kernels in their stable range; a retention of
# exp(-8) ≈ 3e-4 per token already means "forget everything", so nothing useful is lost.
LOG_DECAY_FLOOR = -8.0
# Initial memory spans (tokens) of the decays, log-spaced across channels (GLA) or heads
# (Gated DeltaNet): a softmax teacher attends over the whole context, so most channels start
# with long memory while a few start local — distillation then tunes each.
INITIAL_SPAN_RANGE = (4.0, 4096.0)
# Gated DeltaNet's write strength beta = sigmoid(bias) starts at 0.5: half-overwriting keeps the
# delta rule stable from the first step while letting training move either way.
INITIAL_BETA_LOGIT = 0.0


def key_padding_mask(attention_mask: torch.Tensor | None, key_length: int) -> torch.Tensor | None:
    """Which of the last ``key_length`` positions are real tokens, as bool ``[B, key_length]``.

    Accepts what Hugging Face passes to attention modules: None (no padding), a 2D ``[B, T]`` mask
    of 1/0, or a 4D ``[B, 1, T_q, T_k]`` mask (bool: True = attend; float: 0 = attend). The last
    query row of a 4D mask sees every real key in both causal and bidirectional masks.
    """
    if attention_mask is None:
        return None
    if attention_mask.dim() == 4:
        row = attention_mask[:, 0, -1, :]
        valid = row if row.dtype == torch.bool else row == 0
    elif attention_mask.dim() == 2:
        valid = attention_mask.bool()
    else:
        raise ValueError(f"attention_mask must be 2D or 4D, got shape {tuple(attention_mask.shape)}")
    return valid[:, -key_length:]


class RecurrentStateLayer(DynamicLayer):
    """A transformers cache layer for a linear-attention layer: one recurrent state, no keys.

    It still counts the tokens it has seen, because transformers reads the sequence length (for
    positions and masks) from layer 0, which may be a linear layer.
    """

    def __init__(self) -> None:
        super().__init__()
        self.state: torch.Tensor | None = None
        self.seen_tokens = 0
        # Set by decoding.StaticDecoder: the student updates ``state`` where it lies (a captured CUDA graph
        # replays on that memory) and leaves the token count to the decoder.
        self.in_place = False

    def advance(self, state: torch.Tensor, num_tokens: int) -> None:
        self.state, self.seen_tokens = state, self.seen_tokens + num_tokens

    def get_seq_length(self, *args) -> int:
        return self.seen_tokens

    def update(self, *args, **kwargs):
        raise RuntimeError("a linear-attention layer keeps a recurrent state, not keys and values")

    def reset(self) -> None:
        self.state, self.seen_tokens = None, 0

    def crop(self, max_length: int) -> None:
        raise NotImplementedError("a recurrent state cannot be rolled back to an earlier length")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.state is not None:
            self.state = self.state.index_select(0, beam_idx.to(self.state.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.state is not None:
            self.state = self.state.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.state is not None:
            self.state = self.state[indices, ...]


class PreallocatedLayer(DynamicLayer):
    """A transformers cache layer for a full-attention layer that writes keys and values in place into
    buffers sized for the whole generation (``capacity`` tokens), instead of concatenating.

    DynamicLayer concatenates into new tensors at every step, so each step copies the layer's whole
    cache and briefly holds it twice; near full GPU memory that costs more than the attention itself.
    Here ``keys``/``values`` are views of the buffers' first ``length`` positions, so the DynamicLayer
    methods that read them (sequence length, mask sizes, crop) work unchanged. Going past the
    capacity doubles the buffers (one copy), so an underestimate costs memory, never correctness.
    """

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity
        self.key_buffer: torch.Tensor | None = None
        self.value_buffer: torch.Tensor | None = None
        # Set by decoding.StaticDecoder: a device tensor [1] holding the position the next token is written
        # to; update() then returns the whole buffers and the decoder keeps the lengths.
        self.write_position: torch.Tensor | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self.write_position is not None:
            self.key_buffer.index_copy_(2, self.write_position, key_states)
            self.value_buffer.index_copy_(2, self.write_position, value_states)
            return self.key_buffer, self.value_buffer
        length = self.get_seq_length()
        end = length + key_states.shape[-2]
        if self.key_buffer is None or end > self.key_buffer.shape[-2]:
            self._reserve(key_states, value_states, end)
        self.key_buffer[..., length:end, :].copy_(key_states)
        self.value_buffer[..., length:end, :].copy_(value_states)
        self._expose(end)
        return self.keys, self.values

    def _reserve(self, key_states: torch.Tensor, value_states: torch.Tensor, needed: int) -> None:
        length = self.get_seq_length()
        held = 0 if self.key_buffer is None else self.key_buffer.shape[-2]
        capacity = max(needed, self.capacity, 2 * held)
        buffers = []
        for old, new in ((self.key_buffer, key_states), (self.value_buffer, value_states)):
            buffer = new.new_empty((*new.shape[:-2], capacity, new.shape[-1]))
            if length:
                buffer[..., :length, :].copy_(old[..., :length, :])
            buffers.append(buffer)
        self.key_buffer, self.value_buffer = buffers

    def _expose(self, length: int) -> None:
        self.keys = self.key_buffer[..., :length, :]
        self.values = self.value_buffer[..., :length, :]
        self.is_initialized = True

    def _rebuild(self, transform) -> None:
        """Apply a batch-dimension ``transform`` to the buffers (the exposed views follow)."""
        if self.key_buffer is not None:
            length = self.get_seq_length()
            self.key_buffer, self.value_buffer = transform(self.key_buffer), transform(self.value_buffer)
            self._expose(length)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._rebuild(lambda buffer: buffer.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._rebuild(lambda buffer: buffer[indices, ...])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._rebuild(lambda buffer: buffer.index_select(0, beam_idx.to(buffer.device)))

    def reset(self) -> None:
        self.key_buffer = self.value_buffer = self.keys = self.values = None
        self.is_initialized = False


def attends_globally(config) -> bool:
    """Whether every attention layer of ``config`` sees all earlier tokens (no sliding window, no chunks):
    only then does a preallocated cache, which keeps every position, decode the model correctly."""
    hybrid = getattr(config, "dtr_hybrid", None) or {}
    types = hybrid.get("base_layer_types") or getattr(config, "layer_types", None) or ()
    windowed = getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True)
    return not windowed and all(kind in ("full_attention", "linear_attention") for kind in types)


def preallocated_cache(num_layers: int, capacity: int) -> DynamicCache:
    """A cache for ``capacity`` tokens (prompt + new tokens) whose full-attention layers write in place
    (PreallocatedLayer, allocated on first use); a student replaces its slot with its recurrent state."""
    cache = DynamicCache()
    cache.layers[:] = [PreallocatedLayer(capacity) for _ in range(num_layers)]
    return cache


def _state_layer(cache, layer_idx: int) -> RecurrentStateLayer:
    """This layer's slot in ``cache``, put there on first use.

    The slot a cache made for this index (a key/value layer, or transformers' own linear layer
    when built from a hybrid config) has not been written yet, so it is simply replaced.
    """
    while len(cache.layers) <= layer_idx:
        cache.layers.append(DynamicLayer())
    if not isinstance(cache.layers[layer_idx], RecurrentStateLayer):
        cache.layers[layer_idx] = RecurrentStateLayer()
    return cache.layers[layer_idx]


def _retention_logits(count: int, device=None) -> torch.Tensor:
    """Logits whose sigmoid is a per-token retention 1 - 1/span, spans log-spaced."""
    low, high = INITIAL_SPAN_RANGE
    spans = torch.logspace(math.log10(low), math.log10(high), count, device=device)
    retention = 1.0 - 1.0 / spans
    return torch.log(retention) - torch.log1p(-retention)


class LinearAttentionStudent(nn.Module):
    """One layer's linear-attention counterpart.

    Args:
        kind: "gla" (per-channel data-dependent decay; with positive features the readout is
            normalised like softmax: sum_s w_ts v_s / sum_s w_ts) or "gated_deltanet" (delta rule
            with per-head decay and write strength; L2-normalised q/k; RMS-normalised readout).
        hidden_size, num_heads, head_dim: the teacher's shapes (K/V heads already expanded).
        causal: decoder (True) or bidirectional encoder (False: forward + backward scans summed).
        feature_map: "hedgehog" — per head ``[softmax(xW), softmax(-xW)]`` with W initialised to
            the identity (positive, spiky like exp(q·k)); "identity" — the raw projections.
        gate_rank: rank of GLA's gate projection (hidden → rank → heads·key_dim).
        output_proj: whether the replaced module ends with an output projection.
        backend: operator backend, see ``ops.gla`` ("auto" picks fla on CUDA when installed).
    """

    def __init__(
        self,
        *,
        kind: str,
        hidden_size: int,
        num_heads: int,
        head_dim: int,
        causal: bool,
        feature_map: str = "hedgehog",
        gate_rank: int = 16,
        chunk_size: int = 32,
        qkv_bias: bool = False,
        output_proj: bool = True,
        o_bias: bool = False,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if kind not in ("gla", "gated_deltanet"):
            raise ValueError(f"kind={kind!r}: must be 'gla' or 'gated_deltanet'")
        if feature_map not in ("hedgehog", "identity"):
            raise ValueError(f"feature_map={feature_map!r}: must be 'hedgehog' or 'identity'")
        self.kind, self.causal, self.feature_map = kind, causal, feature_map
        self.num_heads, self.head_dim = num_heads, head_dim
        self.chunk_size, self.backend = chunk_size, backend
        # Position in the layer stack, set when the student is installed: names its cache slot.
        self.layer_idx: int | None = None
        # The operator backend the last forward ran ("fla", "chunked", ...), for benchmarks and tests.
        self.last_backend: str | None = None
        self._config = dict(
            kind=kind, hidden_size=hidden_size, num_heads=num_heads, head_dim=head_dim,
            causal=causal, feature_map=feature_map, gate_rank=gate_rank, chunk_size=chunk_size,
            qkv_bias=qkv_bias, output_proj=output_proj, o_bias=o_bias,
        )
        inner = num_heads * head_dim
        self.q_proj = nn.Linear(hidden_size, inner, bias=qkv_bias)
        self.k_proj = nn.Linear(hidden_size, inner, bias=qkv_bias)
        self.v_proj = nn.Linear(hidden_size, inner, bias=qkv_bias)
        self.o_proj = nn.Linear(inner, hidden_size, bias=o_bias) if output_proj else None

        if feature_map == "hedgehog":
            self.feature_weight = nn.Parameter(torch.eye(head_dim).repeat(num_heads, 1, 1))
            self.key_dim = 2 * head_dim
        else:
            self.key_dim = head_dim

        if kind == "gla":
            self.gate_down = nn.Linear(hidden_size, gate_rank, bias=False)
            self.gate_up = nn.Linear(gate_rank, num_heads * self.key_dim, bias=True)
            # Zero up-projection: gates start data-independent at the documented spans.
            nn.init.zeros_(self.gate_up.weight)
            with torch.no_grad():
                self.gate_up.bias.copy_(_retention_logits(self.key_dim).repeat(num_heads))
        else:
            self.decay_proj = nn.Linear(hidden_size, num_heads)
            self.beta_proj = nn.Linear(hidden_size, num_heads)
            nn.init.zeros_(self.decay_proj.weight)
            nn.init.zeros_(self.beta_proj.weight)
            with torch.no_grad():
                self.decay_proj.bias.copy_(_retention_logits(num_heads))
                self.beta_proj.bias.fill_(INITIAL_BETA_LOGIT)

        # GLA with positive features normalises like softmax; otherwise an RMS norm per head
        # (its weight learns the teacher's output scale).
        self.normalised_readout = kind == "gla" and feature_map == "hedgehog"
        if not self.normalised_readout:
            self.out_norm_weight = nn.Parameter(torch.ones(num_heads, head_dim))

    def config_dict(self) -> dict:
        """Constructor arguments (without backend), JSON-serialisable: rebuilds this student."""
        return dict(self._config)

    @torch.no_grad()
    def calibrate_readout_scale(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None) -> None:
        """Start an RMS-normalised readout at the teacher's output scale.

        Softmax attention outputs convex mixtures of value vectors, so per head its output has
        about the RMS of that head's values; a unit-RMS readout would start off by that factor.
        No-op for the softmax-like normalised GLA readout, which already mixes values.
        """
        if self.normalised_readout:
            return
        batch, length, _ = hidden_states.shape
        v = self.v_proj(hidden_states).view(batch, length, self.num_heads, self.head_dim)
        valid = key_padding_mask(attention_mask, length)
        values = v.reshape(-1, self.num_heads, self.head_dim) if valid is None else v[valid]
        rms = values.float().pow(2).mean(dim=(0, 2)).sqrt()  # [H]
        self.out_norm_weight.copy_(rms[:, None].expand_as(self.out_norm_weight))

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, H, D] → [B, T, H, key_dim]."""
        if self.feature_map == "identity":
            return x
        projected = torch.einsum("bthd,hde->bthe", x, self.feature_weight)
        return torch.cat([projected.softmax(-1), (-projected).softmax(-1)], dim=-1)

    def _scan(self, q, k, v, g, beta, reverse: bool = False, initial_state=None, output_final_state=False):
        if reverse:
            q, k, v, g = (t.flip(1) for t in (q, k, v, g))
            beta = None if beta is None else beta.flip(1)
        gated_delta_backward = self.kind == "gated_deltanet" and needs_grad(q, k, v, g, beta)
        self.last_backend = resolve_backend(self.backend, q, gated_delta_backward)
        state_kwargs = dict(backend=self.last_backend, chunk_size=self.chunk_size, initial_state=initial_state,
                            output_final_state=output_final_state)
        if self.kind == "gla":
            out, state = gla(q, k, v, g, scale=1.0, **state_kwargs)
        else:
            out, state = gated_delta(q, k, v, g, beta, scale=1.0, **state_kwargs)
        return (out.flip(1) if reverse else out), state

    def _step_in_place(self, q, k, v, g, beta, state: torch.Tensor) -> torch.Tensor:
        """One decoding token whose new state overwrites ``state`` (decoding.StaticDecoder)."""
        if q.shape[1] != 1:
            raise RuntimeError(f"a state updated in place advances one token per call; got {q.shape[1]}")
        if self.kind == "gla":
            wanted = "torch" if self.backend in ("recurrent", "chunked") else "auto"
            self.last_backend = resolve_step_backend(wanted, q, state)
            return gla_step_(q, k, v, g, 1.0, state, backend=self.last_backend)
        out, new_state = self._scan(q, k, v, g, beta, initial_state=state, output_final_state=True)
        state.copy_(new_state)
        return out

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                cache=None, past_key_values=None, **_ignored) -> tuple[torch.Tensor, None]:
        """hidden_states [B, T, hidden] → ([B, T, hidden or H*D], None), like HF attention.

        ``cache`` / ``past_key_values``: a transformers Cache (one name per transformers version);
        a causal student continues from its state there and stores the new one.
        """
        cache = cache if cache is not None else past_key_values
        if cache is not None and self.causal and self.layer_idx is None:
            raise RuntimeError("a student used with a cache needs its layer_idx (set when installed)")
        use_cache = cache is not None and self.causal
        batch, length, _ = hidden_states.shape
        heads, dim = self.num_heads, self.head_dim
        q = self._features(self.q_proj(hidden_states).view(batch, length, heads, dim))
        k = self._features(self.k_proj(hidden_states).view(batch, length, heads, dim))
        v = self.v_proj(hidden_states).view(batch, length, heads, dim)

        valid = key_padding_mask(attention_mask, length)
        if valid is not None:
            # A zero key writes nothing into the state, so padding never reaches real tokens.
            k = k * valid[:, :, None, None].to(k.dtype)

        if self.kind == "gla":
            g = F.logsigmoid(self.gate_up(self.gate_down(hidden_states)).float())
            g = g.view(batch, length, heads, self.key_dim).clamp_min(LOG_DECAY_FLOOR)
            beta = None
        else:
            q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
            g = F.logsigmoid(self.decay_proj(hidden_states).float()).clamp_min(LOG_DECAY_FLOOR)
            beta = torch.sigmoid(self.beta_proj(hidden_states).float())
        # One dtype for every kernel input: under autocast the projections come out in bf16 but
        # softmax features and normalised q/k in fp32, and fla's kernels need them to agree.
        q, k, g = q.to(v.dtype), k.to(v.dtype), g.to(v.dtype)
        beta = None if beta is None else beta.to(v.dtype)

        if self.normalised_readout:
            # An all-ones value column makes the same scan accumulate the normaliser sum_s w_ts.
            v = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)
        state_layer = _state_layer(cache, self.layer_idx) if use_cache else None
        if state_layer is not None and state_layer.in_place:
            out = self._step_in_place(q, k, v, g, beta, state_layer.state)
        else:
            out, state = self._scan(q, k, v, g, beta, output_final_state=use_cache,
                                    initial_state=None if state_layer is None else state_layer.state)
            if use_cache:
                state_layer.advance(state, length)
        if not self.causal:
            out = out + self._scan(q, k, v, g, beta, reverse=True)[0]

        if self.normalised_readout:
            out = out[..., :dim] / (out[..., dim:] + 1e-6)
        else:
            out = out * torch.rsqrt(out.pow(2).mean(-1, keepdim=True) + 1e-6) * self.out_norm_weight
        out = out.reshape(batch, length, heads * dim)
        if self.o_proj is not None:
            out = self.o_proj(out)
        return out, None

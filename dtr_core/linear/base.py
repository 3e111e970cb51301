"""What every linear-attention student shares: a drop-in replacement for one softmax attention module.

A student keeps the teacher's ``q_proj/k_proj/v_proj/o_proj`` names so teacher weights load
directly, and is called exactly like the attention module it replaces:
``student(hidden_states, attention_mask=..., cache=..., **ignored) -> (output, None)``.
The mechanisms (``gla.GLAStudent``, ``gated_deltanet.GatedDeltaNetStudent``) add their gates and scan;
``students.build_student`` rebuilds either from its ``config_dict()``.

Decoding: a causal student given a transformers ``Cache`` (``cache=``, or ``past_key_values=`` in
older transformers) continues from the recurrent state it left there (``cache.RecurrentStateLayer``)
and stores the new one, so a linear layer's cache stays one fixed-size state however long the
sequence grows.

Copied next to exported hybrids: imports only torch and its siblings, never dtr_core.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .backends import Output, resolve_backend
from .cache import state_layer
from .feature_maps import FEATURE_MAPS, feature_dim, hedgehog, initial_hedgehog_weight

# Per-step log-decay floor: keeps the chunked kernels in their stable range; a retention of
# exp(-8) ≈ 3e-4 per token already means "forget everything", so nothing useful is lost.
LOG_DECAY_FLOOR = -8.0
# Initial memory spans (tokens) of the decays, log-spaced across channels (GLA) or heads
# (Gated DeltaNet): a softmax teacher attends over the whole context, so most channels start
# with long memory while a few start local — distillation then tunes each.
INITIAL_SPAN_RANGE = (4.0, 4096.0)


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


def retention_logits(count: int, device=None) -> torch.Tensor:
    """[count] logits whose sigmoid is a per-token retention 1 - 1/span, spans log-spaced over
    ``INITIAL_SPAN_RANGE``."""
    low, high = INITIAL_SPAN_RANGE
    spans = torch.logspace(math.log10(low), math.log10(high), count, device=device)
    retention = 1.0 - 1.0 / spans
    return torch.log(retention) - torch.log1p(-retention)


class LinearAttentionStudent(nn.Module):
    """One layer's linear-attention counterpart; a mechanism subclass supplies its gates and scan.

    Args:
        hidden_size, num_heads, head_dim: the teacher's shapes (K/V heads already expanded).
        causal: decoder (True) or bidirectional encoder (False: forward + backward scans summed).
        feature_map: "hedgehog" (``feature_maps.hedgehog``, W initialised to the identity) or
            "identity" (the raw projections).
        gate_rank: rank of GLA's gate projection (recorded for every kind, so configs share keys).
        chunk_size: tokens per chunk of the pure-PyTorch chunked scan.
        qkv_bias, o_bias: whether the teacher's projections have biases.
        output_proj: whether the replaced module ends with an output projection.
        backend: operator backend, see ``gla.gla`` ("auto" picks fla on CUDA when installed).

    A subclass sets ``kind`` (its name in ``config_dict()``) and ``state_sums_writes``, and defines
    ``_build_gates`` (its parameters), ``_gates`` (their per-token values) and ``_operator`` (its
    scan); it may override ``_resolve_backend`` and ``_step_in_place``.
    """

    kind: str
    # Whether the state is a decayed sum of k^T v writes (no delta-rule corrections): only then does an
    # all-ones value column accumulate the normaliser sum_s w_ts of a softmax-like readout.
    state_sums_writes: bool

    def __init__(
        self,
        *,
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
        if feature_map not in FEATURE_MAPS:
            raise ValueError(f"feature_map={feature_map!r}: must be 'hedgehog' or 'identity'")
        self.causal, self.feature_map = causal, feature_map
        self.num_heads, self.head_dim = num_heads, head_dim
        self.chunk_size, self.backend = chunk_size, backend
        # Position in the layer stack, set when the student is installed: names its cache slot.
        self.layer_idx: int | None = None
        # The operator backend the last forward ran ("fla", "chunked", ...), for benchmarks and tests.
        self.last_backend: str | None = None
        self._config = dict(
            kind=self.kind, hidden_size=hidden_size, num_heads=num_heads, head_dim=head_dim,
            causal=causal, feature_map=feature_map, gate_rank=gate_rank, chunk_size=chunk_size,
            qkv_bias=qkv_bias, output_proj=output_proj, o_bias=o_bias,
        )
        # Parameters are created in a fixed order (projections, feature map, gates, readout): seeded
        # students draw their random initial values in that order, so it must not change.
        inner = num_heads * head_dim
        self.q_proj = nn.Linear(hidden_size, inner, bias=qkv_bias)
        self.k_proj = nn.Linear(hidden_size, inner, bias=qkv_bias)
        self.v_proj = nn.Linear(hidden_size, inner, bias=qkv_bias)
        self.o_proj = nn.Linear(inner, hidden_size, bias=o_bias) if output_proj else None
        if feature_map == "hedgehog":
            self.feature_weight = nn.Parameter(initial_hedgehog_weight(num_heads, head_dim))
        self.key_dim = feature_dim(feature_map, head_dim)
        self._build_gates(hidden_size, gate_rank)
        # A softmax-like normalised readout where the scan allows it with positive features; otherwise
        # an RMS norm per head (its weight learns the teacher's output scale).
        self.normalised_readout = self.state_sums_writes and feature_map == "hedgehog"
        if not self.normalised_readout:
            self.out_norm_weight = nn.Parameter(torch.ones(num_heads, head_dim))

    # ------------------------------------------------------------------ what a mechanism supplies

    def _build_gates(self, hidden_size: int, gate_rank: int) -> None:
        """Create the mechanism's own parameters (``self.key_dim`` and the projections exist)."""
        raise NotImplementedError

    def _gates(self, hidden_states: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        """hidden_states [B, T, hidden], q/k features [B, T, H, key_dim] → (q, k, gates): q and k as
        the scan reads them and the tuple of per-token gate tensors ``_operator`` takes after v."""
        raise NotImplementedError

    @staticmethod
    def _operator(q, k, v, gates, **kwargs) -> Output:
        """The mechanism's scan (e.g. ``gla.gla``) on q/k [B, T, H, K], v [B, T, H, V] and ``gates``;
        ``kwargs``: scale, backend, chunk_size, initial_state, output_final_state."""
        raise NotImplementedError

    def _resolve_backend(self, q, k, v, gates) -> str:
        """The backend a scan on these inputs runs."""
        return resolve_backend(self.backend, q)

    def _step_in_place(self, q, k, v, gates, state: torch.Tensor) -> torch.Tensor:
        """One decoding token whose new state overwrites ``state`` (a cache layer in static mode, see
        ``cache.RecurrentStateLayer``). Here by a scan whose new state is copied in; a mechanism with an
        in-place kernel overrides this."""
        out, new_state = self._scan(q, k, v, gates, initial_state=state, output_final_state=True)
        state.copy_(new_state)
        return out

    # ------------------------------------------------------------------ shared

    def config_dict(self) -> dict:
        """Constructor arguments (without backend) and ``kind``, JSON-serialisable: rebuilds this student
        through ``students.build_student``."""
        return dict(self._config)

    @torch.no_grad()
    def calibrate_readout_scale(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None) -> None:
        """Start an RMS-normalised readout at the teacher's output scale.

        Softmax attention outputs convex mixtures of value vectors, so per head its output has
        about the RMS of that head's values; a unit-RMS readout would start off by that factor.
        No-op for the softmax-like normalised readout, which already mixes values.

        Args:
            hidden_states: [B, T, hidden]. attention_mask: as ``forward`` takes it, or None.
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
        return hedgehog(x, self.feature_weight)

    def _scan(self, q, k, v, gates, reverse: bool = False, initial_state=None, output_final_state=False):
        """``_operator`` on the backend this call resolves to (recorded in ``last_backend``); ``reverse``
        scans from the last token to the first (the backward half of a bidirectional student)."""
        if reverse:
            q, k, v = (t.flip(1) for t in (q, k, v))
            gates = tuple(gate.flip(1) for gate in gates)
        self.last_backend = self._resolve_backend(q, k, v, gates)
        out, state = self._operator(q, k, v, gates, scale=1.0, backend=self.last_backend,
                                    chunk_size=self.chunk_size, initial_state=initial_state,
                                    output_final_state=output_final_state)
        return (out.flip(1) if reverse else out), state

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

        q, k, gates = self._gates(hidden_states, q, k)
        # One dtype for every kernel input: under autocast the projections come out in bf16 but
        # softmax features, normalised q/k and gates in fp32, and fla's kernels need them to agree.
        q, k = q.to(v.dtype), k.to(v.dtype)
        gates = tuple(gate.to(v.dtype) for gate in gates)

        if self.normalised_readout:
            # An all-ones value column makes the same scan accumulate the normaliser sum_s w_ts.
            v = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)
        layer = state_layer(cache, self.layer_idx) if use_cache else None
        if layer is not None and layer.in_place:
            if length != 1:
                raise RuntimeError(f"a state updated in place advances one token per call; got {length}")
            out = self._step_in_place(q, k, v, gates, layer.state)
        else:
            out, state = self._scan(q, k, v, gates, output_final_state=use_cache,
                                    initial_state=None if layer is None else layer.state)
            if use_cache:
                layer.advance(state, length)
        if not self.causal:
            out = out + self._scan(q, k, v, gates, reverse=True)[0]

        if self.normalised_readout:
            out = out[..., :dim] / (out[..., dim:] + 1e-6)
        else:
            out = out * torch.rsqrt(out.pow(2).mean(-1, keepdim=True) + 1e-6) * self.out_norm_weight
        out = out.reshape(batch, length, heads * dim)
        if self.o_proj is not None:
            out = self.o_proj(out)
        return out, None

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
import torch.nn.functional as F
from torch import nn

from . import kernels
from .backends import Output, needs_grad, resolve_backend, resolve_step_backend
from .cache import state_layer
from .feature_maps import FEATURE_MAPS, feature_dim, hedgehog, initial_hedgehog_weight
from .prefill_graphs import replayed_attend, replays_as_graph
from .short_conv import causal_conv, identity_kernel
from .window import (
    combine_normalised,
    history_or_zeros,
    lagged_queries,
    lagged_sequence,
    last_window,
    ring_lagged_queries,
    ring_softmax,
    rotary_tables,
    rotate,
    window_softmax,
    with_history,
)

# Per-step log-decay floor: keeps the chunked kernels in their stable range; a retention of
# exp(-8) ≈ 3e-4 per token already means "forget everything", so nothing useful is lost.
LOG_DECAY_FLOOR = -8.0
# Initial memory spans (tokens) of the decays, log-spaced across channels (GLA) or heads
# (Gated DeltaNet): a softmax teacher attends over the whole context, so most channels start
# with long memory while a few start local — distillation then tunes each.
INITIAL_SPAN_RANGE = (4.0, 4096.0)
# Inference calls over more tokens than this run a few batch rows at a time. A student's intermediates (features
# twice the head size, per-channel log-decays, the scan's chunk states) are several times its input: at batch 64 x
# 8K they lifted an L/2 hybrid's prompt peak above the full model's (68.7 against 57.3 GiB on an H200, BENCHMARKS.md
# issue 15), where the MLP's set it. 64K tokens is batch 8 x 8K, a shape the student's kernels already run at speed.
PREFILL_PIECE_TOKENS = 65536


def batch_rows(tensor: torch.Tensor | None, rows: slice, batch: int) -> torch.Tensor | None:
    """``tensor``'s ``rows`` when its first dimension is the batch's; as it is when None or broadcast over it."""
    return tensor[rows] if tensor is not None and tensor.shape[0] == batch else tensor


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
        window: W > 0 makes a sliding-window student (``window.py``): exact softmax attention over the
            last W tokens, the scan over every token before them, one readout; 0: the scan alone.
        rope: whether the window's queries and keys are rotated like the teacher's (its ``inv_freq`` is
            the ``rotary_inv_freq`` buffer, ``rope_scaling`` its attention scaling); the hybrid model
            passes its own ``position_embeddings``, which take precedence.
        short_conv: kernel size of causal depthwise convolutions on the scan's q/k/v (``short_conv.py``),
            initialised to the identity; 0: none.

    A subclass sets ``kind`` (its name in ``config_dict()``) and ``state_sums_writes``, and defines
    ``_build_gates`` (its parameters), ``_gates`` (their per-token values) and ``_operator`` (its
    scan) and ``_in_place_step`` (its decoding step on a state it overwrites); it may override
    ``_resolve_backend`` and define ``_kernel_scan`` with ``_kernel_gates``.
    """

    kind: str
    # Whether the state is a decayed sum of k^T v writes (no delta-rule corrections): only then does an
    # all-ones value column accumulate the normaliser sum_s w_ts of a softmax-like readout.
    state_sums_writes: bool
    # Whether the scan reads L2-normalised features (the delta rule needs unit keys).
    normalised_features: bool = False
    # Where the feature map, log-decays and readout run as fused Triton kernels (``kernels.py``): "auto" on
    # CUDA when no gradient is recorded (inference: prefill and decoding), "triton" always (the tests run
    # them in Triton's CPU interpreter), "torch" never. Not part of the config: it changes no result.
    prefill_kernels: str = "auto"
    # Whether a short call that starts a sequence replays as a CUDA graph on CUDA without gradients
    # (``prefill_graphs.py``): the host's time to issue the kernels bounds such calls. Changes no result.
    replay_prefill: bool = True
    # The mechanism's own Triton scan for prompts on the fused kernels, a method (q, k, v, gates, kernel_gates,
    # initial state, initial key sum, **options) with ``kernels.gla_prefill_triton``'s contract (the normaliser
    # apart, no value column, the readout on request): ``gates`` are ``_gates``' log-decays, or with
    # ``kernel_gates`` what ``_kernel_gates`` gives. None: ``_operator`` serves every call.
    _kernel_scan = None

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
        window: int = 0,
        rope: bool = False,
        rope_scaling: float = 1.0,
        short_conv: int = 0,
        kv_heads: int = 0,
    ) -> None:
        super().__init__()
        if feature_map not in FEATURE_MAPS:
            raise ValueError(f"feature_map={feature_map!r}: must be 'hedgehog' or 'identity'")
        if window < 0 or short_conv < 0 or short_conv == 1:
            raise ValueError(f"window={window}, short_conv={short_conv}: window must be >= 0 and short_conv "
                             "0 (none) or a kernel size >= 2")
        kv_heads = kv_heads or num_heads
        if kv_heads < 1 or num_heads % kv_heads:
            raise ValueError(f"kv_heads={kv_heads}: must divide num_heads={num_heads} (0: one per query head)")
        self.causal, self.feature_map = causal, feature_map
        self.window, self.rope, self.rope_scaling, self.short_conv = window, rope, rope_scaling, short_conv
        self.num_heads, self.head_dim = num_heads, head_dim
        # Query heads per key/value head: above 1, each group of query heads shares one K/V projection, as in a
        # GQA teacher (its projections cost what the teacher's do); the keys and values are repeated per query
        # head right after the projections, so everything after them sees one K/V head per query head, except on
        # the kernels that read the shared heads themselves (``_shares_kv_in_kernels``).
        self.kv_groups = num_heads // kv_heads
        self.chunk_size, self.backend = chunk_size, backend
        # Position in the layer stack, set when the student is installed: names its cache slot.
        self.layer_idx: int | None = None
        # The operator backend the last forward ran ("fla", "chunked", ...), for benchmarks and tests.
        self.last_backend: str | None = None
        self._config = dict(
            kind=self.kind, hidden_size=hidden_size, num_heads=num_heads, head_dim=head_dim,
            causal=causal, feature_map=feature_map, gate_rank=gate_rank, chunk_size=chunk_size,
            qkv_bias=qkv_bias, output_proj=output_proj, o_bias=o_bias,
            window=window, rope=rope, rope_scaling=rope_scaling, short_conv=short_conv, kv_heads=kv_heads,
        )
        # Parameters are created in a fixed order (projections, feature map, gates, readout): seeded
        # students draw their random initial values in that order, so it must not change.
        inner = num_heads * head_dim
        self.q_proj = nn.Linear(hidden_size, inner, bias=qkv_bias)
        self.k_proj = nn.Linear(hidden_size, kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(hidden_size, kv_heads * head_dim, bias=qkv_bias)
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
        if short_conv:
            for name in ("q_conv", "k_conv", "v_conv"):
                setattr(self, name, nn.Parameter(identity_kernel(inner, short_conv)))
        if window and self.normalised_readout:
            # log-scale of window weights exp(score) against feature products (calibrate_readout_scale).
            self.window_offset = nn.Parameter(torch.zeros(num_heads))
        if window and rope:
            self.register_buffer("rotary_inv_freq", torch.zeros(head_dim // 2))

    # ------------------------------------------------------------------ what a mechanism supplies

    def _build_gates(self, hidden_size: int, gate_rank: int) -> None:
        """Create the mechanism's own parameters (``self.key_dim`` and the projections exist)."""
        raise NotImplementedError

    def _gates(self, hidden_states: torch.Tensor, fused: bool) -> tuple:
        """hidden_states [B, T, hidden] → the tuple of per-token gate tensors ``_operator`` takes after v;
        ``fused``: log-decays by ``_log_decays``' kernel."""
        raise NotImplementedError

    def _kernel_gates(self, hidden_states: torch.Tensor) -> tuple:
        """With a ``_kernel_scan``: the gates in the form that scan takes on a prompt, where it computes the
        log-decays itself (fewer passes over per-token, per-channel tensors)."""
        raise NotImplementedError

    @staticmethod
    def _operator(q, k, v, gates, **kwargs) -> Output:
        """The mechanism's scan (e.g. ``gla.gla``) on q/k [B, T, H, K], v [B, T, H, V] and ``gates``;
        ``kwargs``: scale, backend, chunk_size, initial_state, output_final_state."""
        raise NotImplementedError

    @staticmethod
    def _in_place_step(q, k, v, *gates_scale_state, backend: str) -> torch.Tensor:
        """The mechanism's decoding step (e.g. ``gla.gla_step_``) on q/k [B, 1, H, K], v [B, 1, H, V], its gates, the
        scale and an fp32 state [B, H, K, V] that it overwrites; backend "triton" or "torch"."""
        raise NotImplementedError

    def _resolve_backend(self, q, k, v, gates) -> str:
        """The backend a scan on these inputs runs (training may take another than inference)."""
        return resolve_backend(self.backend, q, differentiated=needs_grad(q, k, v, *gates))

    def _step_in_place(self, q, k, v, gates, state: torch.Tensor) -> torch.Tensor:
        """One decoding token whose new state overwrites ``state`` (a cache layer in static mode, see
        ``cache.RecurrentStateLayer``); v comes with its ``_value_columns``. By the mechanism's ``_in_place_step``
        (one Triton kernel on CUDA); a student held to a PyTorch backend keeps the step in PyTorch too."""
        wanted = "torch" if self.backend in ("recurrent", "chunked") else "auto"
        self.last_backend = resolve_step_backend(wanted, q, state)
        return self._in_place_step(q, k, v, *gates, 1.0, state, backend=self.last_backend)

    # ------------------------------------------------------------------ shared

    def config_dict(self) -> dict:
        """Constructor arguments (without backend) and ``kind``, JSON-serialisable: rebuilds this student
        through ``students.build_student``."""
        return dict(self._config)

    @torch.no_grad()
    def calibrate_readout_scale(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None) -> None:
        """Start the readout at the teacher's scale, from a batch of the teacher's attention inputs.

        The student's projections start as the teacher's, so softmax attention over them is the
        teacher's attention (``_softmax_reference``). An RMS-normalised readout starts at the RMS of
        that output per channel: a unit-RMS readout, or the values' RMS, can be many times too loud
        where the teacher averages over many tokens (a Gated DeltaNet student on MiniLM started at
        relative errors 5-10 with the values' RMS). In a sliding-window student that readout is added to
        the window's, so it starts at the share of the teacher's attention that lies beyond the window;
        with the softmax-like readout, ``window_offset`` starts where the window's weights
        exp(score - offset) and the scan's feature products split the mass as the teacher does.

        Args:
            hidden_states: [B, T, hidden]. attention_mask: as ``forward`` takes it, or None.
        """
        if self.normalised_readout and not self.window:
            return  # a softmax-like readout already mixes values at their scale: nothing to calibrate
        valid = key_padding_mask(attention_mask, hidden_states.shape[1])
        output_rms, log_far_mass, far_share = self._softmax_reference(hidden_states, valid)
        if self.normalised_readout:
            if self.window:
                self._calibrate_window_offset(hidden_states, attention_mask, valid, log_far_mass)
            return
        self.out_norm_weight.copy_(output_rms if far_share is None else output_rms * far_share[:, None])

    def _softmax_reference(self, hidden_states, valid):
        """Softmax attention over the student's own (initial: the teacher's) projections, per head:
        the RMS of its output per channel [H, D] and, for a sliding-window student, the log of its total
        unnormalised mass beyond the window over the batch [H] and the mean share of a query's mass that
        lies there [H] (None, None without a window)."""
        batch, length, _ = hidden_states.shape
        projections = self._projections(hidden_states)
        q, k = self._window_queries_keys(projections, None, None)
        v = projections[2].view(q.shape)
        ones = torch.ones(length, length, dtype=torch.bool, device=q.device)
        reachable = ones.tril() if self.causal else ones
        far = ones.tril(-self.window)
        if not self.causal:
            far = far | ones.triu(self.window)
        squares = torch.zeros(self.num_heads, self.head_dim, device=q.device)
        log_mass = torch.full((self.num_heads,), -math.inf, device=q.device)
        shares, count = [], 0
        for row in range(batch):  # one sequence at a time: the scores are [H, T, T]
            real = ones if valid is None else valid[row][None, :] & valid[row][:, None]
            queries = real.any(-1)
            scores = torch.einsum("thd,shd->hts", q[row].float(), k[row].float()) / math.sqrt(self.head_dim)
            reached = scores.masked_fill(~(reachable & real), -math.inf)
            log_all = reached.logsumexp(-1)  # [H, T]
            weights = (reached - log_all[..., None]).exp().nan_to_num(0.0)  # rows without keys: 0
            output = torch.einsum("hts,shd->htd", weights, v[row].float())
            squares += output[:, queries].pow(2).sum(1)
            count += int(queries.sum())
            if self.window:
                log_far = scores.masked_fill(~(far & real), -math.inf).logsumexp(-1)
                log_mass = torch.logaddexp(log_mass, log_far.flatten(1).logsumexp(-1))
                shares.append((log_far - log_all).exp()[:, queries].nan_to_num(0.0))
        output_rms = (squares / max(count, 1)).sqrt()
        if not self.window:
            return output_rms, None, None
        return output_rms, log_mass, torch.cat(shares, dim=1).mean(1)

    def _calibrate_window_offset(self, hidden_states, attention_mask, valid, log_far_mass) -> None:
        """Set ``window_offset`` so that, over the batch, sum exp(score - offset) beyond the window equals
        the scan's sum of feature products there (per head): the teacher's split, in the scan's units."""
        _, (linear, _), _ = self._window_halves(hidden_states, attention_mask, None, None)  # unfused: not early
        linear_mass = linear[..., -1] if valid is None else linear[..., -1][valid]
        linear_mass = linear_mass.float().reshape(-1, self.num_heads).sum(0)
        usable = torch.isfinite(log_far_mass) & (linear_mass > 0)
        self.window_offset.copy_(torch.where(usable, log_far_mass - linear_mass.clamp_min(1e-30).log(),
                                             self.window_offset))

    def _fused(self, x: torch.Tensor) -> bool:
        """Whether this call runs the fused kernels (see ``prefill_kernels``)."""
        if self.prefill_kernels == "torch" or not kernels.prefill_kernels_fit(self.head_dim):
            return False
        return self.prefill_kernels == "triton" or (x.is_cuda and not torch.is_grad_enabled())

    def _features(self, x: torch.Tensor, fused: bool, valid: torch.Tensor | None = None) -> torch.Tensor:
        """[B, T, H, D] → [B, T, H, key_dim]: the feature map, L2-normalised if ``normalised_features``, and
        zero where ``valid`` [B, T] is False (a zero key writes nothing, so padding never reaches real tokens).
        ``fused`` hedgehog features also take shared K heads [B, T, H_kv, D] (``kernels.hedgehog_triton``)."""
        if fused and self.feature_map == "hedgehog":
            return kernels.hedgehog_triton(x, self.feature_weight, valid, self.normalised_features)
        features = x if self.feature_map == "identity" else hedgehog(x, self.feature_weight)
        if self.normalised_features:
            features = F.normalize(features, dim=-1)
        return features if valid is None else features * valid[:, :, None, None].to(features.dtype)

    @staticmethod
    def _log_decays(logits: torch.Tensor, fused: bool) -> torch.Tensor:
        """Per-token log-decays log(sigmoid(logits)) >= LOG_DECAY_FLOOR: fp32, or in the logits' dtype by one
        kernel when ``fused`` (the scan reads them in v's dtype either way)."""
        if fused:
            return kernels.log_decay_triton(logits, LOG_DECAY_FLOOR)
        return F.logsigmoid(logits.float()).clamp_min(LOG_DECAY_FLOOR)

    def _scan(self, q, k, v, gates, reverse: bool = False, initial_state=None, output_final_state=False):
        """``_operator`` on the backend this call resolves to (recorded in ``last_backend``), v [B, T, H, D] with
        ``_value_columns``' columns; ``reverse`` scans from the last token to the first (the backward half of a
        bidirectional student)."""
        v = self._value_columns(v)
        if reverse:
            q, k, v = (t.flip(1) for t in (q, k, v))
            gates = tuple(gate.flip(1) for gate in gates)
        self.last_backend = self._resolve_backend(q, k, v, gates)
        out, state = self._operator(q, k, v, gates, scale=1.0, backend=self.last_backend,
                                    chunk_size=self.chunk_size, initial_state=initial_state,
                                    output_final_state=output_final_state)
        return (out.flip(1) if reverse else out), state

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                cache=None, past_key_values=None, position_embeddings=None, **_ignored) -> tuple[torch.Tensor, None]:
        """hidden_states [B, T, hidden] → ([B, T, hidden or H*D], None), like HF attention.

        ``cache`` / ``past_key_values``: a transformers Cache (one name per transformers version);
        a causal student continues from its state there and stores the new one.
        ``position_embeddings``: the model's rotary (cos, sin), used by a sliding window with ``rope``.
        """
        cache = cache if cache is not None else past_key_values
        if cache is not None and self.causal and self.layer_idx is None:
            raise RuntimeError("a student used with a cache needs its layer_idx (set when installed)")
        layer = state_layer(cache, self.layer_idx) if cache is not None and self.causal else None
        if layer is not None and layer.in_place and hidden_states.shape[1] != 1:
            raise RuntimeError(f"a state updated in place advances one token per call; got {hidden_states.shape[1]}")
        pieces = self._row_pieces(hidden_states, layer)
        if len(pieces) == 1:
            if replays_as_graph(hidden_states, layer, self.replay_prefill):
                valid = key_padding_mask(attention_mask, hidden_states.shape[1])
                return replayed_attend(self, hidden_states, valid, position_embeddings, layer), None
            return self._attend(hidden_states, attention_mask, layer, position_embeddings), None
        batch = hidden_states.shape[0]
        parts = [None if layer is None else layer.rows(rows) for rows in pieces]
        out = torch.cat([
            self._attend(hidden_states[rows], batch_rows(attention_mask, rows, batch), part,
                         None if position_embeddings is None else
                         tuple(batch_rows(table, rows, batch) for table in position_embeddings))
            for rows, part in zip(pieces, parts)
        ])
        if layer is not None:  # every part has read its rows of the old state: new tensors take the new ones
            layer.reset()
            for rows, part in zip(pieces, parts):
                layer.write_rows(rows, part, batch, part.seen_tokens)
        return out, None

    def _row_pieces(self, hidden_states: torch.Tensor, layer) -> list[slice]:
        """The batch rows each call of ``_attend`` takes: all at once, or, for inference calls over more than
        ``PREFILL_PIECE_TOKENS`` tokens, as many rows as fit in that many (at least one)."""
        batch, length, _ = hidden_states.shape
        if torch.is_grad_enabled() or (layer is not None and layer.in_place) or batch * length <= PREFILL_PIECE_TOKENS:
            return [slice(0, batch)]
        rows = max(1, PREFILL_PIECE_TOKENS // length)
        return [slice(start, min(start + rows, batch)) for start in range(0, batch, rows)]

    def _attend(self, hidden_states: torch.Tensor, attention_mask, layer, position_embeddings) -> torch.Tensor:
        """The student's output [B, T, hidden or H*D] for these rows, continuing ``layer``'s state (or None)."""
        batch, length, _ = hidden_states.shape
        if self.window:
            fused = self._fused_window(hidden_states)
            window_inputs, linear, layout = self._window_halves(hidden_states, attention_mask, layer,
                                                                position_embeddings, fused)
            out = self._window_readout(window_inputs, linear, fused, layout)
        else:
            valid = key_padding_mask(attention_mask, length)
            fused = self._fused(hidden_states)
            # A prompt on the kernel scan takes its own form of the gates and returns its output read out.
            kernel_scan = self._prompt_kernel_scan(fused, length, layer)
            projections = self._projections(hidden_states, repeat=not self._shares_kv_in_kernels(kernel_scan))
            q, k, v, gates = self._scan_inputs(hidden_states, projections, valid, layer, kernel_gates=kernel_scan)
            out, mass = self._causal_scan(q, k, v, gates, layer, fused, kernel_gates=kernel_scan,
                                          read_out=kernel_scan)
            if not self.causal:
                out = out + self._scan(q, k, v, gates, reverse=True)[0]
            if not (kernel_scan and self.normalised_readout):
                out = self._readout(out, fused, mass)
        out = out.reshape(batch, length, self.num_heads * self.head_dim)
        return out if self.o_proj is None else self.o_proj(out)

    def _fused_window(self, x: torch.Tensor) -> bool:
        """Whether a sliding-window student's own steps (lagged queries, window attention and readout) run
        as fused kernels on this call: as ``_fused``, for causal students whose window the kernels serve."""
        return self.causal and self._fused(x) and kernels.window_kernels_fit(self.window)

    def _window_readout(self, window_inputs, linear: tuple, fused: bool, layout: str) -> torch.Tensor:
        """A sliding-window student's output [B, T, H, D] from ``_window_halves``' window inputs, lagged scan
        (output and normaliser) and ``layout``: the softmax-like readout over both halves, or the window's softmax
        plus the scan's RMS readout."""
        q, keys, values, valid = window_inputs  # (history, new) pairs but q
        linear, mass = linear
        scale = 1.0 / math.sqrt(self.head_dim)
        if fused:
            readout = dict(offset=self.window_offset, mass=mass) if self.normalised_readout else dict(
                norm_weight=self.out_norm_weight)
            return kernels.window_readout_triton(q, keys, values, valid, linear, self.window, scale,
                                                 early_linear=layout == "early", ring=layout == "ring", **readout)
        if layout == "ring":
            parts = ring_softmax(q.float() * scale, keys[0], values[0], valid[0])
        else:
            keys, values, valid = (with_history(history, new, self.window) for history, new in (keys, values, valid))
            parts = window_softmax(q.float() * scale, keys, values, valid, self.window, self.causal)
        if self.normalised_readout:
            return combine_normalised(parts, linear, self.window_offset).to(linear.dtype)
        numerator, denominator, _ = parts
        return (numerator / (denominator + 1e-6) + self._normalised(linear).float()).to(linear.dtype)

    def _readout(self, out: torch.Tensor, fused: bool, mass: torch.Tensor | None = None) -> torch.Tensor:
        """A scan's output [B, T, H, V] → [B, T, H * D]: the softmax-like readout (its normaliser the last value
        column, or ``mass`` [B, T, H] when computed apart) or the RMS-normalised one."""
        if self.normalised_readout:
            if fused:
                return kernels.normalised_readout_triton(out, mass)
            return out[..., :self.head_dim] / (out[..., self.head_dim:] + 1e-6)
        if fused:
            return kernels.rms_readout_triton(out, self.out_norm_weight)
        return self._normalised(out)

    def _normalised(self, out: torch.Tensor) -> torch.Tensor:
        """The RMS-normalised readout of a scan's output [B, T, H, D]."""
        return out * torch.rsqrt(out.pow(2).mean(-1, keepdim=True) + 1e-6) * self.out_norm_weight

    def _projections(self, hidden_states, repeat: bool = True):
        """The q/k/v projections [B, T, H*D]: shared K/V heads repeated for their query heads, or with ``repeat``
        False as they are ([B, T, H_kv*D])."""
        k, v = self.k_proj(hidden_states), self.v_proj(hidden_states)
        if repeat:
            k, v = self._per_query_head(k), self._per_query_head(v)
        return self.q_proj(hidden_states), k, v

    def _prompt_kernel_scan(self, fused: bool, length: int, layer) -> bool:
        """Whether a scan over ``length`` tokens runs the mechanism's ``_kernel_scan``: a causal call on the fused
        kernels over more than one token (a single token takes ``_operator``'s one-token form: one kernel), not a
        static decoding step."""
        return (fused and self.causal and self._kernel_scan is not None and length > 1
                and not (layer is not None and layer.in_place))

    def _shares_kv_in_kernels(self, kernel_scan: bool) -> bool:
        """Whether a call without a window whose scan is the ``kernel_scan`` reads shared K/V heads where they lie:
        the feature-map kernel and the scan take them, so the prompt skips the repeat copies (at Qwen2.5-1.5B's
        shape 5% of a GLA layer at 8K tokens, BENCHMARKS.md issue 15). Short convolutions run per query head."""
        return kernel_scan and self.kv_groups > 1 and self.feature_map == "hedgehog" and not self.short_conv

    def _per_query_head(self, x: torch.Tensor) -> torch.Tensor:
        """A K or V projection [B, T, H_kv*D] → [B, T, H*D], each K/V head repeated for the query heads of its group
        (query head h reads K/V head h // kv_groups, as transformers' ``repeat_kv``)."""
        if self.kv_groups == 1:
            return x
        batch, length, _ = x.shape
        grouped = x.view(batch, length, -1, 1, self.head_dim)
        return grouped.expand(-1, -1, -1, self.kv_groups, -1).reshape(batch, length, -1)

    def _scan_inputs(self, hidden_states, projections, valid, layer, kernel_gates: bool = False):
        """(q, k, v, gates) as the scan reads them (v without ``_value_columns``' normaliser column): the
        ``projections`` through the short convolutions, feature map and gates (``kernel_gates``: ``_kernel_gates``'
        form, else ``_gates``');
        padding keys (``valid`` False) zeroed, one dtype. k and v keep the projections' heads
        (``_shares_kv_in_kernels``); features are per query head."""
        batch, length, _ = hidden_states.shape
        fused = self._fused(hidden_states)
        q, k, v = projections
        if self.short_conv:
            if valid is not None:  # padding's projections must not leak into real tokens' convolutions
                q, k, v = (x * valid[:, :, None].to(x.dtype) for x in (q, k, v))
            q, k, v = (self._convolved(x, name, layer) for x, name in ((q, "q_conv"), (k, "k_conv"), (v, "v_conv")))
        q, k, v = (x.view(batch, length, -1, self.head_dim) for x in (q, k, v))
        q, k = self._features(q, fused), self._features(k, fused, valid)
        gates = self._kernel_gates(hidden_states) if kernel_gates else self._gates(hidden_states, fused)
        # One dtype for every kernel input: under autocast the projections come out in bf16 but
        # softmax features, normalised q/k and gates in fp32, and fla's kernels need them to agree.
        q, k = q.to(v.dtype), k.to(v.dtype)
        gates = tuple(gate.to(v.dtype) for gate in gates)
        return q, k, v, gates

    def _value_columns(self, v: torch.Tensor) -> torch.Tensor:
        """v [B, T, H, D] as ``_operator`` takes it: with an all-ones column for the softmax-like readout, which makes
        the same scan accumulate the normaliser sum_s w_ts (``_kernel_scan`` computes it apart)."""
        return torch.cat([v, torch.ones_like(v[..., :1])], dim=-1) if self.normalised_readout else v

    def _convolved(self, x: torch.Tensor, name: str, layer) -> torch.Tensor:
        """``x`` [B, T, H*D] through the short convolution ``name``, continuing a cache's history."""
        history = None if layer is None else layer.histories.get(name)
        out, history = causal_conv(x, getattr(self, name), history)
        if layer is not None:
            layer.keep(name, history)
        return out

    def _causal_scan(self, q, k, v, gates, layer, fused: bool = False, kernel_gates: bool = False,
                     read_out: bool = False) -> tuple:
        """The forward scan, continuing and updating ``layer``'s state when decoding with a cache: (its output,
        the normaliser [B, T, H] when ``_kernel_scan`` computed it apart, else None). A prompt on the fused kernels
        (``_prompt_kernel_scan``) runs the mechanism's ``_kernel_scan``; there ``kernel_gates`` says that the gates
        are ``_kernel_gates``' form, and ``read_out`` has the scan apply a softmax-like readout itself (the output is
        then read out and the normaliser None).

        A cache keeps one state layout whichever way a call computed it: a softmax-like readout's running key
        sum is the state's last value column, as an all-ones value column leaves it."""
        if layer is not None and layer.in_place:
            return self._step_in_place(q, k, self._value_columns(v), gates, layer.state), None
        state = None if layer is None else layer.state
        if not self._prompt_kernel_scan(fused, q.shape[1], layer):
            out, state = self._scan(q, k, v, gates, output_final_state=layer is not None, initial_state=state)
            if layer is not None:
                layer.advance(state, q.shape[1])
            return out, None
        key_sums = self.normalised_readout
        start, start_sum = (state[..., :-1], state[..., -1]) if state is not None and key_sums else (state, None)
        self.last_backend = "triton"
        out, mass, state, key_sum = self._kernel_scan(
            q, k, v, gates, kernel_gates, start, start_sum, output_final_state=layer is not None, key_sums=key_sums,
            normalise=read_out and key_sums)
        if layer is not None:
            layer.advance(state if key_sum is None else torch.cat([state, key_sum[..., None]], dim=-1), q.shape[1])
        return out, mass

    def _window_queries_keys(self, projections, position_embeddings, layer, fused: bool = False):
        """The window's queries and keys [B, T, H, D]: the raw ``projections``, rotated like the
        teacher's when ``rope`` (positions continue a cache's count; ``fused``: by ``kernels.rotary_triton``)."""
        batch, length, _ = projections[0].shape
        shape = (batch, length, self.num_heads, self.head_dim)
        q, k = projections[0].view(shape), projections[1].view(shape)
        if not self.rope:
            return q, k
        if position_embeddings is None:
            start = 0 if layer is None else layer.seen_tokens
            position_embeddings = rotary_tables(self.rotary_inv_freq, start, length, self.rope_scaling, q.dtype)
        cos, sin = position_embeddings
        if fused:
            return kernels.rotary_triton(q, cos, sin), kernels.rotary_triton(k, cos, sin)
        return rotate(q, cos, sin), rotate(k, cos, sin)

    def _window_halves(self, hidden_states, attention_mask, layer, position_embeddings, fused: bool = False):
        """A sliding-window student's two halves before their readout: the window's inputs and the lagged
        scan's output [B, T, H, V(+1)] (both directions summed when bidirectional); ``fused``: rotary
        positions and lagged queries by their kernels.

        The window's inputs are its queries [B, T, H, D] and, as (history, new tokens) pairs, its keys and
        values ([B, W, H, D], [B, T, H, D]) and their validity ([B, W], [B, T]). The history is the W tokens
        before this call that the scan's state does not hold yet: a cache's, or None at the start of a
        sequence (zeros: no keys). History then new tokens form the "combined" sequence (``window.py``); a
        cache keeps its last W tokens for the next call.

        Returns (window inputs, (scan output, its normaliser [B, T, H] when computed apart or None), layout), the
        layout one of
          "late": the scan output's row t is token t's;
          "early": its row t - W is token t's (a fused call that starts a sequence; see below);
          "ring": one static decoding step (``_ring_step``), whose histories are rings already holding the
              new token: the pairs are (ring, None).
        """
        length = hidden_states.shape[1]
        window = self.window
        projections = self._projections(hidden_states)
        valid = key_padding_mask(attention_mask, length)
        q, k, v, gates = self._scan_inputs(hidden_states, projections, valid, layer)
        q_window, k_window = self._window_queries_keys(projections, position_embeddings, layer, fused)
        valid = torch.ones_like(k[..., 0, 0]) if valid is None else valid.to(k.dtype)
        v_window = projections[2].view(q_window.shape)
        new = dict(window_k=k_window, window_v=v_window, window_valid=valid, scan_k=k, scan_v=v,
                   **{f"scan_gate{i}": gate for i, gate in enumerate(gates)})
        if layer is not None and layer.in_place:
            return self._ring_step(q, q_window, new, layer)
        histories = {name: None if layer is None else layer.histories.get(name) for name in new}
        # A fused call that starts a sequence scans the new tokens as they are, its queries W rows early (the
        # zero history a late scan would read first adds nothing): no shifted copies of k, v and the gates.
        early = fused and length > window and histories["scan_k"] is None
        if early:
            lagged_q = kernels.lagged_queries_triton(q, gates[0], None, window, early=True)
        elif fused:
            lagged_q = kernels.lagged_queries_triton(q, gates[0], histories["scan_gate0"], window)
        else:
            lagged_q = lagged_queries(q, gates[0], history_or_zeros(histories["scan_gate0"], gates[0], window), window)
        if early:
            if layer is not None:
                # The cached state must stop W tokens short of the end, as a late scan's does: the last W
                # keys (kept first, as copies, for the next call's history) write nothing and their decays are
                # 1 (log 0).
                for name in new:
                    layer.keep(name, last_window(None, new[name], window))
                if k._base is not None:  # a view of the window's own keys (identity features): not in place
                    k = k.clone()
                k[:, length - window:] = 0
                gates[0][:, length - window:] = 0
            scan_inputs = (k, v, gates)
        else:
            late = {name: lagged_sequence(histories[name], new[name], window)
                    for name in new if name.startswith("scan_")}
            scan_inputs = (late["scan_k"], late["scan_v"], tuple(late[f"scan_gate{i}"] for i in range(len(gates))))
            if layer is not None:
                for name, tensor in new.items():
                    layer.keep(name, last_window(histories[name], tensor, window))
        linear, mass = self._causal_scan(lagged_q, *scan_inputs, layer, fused)
        if not self.causal:  # the keys W or more tokens later: the same lagged scan, from the end
            flipped = [x.flip(1) for x in (q, k, v, *gates)]
            backward_q = lagged_queries(flipped[0], flipped[3], history_or_zeros(None, flipped[3], window), window)
            backward_inputs = [lagged_sequence(None, x, window) for x in flipped[1:]]
            linear = linear + self._scan(backward_q, backward_inputs[0], backward_inputs[1],
                                         tuple(backward_inputs[2:]))[0].flip(1)
        pairs = [(histories[name], new[name]) for name in ("window_k", "window_v", "window_valid")]
        return (q_window, *pairs), (linear, mass), "early" if early else "late"

    def _ring_step(self, q, q_window, new: dict, layer):
        """One static decoding step of a sliding-window student (``_window_halves``' "ring" layout).

        In static mode a cache's histories are rings (``cache.RecurrentStateLayer.ring_slot``): the new token
        takes the slot of the token W positions back, the one that leaves the window. That token is what the
        scan, W tokens late, writes now; the ring then holds the W tokens the window attends to and whose decays
        the lagged query carries, in whatever order. Each step writes one token per history, where keeping the
        histories in order would shift all W (the copies cost more than the attention they replace).
        """
        slot = layer.ring_slot(self.window)
        scan_names = [name for name in new if name.startswith("scan_")]
        leaving = {name: layer.histories[name].index_select(1, slot) for name in scan_names}  # read before writing
        for name, tensor in new.items():
            layer.write_ring(name, slot, tensor)
        lagged_q = ring_lagged_queries(q, layer.histories["scan_gate0"])
        gates = tuple(leaving[name] for name in scan_names[2:])
        linear = self._causal_scan(lagged_q, leaving["scan_k"], leaving["scan_v"], gates, layer)
        rings = [(layer.histories[name], None) for name in ("window_k", "window_v", "window_valid")]
        return (q_window, *rings), linear, "ring"

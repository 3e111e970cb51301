"""Gated linear attention (GLA): per-key-channel data-dependent decay ``g`` (a log-decay, <= 0)::

    S_t = exp(g_t)[:, None] * S_{t-1} + k_t^T v_t
    o_t = scale * q_t @ S_t

Side by side, as in fla: the step-by-step reference (``gla_recurrent``), the chunkwise-parallel
PyTorch form (``gla_chunked``, differentiable, runs anywhere), the dispatcher that can also call fla's
Triton kernels on CUDA (``gla``), the in-place decoding step (``gla_step_``) and the student layer
(``GLAStudent``). Conventions (layout, dtypes, backends): ``backends.py``.

Copied next to exported hybrids: imports only torch, its siblings and (inside try) fla.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import nn

from .backends import (
    Output,
    check_chunk_size,
    check_qkv,
    check_step,
    compiled,
    from_chunks,
    heads_first,
    masked_exp,
    needs_grad,
    resolve_backend,
    resolve_step_backend,
    starting_state,
    to_chunks,
)
from .base import LOG_DECAY_FLOOR, LinearAttentionStudent, retention_logits
from .kernels import gla_prefill_triton, gla_step_triton

try:  # optional: backends.resolve_backend refuses the fla backends when fla could not be imported
    from fla.ops.gla import chunk_gla, fused_recurrent_gla
except ImportError:
    pass

# Sub-block length inside GLA chunks (see `_intra_chunk_scores`). Pairwise decays cost
# ~B*H*T*K*c exps and the cross-sub-block keys ~B*H*T*K*C/c multiplies; c = 4 was fastest
# on CPU for chunk sizes 16-64.
_SUBBLOCK = 4


def _check_inputs(q, k, v, g, initial_state) -> Tuple[int, int, int, int, int]:
    dims = check_qkv(q, k, v, initial_state)
    if g.shape != q.shape:
        raise ValueError(
            f"GLA gate g must have the shape of q [B, T, H, K] = {tuple(q.shape)}; "
            f"got g {tuple(g.shape)}"
        )
    return dims


def gla_recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    scale: float,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
) -> Output:
    """Reference GLA: one recurrence step per token.

    Args:
        q, k: [B, T, H, K]. v: [B, T, H, V]. g: [B, T, H, K] log-decay (<= 0).
        scale: multiplies q.
        initial_state: [B, H, K, V] or None (zeros).
        output_final_state: also return the state after the last token.

    Returns:
        o [B, T, H, V] in q's dtype, and the fp32 final state [B, H, K, V] or None.
    """
    B, T, H, K, V = _check_inputs(q, k, v, g, initial_state)
    dtype = q.dtype
    q, k, v, g = (heads_first(x) for x in (q, k, v, g))
    S = starting_state(initial_state, B, H, K, V, like=q)
    o = q.new_empty(B, T, H, V)
    for t in range(T):
        S = g[:, :, t, :, None].exp() * S + k[:, :, t, :, None] * v[:, :, t, None, :]
        o[:, t] = scale * torch.einsum("bhk,bhkv->bhv", q[:, :, t], S)
    return o.to(dtype), (S if output_final_state else None)


def _intra_chunk_scores(q: torch.Tensor, k: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Causal decayed scores A[i, j] = sum_c q[i,c] k[j,c] exp(b[i,c] - b[j,c]) for j <= i.

    q, k, b: [..., C, K] with b the within-chunk inclusive cumsum of g (non-increasing).
    Returns [..., C, C].

    The textbook factorisation (q * exp(b)) @ (k * exp(-b))^T overflows once the decay
    within a chunk exceeds ~88 nats (e.g. g = -8 over 12 steps). Instead the chunk is split
    into sub-blocks of length c:
      * pairs in the same sub-block use the exact pairwise exponent b_i - b_j;
      * for a key j in an earlier sub-block (last position e) than the query i (sub-block
        starting at s), exp(b_i - b_j) = exp(b_i - b_s) * exp(b_s - b_e) * exp(b_e - b_j):
        the outer factors fold into q and k and the middle one is per sub-block pair, so
        the cross-sub-block scores are one matmul.
    Every exponent above is <= 0 (b is non-increasing), so nothing can overflow.
    """
    *batch, C, K = q.shape
    c = math.gcd(C, _SUBBLOCK)
    n_sub = C // c
    qs, ks, bs = (x.reshape(*batch, n_sub, c, K) for x in (q, k, b))
    causal = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()

    # Same sub-block: [..., n_sub, c, c, K] pairwise decays.
    decay = masked_exp(bs[..., :, None, :] - bs[..., None, :, :], causal[:, :, None])
    diag = (qs[..., :, None, :] * ks[..., None, :, :] * decay).sum(-1)

    # Earlier sub-blocks, bridged through the gap between the key sub-block's last position e
    # and the query sub-block's first position s (all three factors are <= 1).
    q_ref = qs * (bs - bs[..., :1, :]).exp()  # decay s -> i
    k_end = ks * (bs[..., -1:, :] - bs).exp()  # decay j -> e
    earlier = torch.ones(n_sub, n_sub, dtype=torch.bool, device=q.device).tril(-1)
    gap = masked_exp(bs[..., :, None, 0, :] - bs[..., None, :, -1, :], earlier[:, :, None])
    k_ref = (gap[..., None, :] * k_end[..., None, :, :, :]).reshape(*batch, n_sub, C, K)
    scores = q_ref @ k_ref.transpose(-1, -2)  # [..., n_sub, c, C]

    # Add the diagonal sub-blocks: scatter diag[..., i, :, :] into column block i of row block i.
    eye = torch.eye(n_sub, dtype=q.dtype, device=q.device)
    scores = scores + torch.einsum("...ipj,il->...iplj", diag, eye).reshape(scores.shape)
    return scores.reshape(*batch, C, C)


def gla_chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    scale: float,
    chunk_size: int = 32,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
) -> Output:
    """Chunkwise-parallel GLA (same contract as `gla_recurrent`), differentiable.

    Within a chunk the output is a causal decayed attention (see `_intra_chunk_scores`)
    plus the contribution of the state entering the chunk; states are passed between chunks
    sequentially. Every exponential used has a non-positive exponent, so the form is stable
    for arbitrarily strong decays. Any T (padded internally) and any chunk_size.

    Args:
        q, k: [B, T, H, K]. v: [B, T, H, V]. g: [B, T, H, K] log-decay (<= 0).
        scale: multiplies q.
        chunk_size: tokens per chunk.
        initial_state: [B, H, K, V] or None (zeros).
        output_final_state: also return the state after the last token.

    Returns:
        o [B, T, H, V] in q's dtype, and the fp32 final state [B, H, K, V] or None.
    """
    B, T, H, K, V = _check_inputs(q, k, v, g, initial_state)
    check_chunk_size(chunk_size)
    dtype = q.dtype
    q, k, v, g = (to_chunks(heads_first(x), chunk_size) for x in (q, k, v, g))  # [B,H,N,C,*]
    q = q * scale
    b = g.cumsum(-2)  # decay from the chunk start up to and including each position
    b_last = b[..., -1, :]  # [B, H, N, K] total decay of each chunk

    o_intra = _intra_chunk_scores(q, k, b) @ v
    q_decayed = q * b.exp()  # reads the state entering the chunk
    k_decayed = k * (b_last[..., None, :] - b).exp()  # writes, decayed to the chunk end
    chunk_writes = k_decayed.transpose(-1, -2) @ v  # [B, H, N, K, V]

    S = starting_state(initial_state, B, H, K, V, like=q)
    entering = []
    for n in range(q.shape[2]):
        entering.append(S)
        S = b_last[:, :, n, :, None].exp() * S + chunk_writes[:, :, n]
    o = o_intra + q_decayed @ torch.stack(entering, dim=2)
    return from_chunks(o, T, dtype), (S if output_final_state else None)


def gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    scale: float,
    backend: str = "auto",
    chunk_size: int = 32,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
) -> Output:
    """GLA with a selectable implementation; arguments and returns as in `gla_chunked`.

    backend:
        "auto": on CUDA with fla installed, "fla" (or "fla_recurrent" for one token); otherwise
            "chunked" (or "recurrent" for one token).
        "recurrent" / "chunked": the pure-PyTorch implementations in this file.
        "fla": `fla.ops.gla.chunk_gla` (CUDA, differentiable).
        "fla_recurrent": `fla.ops.gla.fused_recurrent_gla` (CUDA; meant for decoding).
    chunk_size only affects "chunked"; fla picks its own.
    """
    backend = resolve_backend(backend, q, differentiated=needs_grad(q, k, v, g, initial_state))
    if backend == "recurrent":
        return gla_recurrent(q, k, v, g, scale, initial_state, output_final_state)
    if backend in ("chunked", "compiled"):
        form = gla_chunked if backend == "chunked" else compiled(gla_chunked)
        return form(q, k, v, g, scale, chunk_size, initial_state, output_final_state)
    _check_inputs(q, k, v, g, initial_state)
    if initial_state is not None:
        initial_state = initial_state.float()  # fla's kernels keep (and assert) an fp32 state
    state_kwargs = dict(initial_state=initial_state, output_final_state=output_final_state)
    if backend == "fla":
        return chunk_gla(q, k, v, g, scale=scale, **state_kwargs)
    return fused_recurrent_gla(q, k, v, gk=g, scale=scale, **state_kwargs)  # gate is named gk


def gla_step_(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    scale: float,
    state: torch.Tensor,
    backend: str = "auto",
) -> torch.Tensor:
    """One GLA decoding step that updates ``state`` in place and returns the output.

    Args:
        q, k, g: [B, 1, H, K]. v: [B, 1, H, V].
        state: fp32 [B, H, K, V], overwritten with the state after this token.
        backend: "auto" (Triton on CUDA when the state is stored V-first, else "torch"),
            "triton" (``kernels.gla_step_triton``; also on CPU tensors under TRITON_INTERPRET=1) or "torch".

    Returns:
        o [B, 1, H, V] in q's dtype.

    The state never moves, which is what lets a captured CUDA graph replay the step. "V-first"
    storage (``state.transpose(-1, -2)`` contiguous, as a static decoder's cache keeps it) makes
    each kernel row one value channel's K contiguous keys, read whole whatever V is.
    """
    B, T, H, K, V = _check_inputs(q, k, v, g, state)
    check_step("gla_step_", T, state)
    backend = resolve_step_backend(backend, q, state)
    if backend == "torch":
        qf, kf, vf, gf = (x[:, 0].float() for x in (q, k, v, g))  # [B, H, *]
        state.mul_(gf.exp()[..., None]).add_(kf[..., None] * vf[..., None, :])
        return (scale * torch.einsum("bhk,bhkv->bhv", qf, state))[:, None].to(q.dtype)
    return gla_step_triton(q, k, v, g, scale, state)


class GLAStudent(LinearAttentionStudent):
    """A GLA student: a low-rank gate projection (hidden → ``gate_rank`` → heads·key_dim) gives every
    key channel its own data-dependent decay. With positive (hedgehog) features the readout is
    normalised like softmax: sum_s w_ts v_s / sum_s w_ts. Arguments: see LinearAttentionStudent.
    """

    kind = "gla"
    state_sums_writes = True

    def _build_gates(self, hidden_size: int, gate_rank: int) -> None:
        self.gate_down = nn.Linear(hidden_size, gate_rank, bias=False)
        self.gate_up = nn.Linear(gate_rank, self.num_heads * self.key_dim, bias=True)
        # Zero up-projection: gates start data-independent at the documented spans.
        nn.init.zeros_(self.gate_up.weight)
        with torch.no_grad():
            self.gate_up.bias.copy_(retention_logits(self.key_dim).repeat(self.num_heads))

    def _gates(self, hidden_states, fused):
        batch, length, _ = hidden_states.shape
        g = self._log_decays(self.gate_up(self.gate_down(hidden_states)), fused)
        return (g.view(batch, length, self.num_heads, self.key_dim),)

    def _kernel_gates(self, hidden_states):
        # The gate's low-rank activations: the scan takes gate_up's logits and their log-decays as it sums them.
        return (self.gate_down(hidden_states),)

    def _kernel_scan(self, q, k, v, gates, kernel_gates, initial_state, initial_key_sum, **options):
        low_rank = dict(gate_up=(self.gate_up.weight, self.gate_up.bias), logits_floor=LOG_DECAY_FLOOR) \
            if kernel_gates else {}
        return gla_prefill_triton(q, k, v, *gates, 1.0, initial_state, initial_key_sum, **low_rank, **options)

    @staticmethod
    def _operator(q, k, v, gates, **kwargs) -> Output:
        return gla(q, k, v, *gates, **kwargs)

    _in_place_step = staticmethod(gla_step_)

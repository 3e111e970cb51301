"""Gated DeltaNet's gated delta rule: per-head log-decay ``g`` (<= 0) and write strength ``beta``::

    S   = exp(g_t) * S_{t-1}
    S_t = S + k_t^T (beta_t * (v_t - k_t @ S))
    o_t = scale * q_t @ S_t

Side by side, as in fla: the step-by-step reference (``gated_delta_recurrent``), the chunkwise
PyTorch form (``gated_delta_chunked``, differentiable, runs anywhere), the dispatcher that can also
call fla's Triton kernels on CUDA (``gated_delta``), the in-place decoding step (``gated_delta_step_``) and
the student layer (``GatedDeltaNetStudent``).
Conventions (layout, dtypes, backends): ``backends.py``.

Copied next to exported hybrids: imports only torch, its siblings and (inside try) fla.
"""

from __future__ import annotations

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
from .base import LinearAttentionStudent, retention_logits
from .kernels import gated_delta_step_triton

try:  # optional: backends.resolve_backend refuses the fla backends when fla could not be imported
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule
except ImportError:
    pass

# The write strength beta = sigmoid(bias) starts at 0.5: half-overwriting keeps the delta rule
# stable from the first step while letting training move either way.
INITIAL_BETA_LOGIT = 0.0


def _check_inputs(q, k, v, g, beta, initial_state) -> Tuple[int, int, int, int, int]:
    dims = check_qkv(q, k, v, initial_state)
    for name, x in (("g", g), ("beta", beta)):
        if x.shape != q.shape[:3]:
            raise ValueError(
                f"gated-delta {name} must be [B, T, H] = {tuple(q.shape[:3])}; "
                f"got {name} {tuple(x.shape)}"
            )
    return dims


def gated_delta_recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
) -> Output:
    """Reference gated delta rule: one recurrence step per token.

    q and k are used as given (callers L2-normalise them).

    Args:
        q, k: [B, T, H, K]. v: [B, T, H, V].
        g: [B, T, H] log-decay (<= 0). beta: [B, T, H] write strength in (0, 1).
        scale: multiplies q.
        initial_state: [B, H, K, V] or None (zeros).
        output_final_state: also return the state after the last token.

    Returns:
        o [B, T, H, V] in q's dtype, and the fp32 final state [B, H, K, V] or None.
    """
    B, T, H, K, V = _check_inputs(q, k, v, g, beta, initial_state)
    dtype = q.dtype
    q, k, v, g, beta = (heads_first(x) for x in (q, k, v, g, beta))
    S = starting_state(initial_state, B, H, K, V, like=q)
    o = q.new_empty(B, T, H, V)
    for t in range(T):
        k_t = k[:, :, t]
        S = g[:, :, t, None, None].exp() * S
        u = beta[:, :, t, None] * (v[:, :, t] - torch.einsum("bhk,bhkv->bhv", k_t, S))
        S = S + k_t[..., None] * u[..., None, :]
        o[:, t] = scale * torch.einsum("bhk,bhkv->bhv", q[:, :, t], S)
    return o.to(dtype), (S if output_final_state else None)


def gated_delta_chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float,
    chunk_size: int = 32,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
) -> Output:
    """Chunkwise gated delta rule (same contract as `gated_delta_recurrent`), differentiable.

    With S0 the state entering a chunk and b the within-chunk inclusive cumsum of g, the
    per-token writes u_t = beta_t (v_t - k_t S'_t) satisfy the unit-lower-triangular system

        u_t + sum_{j<t} beta_t exp(b_t - b_j) (k_t . k_j) u_j = beta_t v_t - beta_t exp(b_t) k_t S0,

    so (WY/UT form) u = U - W @ S0 with U = T^-1 (beta v), W = T^-1 (beta exp(b) k), both
    independent of S0 and solved for all chunks at once. Then, per chunk in order,

        o  = scale * (q exp(b)) @ S0 + (scale q k^T * exp(b_i - b_j))_{j<=i} @ u
        S1 = exp(b_last) S0 + (k exp(b_last - b))^T @ u.

    All exponents are <= 0, so any decay strength is stable. Any T (padded internally).

    Args:
        q, k: [B, T, H, K]. v: [B, T, H, V].
        g: [B, T, H] log-decay (<= 0). beta: [B, T, H] write strength in (0, 1).
        scale: multiplies q.
        chunk_size: tokens per chunk.
        initial_state: [B, H, K, V] or None (zeros).
        output_final_state: also return the state after the last token.

    Returns:
        o [B, T, H, V] in q's dtype, and the fp32 final state [B, H, K, V] or None.
    """
    B, T, H, K, V = _check_inputs(q, k, v, g, beta, initial_state)
    check_chunk_size(chunk_size)
    dtype = q.dtype
    q, k, v, g, beta = (to_chunks(heads_first(x), chunk_size) for x in (q, k, v, g, beta))
    q = q * scale
    b = g.cumsum(-1)  # [B, H, N, C]
    b_last = b[..., -1]  # [B, H, N]
    causal = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=q.device).tril()
    decay = masked_exp(b[..., :, None] - b[..., None, :], causal)  # exp(b_i - b_j), j <= i

    # WY representation: solve (I + L) [U, W] = [beta v, beta exp(b) k]; L is strictly lower,
    # so unitriangular=True supplies the identity.
    L = (beta[..., None] * (k @ k.transpose(-1, -2)) * decay).tril(-1)
    rhs = torch.cat([beta[..., None] * v, (beta * b.exp())[..., None] * k], dim=-1)
    U, W = torch.linalg.solve_triangular(L, rhs, upper=False, unitriangular=True).split([V, K], -1)

    scores = (q @ k.transpose(-1, -2)) * decay  # [B, H, N, C, C]
    q_decayed = q * b.exp()[..., None]
    k_decayed = k * (b_last[..., None] - b).exp()[..., None]

    S = starting_state(initial_state, B, H, K, V, like=q)
    outputs = []
    for n in range(q.shape[2]):
        u = U[:, :, n] - W[:, :, n] @ S
        outputs.append(q_decayed[:, :, n] @ S + scores[:, :, n] @ u)
        S = b_last[:, :, n, None, None].exp() * S + k_decayed[:, :, n].transpose(-1, -2) @ u
    o = torch.stack(outputs, dim=2)
    return from_chunks(o, T, dtype), (S if output_final_state else None)


def gated_delta(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float,
    backend: str = "auto",
    chunk_size: int = 32,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
) -> Output:
    """Gated delta rule with a selectable implementation; arguments and returns as in
    `gated_delta_chunked`. q and k must already be L2-normalised (no in-kernel norm).

    backend:
        "auto": on CUDA with fla installed, "fla" (or "fla_recurrent" for one token); otherwise
            "chunked" (or "recurrent" for one token).
        "recurrent" / "chunked": the pure-PyTorch implementations in this file; "compiled": the
            chunked one under torch.compile ("auto"'s choice for training where fla cannot serve).
        "fla": `fla.ops.gated_delta_rule.chunk_gated_delta_rule` (CUDA, differentiable).
        "fla_recurrent": `fla.ops.gated_delta_rule.fused_recurrent_gated_delta_rule`
            (CUDA, forward only: for decoding).
    chunk_size only affects "chunked"; fla picks its own.
    """
    backend = resolve_backend(backend, q, gated_delta_backward=needs_grad(q, k, v, g, beta, initial_state))
    if backend == "recurrent":
        return gated_delta_recurrent(q, k, v, g, beta, scale, initial_state, output_final_state)
    if backend in ("chunked", "compiled"):
        form = gated_delta_chunked if backend == "chunked" else compiled(gated_delta_chunked)
        return form(q, k, v, g, beta, scale, chunk_size, initial_state, output_final_state)
    _check_inputs(q, k, v, g, beta, initial_state)
    if initial_state is not None:
        initial_state = initial_state.float()  # fla keeps the recurrent state in fp32
    # Keywords throughout: the fused kernel's positional order is (q, k, v, g, gk, gv, beta).
    kernel = chunk_gated_delta_rule if backend == "fla" else fused_recurrent_gated_delta_rule
    return kernel(
        q,
        k,
        v,
        g=g,
        beta=beta,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        use_qk_l2norm_in_kernel=False,
    )


def gated_delta_step_(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float,
    state: torch.Tensor,
    backend: str = "auto",
) -> torch.Tensor:
    """One gated-delta decoding step that updates ``state`` in place and returns the output.

    Args:
        q, k: [B, 1, H, K] (L2-normalised). v: [B, 1, H, V]. g (log-decay), beta: [B, 1, H].
        state: fp32 [B, H, K, V], overwritten with the state after this token.
        backend: "auto" (Triton on CUDA when the state is stored V-first, else "torch"),
            "triton" (``kernels.gated_delta_step_triton``; also on CPU tensors under TRITON_INTERPRET=1) or "torch".

    Returns:
        o [B, 1, H, V] in q's dtype.

    As ``gla.gla_step_``: the state never moves, so a captured CUDA graph replays the step, and one kernel reads
    and writes it once (a scan from it would write a new state, then copy that in).
    """
    B, T, H, K, V = _check_inputs(q, k, v, g, beta, state)
    check_step("gated_delta_step_", T, state)
    backend = resolve_step_backend(backend, q, state)
    if backend == "torch":
        qf, kf, vf = (x[:, 0].float() for x in (q, k, v))  # [B, H, *]
        state.mul_(g[:, 0].float().exp()[..., None, None])
        u = beta[:, 0].float()[..., None] * (vf - torch.einsum("bhk,bhkv->bhv", kf, state))
        state.add_(kf[..., None] * u[..., None, :])
        return (scale * torch.einsum("bhk,bhkv->bhv", qf, state))[:, None].to(q.dtype)
    return gated_delta_step_triton(q, k, v, g, beta, scale, state)


class GatedDeltaNetStudent(LinearAttentionStudent):
    """A Gated DeltaNet student: the delta rule with a per-head data-dependent decay and write strength
    (``decay_proj``, ``beta_proj``), L2-normalised q/k and an RMS-normalised readout. Arguments: see
    LinearAttentionStudent (``gate_rank`` is unused here).
    """

    kind = "gated_deltanet"
    state_sums_writes = False
    normalised_features = True

    def _build_gates(self, hidden_size: int, gate_rank: int) -> None:
        self.decay_proj = nn.Linear(hidden_size, self.num_heads)
        self.beta_proj = nn.Linear(hidden_size, self.num_heads)
        # Zero weights: decays and write strengths start data-independent, at the documented values.
        nn.init.zeros_(self.decay_proj.weight)
        nn.init.zeros_(self.beta_proj.weight)
        with torch.no_grad():
            self.decay_proj.bias.copy_(retention_logits(self.num_heads))
            self.beta_proj.bias.fill_(INITIAL_BETA_LOGIT)

    def _gates(self, hidden_states, fused):
        beta = torch.sigmoid(self.beta_proj(hidden_states).float())
        return self._log_decays(self.decay_proj(hidden_states), fused), beta

    @staticmethod
    def _operator(q, k, v, gates, **kwargs) -> Output:
        return gated_delta(q, k, v, *gates, **kwargs)

    _in_place_step = staticmethod(gated_delta_step_)

    def _resolve_backend(self, q, k, v, gates) -> str:
        # fla cannot differentiate the gated delta rule everywhere: a call that will be differentiated
        # may have to stay on PyTorch (backends.fla_gated_delta_backward_supported).
        differentiated = needs_grad(q, k, v, *gates)
        return resolve_backend(self.backend, q, differentiated, differentiated)

"""Pure-PyTorch linear-attention operators with flash-linear-attention semantics.

Two mechanisms, matching ``fla`` 0.6.0 (layout ``[B, T, H, D]``, state ``[B, H, K, V]``):

* GLA (gated linear attention), per-key-channel log-decay ``g``::

      S_t = exp(g_t)[:, None] * S_{t-1} + k_t^T v_t
      o_t = scale * q_t @ S_t

* Gated delta rule (Gated DeltaNet), per-head log-decay ``g`` and write strength ``beta``::

      S   = exp(g_t) * S_{t-1}
      S_t = S + k_t^T (beta_t * (v_t - k_t @ S))
      o_t = scale * q_t @ S_t

Each mechanism has a step-by-step reference (``*_recurrent``), a chunkwise-parallel
pure-PyTorch form (``*_chunked``, differentiable, runs anywhere) and a dispatcher
(``gla`` / ``gated_delta``) that can also call fla's Triton kernels on CUDA.

All implementations compute in fp32, return the output in the dtype of ``q`` and the
final state in fp32 (as fla does). ``g`` must be <= 0 (log of a decay in (0, 1]).

For decoding, ``gla_step_`` advances a GLA state in place by one token (one Triton kernel on CUDA),
so that a captured CUDA graph can replay the step (see ``decoding.py``).

This file is self-contained (only torch and, optionally, fla and Triton) so that it can be copied
verbatim next to exported models.
"""

import math
import importlib.util
from typing import Optional, Tuple

import torch

try:
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule
    from fla.ops.gla import chunk_gla, fused_recurrent_gla
    from fla.utils import IS_NVIDIA_HOPPER, TRITON_ABOVE_3_4_0, TRITON_ABOVE_3_7_1

    _FLA_IMPORT_ERROR: Optional[str] = None
    # fla refuses the gated delta rule's backward on Hopper GPUs under Triton 3.4-3.7.0 (wrong
    # results, fla issue #640) unless tilelang provides that kernel; "auto" then trains on "chunked".
    _FLA_GATED_DELTA_BACKWARD = (
        not (IS_NVIDIA_HOPPER and TRITON_ABOVE_3_4_0 and not TRITON_ABOVE_3_7_1)
        or importlib.util.find_spec("tilelang") is not None
    )
except ImportError as exc:  # fla is optional: the pure-PyTorch backends need nothing else
    _FLA_IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

try:  # Triton comes with fla (and with CUDA builds of torch); without it decoding steps use PyTorch ops
    import triton
    import triton.language as tl
except ImportError:
    triton = None

BACKENDS = ("auto", "recurrent", "chunked", "fla", "fla_recurrent")

# Sub-block length inside GLA chunks (see `_gla_intra_chunk_scores`). Pairwise decays cost
# ~B*H*T*K*c exps and the cross-sub-block keys ~B*H*T*K*C/c multiplies; c = 4 was fastest
# on CPU for chunk sizes 16-64.
_GLA_SUBBLOCK = 4

Output = Tuple[torch.Tensor, Optional[torch.Tensor]]


def fla_available() -> bool:
    """Whether flash-linear-attention (fla) could be imported."""
    return _FLA_IMPORT_ERROR is None


# --------------------------------------------------------------------------- validation


def _check_qkv(q, k, v, initial_state) -> Tuple[int, int, int, int, int]:
    """Check q/k/v/initial_state shapes; return (B, T, H, K, V)."""
    if q.dim() != 4 or k.shape != q.shape:
        raise ValueError(
            f"q and k must both be [B, T, H, K]; got q {tuple(q.shape)}, k {tuple(k.shape)}"
        )
    B, T, H, K = q.shape
    if v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must be [B, T, H, V] = [{B}, {T}, {H}, V]; got v {tuple(v.shape)}")
    V = v.shape[-1]
    if initial_state is not None and initial_state.shape != (B, H, K, V):
        raise ValueError(
            f"initial_state must be [B, H, K, V] = [{B}, {H}, {K}, {V}]; "
            f"got {tuple(initial_state.shape)}"
        )
    return B, T, H, K, V


def _check_gla_inputs(q, k, v, g, initial_state) -> Tuple[int, int, int, int, int]:
    dims = _check_qkv(q, k, v, initial_state)
    if g.shape != q.shape:
        raise ValueError(
            f"GLA gate g must have the shape of q [B, T, H, K] = {tuple(q.shape)}; "
            f"got g {tuple(g.shape)}"
        )
    return dims


def _check_gated_delta_inputs(q, k, v, g, beta, initial_state) -> Tuple[int, int, int, int, int]:
    dims = _check_qkv(q, k, v, initial_state)
    for name, x in (("g", g), ("beta", beta)):
        if x.shape != q.shape[:3]:
            raise ValueError(
                f"gated-delta {name} must be [B, T, H] = {tuple(q.shape[:3])}; "
                f"got {name} {tuple(x.shape)}"
            )
    return dims


def _check_chunk_size(chunk_size: int) -> None:
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int; got {chunk_size!r}")


# --------------------------------------------------------------------------- helpers


def _heads_first(x: torch.Tensor) -> torch.Tensor:
    """[B, T, H, ...] -> fp32 [B, H, T, ...]."""
    return x.float().transpose(1, 2)


def _to_chunks(x: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """[B, H, T, ...] -> [B, H, N, chunk_size, ...], zero-padding T up to N * chunk_size.

    Zero padding is neutral for both mechanisms: k = 0 (and beta = 0) writes nothing,
    and g = 0 means no decay, so outputs and the final state are unchanged.
    """
    B, H, T = x.shape[:3]
    pad = -T % chunk_size
    if pad:
        x = torch.cat([x, x.new_zeros(B, H, pad, *x.shape[3:])], dim=2)
    return x.reshape(B, H, -1, chunk_size, *x.shape[3:])


def _from_chunks(o: torch.Tensor, T: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, H, N, C, V] -> [B, T, H, V] in `dtype`, dropping padding."""
    B, H = o.shape[:2]
    return o.reshape(B, H, -1, o.shape[-1])[:, :, :T].transpose(1, 2).to(dtype)


def _initial_state(initial_state, B, H, K, V, like: torch.Tensor) -> torch.Tensor:
    if initial_state is None:
        return like.new_zeros(B, H, K, V)
    return initial_state.float()


def _masked_exp(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """exp(x) where mask, exactly 0 elsewhere.

    Masking the exponent (not the result) keeps unused entries, whose exponents may be
    large and positive, from overflowing to inf and turning into NaN (values or grads).
    """
    return x.masked_fill(~mask, -math.inf).exp()


# --------------------------------------------------------------------------- GLA


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
    B, T, H, K, V = _check_gla_inputs(q, k, v, g, initial_state)
    dtype = q.dtype
    q, k, v, g = (_heads_first(x) for x in (q, k, v, g))
    S = _initial_state(initial_state, B, H, K, V, like=q)
    o = q.new_empty(B, T, H, V)
    for t in range(T):
        S = g[:, :, t, :, None].exp() * S + k[:, :, t, :, None] * v[:, :, t, None, :]
        o[:, t] = scale * torch.einsum("bhk,bhkv->bhv", q[:, :, t], S)
    return o.to(dtype), (S if output_final_state else None)


def _gla_intra_chunk_scores(q: torch.Tensor, k: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
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
    c = math.gcd(C, _GLA_SUBBLOCK)
    n_sub = C // c
    qs, ks, bs = (x.reshape(*batch, n_sub, c, K) for x in (q, k, b))
    causal = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()

    # Same sub-block: [..., n_sub, c, c, K] pairwise decays.
    decay = _masked_exp(bs[..., :, None, :] - bs[..., None, :, :], causal[:, :, None])
    diag = (qs[..., :, None, :] * ks[..., None, :, :] * decay).sum(-1)

    # Earlier sub-blocks, bridged through the gap between the key sub-block's last position e
    # and the query sub-block's first position s (all three factors are <= 1).
    q_ref = qs * (bs - bs[..., :1, :]).exp()  # decay s -> i
    k_end = ks * (bs[..., -1:, :] - bs).exp()  # decay j -> e
    earlier = torch.ones(n_sub, n_sub, dtype=torch.bool, device=q.device).tril(-1)
    gap = _masked_exp(bs[..., :, None, 0, :] - bs[..., None, :, -1, :], earlier[:, :, None])
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

    Within a chunk the output is a causal decayed attention (see `_gla_intra_chunk_scores`)
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
    B, T, H, K, V = _check_gla_inputs(q, k, v, g, initial_state)
    _check_chunk_size(chunk_size)
    dtype = q.dtype
    q, k, v, g = (_to_chunks(_heads_first(x), chunk_size) for x in (q, k, v, g))  # [B,H,N,C,*]
    q = q * scale
    b = g.cumsum(-2)  # decay from the chunk start up to and including each position
    b_last = b[..., -1, :]  # [B, H, N, K] total decay of each chunk

    o_intra = _gla_intra_chunk_scores(q, k, b) @ v
    q_decayed = q * b.exp()  # reads the state entering the chunk
    k_decayed = k * (b_last[..., None, :] - b).exp()  # writes, decayed to the chunk end
    chunk_writes = k_decayed.transpose(-1, -2) @ v  # [B, H, N, K, V]

    S = _initial_state(initial_state, B, H, K, V, like=q)
    entering = []
    for n in range(q.shape[2]):
        entering.append(S)
        S = b_last[:, :, n, :, None].exp() * S + chunk_writes[:, :, n]
    o = o_intra + q_decayed @ torch.stack(entering, dim=2)
    return _from_chunks(o, T, dtype), (S if output_final_state else None)


# --------------------------------------------------------------------------- gated delta rule


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
    B, T, H, K, V = _check_gated_delta_inputs(q, k, v, g, beta, initial_state)
    dtype = q.dtype
    q, k, v, g, beta = (_heads_first(x) for x in (q, k, v, g, beta))
    S = _initial_state(initial_state, B, H, K, V, like=q)
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
    B, T, H, K, V = _check_gated_delta_inputs(q, k, v, g, beta, initial_state)
    _check_chunk_size(chunk_size)
    dtype = q.dtype
    q, k, v, g, beta = (_to_chunks(_heads_first(x), chunk_size) for x in (q, k, v, g, beta))
    q = q * scale
    b = g.cumsum(-1)  # [B, H, N, C]
    b_last = b[..., -1]  # [B, H, N]
    causal = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=q.device).tril()
    decay = _masked_exp(b[..., :, None] - b[..., None, :], causal)  # exp(b_i - b_j), j <= i

    # WY representation: solve (I + L) [U, W] = [beta v, beta exp(b) k]; L is strictly lower,
    # so unitriangular=True supplies the identity.
    L = (beta[..., None] * (k @ k.transpose(-1, -2)) * decay).tril(-1)
    rhs = torch.cat([beta[..., None] * v, (beta * b.exp())[..., None] * k], dim=-1)
    U, W = torch.linalg.solve_triangular(L, rhs, upper=False, unitriangular=True).split([V, K], -1)

    scores = (q @ k.transpose(-1, -2)) * decay  # [B, H, N, C, C]
    q_decayed = q * b.exp()[..., None]
    k_decayed = k * (b_last[..., None] - b).exp()[..., None]

    S = _initial_state(initial_state, B, H, K, V, like=q)
    outputs = []
    for n in range(q.shape[2]):
        u = U[:, :, n] - W[:, :, n] @ S
        outputs.append(q_decayed[:, :, n] @ S + scores[:, :, n] @ u)
        S = b_last[:, :, n, None, None].exp() * S + k_decayed[:, :, n].transpose(-1, -2) @ u
    o = torch.stack(outputs, dim=2)
    return _from_chunks(o, T, dtype), (S if output_final_state else None)


# --------------------------------------------------------------------------- dispatchers


def fla_gated_delta_backward_supported() -> bool:
    """Whether fla can differentiate the gated delta rule here (see ``_FLA_GATED_DELTA_BACKWARD``)."""
    return fla_available() and _FLA_GATED_DELTA_BACKWARD


def needs_grad(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether autograd will differentiate through an op on these tensors."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def resolve_backend(backend: str, q: torch.Tensor, gated_delta_backward: bool = False) -> str:
    """Map "auto" to a concrete backend and check that an fla backend can run.

    ``gated_delta_backward``: the call is a gated delta rule that will be differentiated.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; valid backends: {', '.join(BACKENDS)}")
    if backend == "auto":
        # One-token steps (decoding) take the step-by-step forms; longer inputs the chunked ones.
        step = q.shape[1] == 1
        if q.is_cuda and fla_available() and (fla_gated_delta_backward_supported() or not gated_delta_backward):
            return "fla_recurrent" if step else "fla"
        return "recurrent" if step else "chunked"
    if backend.startswith("fla"):
        if not fla_available():
            raise RuntimeError(
                f"backend {backend!r} needs flash-linear-attention (fla==0.6.0), which could not "
                f"be imported ({_FLA_IMPORT_ERROR}); install it or use backend='chunked'"
            )
        if not q.is_cuda:
            raise RuntimeError(
                f"backend {backend!r} runs fla's Triton kernels and needs CUDA tensors; "
                f"got tensors on {q.device}; use backend='chunked' off-GPU"
            )
    return backend


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
    backend = resolve_backend(backend, q)
    if backend == "recurrent":
        return gla_recurrent(q, k, v, g, scale, initial_state, output_final_state)
    if backend == "chunked":
        return gla_chunked(q, k, v, g, scale, chunk_size, initial_state, output_final_state)
    _check_gla_inputs(q, k, v, g, initial_state)
    if initial_state is not None:
        initial_state = initial_state.float()  # fla's kernels keep (and assert) an fp32 state
    state_kwargs = dict(initial_state=initial_state, output_final_state=output_final_state)
    if backend == "fla":
        return chunk_gla(q, k, v, g, scale=scale, **state_kwargs)
    return fused_recurrent_gla(q, k, v, gk=g, scale=scale, **state_kwargs)  # gate is named gk


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
        "recurrent" / "chunked": the pure-PyTorch implementations in this file.
        "fla": `fla.ops.gated_delta_rule.chunk_gated_delta_rule` (CUDA, differentiable).
        "fla_recurrent": `fla.ops.gated_delta_rule.fused_recurrent_gated_delta_rule`
            (CUDA, forward only: for decoding).
    chunk_size only affects "chunked"; fla picks its own.
    """
    backend = resolve_backend(backend, q, gated_delta_backward=needs_grad(q, k, v, g, beta, initial_state))
    if backend == "recurrent":
        return gated_delta_recurrent(q, k, v, g, beta, scale, initial_state, output_final_state)
    if backend == "chunked":
        return gated_delta_chunked(
            q, k, v, g, beta, scale, chunk_size, initial_state, output_final_state
        )
    _check_gated_delta_inputs(q, k, v, g, beta, initial_state)
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


# --------------------------------------------------------------------------- in-place decoding step


def resolve_step_backend(backend: str, q: torch.Tensor, state: torch.Tensor) -> str:
    """The backend `gla_step_` runs: "auto" picks Triton on CUDA when the state is stored V-first."""
    v_first = state.transpose(-1, -2).is_contiguous()
    if backend == "auto":
        return "triton" if triton is not None and q.is_cuda and v_first else "torch"
    if backend not in ("triton", "torch"):
        raise ValueError(f"unknown backend {backend!r}; valid: 'auto', 'triton', 'torch'")
    if backend == "triton" and triton is None:
        raise RuntimeError("backend 'triton' needs Triton, which could not be imported")
    if backend == "triton" and not v_first:
        raise ValueError("backend 'triton' needs the state stored V-first (state.transpose(-1, -2) contiguous)")
    return backend


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
            "triton" (also on CPU tensors under TRITON_INTERPRET=1) or "torch".

    Returns:
        o [B, 1, H, V] in q's dtype.

    The state never moves, which is what lets a captured CUDA graph replay the step. "V-first"
    storage (``state.transpose(-1, -2)`` contiguous, as ``decoding.StaticDecoder`` keeps it) makes
    each kernel row one value channel's K contiguous keys, read whole whatever V is.
    """
    B, T, H, K, V = _check_gla_inputs(q, k, v, g, state)
    if T != 1:
        raise ValueError(f"gla_step_ advances one token; got T={T}")
    if state.dtype != torch.float32:
        raise ValueError(f"the GLA state must be fp32; got {state.dtype}")
    backend = resolve_step_backend(backend, q, state)
    if backend == "torch":
        qf, kf, vf, gf = (x[:, 0].float() for x in (q, k, v, g))  # [B, H, *]
        state.mul_(gf.exp()[..., None]).add_(kf[..., None] * vf[..., None, :])
        return (scale * torch.einsum("bhk,bhkv->bhv", qf, state))[:, None].to(q.dtype)
    o = torch.empty(B, 1, H, V, dtype=q.dtype, device=q.device)
    block_k = triton.next_power_of_2(K)
    block_v = max(1, min(32, 8192 // block_k))  # a [block_v, block_k] fp32 tile per program
    _gla_step_kernel[(triton.cdiv(V, block_v), B * H)](
        q.contiguous(), k.contiguous(), v.contiguous(), g.contiguous(), state, o, scale,
        K=K, V=V, BLOCK_K=block_k, BLOCK_V=block_v,
    )
    return o


if triton is not None:

    @triton.jit
    def _gla_step_kernel(q, k, v, g, state, o, scale, K: tl.constexpr, V: tl.constexpr,
                         BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr):
        # One (sequence, head) and BLOCK_V value channels: S[v, :] = exp(g) * S[v, :] + v[v] * k,
        # o[v] = scale * q . S[v, :]. q/k/g rows are K long, v/o rows V long, state rows [V, K].
        i_v, i_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
        keys = tl.arange(0, BLOCK_K)
        channels = i_v * BLOCK_V + tl.arange(0, BLOCK_V)
        key_ok, channel_ok = keys < K, channels < V
        b_q = tl.load(q + i_bh * K + keys, mask=key_ok, other=0).to(tl.float32) * scale
        b_k = tl.load(k + i_bh * K + keys, mask=key_ok, other=0).to(tl.float32)
        b_g = tl.load(g + i_bh * K + keys, mask=key_ok, other=0).to(tl.float32)
        b_v = tl.load(v + i_bh * V + channels, mask=channel_ok, other=0).to(tl.float32)
        p_state = state + i_bh * V * K + channels[:, None] * K + keys[None, :]
        tile_ok = channel_ok[:, None] & key_ok[None, :]
        b_s = tl.load(p_state, mask=tile_ok, other=0)
        b_s = b_s * tl.exp(b_g)[None, :] + b_v[:, None] * b_k[None, :]
        tl.store(p_state, b_s, mask=tile_ok)
        tl.store(o + i_bh * V + channels, tl.sum(b_s * b_q[None, :], axis=1).to(o.dtype.element_ty), mask=channel_ok)

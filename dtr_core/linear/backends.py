"""What every linear-attention operator shares: backend choice (fla or PyTorch), input checks and the
chunking helpers of the pure-PyTorch chunked forms.

The operators (``gla.py``, ``gated_deltanet.py``) follow fla 0.6.0's conventions: layout
``[B, T, H, D]``, recurrent state ``[B, H, K, V]``, ``g`` a log-decay (<= 0). Every PyTorch form
computes in fp32 and returns the output in q's dtype and the final state in fp32, as fla does.

Copied next to exported hybrids: imports only torch, its siblings and (inside try) fla.
"""

from __future__ import annotations

import importlib.util
import math
from typing import Optional, Tuple

import torch

from .kernels import triton

try:
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

BACKENDS = ("auto", "recurrent", "chunked", "compiled", "fla", "fla_recurrent")

# (output [B, T, H, V], final state [B, H, K, V] or None): what every operator returns.
Output = Tuple[torch.Tensor, Optional[torch.Tensor]]


def fla_available() -> bool:
    """Whether flash-linear-attention (fla) could be imported."""
    return _FLA_IMPORT_ERROR is None


def fla_gated_delta_backward_supported() -> bool:
    """Whether fla can differentiate the gated delta rule here (see ``_FLA_GATED_DELTA_BACKWARD``)."""
    return fla_available() and _FLA_GATED_DELTA_BACKWARD


def needs_grad(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether autograd will differentiate through an op on these tensors."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def resolve_backend(backend: str, q: torch.Tensor, gated_delta_backward: bool = False,
                    differentiated: bool = False) -> str:
    """Map "auto" to a concrete backend and check that an fla backend can run.

    ``gated_delta_backward``: the call is a gated delta rule that will be differentiated.
    ``differentiated``: the call will be differentiated (training). On CUDA where fla cannot serve it,
    "auto" then takes "compiled": the chunked form's many small kernels, fused by torch.compile, trained
    a student layer 2.0x (GLA) and 2.8x (Gated DeltaNet) faster than eager on an H200, after a first step
    that compiles (2 min for Gated DeltaNet; BENCHMARKS.md, "Issue 14"). Calls that are not
    differentiated stay eager: no compile latency while generating.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; valid backends: {', '.join(BACKENDS)}")
    if backend == "auto":
        # One-token steps (decoding) take the step-by-step forms; longer inputs the chunked ones.
        step = q.shape[1] == 1
        if q.is_cuda and fla_available() and (fla_gated_delta_backward_supported() or not gated_delta_backward):
            return "fla_recurrent" if step else "fla"
        if step:
            return "recurrent"
        return "compiled" if q.is_cuda and (differentiated or gated_delta_backward) else "chunked"
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


_COMPILED: dict = {}


def compiled(form):
    """``form`` (a chunked PyTorch form) under torch.compile, compiled once per process and reused by
    every layer; torch recompiles it for new shapes by itself."""
    if form not in _COMPILED:
        _COMPILED[form] = torch.compile(form)
    return _COMPILED[form]


def resolve_step_backend(backend: str, q: torch.Tensor, state: torch.Tensor) -> str:
    """The backend an in-place decoding step (``gla.gla_step_``, ``gated_deltanet.gated_delta_step_``) runs: "auto"
    picks Triton on CUDA when the state is stored V-first."""
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


# --------------------------------------------------------------------------- validation


def check_step(name: str, length: int, state: torch.Tensor) -> None:
    """What an in-place decoding step takes: one token, and an fp32 state."""
    if length != 1:
        raise ValueError(f"{name} advances one token; got T={length}")
    if state.dtype != torch.float32:
        raise ValueError(f"{name} keeps an fp32 state; got {state.dtype}")


def check_qkv(q, k, v, initial_state) -> Tuple[int, int, int, int, int]:
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


def check_chunk_size(chunk_size: int) -> None:
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int; got {chunk_size!r}")


# --------------------------------------------------------------------------- PyTorch-form helpers


def heads_first(x: torch.Tensor) -> torch.Tensor:
    """[B, T, H, ...] -> fp32 [B, H, T, ...]."""
    return x.float().transpose(1, 2)


def to_chunks(x: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """[B, H, T, ...] -> [B, H, N, chunk_size, ...], zero-padding T up to N * chunk_size.

    Zero padding is neutral for both mechanisms: k = 0 (and beta = 0) writes nothing,
    and g = 0 means no decay, so outputs and the final state are unchanged.
    """
    B, H, T = x.shape[:3]
    pad = -T % chunk_size
    if pad:
        x = torch.cat([x, x.new_zeros(B, H, pad, *x.shape[3:])], dim=2)
    return x.reshape(B, H, -1, chunk_size, *x.shape[3:])


def from_chunks(o: torch.Tensor, T: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, H, N, C, V] -> [B, T, H, V] in `dtype`, dropping padding."""
    B, H = o.shape[:2]
    return o.reshape(B, H, -1, o.shape[-1])[:, :, :T].transpose(1, 2).to(dtype)


def starting_state(initial_state, B, H, K, V, like: torch.Tensor) -> torch.Tensor:
    """The fp32 state [B, H, K, V] a scan starts from: ``initial_state``, or zeros."""
    if initial_state is None:
        return like.new_zeros(B, H, K, V)
    return initial_state.float()


def masked_exp(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """exp(x) where mask, exactly 0 elsewhere.

    Masking the exponent (not the result) keeps unused entries, whose exponents may be
    large and positive, from overflowing to inf and turning into NaN (values or grads).
    """
    return x.masked_fill(~mask, -math.inf).exp()

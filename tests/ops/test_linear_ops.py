"""Tests for the operators of dtr_core.linear.gla and .gated_deltanet: chunked forms vs the step-by-step
references, dispatchers (backend choice: dtr_core.linear.backends), and (marked `gpu`) fla's kernels vs
the references."""

import os
import re
from typing import Callable, NamedTuple

import pytest
import torch
import torch.nn.functional as F
from conftest import rel_err

from dtr_core.linear import backends
from dtr_core.linear.gated_deltanet import gated_delta, gated_delta_chunked, gated_delta_recurrent
from dtr_core.linear.gla import gla, gla_chunked, gla_recurrent

B, T, H, K, V = 2, 75, 2, 16, 12  # T is not a multiple of any tested chunk size
SCALE = K**-0.5
TOL = 1e-4

# Per-step log-decay ranges: strong decays underflow a naive exp(-cumsum) within one chunk.
DECAYS = {"strong": (-8.0, 0.0), "weak": (-1e-3, 0.0)}


def uniform(shape, low, high, gen):
    return low + (high - low) * torch.rand(shape, generator=gen)


def gla_inputs(decay="strong", with_state=True, t=T, kv=(K, V), device="cpu", dtype=torch.float32):
    """(q, k, v, g, initial_state) for GLA, seed 42."""
    gen = torch.Generator().manual_seed(42)
    dk, dv = kv
    q, k = torch.randn(B, t, H, dk, generator=gen), torch.randn(B, t, H, dk, generator=gen)
    v = torch.randn(B, t, H, dv, generator=gen)
    g = uniform((B, t, H, dk), *DECAYS[decay], gen)
    h0 = torch.randn(B, H, dk, dv, generator=gen) if with_state else None
    return [x if x is None else x.to(device, dtype) for x in (q, k, v, g, h0)]


def gated_delta_inputs(
    decay="strong", with_state=True, t=T, kv=(K, V), device="cpu", dtype=torch.float32
):
    """(q, k, v, g, beta, initial_state) for the gated delta rule, seed 42; q, k L2-normalised."""
    gen = torch.Generator().manual_seed(42)
    dk, dv = kv
    q = F.normalize(torch.randn(B, t, H, dk, generator=gen), dim=-1)
    k = F.normalize(torch.randn(B, t, H, dk, generator=gen), dim=-1)
    v = torch.randn(B, t, H, dv, generator=gen)
    g = uniform((B, t, H), *DECAYS[decay], gen)
    beta = torch.sigmoid(torch.randn(B, t, H, generator=gen))
    h0 = torch.randn(B, H, dk, dv, generator=gen) if with_state else None
    return [x if x is None else x.to(device, dtype) for x in (q, k, v, g, beta, h0)]


def run_gla(fn, inputs, **kwargs):
    q, k, v, g, h0 = inputs
    return fn(q, k, v, g, SCALE, initial_state=h0, output_final_state=True, **kwargs)


def run_gated_delta(fn, inputs, **kwargs):
    q, k, v, g, beta, h0 = inputs
    return fn(q, k, v, g, beta, SCALE, initial_state=h0, output_final_state=True, **kwargs)


class Mechanism(NamedTuple):
    make: Callable  # builds the input list
    run: Callable  # run(fn, inputs, **kwargs) -> (o, final_state)
    recurrent: Callable
    chunked: Callable
    dispatch: Callable


MECHANISMS = {
    "gla": Mechanism(gla_inputs, run_gla, gla_recurrent, gla_chunked, gla),
    "gated_delta": Mechanism(
        gated_delta_inputs,
        run_gated_delta,
        gated_delta_recurrent,
        gated_delta_chunked,
        gated_delta,
    ),
}

mechanisms = pytest.mark.parametrize("mechanism", list(MECHANISMS))
chunk_sizes = pytest.mark.parametrize("chunk_size", [16, 32, 64], ids=lambda c: f"C{c}")
decays = pytest.mark.parametrize("decay", list(DECAYS))


# --------------------------------------------------------------------------- chunked vs recurrent


@mechanisms
@chunk_sizes
@decays
@pytest.mark.parametrize("with_state", [True, False], ids=["h0", "no_h0"])
def test_chunked_matches_recurrent(mechanism, chunk_size, decay, with_state):
    m = MECHANISMS[mechanism]
    inputs = m.make(decay, with_state)
    o_ref, s_ref = m.run(m.recurrent, inputs)
    o, s = m.run(m.chunked, inputs, chunk_size=chunk_size)
    assert o.shape == (B, T, H, V) and s.shape == (B, H, K, V)
    assert rel_err(o, o_ref) <= TOL
    assert rel_err(s, s_ref) <= TOL


@mechanisms
@chunk_sizes
@decays
def test_chunked_gradients_match_recurrent(mechanism, chunk_size, decay):
    m = MECHANISMS[mechanism]
    gen = torch.Generator().manual_seed(42)
    w_o, w_s = torch.randn(B, T, H, V, generator=gen), torch.randn(B, H, K, V, generator=gen)

    def grads(fn, **kwargs):
        inputs = [x.clone().requires_grad_() for x in m.make(decay)]
        o, s = m.run(fn, inputs, **kwargs)
        ((o * w_o).sum() + (s * w_s).sum()).backward()
        return [x.grad for x in inputs]

    for got, want in zip(grads(m.chunked, chunk_size=chunk_size), grads(m.recurrent)):
        assert rel_err(got, want) <= TOL


@mechanisms
def test_no_final_state_unless_requested(mechanism):
    m = MECHANISMS[mechanism]
    inputs = m.make()
    for fn in (m.recurrent, m.chunked):
        o, s = fn(*inputs[:-1], SCALE)
        assert s is None and o.shape == (B, T, H, V)


@mechanisms
def test_single_token_and_odd_chunk_size(mechanism):
    m = MECHANISMS[mechanism]
    for t, chunk_size in [(1, 32), (29, 7)]:
        inputs = m.make(t=t)
        o_ref, s_ref = m.run(m.recurrent, inputs)
        o, s = m.run(m.chunked, inputs, chunk_size=chunk_size)
        assert rel_err(o, o_ref) <= TOL and rel_err(s, s_ref) <= TOL


@mechanisms
@pytest.mark.parametrize("impl", ["recurrent", "chunked"])
def test_bf16_inputs(mechanism, impl):
    m = MECHANISMS[mechanism]
    fn = getattr(m, impl)
    inputs = m.make()
    bf16 = [x.bfloat16() for x in inputs]
    o, s = m.run(fn, bf16)
    assert o.dtype == torch.bfloat16 and s.dtype == torch.float32
    # Same rounded inputs in fp32: only the output rounding differs.
    o_ref, s_ref = m.run(m.recurrent, [x.float() for x in bf16])
    assert rel_err(o, o_ref) <= 1e-2 and rel_err(s, s_ref) <= 1e-4


# --------------------------------------------------------------------------- dispatchers


@mechanisms
def test_dispatcher_cpu_backends(mechanism):
    m = MECHANISMS[mechanism]
    inputs = m.make()
    expected = {
        "recurrent": m.run(m.recurrent, inputs),
        "chunked": m.run(m.chunked, inputs, chunk_size=16),
        "auto": m.run(m.chunked, inputs, chunk_size=16),  # CPU tensors never go to fla
    }
    for backend, (o_ref, s_ref) in expected.items():
        o, s = m.run(m.dispatch, inputs, backend=backend, chunk_size=16)
        torch.testing.assert_close(o, o_ref, rtol=0, atol=0)
        torch.testing.assert_close(s, s_ref, rtol=0, atol=0)


@mechanisms
def test_compiled_backend_is_the_chunked_form_with_its_gradients(mechanism):
    """"compiled" (what "auto" trains with on CUDA where fla cannot) runs the chunked form under
    torch.compile: the same outputs, final states and gradients (fp32, tiny sizes: compiling takes
    seconds per mechanism on the CPU)."""
    m = MECHANISMS[mechanism]
    results = []
    for backend in ("chunked", "compiled"):
        inputs = [x if x is None else x.clone().requires_grad_(x.is_floating_point()) for x in m.make(t=40)]
        o, s = m.run(m.dispatch, inputs, backend=backend, chunk_size=16)
        (o.square().sum() + s.square().sum()).backward()
        results.append((o, s, [x.grad for x in inputs if x is not None]))
    (o_ref, s_ref, grads_ref), (o, s, grads) = results
    torch.testing.assert_close(o, o_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s, s_ref, rtol=1e-5, atol=1e-5)
    for grad, grad_ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(grad, grad_ref, rtol=1e-4, atol=1e-4)


def test_auto_trains_on_the_compiled_form_only_on_cuda_without_fla(monkeypatch):
    """Where "auto" sends a call: fla on CUDA when it can serve it; a differentiated call it cannot
    serve takes "compiled" on CUDA; the CPU and calls without gradients stay eager."""
    cpu, cuda = torch.empty(1, 8, 1, 4), torch.empty(1, 8, 1, 4, device="meta")
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: self.device.type == "meta"))
    monkeypatch.setattr(backends, "_FLA_IMPORT_ERROR", "ImportError: no fla here")
    assert backends.resolve_backend("auto", cpu, differentiated=True) == "chunked"
    assert backends.resolve_backend("auto", cuda, differentiated=True) == "compiled"
    assert backends.resolve_backend("auto", cuda) == "chunked"
    assert backends.resolve_backend("auto", cuda[:, :1]) == "recurrent"
    monkeypatch.setattr(backends, "_FLA_IMPORT_ERROR", None)
    monkeypatch.setattr(backends, "_FLA_GATED_DELTA_BACKWARD", False, raising=False)  # Hopper, Triton < 3.7.1
    assert backends.resolve_backend("auto", cuda, differentiated=True) == "fla"
    assert backends.resolve_backend("auto", cuda, gated_delta_backward=True, differentiated=True) == "compiled"


@mechanisms
def test_dispatcher_auto_decodes_one_token_step_by_step(mechanism):
    # A decoding step (one token) takes the step-by-step form, not a one-token chunk.
    m = MECHANISMS[mechanism]
    inputs = m.make(t=1)
    o_ref, s_ref = m.run(m.recurrent, inputs)
    o, s = m.run(m.dispatch, inputs, backend="auto")
    torch.testing.assert_close(o, o_ref, rtol=0, atol=0)
    torch.testing.assert_close(s, s_ref, rtol=0, atol=0)


@mechanisms
def test_dispatcher_unknown_backend(mechanism):
    m = MECHANISMS[mechanism]
    with pytest.raises(ValueError, match="valid backends: auto, recurrent, chunked, compiled, fla"):
        m.run(m.dispatch, m.make(), backend="triton")


@mechanisms
@pytest.mark.parametrize("backend", ["fla", "fla_recurrent"])
def test_dispatcher_fla_without_fla(mechanism, backend, monkeypatch):
    m = MECHANISMS[mechanism]
    monkeypatch.setattr(backends, "_FLA_IMPORT_ERROR", "ModuleNotFoundError: No module named 'fla'")
    assert not backends.fla_available()
    with pytest.raises(RuntimeError, match="flash-linear-attention"):
        m.run(m.dispatch, m.make(), backend=backend)


@mechanisms
@pytest.mark.parametrize("backend", ["fla", "fla_recurrent"])
def test_dispatcher_fla_needs_cuda(mechanism, backend, monkeypatch):
    m = MECHANISMS[mechanism]
    monkeypatch.setattr(backends, "_FLA_IMPORT_ERROR", None)  # pretend fla imported
    inputs = m.make()
    with pytest.raises(RuntimeError, match="CUDA"):
        m.run(m.dispatch, inputs, backend=backend)
    # ... while "auto" still picks the pure-PyTorch chunked form for CPU tensors.
    o, _ = m.run(m.dispatch, inputs, backend="auto")
    torch.testing.assert_close(o, m.run(m.chunked, inputs)[0], rtol=0, atol=0)


# --------------------------------------------------------------------------- validation


def _replace(inputs, index, shape):
    inputs = list(inputs)
    inputs[index] = torch.zeros(shape)
    return inputs


def _name(fn):
    return fn.__name__


@pytest.mark.parametrize("fn", [gla_recurrent, gla_chunked, gla], ids=_name)
@pytest.mark.parametrize(
    "index, shape",
    [(1, (B, T, H, K + 1)), (2, (B, T, H + 1, V)), (3, (B, T, H)), (4, (B, H, V, K))],
    ids=["k", "v", "g", "initial_state"],
)
def test_gla_shape_errors(fn, index, shape):
    with pytest.raises(ValueError, match=re.escape(str(shape))):
        run_gla(fn, _replace(gla_inputs(), index, shape))


@pytest.mark.parametrize(
    "fn", [gated_delta_recurrent, gated_delta_chunked, gated_delta], ids=_name
)
@pytest.mark.parametrize(
    "index, shape",
    [
        (1, (B, T + 1, H, K)),
        (2, (B, T, H, V, 1)),
        (3, (B, T, H, K)),
        (4, (B, T, H, 1)),
        (5, (H, K, V)),
    ],
    ids=["k", "v", "g", "beta", "initial_state"],
)
def test_gated_delta_shape_errors(fn, index, shape):
    with pytest.raises(ValueError, match=re.escape(str(shape))):
        run_gated_delta(fn, _replace(gated_delta_inputs(), index, shape))


@mechanisms
@pytest.mark.parametrize("chunk_size", [0, 16.0])
def test_bad_chunk_size(mechanism, chunk_size):
    m = MECHANISMS[mechanism]
    with pytest.raises(ValueError, match="chunk_size"):
        m.run(m.chunked, m.make(), chunk_size=chunk_size)


# --------------------------------------------------------------------------- fla kernels (GPU)

gpu = pytest.mark.gpu
needs_fla = pytest.mark.skipif(
    not (torch.cuda.is_available() and backends.fla_available()), reason="needs CUDA and fla"
)
GPU_SHAPE = dict(t=100, kv=(64, 64))  # typical head sizes; T not a multiple of fla's chunk (64)
# fla's chunk kernels do their fp32 matmuls (tl.dot) in TF32 unless Triton is started with
# TRITON_F32_DEFAULT=ieee, so plain fp32 agreement is TF32-limited (~1e-3).
FLA_FP32_TOL = 1e-4 if os.environ.get("TRITON_F32_DEFAULT") == "ieee" else 5e-3


@gpu
@needs_fla
@mechanisms
@decays
@pytest.mark.parametrize(
    "dtype, tol", [(torch.float32, FLA_FP32_TOL), (torch.bfloat16, 1e-2)], ids=["fp32", "bf16"]
)
def test_fla_chunk_matches_recurrent(mechanism, decay, dtype, tol, request):
    if (mechanism, decay, dtype) == ("gated_delta", "weak", torch.float32):
        # Measured on an H200 (fla 0.6.0, Triton 3.6, TRITON_F32_DEFAULT=ieee): 1.39e-4. The
        # fla kernel's own arithmetic, not ours; kept at 1e-4 so a better kernel shows as XPASS.
        request.applymarker(pytest.mark.xfail(reason="fla's fp32 gated delta kernel: 1.4e-4 with weak decays"))
    m = MECHANISMS[mechanism]
    inputs = m.make(decay, device="cuda", dtype=dtype, **GPU_SHAPE)
    o_ref, s_ref = m.run(m.recurrent, inputs)
    o, s = m.run(m.dispatch, inputs, backend="fla")
    assert o.dtype == dtype
    assert rel_err(o, o_ref) <= tol
    assert rel_err(s, s_ref) <= tol


@gpu
@needs_fla
@mechanisms
def test_fla_recurrent_decoding_step(mechanism):
    # The fused recurrent kernels use elementwise fp32 math (no tl.dot): full fp32 accuracy.
    m = MECHANISMS[mechanism]
    inputs = m.make(device="cuda", t=1, kv=GPU_SHAPE["kv"])
    o_ref, s_ref = m.run(m.recurrent, inputs)
    o, s = m.run(m.dispatch, inputs, backend="fla_recurrent")
    assert rel_err(o, o_ref) <= TOL and rel_err(s, s_ref) <= TOL


@gpu
@needs_fla
@mechanisms
def test_fla_gradients_match_chunked(mechanism):
    if mechanism == "gated_delta" and not backends.fla_gated_delta_backward_supported():
        pytest.skip("fla refuses the gated delta backward on Hopper with Triton < 3.7.1 (fla issue #640)")
    m = MECHANISMS[mechanism]

    def grads(fn, **kwargs):
        inputs = [x.clone().requires_grad_() for x in m.make(device="cuda", **GPU_SHAPE)]
        o, _ = m.run(fn, inputs, **kwargs)
        w = torch.randn(o.shape, device="cuda", generator=torch.Generator("cuda").manual_seed(42))
        (o * w).sum().backward()
        return [x.grad for x in inputs]

    for got, want in zip(grads(m.dispatch, backend="fla"), grads(m.chunked)):
        assert rel_err(got, want) <= FLA_FP32_TOL

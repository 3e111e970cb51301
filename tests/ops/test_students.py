"""Students: built from teacher weights, documented initial values, padding, causality, drop-in use."""

import math
import os

import pytest
import torch
from conftest import bf16_bound, rel_err, tiny_model

from dtr_core.adapters import adapter_for
from dtr_core.hybrid import hybrid_view
from dtr_core.linear import backends
from dtr_core.linear.base import INITIAL_SPAN_RANGE, key_padding_mask
from dtr_core.linear.build import student_from_teacher
from dtr_core.linear.gated_deltanet import GatedDeltaNetStudent
from dtr_core.linear.gla import GLAStudent
from dtr_core.linear.students import build_student
from dtr_core.specs import StudentSpec

KINDS = ("gla", "gated_deltanet")


def new_student(kind, **config):
    return build_student(dict(kind=kind, **config))


def make_student(family, kind, feature_map="hedgehog", layer_idx=0):
    model = tiny_model(family)
    adapter = adapter_for(model)
    spec = StudentSpec(kind=kind, feature_map=feature_map, window=0)  # the linear forms alone
    return model, adapter, student_from_teacher(spec, adapter.read_attention_weights(model, layer_idx),
                                                causal=adapter.causal)


@pytest.mark.parametrize("kind", KINDS)
def test_student_starts_from_teacher_projections(family, kind):
    model, adapter, student = make_student(family, kind)
    weights = adapter.read_attention_weights(model, 0)  # K/V heads shared as the teacher's (the default)
    torch.testing.assert_close(student.q_proj.weight, weights.q_weight)
    torch.testing.assert_close(student.k_proj.weight, weights.k_weight)
    torch.testing.assert_close(student.v_proj.weight, weights.v_weight)
    if weights.o_weight is None:
        assert student.o_proj is None
    else:
        torch.testing.assert_close(student.o_proj.weight, weights.o_weight)
    if weights.q_bias is not None:
        torch.testing.assert_close(student.k_proj.bias, weights.k_bias)


def test_initial_gates_follow_documented_spans():
    student = GLAStudent(hidden_size=32, num_heads=2, head_dim=8, causal=True)
    retention = torch.sigmoid(student.gate_up.bias.view(2, 16))
    low, high = INITIAL_SPAN_RANGE
    torch.testing.assert_close(1 / (1 - retention[0, 0]), torch.tensor(low))
    torch.testing.assert_close(1 / (1 - retention[0, -1]), torch.tensor(high), rtol=1e-3, atol=0)
    assert torch.count_nonzero(student.gate_up.weight) == 0  # data-independent at the start
    delta = GatedDeltaNetStudent(hidden_size=32, num_heads=2, head_dim=8, causal=True)
    torch.testing.assert_close(torch.sigmoid(delta.beta_proj.bias), torch.full((2,), 0.5))
    assert math.isclose(torch.sigmoid(delta.decay_proj.bias[0]).item(), 1 - 1 / low, rel_tol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("feature_map", ["hedgehog", "identity"])
def test_padding_does_not_change_real_positions(kind, feature_map):
    torch.manual_seed(42)
    for causal, side in ((True, "left"), (False, "right"), (True, "right")):
        student = new_student(kind, hidden_size=32, num_heads=2, head_dim=8, causal=causal, feature_map=feature_map)
        real = torch.randn(1, 9, 32)
        pad = torch.randn(1, 4, 32)
        padded = torch.cat([pad, real], 1) if side == "left" else torch.cat([real, pad], 1)
        mask = torch.zeros(1, 13)
        if side == "left":
            mask[:, 4:] = 1
        else:
            mask[:, :9] = 1
        alone, _ = student(real)
        with_pad, _ = student(padded, attention_mask=mask)
        kept = with_pad[:, 4:] if side == "left" else with_pad[:, :9]
        torch.testing.assert_close(kept, alone, rtol=1e-5, atol=1e-5, msg=f"causal={causal} {side} padding")


@pytest.mark.parametrize("kind", KINDS)
def test_causal_student_never_looks_ahead_bidirectional_does(kind):
    torch.manual_seed(42)
    x = torch.randn(1, 12, 32)
    changed = x.clone()
    changed[:, 8:] += 1.0
    for causal in (True, False):
        student = new_student(kind, hidden_size=32, num_heads=2, head_dim=8, causal=causal)
        a, _ = student(x)
        b, _ = student(changed)
        prefix_equal = torch.allclose(a[:, :8], b[:, :8], atol=1e-6)
        assert prefix_equal == causal


def test_key_padding_mask_reads_hf_masks():
    two_d = torch.tensor([[0, 1, 1]])
    assert key_padding_mask(two_d, 3).tolist() == [[False, True, True]]
    causal_bool = torch.tril(torch.ones(3, 3, dtype=torch.bool))[None, None].clone()
    causal_bool[..., 0] = False  # key 0 is padding
    assert key_padding_mask(causal_bool, 3).tolist() == [[False, True, True]]
    additive = torch.zeros(1, 1, 1, 4)
    additive[..., :2] = torch.finfo(torch.float32).min
    assert key_padding_mask(additive, 1).tolist() == [[True]]  # decoding: only the new key
    assert key_padding_mask(None, 5) is None
    with pytest.raises(ValueError, match="2D or 4D"):
        key_padding_mask(torch.ones(3), 3)


@pytest.mark.parametrize("kind", KINDS)
def test_hybrid_runs_with_padding_and_restores_base(family, kind):
    model, adapter, _ = make_student(family, kind)
    spec = StudentSpec(kind=kind, window=0)
    students = {i: student_from_teacher(spec, adapter.read_attention_weights(model, i), causal=adapter.causal)
                for i in range(2)}
    ids = torch.randint(3, 100, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, 7:] = 0
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask)
        with hybrid_view(model, adapter, students, [1]):
            assert adapter.attention_module(model, 1) is students[1]
            hybrid = model(input_ids=ids, attention_mask=mask)
        after = model(input_ids=ids, attention_mask=mask)
    key = "last_hidden_state" if family == "bert" else "logits"
    assert torch.isfinite(hybrid[key]).all()
    assert not torch.allclose(hybrid[key], before[key])
    torch.testing.assert_close(after[key], before[key])
    assert adapter.attention_module(model, 1) is not students[1]



@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and backends.fla_available()), reason="needs CUDA and fla")
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("options", [{}, dict(window=64, short_conv=4)], ids=["plain", "window+conv"])
def test_student_on_fla_kernels_matches_pytorch_path(kind, causal, options):
    """On CUDA the student picks fla by itself and matches the PyTorch path: in fp32 to 1e-4 (outputs
    and gradients). In bf16 both paths are measured against the fp32 PyTorch result: fla must be within
    1e-2 of it, or no further than 1.5x the PyTorch path's own bf16 error where bf16 alone costs more
    (the input gradient: its two bf16 paths differed by 1.1-2.2e-2 on an H200, neither path exact)."""
    torch.manual_seed(42)
    student = new_student(kind, hidden_size=256, num_heads=4, head_dim=64, causal=causal, **options).cuda()
    x = torch.randn(2, 200, 256, device="cuda")
    mask = torch.ones(2, 200, device="cuda")
    mask[1, 150:] = 0

    def run(backend, dtype):
        student.backend = backend
        model = student.to(dtype)
        inputs = x.to(dtype).detach().requires_grad_()
        out, _ = model(inputs, attention_mask=mask)
        out.float().pow(2).mean().backward()
        grads = [inputs.grad.float()] + [p.grad.float() for p in model.parameters()]
        model.zero_grad()
        return [out.float(), *grads], student.last_backend

    fp32_tol = 1e-4 if os.environ.get("TRITON_F32_DEFAULT") == "ieee" else 5e-3  # TF32 otherwise
    # Where fla cannot differentiate the gated delta rule, "auto" trains on the PyTorch form under torch.compile.
    expected_backend = "fla" if kind == "gla" or backends.fla_gated_delta_backward_supported() else "compiled"
    if kind == "gated_deltanet" and expected_backend == "fla":
        # fla's gated delta backward (Triton 3.7.1, H200) is not fp32-exact even with IEEE dots: its gradients left the
        # PyTorch form by 2.6e-3 to 1.1e-2 in four students of these sizes (BENCHMARKS.md, issue 15, ninth session);
        # fla's own test of the kernel accepts 2e-2 for the betas' and decays' gradients.
        fp32_tol = 2e-2
    exact, _ = run("chunked", torch.float32)
    fast, backend = run("auto", torch.float32)
    assert backend == expected_backend
    assert max(rel_err(got, want) for got, want in zip(fast, exact)) <= fp32_tol
    # bf16 last: the cast back to fp32 would not restore the rounded weights.
    pytorch_bf16, _ = run("chunked", torch.bfloat16)
    fast_bf16, backend = run("auto", torch.bfloat16)
    assert backend == expected_backend
    for index, (got, same_precision, want) in enumerate(zip(fast_bf16, pytorch_bf16, exact)):
        error, reference_error = rel_err(got, want), rel_err(same_precision, want)
        print(f"tensor {index}: bf16 fla {error:.2e}, bf16 PyTorch {reference_error:.2e} (vs fp32 PyTorch)")
        assert error <= bf16_bound(same_precision, want), index


def test_student_construction_is_seeded_and_leaves_global_rng_alone():
    model = tiny_model("llama")
    adapter = adapter_for(model)
    weights = adapter.read_attention_weights(model, 0)
    torch.manual_seed(7)
    before = torch.random.get_rng_state()
    a = student_from_teacher(StudentSpec(), weights, causal=True, seed=3)
    assert torch.equal(torch.random.get_rng_state(), before)
    b = student_from_teacher(StudentSpec(), weights, causal=True, seed=3)
    c = student_from_teacher(StudentSpec(), weights, causal=True, seed=4)
    torch.testing.assert_close(a.gate_down.weight, b.gate_down.weight)
    assert not torch.equal(a.gate_down.weight, c.gate_down.weight)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("feature_map", ["hedgehog", "identity"])
def test_build_student_rebuilds_a_student_from_its_config(kind, feature_map):
    """What an exported model does: a student rebuilt from config_dict() is the same module, and with
    the original's weights loaded computes the same outputs."""
    model, adapter, original = make_student("gpt2", kind, feature_map)  # gpt2: biased projections
    config = original.config_dict()
    assert config["kind"] == kind == original.kind
    rebuilt = build_student(config)
    assert type(rebuilt) is type(original) and rebuilt.config_dict() == config
    assert list(rebuilt.state_dict()) == list(original.state_dict())
    rebuilt.load_state_dict(original.state_dict())
    x = torch.randn(2, 7, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(rebuilt(x)[0], original(x)[0])
    # Built twice from one seed: the same initial weights, bit for bit.
    torch.manual_seed(3)
    first = build_student(config)
    torch.manual_seed(3)
    second = build_student(config)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
    with pytest.raises(ValueError, match="kind='mamba'"):
        build_student({**config, "kind": "mamba"})

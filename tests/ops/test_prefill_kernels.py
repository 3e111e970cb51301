"""The fused inference kernels of a student's prefill (``kernels.py``: feature map, log-decays, readouts).

On the CPU they run in Triton's interpreter (a subprocess: TRITON_INTERPRET is read at import) and must give
what the PyTorch forms give in fp32, kernel by kernel and through whole students of every kind and option.
The ``gpu`` test checks them in bf16 on CUDA, where "auto" picks them by itself.
"""

import textwrap

import pytest
import torch
from conftest import bf16_bound, rel_err, run_in_triton_interpreter

from dtr_core.linear import kernels
from dtr_core.linear.students import build_student

STUDENT_OPTIONS = [
    dict(kind="gla"),
    dict(kind="gated_deltanet"),
    dict(kind="gla", causal=False),
    dict(kind="gated_deltanet", causal=False),
    dict(kind="gla", window=3, short_conv=4),
    dict(kind="gated_deltanet", window=3, short_conv=4),
    dict(kind="gla", feature_map="identity"),
    # Windows the window kernels serve (a power of two >= 16), with rotary positions and convolutions.
    dict(kind="gla", window=16, rope=True),
    dict(kind="gated_deltanet", window=16, short_conv=4, kv_heads=1),  # K/V heads shared by the 3 query heads
    dict(kind="gla", kv_heads=1),  # the feature map and the scan read the shared heads where they lie
]


def perturbed_student(options: dict, hidden_size=48, num_heads=3, head_dim=16, seed=0):
    """A student whose gates, feature map and readout weights are off their initial values, so every
    part the kernels fuse does something."""
    torch.manual_seed(seed)
    config = dict(hidden_size=hidden_size, num_heads=num_heads, head_dim=head_dim, causal=True) | options
    student = build_student(config, backend="chunked")
    with torch.no_grad():
        for parameter in student.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
        if student.window and student.rope:  # the teacher's rotary frequencies (zeros until a teacher sets them)
            student.rotary_inv_freq.copy_(10000.0 ** -(torch.arange(0, head_dim, 2) / head_dim))
    return student.eval()


INTERPRETED = textwrap.dedent("""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from dtr_core.linear import kernels
    from transformers import DynamicCache
    from dtr_core.linear.feature_maps import hedgehog
    from dtr_core.linear.gla import gla_recurrent
    from dtr_core.linear.window import combine_normalised, lagged_queries, rotary_tables, rotate, window_softmax
    from ops.test_prefill_kernels import STUDENT_OPTIONS, perturbed_student

    def worst(a, b):
        return (a.float() - b.float()).abs().max().item()

    torch.manual_seed(0)
    x, weight = torch.randn(2, 70, 3, 16), torch.randn(3, 16, 16) * 0.5
    valid = torch.rand(2, 70) > 0.3
    expected = hedgehog(x, weight)
    assert worst(kernels.hedgehog_triton(x, weight), expected) <= 1e-6
    masked = F.normalize(expected, dim=-1) * valid[:, :, None, None]
    assert worst(kernels.hedgehog_triton(x, weight, valid, l2_normalise=True), masked) <= 1e-6
    shared = x[:, :, :1]  # one key head for the 3 heads of the feature map
    assert worst(kernels.hedgehog_triton(shared, weight), hedgehog(shared.expand(-1, -1, 3, -1), weight)) <= 1e-6

    cos, sin = torch.randn(2, 70, 16), torch.randn(2, 70, 16)
    assert worst(kernels.rotary_triton(x, cos, sin), rotate(x, cos, sin)) <= 1e-6
    assert worst(kernels.rotary_triton(x, cos[:1], sin[:1]), rotate(x, cos[:1], sin[:1])) <= 1e-6

    logits = torch.randn(3, 50, 7) * 6
    assert worst(kernels.log_decay_triton(logits, -8.0), F.logsigmoid(logits).clamp_min(-8.0)) <= 1e-6

    scan = torch.randn(2, 37, 3, 17)
    scan[..., -1] = scan[..., -1].abs() + 0.5
    assert worst(kernels.normalised_readout_triton(scan),
                 (scan[..., :16] / (scan[..., 16:] + 1e-6)).reshape(2, 37, 48)) <= 1e-6
    assert worst(kernels.normalised_readout_triton(scan[..., :16], scan[..., 16]),
                 (scan[..., :16] / (scan[..., 16:] + 1e-6)).reshape(2, 37, 48)) <= 1e-6

    # GLA's prefill scan against the recurrence with an all-ones value column: outputs, the normaliser (that
    # column) and the final state and key sum, from a given state or from zeros. Over more tokens than two chunks
    # (not a multiple of one), decays at the -8 floor over many rows (the scores' exponents at their bound) and none
    # at all, more key channels than one tile and more value channels than one program of the state kernel; the
    # chunks in one segment, or (the interpreter counts one multiprocessor) in several; value heads shared by
    # query heads; log-decays given, or taken from low-rank gates in the scan with its output read out.
    np.seterr(over="ignore")  # masked scores (a key after its query) may overflow; they are replaced by zeros
    for batch, length, heads, key_dim, value_dim, per_sm, value_heads in (
            (2, 150, 3, 32, 16, 2, 3), (1, 70, 2, 128, 160, 16, 1), (1, 300, 2, 32, 16, 6, 2),
            (1, 300, 1, 32, 16, 64, 1), (2, 90, 4, 32, 16, 16, 2)):
        tiles = kernels.ScanTiles(state_programs_per_sm=per_sm)
        q, k = torch.rand(batch, length, heads, key_dim), torch.rand(batch, length, heads, key_dim)
        g = -torch.rand(batch, length, heads, key_dim) * 8
        g[0, 5:40], g[..., :3] = -8.0, 0.0
        v = torch.randn(batch, length, value_heads, value_dim)
        start, start_sum = torch.rand(batch, heads, key_dim, value_dim), torch.rand(batch, heads, key_dim)
        per_head = v.repeat_interleave(heads // value_heads, dim=2)  # query head h reads value head h // group
        with_ones = torch.cat([per_head, torch.ones_like(per_head[..., :1])], dim=-1)
        expected, state = gla_recurrent(q, k, with_ones, g, 0.5, torch.cat([start, start_sum[..., None]], dim=-1),
                                        output_final_state=True)
        out, mass, final, final_sum = kernels.gla_prefill_triton(q, k, v, g, 0.5, start, start_sum,
                                                                 output_final_state=True, key_sums=True, tiles=tiles)
        size = expected.abs().max()
        assert worst(out, expected[..., :-1]) <= 1e-5 * size and worst(mass, expected[..., -1]) <= 1e-5 * size
        assert worst(final, state[..., :-1]) <= 1e-5 * state.abs().max()
        assert worst(final_sum, state[..., -1]) <= 1e-5 * state.abs().max()
        out, mass, final, final_sum = kernels.gla_prefill_triton(q, k, v, g, 0.5, tiles=tiles)
        expected = gla_recurrent(q, k, per_head, g, 0.5)[0]
        assert worst(out, expected) <= 1e-5 * expected.abs().max() and mass is final is final_sum is None
        # Low-rank gates in (their logits and log-decays taken in the scan), the softmax-like readout out (a prompt
        # of a GLA student): a rank below tl.dot's 16 and one above, neither a power of two.
        rank = 3 + key_dim // 8
        low_rank, up_weight, up_bias = (torch.randn(batch, length, rank), torch.randn(heads * key_dim, rank),
                                        torch.randn(heads * key_dim) * 3)
        logits = (low_rank @ up_weight.T + up_bias).view(batch, length, heads, key_dim)
        expected, state = gla_recurrent(q, k, with_ones, F.logsigmoid(logits).clamp_min(-8.0), 0.5,
                                        torch.cat([start, start_sum[..., None]], dim=-1), output_final_state=True)
        read_out = expected[..., :-1] / (expected[..., -1:] + 1e-6)
        out, mass, final, final_sum = kernels.gla_prefill_triton(
            q, k, v, low_rank, 0.5, start, start_sum, output_final_state=True, key_sums=True,
            gate_up=(up_weight, up_bias), logits_floor=-8.0, normalise=True, tiles=tiles)
        assert worst(out, read_out) <= 1e-5 * read_out.abs().max() and mass is None
        assert worst(final, state[..., :-1]) <= 1e-5 * state.abs().max()
        assert worst(final_sum, state[..., -1]) <= 1e-5 * state.abs().max()
    out_weight = torch.rand(3, 16)
    rms = scan[..., :16] * torch.rsqrt(scan[..., :16].pow(2).mean(-1, keepdim=True) + 1e-6) * out_weight
    assert worst(kernels.rms_readout_triton(scan[..., :16], out_weight), rms.reshape(2, 37, 48)) <= 1e-5

    q = torch.randn(2, 37, 3, 16)
    for decay in (-torch.rand(2, 16 + 37, 3, 16), -torch.rand(2, 16 + 37, 3)):  # per channel (GLA), per head
        history, new = decay[:, :16], decay[:, 16:]
        assert worst(kernels.lagged_queries_triton(q, new, history, 16), lagged_queries(q, new, history, 16)) <= 1e-5
        assert worst(kernels.lagged_queries_triton(q, new, None, 16),
                     lagged_queries(q, new, torch.zeros_like(history), 16)) <= 1e-5

    keys, values = torch.randn(2, 16 + 37, 3, 16), torch.randn(2, 16 + 37, 3, 16)
    key_valid = (torch.rand(2, 16 + 37) > 0.2).float()
    key_valid[0, :30] = 0  # queries whose whole window is padding
    linear, offset, norm_weight = torch.rand(2, 37, 3, 17), torch.randn(3), torch.rand(3, 16)
    rms = linear[..., :16] * torch.rsqrt(linear[..., :16].pow(2).mean(-1, keepdim=True) + 1e-6) * norm_weight
    for has_history in (True, False):
        if not has_history:  # the start of a sequence: no keys before the new tokens
            keys[:, :16], values[:, :16], key_valid[:, :16] = 0, 0, 0
        pairs = [(x[:, :16] if has_history else None, x[:, 16:]) for x in (keys, values, key_valid)]
        parts = window_softmax(q * 0.25, keys, values, key_valid, 16, True)
        # Relative to the readout's size: a query whose window and scan carry little mass reads thousands.
        expected = combine_normalised(parts, linear, offset)
        got = kernels.window_readout_triton(q, *pairs, linear, 16, 0.25, offset=offset)
        assert worst(got, expected) <= 1e-5 * max(1.0, expected.abs().max())
        expected = parts[0] / (parts[1] + 1e-6) + rms
        got = kernels.window_readout_triton(q, *pairs, linear[..., :16], 16, 0.25, norm_weight=norm_weight)
        assert worst(got, expected) <= 1e-5 * max(1.0, expected.abs().max())

    hidden = torch.randn(2, 41, 48)
    mask = torch.ones(2, 41)
    mask[1, :9] = 0  # left padding
    for options in STUDENT_OPTIONS:
        student = perturbed_student(options)
        with torch.no_grad():
            results = {}
            for mode in ("torch", "triton"):
                student.prefill_kernels = mode
                results[mode] = student(hidden, attention_mask=mask)[0]
        error = worst(results["triton"], results["torch"])
        assert error <= 2e-5, (options, error)

    # Cached calls of any size (a prompt, single steps, a longer piece) continue like one forward.
    for options in STUDENT_OPTIONS[-3:]:  # windows with rotary positions and convolutions, shared K/V heads
        student = perturbed_student(options)
        student.layer_idx, student.prefill_kernels = 0, "triton"
        with torch.no_grad():
            whole = student(hidden, attention_mask=mask)[0]
            cache, pieces, start = DynamicCache(), [], 0
            for size in (20, 1, 1, 19):
                pieces.append(student(hidden[:, start:start + size], attention_mask=mask[:, :start + size],
                                      cache=cache)[0])
                start += size
        real = mask.bool()
        error = worst(torch.cat(pieces, dim=1)[real], whole[real])
        assert error <= 2e-5, (options, error)

        # Static decoding's steps (states and histories overwritten in place) continue the same way.
        with torch.no_grad():
            cache = DynamicCache()
            student(hidden[:, :20], attention_mask=mask[:, :20], cache=cache)
            position = torch.tensor([20])  # in static mode positions come from the caller (the cache's count stays)
            cache.layers[0].begin_static(position)
            steps = []
            for t in range(20, 41):  # more than W = 16 steps: the window's rings wrap around
                rope = rotary_tables(student.rotary_inv_freq, t, 1, 1.0, hidden.dtype) if student.rope else None
                steps.append(student(hidden[:, t:t + 1], attention_mask=mask[:, :t + 1], cache=cache,
                                     position_embeddings=rope)[0])
                position.add_(1)
        error = worst(torch.cat(steps, dim=1), whole[:, 20:])
        assert error <= 2e-5, (options, "static", error)

    # Identity features and no mask: the scan's keys are then a view of the window's keys, which a cached
    # prompt (whose last W keys the scan must not see) may not zero in place.
    student = perturbed_student(dict(kind="gla", window=16, feature_map="identity"))
    student.layer_idx, student.prefill_kernels = 0, "triton"
    with torch.no_grad():
        whole = student(hidden)[0]
        cache = DynamicCache()
        pieces = [student(hidden[:, :20], cache=cache)[0], student(hidden[:, 20:], cache=cache)[0]]
    assert worst(torch.cat(pieces, dim=1), whole) <= 2e-5
    print("prefill kernels ok")
""")


@pytest.mark.integration
def test_prefill_kernels_match_pytorch_in_the_interpreter():
    run_in_triton_interpreter(INTERPRETED, "prefill kernels ok")


def test_prefill_kernels_are_chosen_for_inference_on_cuda_only():
    student = perturbed_student(dict(kind="gla"))
    hidden = torch.randn(1, 4, 48)
    with torch.no_grad():
        assert student._fused(hidden) is False  # CPU tensors: PyTorch unless forced
        student.prefill_kernels = "triton"
        assert student._fused(hidden) is kernels.prefill_kernels_fit(16)
    student.prefill_kernels = "auto"
    cuda_like = torch.empty(1, 4, 48, device="meta")
    assert student._fused(cuda_like) is False
    odd = perturbed_student(dict(kind="gla"), hidden_size=30, head_dim=10)
    odd.prefill_kernels = "triton"
    assert odd._fused(torch.randn(1, 4, 30)) is False  # heads not a power of two: the PyTorch forms


@pytest.mark.skipif(kernels.triton is None, reason="needs Triton")
def test_prefill_kernels_refuse_heads_that_do_not_divide_a_readout_without_its_normaliser_and_unfit_gates():
    q = torch.rand(1, 8, 4, 32)
    with pytest.raises(ValueError, match="v has 3 heads: they must divide q's 4"):
        kernels.gla_prefill_triton(q, q, torch.rand(1, 8, 3, 16), -q, 1.0)
    with pytest.raises(ValueError, match="needs key_sums=True"):
        kernels.gla_prefill_triton(q, q, torch.rand(1, 8, 2, 16), -q, 1.0, normalise=True)
    with pytest.raises(ValueError, match="gate_up and logits_floor come together"):
        kernels.gla_prefill_triton(q, q, q, q, 1.0, logits_floor=-8.0)
    with pytest.raises(ValueError, match=r"must be \[B, T, R\] = \[1, 8, R\] and \[H\*K, R\] = \[128, R\]"):
        kernels.gla_prefill_triton(q, q, q, torch.rand(1, 8, 5), 1.0, gate_up=(torch.rand(128, 4), None),
                                   logits_floor=-8.0)
    with pytest.raises(ValueError, match="x has 3 heads: they must divide the feature map's 4"):
        kernels.hedgehog_triton(torch.rand(1, 8, 3, 16), torch.rand(4, 16, 16))


def test_only_prompts_on_the_kernel_scan_read_shared_heads():
    """Which calls take the prompt path (``_prompt_kernel_scan``) and skip the K/V repeat copies."""
    student = perturbed_student(dict(kind="gla", kv_heads=1))
    assert student._prompt_kernel_scan(True, 5, None) and student._shares_kv_in_kernels(True)
    assert not student._prompt_kernel_scan(True, 1, None)  # one token: fla's one-token form
    assert not student._prompt_kernel_scan(False, 5, None)  # unfused: the operator
    assert not perturbed_student(dict(kind="gated_deltanet"))._prompt_kernel_scan(True, 5, None)  # no kernel scan
    assert not perturbed_student(dict(kind="gla", kv_heads=1, short_conv=4))._shares_kv_in_kernels(True)
    assert not perturbed_student(dict(kind="gla", kv_heads=1, feature_map="identity"))._shares_kv_in_kernels(True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or kernels.triton is None, reason="needs CUDA and Triton")
@pytest.mark.parametrize("options", [o for o in STUDENT_OPTIONS if o.get("feature_map") != "identity"],
                         ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_prefill_kernels_on_cuda_match_pytorch_in_bf16(options):
    """bf16 on CUDA, both paths against the fp32 PyTorch result: the fused path must be no further from it
    than the unfused bf16 path (1.5x, or 1e-2)."""
    student = perturbed_student(options, hidden_size=256, num_heads=4, head_dim=64).cuda()
    hidden = torch.randn(2, 300, 256, device="cuda")
    mask = torch.ones(2, 300, device="cuda")
    mask[1, :40] = 0

    def run(mode, dtype):
        student.prefill_kernels = mode
        with torch.inference_mode():
            return student.to(dtype)(hidden.to(dtype), attention_mask=mask)[0].float()

    exact = run("torch", torch.float32)
    assert student._fused(hidden) is False  # grad mode on: never the fused path
    unfused = run("torch", torch.bfloat16)
    fused = run("auto", torch.bfloat16)  # CUDA without gradients: the kernels, GLA's scan among them
    assert rel_err(fused, exact) <= bf16_bound(unfused, exact), (rel_err(fused, exact), rel_err(unfused, exact))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or kernels.triton is None, reason="needs CUDA and Triton")
@pytest.mark.parametrize("head_dim", [64, 128])  # Llama-3.2-1B's and Qwen2.5-1.5B's heads (K = 2 x head_dim)
def test_gla_prefill_scan_on_cuda_matches_pytorch(head_dim):
    """GLA's prefill scan on the GPU from a given state (outputs, normaliser, final state): in fp32 as exact as
    the chunked PyTorch form (1e-4); in bf16 no further from that form's fp32 result than fla's ``chunk_gla`` with
    the value column (1.5x, or 1e-2)."""
    from dtr_core.linear.gla import gla

    torch.manual_seed(0)
    batch, length, heads, key_dim = 2, 1000, 3, 2 * head_dim
    q, k = (torch.softmax(torch.randn(batch, length, heads, key_dim, device="cuda"), -1) for _ in range(2))
    g = torch.nn.functional.logsigmoid(torch.randn(batch, length, heads, key_dim, device="cuda") * 3 + 4).clamp_min(-8)
    v = torch.randn(batch, length, heads, head_dim, device="cuda")
    start = torch.rand(batch, heads, key_dim, head_dim + 1, device="cuda")
    with_ones = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)
    with torch.inference_mode():
        exact, exact_state = gla(q, k, with_ones, g, 1.0, backend="chunked", initial_state=start,
                                 output_final_state=True)

        def ours(dtype):
            out, mass, state, key_sum = kernels.gla_prefill_triton(
                *(x.to(dtype) for x in (q, k, v, g)), 1.0, start[..., :-1], start[..., -1], output_final_state=True,
                key_sums=True)
            return torch.cat([out.float(), mass[..., None]], dim=-1), torch.cat([state, key_sum[..., None]], dim=-1)

        out, state = ours(torch.float32)
        assert rel_err(out, exact) <= 1e-4 and rel_err(state, exact_state) <= 1e-4
        fla_out, fla_state = gla(*(x.bfloat16() for x in (q, k, with_ones, g)), 1.0, backend="fla",
                                 initial_state=start, output_final_state=True)
        out, state = ours(torch.bfloat16)
        assert rel_err(out, exact) <= bf16_bound(fla_out, exact), (rel_err(out, exact), rel_err(fla_out, exact))
        assert rel_err(state, exact_state) <= bf16_bound(fla_state, exact_state)

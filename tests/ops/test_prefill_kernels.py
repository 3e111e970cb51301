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

    # The normaliser apart: what an all-ones value column accumulates (output and state), over more tokens than
    # one block of the kernel, from a given state, with more key channels than one program's.
    q, k = torch.rand(2, 150, 3, 40), torch.rand(2, 150, 3, 40)
    g = -torch.rand(2, 150, 3, 40) * 2
    start = torch.rand(2, 3, 40, 1)
    ones, state = gla_recurrent(q, k, torch.ones(2, 150, 3, 1), g, 1.0, start, output_final_state=True)
    mass, key_sum = kernels.normaliser_triton(q, k, g, start[..., 0], output_final_state=True)
    assert worst(mass, ones[..., 0]) <= 1e-4 * ones.abs().max() and worst(key_sum, state[..., 0]) <= 1e-4
    assert worst(kernels.normaliser_triton(q, k, g)[0], gla_recurrent(q, k, torch.ones(2, 150, 3, 1), g, 1.0)[0][..., 0]
                 ) <= 1e-4 * ones.abs().max()
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
        got = kernels.window_readout_triton(q, *pairs, linear, 16, 0.25, offset=offset)
        assert worst(got, combine_normalised(parts, linear, offset)) <= 1e-5
        got = kernels.window_readout_triton(q, *pairs, linear[..., :16], 16, 0.25, norm_weight=norm_weight)
        assert worst(got, parts[0] / (parts[1] + 1e-6) + rms) <= 1e-5

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
    for options in STUDENT_OPTIONS[-2:]:
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


def test_the_normaliser_kernel_serves_batches_that_fill_a_gpu():
    # Llama-3.2-1B's GLA students (32 heads, 128 feature channels): batch 8 at 2K-8K, where the value column cost
    # 26% of the scan, but not one long prompt, whose 128 programs would each run through every token.
    assert kernels.separate_normaliser_pays(8, 2048, 32, 128) and kernels.separate_normaliser_pays(8, 8192, 32, 128)
    assert not kernels.separate_normaliser_pays(1, 131072, 32, 128)
    assert not kernels.separate_normaliser_pays(8, 1024, 32, 128)  # 8K tokens: below the sizes measured


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
    # "auto": at these 600 tokens a normalised readout's normaliser is the scan's value column; "triton" computes
    # it apart (kernels.normaliser_triton), as "auto" does where kernels.separate_normaliser_pays.
    for mode in ("auto", "triton"):
        fused = run(mode, torch.bfloat16)
        error = rel_err(fused, exact)
        assert error <= bf16_bound(unfused, exact), (mode, error, rel_err(unfused, exact))

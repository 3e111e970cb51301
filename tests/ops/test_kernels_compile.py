"""Every Triton kernel in ``kernels.py`` compiles for the GPU (Hopper, sm_90), checked on the CPU.

The interpreter tests (test_prefill_kernels, test_static_decoding) check what the kernels compute, not that
Triton can lower them to GPU code: a per-head decay scanned as a [W, 1] tile passed the interpreter and
failed ``ConvertTritonGPUToLLVM`` on the H200. Triton's compiler and ptxas ship in its wheel, so a subprocess
whose driver stands in for CUDA compiles every launch without running it: the real launch arguments, in
bf16 and fp32, with the 16-byte alignment of the tensors specialised as on the GPU.
"""

import textwrap

import pytest
from conftest import run_triton_script

COMPILE_ONLY = textwrap.dedent("""
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    class CompileOnlyDriver:
        # What JITFunction.run asks of the CUDA driver before it compiles.
        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

    driver.set_active(CompileOnlyDriver())
    compiled = set()
    launch = JITFunction.run

    def compile_without_launch(self, *args, grid, warmup, **kwargs):
        compiled.add(self.fn.__name__)
        return launch(self, *args, grid=grid, warmup=True, **kwargs)

    JITFunction.run = compile_without_launch
""")

LAUNCHES = textwrap.dedent("""
    from transformers import DynamicCache
    from dtr_core.linear import kernels
    from ops.test_prefill_kernels import STUDENT_OPTIONS, perturbed_student

    B, T, H, D = 2, 300, 4, 64
    for dtype in (torch.bfloat16, torch.float32):
        x = torch.randn(B, T, H, D, dtype=dtype)
        valid = torch.rand(B, T) > 0.3
        kernels.hedgehog_triton(x, torch.randn(H, D, D, dtype=dtype))
        kernels.hedgehog_triton(x, torch.randn(H, D, D, dtype=dtype), valid, l2_normalise=True)
        cos, sin = torch.randn(B, T, D, dtype=dtype), torch.randn(B, T, D, dtype=dtype)
        kernels.rotary_triton(x, cos, sin)
        kernels.rotary_triton(x, cos[:1], sin[:1])
        kernels.log_decay_triton(torch.randn(B, T, H * D, dtype=dtype), -8.0)
        scan = torch.randn(B, T, H, D + 1, dtype=dtype)
        kernels.normalised_readout_triton(scan)
        kernels.rms_readout_triton(scan[..., :D].contiguous(), torch.rand(H, D, dtype=dtype))
        for window in (16, 64):
            for decay in (torch.rand(B, window + T, H, D, dtype=dtype), torch.rand(B, window + T, H, dtype=dtype)):
                kernels.lagged_queries_triton(x, -decay[:, window:], -decay[:, :window], window)
                kernels.lagged_queries_triton(x, -decay[:, window:], None, window)
                kernels.lagged_queries_triton(x, -decay[:, window:], None, window, early=True)
            keys, values = (torch.randn(B, window + T, H, D, dtype=dtype) for _ in range(2))
            key_valid = torch.ones(B, window + T, dtype=dtype)
            linear = torch.rand(B, T, H, D + 1, dtype=dtype)
            for history in (True, False):
                pairs = [(y[:, :window] if history else None, y[:, window:]) for y in (keys, values, key_valid)]
                kernels.window_readout_triton(x, *pairs, linear, window, 0.125, offset=torch.randn(H),
                                              early_linear=not history)
                kernels.window_readout_triton(x, *pairs, linear[..., :D], window, 0.125,
                                              norm_weight=torch.rand(H, D))
            rings = [(y[:, :window], None) for y in (keys, values, key_valid)]  # a static decoding step
            kernels.window_readout_triton(x[:, :1], *rings, linear[:, :1], window, 0.125, offset=torch.randn(H),
                                          ring=True)
            kernels.window_readout_triton(x[:, :1], *rings, linear[:, :1, :, :D], window, 0.125,
                                          norm_weight=torch.rand(H, D), ring=True)
        features, decay = torch.rand(B, T, H, 2 * D, dtype=dtype), -torch.rand(B, T, H, 2 * D, dtype=dtype)
        kernels.gla_prefill_triton(features, features, x, decay, 1.0, key_sums=True)
        kernels.gla_prefill_triton(features, features, x, decay, 1.0, torch.zeros(B, H, 2 * D, D),
                                   torch.zeros(B, H, 2 * D), output_final_state=True, key_sums=True,
                                   tiles=kernels.ScanTiles(state_programs_per_sm=64))  # in segments
        kernels.gla_prefill_triton(features, features, x, decay, 1.0)
        up = (torch.rand(H * 2 * D, 16, dtype=dtype), torch.rand(H * 2 * D))
        kernels.gla_prefill_triton(features, features, x[:, :, :2], torch.rand(B, T, 16, dtype=dtype), 1.0,
                                   key_sums=True, gate_up=up, logits_floor=-8.0, normalise=True)  # shared values
        step = torch.randn(B, 1, H, D, dtype=dtype)
        kernels.gla_step_triton(step, step, step, -torch.rand(B, 1, H, D, dtype=dtype), 0.125,
                                torch.zeros(B, H, D, D))
        kernels.gated_delta_step_triton(step, step, step, -torch.rand(B, 1, H, dtype=dtype),
                                        torch.rand(B, 1, H, dtype=dtype), 0.125, torch.zeros(B, H, D, D))
        buffers = torch.randn(B, 2, 1024, D, dtype=dtype)
        for start in (None, torch.zeros(B, dtype=torch.int64)):
            kernels.decode_attention_triton(torch.randn(B, 8, 1, D, dtype=dtype), buffers, buffers,
                                            torch.full((B,), 700), 0.125, num_splits=4, start=start)

    # Whole students, as they call the kernels at inference: prompts, then cached steps.
    hidden = torch.randn(2, 300, 256, dtype=torch.bfloat16)
    mask = torch.ones(2, 300)
    mask[1, :40] = 0
    for options in STUDENT_OPTIONS:
        student = perturbed_student(options, hidden_size=256, num_heads=4, head_dim=64).to(torch.bfloat16)
        student.layer_idx, student.prefill_kernels = 0, "triton"
        with torch.no_grad():
            cache = DynamicCache()
            student(hidden[:, :299], attention_mask=mask[:, :299], cache=cache)
            student(hidden[:, 299:], attention_mask=mask, cache=cache)

    # Every kernel (the functions they call, such as a scan's combining function, compile inside them).
    every_kernel = {name for name, value in vars(kernels).items()
                    if isinstance(value, JITFunction) and name.endswith("_kernel")}
    assert compiled == every_kernel, ("not compiled:", every_kernel - compiled)
    print("compiled for sm_90:", sorted(compiled))
""")


@pytest.mark.integration
def test_every_kernel_compiles_for_hopper():
    run_triton_script(COMPILE_ONLY + LAUNCHES, "compiled for sm_90", {})

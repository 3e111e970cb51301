"""Issue 14: what one student layer costs to train, per kind of student and backend (random weights).

One training step of one layer's student as distillation runs it (fp32 weights, bf16 autocast on
CUDA): forward on [batch, length] hidden states, a mean-square loss, backward. Rows: each kind
(GLA, Gated DeltaNet) with and without a softmax window, on each backend that can train it here:
fla's Triton kernels ("fla": for Gated DeltaNet only where fla can differentiate it, Triton >= 3.7.1
on Hopper), the PyTorch chunked form eager ("chunked") and under torch.compile ("compiled", what
"auto" trains with on CUDA where fla cannot), and the whole student module under torch.compile
("module compiled": projections, feature maps and gates fused too). The teacher's own
attention forward (SDPA) is the reference row. Each row's time is the median of ``--repeats`` steps
after warming up until steady (fla autotunes its kernels on first use).

    python -m bench.student_cost --out $OUT/student_cost.md      # on the GPU
    python -m bench.student_cost --smoke                          # tiny sizes on the CPU, seconds
"""

from __future__ import annotations

import argparse
import time

import torch

from bench.common import (
    build_model,
    default_device,
    environment,
    environment_line,
    full_attention_implementations,
    markdown_table,
    median_ms,
    synchronize,
    warm_until_steady,
    write_results,
)
from dtr_core.adapters import adapter_for
from dtr_core.linear.backends import fla_available, fla_gated_delta_backward_supported
from dtr_core.linear.build import student_from_teacher
from dtr_core.specs import STUDENT_KINDS, StudentSpec


def backends(kind: str, device) -> list[tuple[str, str | None]]:
    """(backend, why it is skipped or None) for one kind of student on this machine."""
    if device.type != "cuda":
        return [("chunked", None)]
    if not fla_available():
        fla_reason = "fla not installed"
    elif kind == "gated_deltanet" and not fla_gated_delta_backward_supported():
        fla_reason = "fla refuses this backward here (Hopper with Triton < 3.7.1, fla issue #640)"
    else:
        fla_reason = None
    return [("fla", fla_reason), ("chunked", None), ("compiled", None), ("module compiled", None)]


def training_step(student, hidden, device):
    """One forward + backward of ``student`` as distillation runs it; returns the closure to time."""
    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out, _ = student(hidden)
        out.float().pow(2).mean().backward()
    return step


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen-1.5b", help="architecture whose attention shape the students take")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--window", type=int, default=64, help="the window rows' softmax window")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--kinds", nargs="+", choices=STUDENT_KINDS, default=list(STUDENT_KINDS),
                        help="which kinds of student to time, in this order")
    parser.add_argument("--backends", default="fla,chunked,compiled,module compiled",
                        help="which backends' rows to time (comma-separated)")
    parser.add_argument("--smoke", action="store_true", help="tiny model and sizes, CPU, seconds")
    parser.add_argument("--out", help="write the markdown table here (and .json beside it)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.batch_size, args.length, args.window, args.repeats = 2, 64, 8, 2
    device = torch.device(default_device(args.smoke))
    attention = full_attention_implementations(device)[-1]
    teacher = build_model(args.model, device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
                          attn_implementation=attention, smoke=args.smoke, num_hidden_layers=1)
    adapter = adapter_for(teacher)
    weights = adapter.read_attention_weights(teacher, 0)
    generator = torch.Generator(device="cpu").manual_seed(0)
    hidden = torch.randn(args.batch_size, args.length, teacher.config.hidden_size, generator=generator).to(device)
    tokens = args.batch_size * args.length

    rows, results = [], []

    def record(label: str, ms: float | None, note: str = "") -> None:
        rate = "—" if ms is None else f"{tokens / ms * 1e3:,.0f}"
        rows.append([label, "—" if ms is None else f"{ms:.2f}", rate, note])
        results.append({"row": label, "ms": ms, "note": note})
        print(f"{label}: {'skipped' if ms is None else f'{ms:.2f} ms'} {note}", flush=True)

    with torch.no_grad():
        positions = torch.arange(args.length, device=device)[None].expand(args.batch_size, -1)
        rotary = adapter.backbone(teacher).rotary_emb(hidden.to(teacher.dtype), positions)
        attention_layer = adapter.attention_module(teacher, 0)

        def forward():
            return attention_layer(hidden.to(teacher.dtype), position_embeddings=rotary, attention_mask=None)

        warm_until_steady(forward, device)
        record("teacher attention, forward only", median_ms(forward, args.repeats, device), attention)

    for kind in args.kinds:
        for window in dict.fromkeys((0, args.window)):  # --window 0: the plain rows only
            spec = StudentSpec(kind=kind, window=window)
            for backend, skipped in backends(kind, device):
                if backend not in args.backends.split(","):
                    continue
                label = f"{kind}{f', window {window}' if window else ''}, {backend}"
                if skipped:
                    record(label, None, skipped)
                    continue
                operator = "chunked" if backend == "module compiled" else backend
                student = student_from_teacher(spec, weights, causal=True, backend=operator).to(device)
                if backend == "module compiled":
                    student = torch.compile(student)
                step = training_step(student, hidden, device)
                try:
                    # The first step pays for compiling (torch.compile) or autotuning (fla): said apart.
                    synchronize(device)
                    started = time.perf_counter()
                    step()
                    synchronize(device)
                    first = time.perf_counter() - started
                    warm_until_steady(step, device, max_windows=6)
                    record(label, median_ms(step, args.repeats, device), f"first step {first:.1f} s")
                except Exception as error:  # a backend failing here is a result to report, not a crash
                    record(label, None, f"failed: {type(error).__name__}: {str(error).splitlines()[0][:120]}")
                del student, step
                if device.type == "cuda":
                    torch.cuda.empty_cache()

    env = environment(device)
    markdown = "\n".join([
        f"One student layer's training step (forward + backward), {args.model} attention shape, "
        f"{args.batch_size}×{args.length} tokens, random weights, on {env['card']}",
        environment_line(env), "",
        markdown_table(["student, backend", "ms per step", "tokens/s (one layer)", "note"], rows),
    ])
    print(markdown)
    write_results(args.out, markdown, {"environment": env, "args": vars(args), "rows": results})


if __name__ == "__main__":
    main()

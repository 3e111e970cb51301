"""Benchmark 1 of issue 5: one attention layer, softmax teacher vs linear-attention students.

Shape: Llama-3.2-1B's attention (hidden 2048, 32 query heads x 64, 8 K/V heads); ``--shape qwen-1.5b``
for Qwen2.5-1.5B's (hidden 1536, 12 x 128, 2 K/V heads). bf16, batch 1, random weights. The teacher is
transformers' attention module itself (q/k/v/o projections, RoPE, causal attention) under SDPA, and
under flash-attn 2 as well when it is installed; each student (GLA, Gated DeltaNet; fla's kernels on
CUDA) is built from that module's weights by ``student_from_teacher``. Both passes time the whole
layer: forward (inference) and forward+backward (weights and input get gradients). Each number is the
median of n CUDA-event timings after one untimed call at that length.

The crossover is the length from which a student stays faster than the teacher, interpolated
log-log between the measured lengths.

fla's kernels autotune on their first call (minutes, then cached in TRITON_CACHE_DIR); the autotune
key does not include the sequence length, so ``--warm-only`` (one call of each student per pass at
one length) compiles everything this benchmark and bench/hybrid_inference.py need at this shape;
tools/gpu/gpu_all.sh runs those warm-ups in parallel processes before any timing.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from dtr_core.adapters import adapter_for
from dtr_core.linear.build import student_from_teacher
from dtr_core.specs import StudentSpec

from .common import (
    ARCHITECTURES,
    build_model,
    cell,
    command_line,
    default_device,
    default_dtype,
    describe_attention,
    environment,
    environment_line,
    full_attention_implementations,
    markdown_table,
    median_ms,
    synchronize,
    tokens_label,
    unless_oom,
    write_results,
)

LENGTHS = tuple(1024 * 2**i for i in range(8))  # 1K ... 128K
SMOKE_LENGTHS = (64, 128)
KINDS = ("gla", "gated_deltanet")
PASSES = ("fwd", "fwd+bwd")
BASELINE = "sdpa"


@dataclass
class Layer:
    """One attention layer under test, called uniformly as ``layer(hidden, rope) -> output``."""

    name: str
    module: nn.Module
    takes_rope: bool  # teachers apply RoPE to q/k; students take hidden states only

    def __call__(self, hidden: torch.Tensor, rope) -> torch.Tensor:
        if self.takes_rope:
            return self.module(hidden, position_embeddings=rope, attention_mask=None)[0]
        return self.module(hidden)[0]


def build_layers(shape: str, kinds, device, dtype, smoke: bool):
    """(teachers, students, rotary embedding): one teacher per available attention backend, all with
    the same random weights, and one student per kind built from them."""
    teachers, rotary, weights = [], None, None
    for implementation in full_attention_implementations(device):
        # One layer and a tiny vocabulary: only the attention module is timed.
        model = build_model(shape, device=device, dtype=dtype, attn_implementation=implementation, smoke=smoke,
                            num_hidden_layers=1, vocab_size=8)
        adapter = adapter_for(model)
        teachers.append(Layer(implementation, adapter.attention_module(model, 0), takes_rope=True))
        rotary, weights = adapter.backbone(model).rotary_emb, adapter.read_attention_weights(model, 0)
    specs = {kind: StudentSpec(kind=kind, window=0) for kind in kinds}
    students = [Layer(kind, student_from_teacher(spec, weights, causal=True).to(device, dtype), takes_rope=False)
                for kind, spec in specs.items()]
    return teachers, students, rotary


def repeats_for(length: int, smoke: bool) -> int:
    """Fewer repeats where one call already takes long (SDPA at 128K: ~0.1 s forward)."""
    if smoke:
        return 1
    return 10 if length <= 8192 else 5 if length <= 32768 else 3


def layer_step(layer: Layer, hidden: torch.Tensor, rope, pass_name: str):
    """(step, before_each): one forward (inference) or forward+backward of ``layer``, and what to run,
    untimed, before each step."""
    if pass_name == "fwd":
        def forward():
            with torch.inference_mode():
                layer(hidden, rope)

        return forward, None
    leaf = hidden.detach().requires_grad_(True)
    grad_output = torch.randn_like(hidden)
    parameters = list(layer.module.parameters())

    def clear_grads():  # a fresh training step allocates its gradients, as after zero_grad(set_to_none=True)
        leaf.grad = None
        for parameter in parameters:
            parameter.grad = None

    return (lambda: layer(leaf, rope).backward(grad_output)), clear_grads


def time_layer(layer: Layer, hidden: torch.Tensor, rope, pass_name: str, repeats: int, device) -> float:
    step, before_each = layer_step(layer, hidden, rope, pass_name)
    return median_ms(step, repeats, device, before_each=before_each)


def inputs(hidden_size: int, length: int, rotary, device, dtype):
    hidden = torch.randn(1, length, hidden_size, device=device, dtype=dtype)
    with torch.no_grad():  # constants of the layer call (no_grad, not inference_mode: backward reads them)
        rope = rotary(hidden, torch.arange(length, device=device)[None])
    return hidden, rope


def crossover(points: list[tuple[int, float, float]]) -> dict:
    """Where a student becomes faster: ``points`` are (tokens, teacher ms, student ms) by length.

    Returns the first measured length from which the student stays faster ("from"), the last one at
    which it was slower ("slower_at") and a log-log interpolated estimate between the two.
    """
    if not points:
        return {"from": None, "slower_at": None, "estimate": None, "text": "not measured"}
    first_faster = len(points)
    while first_faster > 0 and points[first_faster - 1][2] < points[first_faster - 1][1]:
        first_faster -= 1
    if first_faster == len(points):
        return {"from": None, "slower_at": points[-1][0], "estimate": None,
                "text": f"never faster up to {tokens_label(points[-1][0])} tokens"}
    if first_faster == 0:
        return {"from": points[0][0], "slower_at": None, "estimate": None,
                "text": f"faster at every measured length (from {tokens_label(points[0][0])} tokens)"}
    (t0, teacher0, student0), (t1, teacher1, student1) = points[first_faster - 1], points[first_faster]
    log_ratio0, log_ratio1 = math.log(student0 / teacher0), math.log(student1 / teacher1)
    fraction = log_ratio0 / (log_ratio0 - log_ratio1)
    estimate = math.exp(math.log(t0) + fraction * (math.log(t1) - math.log(t0)))
    return {"from": t1, "slower_at": t0, "estimate": estimate,
            "text": f"~{tokens_label(estimate)} tokens (slower at {tokens_label(t0)}, faster from "
                    f"{tokens_label(t1)} on)"}


def crossovers(rows: list[dict], teachers: list[str], students: list[str]) -> list[dict]:
    found = []
    for pass_name in PASSES:
        for student in students:
            for teacher in teachers:
                points = [(row["tokens"], row["ms"][teacher], row["ms"][student]) for row in rows
                          if row["pass"] == pass_name and isinstance(row["ms"].get(teacher), float)
                          and isinstance(row["ms"].get(student), float)]
                if points:
                    found.append({"pass": pass_name, "student": student, "teacher": teacher, **crossover(points)})
    return found


def render(meta: dict, rows: list[dict], teachers: list[str], students: list[str]) -> str:
    headers = ["tokens", "pass"] + [f"{name} ms" for name in teachers]
    for student in students:
        headers += [f"{student} ms", f"{student} speedup vs {BASELINE}"]
    table = []
    for row in rows:
        ms = row["ms"]
        line = [tokens_label(row["tokens"]), row["pass"]] + [cell(ms.get(name)) for name in teachers]
        for student in students:
            both = isinstance(ms.get(student), float) and isinstance(ms.get(BASELINE), float)
            line += [cell(ms.get(student)), f"{ms[BASELINE] / ms[student]:.2f}x" if both else "—"]
        table.append(line)
    lines = [
        "## Benchmark 1: one attention layer, teacher vs students",
        "",
        f"Card: {meta['environment']['card']}. {environment_line(meta['environment'])}.",
        f"Command: `{meta['command']}`",
        f"Shape: {meta['shape']} attention ({meta['attention']}), batch 1, {meta['dtype']}, random weights; "
        f"student operators that ran: {_backends(meta['student_backends'])}; median of n timings (n at each length: "
        + ", ".join(f"{tokens_label(length)}: {n}" for length, n in meta["repeats"].items()) + ").",
        "",
        markdown_table(headers, table),
        "",
        "OOM: out of memory (that layer and pass then skip the longer lengths: —).",
        "",
        "Crossover (student faster than the teacher from):",
    ]
    lines += [f"- {c['student']} vs {c['teacher']}, {c['pass']}: {c['text']}"
              for c in crossovers(rows, teachers, students)]
    return "\n".join(lines)


def _backends(found: dict) -> str:
    """{"fwd": {"gla": "fla", ...}, ...} -> "fwd: gla fla, gated_deltanet fla; ..." """
    return "; ".join(f"{pass_name}: " + ", ".join(f"{kind} {backend}" for kind, backend in kinds.items())
                     for pass_name, kinds in found.items()) or "none yet"


def warm_kernels(students: list[Layer], hidden: torch.Tensor, rope, passes, device) -> None:
    """One call per student and pass: compiles and autotunes fla's kernels for this shape."""
    for student in students:
        for pass_name in passes:
            started = time.perf_counter()
            step, _ = layer_step(student, hidden, rope, pass_name)
            step()
            synchronize(device)
            print(f"warmed {student.name} {pass_name} at {tokens_label(hidden.shape[1])} tokens in "
                  f"{time.perf_counter() - started:.1f} s", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(ARCHITECTURES), default="llama-1b")
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    parser.add_argument("--passes", nargs="+", choices=PASSES, default=list(PASSES))
    parser.add_argument("--lengths", type=int, nargs="+", help="tokens (default 1K..128K; smoke: 64 128)")
    parser.add_argument("--out", help="write the markdown table here, and JSON next to it")
    parser.add_argument("--smoke", action="store_true", help="tiny shape and lengths, on the CPU, in seconds")
    parser.add_argument("--warm-only", action="store_true",
                        help="only call each student once per pass at the first length (kernel autotuning)")
    parser.add_argument("--device", help="default: cuda, or cpu with --smoke")
    args = parser.parse_args(argv)
    device = args.device or default_device(args.smoke)
    if args.smoke:
        torch.set_num_threads(1)  # tiny tensors: extra threads only contend with other processes
    dtype = default_dtype(device)
    lengths = args.lengths or (SMOKE_LENGTHS if args.smoke else LENGTHS)

    teachers, students, rotary = build_layers(args.shape, args.kinds, device, dtype, args.smoke)
    hidden_size = teachers[0].module.config.hidden_size
    if args.warm_only:
        warm_kernels(students, *inputs(hidden_size, lengths[0], rotary, device, dtype), args.passes, device)
        return

    meta = {
        "command": command_line("bench.attention", argv),
        "environment": environment(device), "shape": args.shape,
        "attention": describe_attention(teachers[0].module.config),
        "dtype": str(dtype).removeprefix("torch."), "student_backends": {},
        "repeats": {length: repeats_for(length, args.smoke) for length in sorted(lengths)},
    }
    layers = teachers + students
    teacher_names, student_names = [t.name for t in teachers], [s.name for s in students]
    rows: list[dict] = []
    out_of_memory: set[tuple[str, str]] = set()  # (layer, pass) that ran out: longer lengths are skipped
    for length in sorted(lengths):
        hidden, rope = inputs(hidden_size, length, rotary, device, dtype)
        for pass_name in args.passes:
            row = {"tokens": length, "pass": pass_name, "ms": {}}
            rows.append(row)
            for layer in layers:
                if (layer.name, pass_name) in out_of_memory:
                    continue
                ms = unless_oom(partial(time_layer, layer, hidden, rope, pass_name, repeats_for(length, args.smoke),
                                        device), device)
                if ms is None:
                    out_of_memory.add((layer.name, pass_name))
                row["ms"][layer.name] = "OOM" if ms is None else ms
                if not layer.takes_rope:  # a student: record the operator its scan dispatched to
                    meta["student_backends"].setdefault(pass_name, {})[layer.name] = layer.module.last_backend
                print(f"{tokens_label(length):>5} {pass_name:<8} {layer.name:<18} {cell(row['ms'][layer.name])} ms",
                      flush=True)
                write_results(args.out, render(meta, rows, teacher_names, student_names),
                              {"meta": meta, "rows": rows,
                               "crossovers": crossovers(rows, teacher_names, student_names)})
    print()
    print(render(meta, rows, teacher_names, student_names))


if __name__ == "__main__":
    main()

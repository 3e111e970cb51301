"""Short prompts, the full model and its L/2 hybrid timed in turns in one process (issue 15's prefill targets).

Why: at batch 1 and 2K-8K tokens both models are partly bound by the host (Python issuing kernels), and their
times move between processes and over a process's life by up to 2x (H200, the full Qwen2.5-1.5B-shaped model's
2K prompt: 16.8-35.2 ms in four processes of one session). bench.hybrid_inference times each model once, in a
block of its own, so its batch-1 rows can set a fast full model beside a slow hybrid or the reverse. Here both
models stay on the device (the students are swapped in and out in place, so their weights keep their addresses
and their prefill graphs stay valid), the process first runs the full model for --warm-up seconds (fresh
processes ran slowly for their first 20-50 s), and then every round times the full model, then the hybrid
(--repeats calls each after an untimed one, median). Per length: the medians over the rounds and the median of
the rounds' speedups, with their range.

Models as in bench.hybrid_inference (random weights, bf16 on CUDA), L/2 layers linear, spread evenly.

    python -m bench.prefill_alternating --model llama-1b qwen-1.5b --student gla gated_deltanet --lengths 2048 8192
    python -m bench.prefill_alternating --smoke          # tiny models on the CPU, seconds
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from dtr_core.hybrid import install_students, restore_attention
from dtr_core.specs import STUDENT_KINDS, StudentSpec

from .common import (
    ARCHITECTURES,
    add_student_options,
    cell,
    command_line,
    default_device,
    default_dtype,
    environment,
    environment_line,
    markdown_table,
    median_ms,
    student_label,
    tokens_label,
    write_results,
)
from .hybrid_setup import build_setup, random_tokens


def warm_up(run, seconds: float) -> None:
    """Call ``run`` for ``seconds`` untimed (a fresh process's slow phase)."""
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        run()


def prompt(setup, ids: torch.Tensor):
    """The prompt's forward, as bench.hybrid_inference times it."""
    return setup.model(input_ids=ids, use_cache=True, logits_to_keep=1)


def alternate(setup, length: int, batch: int, rounds: int, repeats: int) -> dict:
    """One length: ``rounds`` rounds of (full model, L/2 hybrid), ``repeats`` timed prompts each."""
    ids = random_tokens(setup, batch, length)

    def prefill():
        return prompt(setup, ids)

    layers = setup.linear_layers(setup.num_layers // 2)
    students = {i: setup.students[i].to(setup.device) for i in layers}
    full, hybrid = [], []
    try:
        for _ in range(rounds):
            full.append(median_ms(prefill, repeats, setup.device))
            originals = install_students(setup.model, setup.adapter, students)
            try:
                hybrid.append(median_ms(prefill, repeats, setup.device))
            finally:
                restore_attention(setup.model, setup.adapter, originals)
    finally:
        for student in students.values():
            student.to("cpu")
    speedups = [f / h for f, h in zip(full, hybrid)]
    return {"tokens": length, "batch": batch, "linear": len(layers), "layers": setup.num_layers,
            "full_ms": statistics.median(full), "hybrid_ms": statistics.median(hybrid),
            "speedup": statistics.median(speedups), "speedup_min": min(speedups), "speedup_max": max(speedups),
            "full_ms_all": full, "hybrid_ms_all": hybrid}


def render(meta: dict, rows: list[dict]) -> str:
    lines = [f"`{meta['command']}` on {meta['environment']['card']} ({environment_line(meta['environment'])}); "
             f"{meta['rounds']} rounds of {meta['repeats']} prompts per model after {meta['warm_up']:.0f} s of warm-up",
             "",
             markdown_table(["model", "student", "batch", "tokens", "linear", "full ms", "hybrid ms",
                             "speedup (median of rounds)", "rounds' range"],
                            [[r["model"], r["student"], str(r["batch"]), tokens_label(r["tokens"]),
                              f"{r['linear']}/{r['layers']}", cell(r["full_ms"]), cell(r["hybrid_ms"]),
                              cell(r["speedup"]) + "x", f"{r['speedup_min']:.2f}-{r['speedup_max']:.2f}x"]
                             for r in rows])]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", nargs="+", choices=sorted(ARCHITECTURES), default=["llama-1b", "qwen-1.5b"])
    parser.add_argument("--student", nargs="+", choices=STUDENT_KINDS, default=["gla"])
    add_student_options(parser)
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warm-up", type=float, default=20.0, help="seconds of untimed full-model prompts first")
    parser.add_argument("--out", help="write the markdown table here, and JSON next to it")
    parser.add_argument("--smoke", action="store_true", help="tiny models on the CPU, seconds")
    args = parser.parse_args(argv)
    if args.smoke:
        args.lengths, args.rounds, args.repeats, args.warm_up = [32], 2, 1, 0.0
    device = default_device(args.smoke)
    dtype = default_dtype(device)
    meta = {"command": command_line("bench.prefill_alternating", argv), "environment": environment(device),
            "rounds": args.rounds, "repeats": args.repeats, "warm_up": args.warm_up}
    rows: list[dict] = []
    for model in args.model:
        for kind in args.student:
            spec = StudentSpec(kind=kind, window=args.window, shared_kv=args.shared_kv)
            setup = build_setup(model, spec, device, dtype, args.smoke, 1, args.batch)
            label = f"{kind} ({student_label(args.window, args.shared_kv)})"
            with torch.inference_mode():
                ids = random_tokens(setup, args.batch, max(args.lengths))
                warm_up(lambda: prompt(setup, ids), args.warm_up)
                for length in args.lengths:
                    rows.append({"model": model, "student": label,
                                 **alternate(setup, length, args.batch, args.rounds, args.repeats)})
                    print(f"{model} {label} {tokens_label(length)}: full {rows[-1]['full_ms']:.2f} ms, hybrid "
                          f"{rows[-1]['hybrid_ms']:.2f} ms, {rows[-1]['speedup']:.2f}x", flush=True)
                    write_results(args.out, render(meta, rows), {"meta": meta, "rows": rows})
    print()
    print(render(meta, rows))


if __name__ == "__main__":
    main()

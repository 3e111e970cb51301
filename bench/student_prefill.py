"""Issue 15: one student layer's prefill against the attention it replaces, and where the student's time goes.

Shape: an architecture's attention (``--shape``, random weights, bf16), batch x length hidden states, one
forward without a cache (inference). Per row: the teacher's attention module under SDPA; the student as a
hybrid's prefill runs it (fused feature map, log-decays and readout, ``kernels.py``; at most
``prefill_graphs.GRAPH_MAX_TOKENS`` tokens replayed as a CUDA graph); the same student eager; then, eager, the same
student on the unfused PyTorch forms (``prefill_kernels="torch"``, what ran before issue 15); the student replayed as
a CUDA graph (its GPU time alone: eager minus graph is what the host adds); the student's scan operator
alone on its prepared inputs as the student runs it (GLA: ``kernels.gla_prefill_triton``), and the host's share
of it; the mechanism's operator on the same inputs (``_operator``: fla's kernels, with a softmax-like readout's
all-ones value column); the host time of one eager student call (Python and launches, before the GPU
finishes), and how many calls in it made the host wait for the GPU (torch's sync debug mode; a wait stops the
host from running ahead of the GPU in a whole model, so its time adds to the GPU's). ``--profile`` adds each
row's kernels by GPU time (torch.profiler), to see which of the student's parts to fuse.

    python -m bench.student_prefill --out $OUT/student_prefill.md     # on the GPU
    python -m bench.student_prefill --smoke                           # tiny sizes on the CPU, seconds
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections import defaultdict

import torch

from bench.common import (
    ARCHITECTURES,
    add_student_options,
    build_model,
    cell,
    command_line,
    default_device,
    default_dtype,
    describe_attention,
    environment,
    environment_line,
    is_cuda,
    markdown_table,
    median_ms,
    synchronize,
    student_label,
    tokens_label,
    unless_oom,
    warm_until_steady,
    write_results,
)
from dtr_core.adapters import adapter_for
from dtr_core.linear.build import student_from_teacher
from dtr_core.linear.decoding import capture_graph
from dtr_core.specs import STUDENT_KINDS, StudentSpec


def teacher_and_students(shape: str, kinds, window: int, shared_kv: bool, device, dtype, smoke: bool):
    """The teacher's attention module (SDPA), its rotary embedding, and one student per kind built from it."""
    model = build_model(shape, device=device, dtype=dtype, attn_implementation="sdpa", smoke=smoke,
                        num_hidden_layers=1, vocab_size=8)
    adapter = adapter_for(model)
    weights = adapter.read_attention_weights(model, 0)
    students = {kind: student_from_teacher(StudentSpec(kind=kind, window=window, shared_kv=shared_kv), weights, causal=True)
                .to(device, dtype).eval() for kind in kinds}
    return adapter.attention_module(model, 0), adapter.backbone(model).rotary_emb, students


def host_ms(fn, repeats: int, device) -> float:
    """Median time the host spends issuing ``fn`` (the GPU may still be working when it returns)."""
    times = []
    for _ in range(repeats):
        synchronize(device)
        started = time.perf_counter()
        fn()
        times.append((time.perf_counter() - started) * 1e3)
    synchronize(device)
    return statistics.median(times)


def graph_ms(fn, repeats: int, device) -> float | None:
    """``fn`` captured as one CUDA graph and replayed: its GPU time without the host's (None off CUDA)."""
    if not is_cuda(device):
        return None
    return median_ms(capture_graph(fn, device).replay, repeats, device, warmup=2)


def host_waits(fn, device) -> int | None:
    """How many times one call of ``fn`` made the host wait for the GPU, by torch's sync debug mode (None off
    CUDA). It sees waits torch causes (``.item()``, copies to the host, ...), not those inside other libraries."""
    if not is_cuda(device):
        return None
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(warning.message) for warning in caught)


def scan_inputs(student, hidden, kernel_scan: bool = False):
    """The student's scan inputs (q, k, v, gates) for ``hidden`` as its forward prepares them: for its operator (a
    K/V head per query head, log-decays), or with ``kernel_scan`` for a prompt's kernel scan (shared K/V heads where
    the kernels read them, the gates in the scan's own form)."""
    projections = student._projections(hidden, repeat=not student._shares_kv_in_kernels(kernel_scan))
    return student._scan_inputs(hidden, projections, None, None, kernel_gates=kernel_scan)


def kernel_table(fn, device, top: int) -> list[dict]:
    """One call of ``fn`` under torch.profiler: GPU time and launches per kernel name, largest first."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if is_cuda(device):
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profile:
        fn()
        synchronize(device)
    totals, counts = defaultdict(float), defaultdict(int)
    for event in profile.events():
        if is_cuda(device) and event.device_type == torch.autograd.DeviceType.CUDA:
            totals[event.name] += event.device_time_total / 1e3
            counts[event.name] += 1
    ranked = sorted(totals, key=totals.get, reverse=True)
    return [{"kernel": name[:90], "ms": totals[name], "launches": counts[name]} for name in ranked[:top]] + (
        [{"kernel": "(all kernels)", "ms": sum(totals.values()), "launches": sum(counts.values())}] if totals else [])


def measure(teacher, rotary, students, batch: int, length: int, repeats: int, device, dtype, profile_top: int):
    hidden = torch.randn(batch, length, teacher.config.hidden_size, device=device, dtype=dtype)
    with torch.inference_mode():
        rope = rotary(hidden, torch.arange(length, device=device)[None].expand(batch, -1))
        row = {"batch": batch, "tokens": length, "ms": {}, "profiles": {}}

        def teacher_call():
            return teacher(hidden, position_embeddings=rope, attention_mask=None)[0]

        row["ms"]["attention"] = median_ms(teacher_call, repeats, device)
        row["ms"]["attention graph"] = graph_ms(teacher_call, repeats, device)
        for kind, student in students.items():
            def student_call(student=student):
                return student(hidden)[0]

            warm_until_steady(student_call, device, window=2)
            fused = student._fused(hidden)
            kernel_scan = student._prompt_kernel_scan(fused, length, None)
            scanned = scan_inputs(student, hidden, kernel_scan)
            row["ms"][kind] = median_ms(student_call, repeats, device)
            student.replay_prefill = False  # from here on every call eager, as before prefill graphs
            row["ms"][f"{kind} eager"] = median_ms(student_call, repeats, device)
            student.prefill_kernels = "torch"
            row["ms"][f"{kind} unfused"] = median_ms(student_call, repeats, device)
            student.prefill_kernels = "auto"
            row["ms"][f"{kind} graph"] = graph_ms(student_call, repeats, device)
            row["ms"][f"{kind} host"] = host_ms(student_call, repeats, device)
            row[f"{kind} host waits"] = host_waits(student_call, device)
            def scan():
                return student._causal_scan(*scanned, None, fused, kernel_gates=kernel_scan, read_out=kernel_scan)

            row["ms"][f"{kind} scan"] = median_ms(scan, repeats, device)
            row["ms"][f"{kind} scan host"] = host_ms(scan, repeats, device)
            row["backend"] = student.last_backend
            q, k, v, gates = scan_inputs(student, hidden)
            row["ms"][f"{kind} operator"] = median_ms(lambda: student._scan(q, k, v, gates), repeats, device)
            if profile_top:
                row["profiles"][kind] = kernel_table(student_call, device, profile_top)
            student.replay_prefill = True
    return row


def render(meta: dict, rows: list[dict], kinds: list[str]) -> str:
    headers = ["batch", "tokens", "attention ms", "attention graph ms"]
    for kind in kinds:
        headers += [f"{kind} ms", f"{kind} eager ms", f"{kind} unfused ms", f"{kind} graph ms", f"{kind} host ms",
                    f"{kind} host waits",
                    f"{kind} scan ms", f"{kind} scan host ms", f"{kind} operator ms", f"{kind} / attention"]
    table = []
    for row in rows:
        ms = row["ms"]
        line = [str(row["batch"]), tokens_label(row["tokens"]), cell(ms.get("attention"), ".3f"),
                cell(ms.get("attention graph"), ".3f")]
        for kind in kinds:
            ratio = ms[kind] / ms["attention"] if isinstance(ms.get(kind), float) else None
            line += [cell(ms.get(kind), ".3f"), cell(ms.get(f"{kind} eager"), ".3f"),
                     cell(ms.get(f"{kind} unfused"), ".3f"),
                     cell(ms.get(f"{kind} graph"), ".3f"), cell(ms.get(f"{kind} host"), ".3f"),
                     cell(row.get(f"{kind} host waits"), "d"), cell(ms.get(f"{kind} scan"), ".3f"),
                     cell(ms.get(f"{kind} scan host"), ".3f"), cell(ms.get(f"{kind} operator"), ".3f"),
                     cell(ratio, ".2f")]
        table.append(line)
    lines = [
        "## One student layer's prefill against the attention it replaces",
        "",
        f"Card: {meta['environment']['card']}. {environment_line(meta['environment'])}.",
        f"Command: `{meta['command']}`",
        f"Shape: {meta['shape']} attention ({meta['attention']}), {meta['dtype']}, random weights, window "
        f"{meta['window']}, {student_label(0, meta['shared_kv'])}; scan backend: {meta.get('backend')}. "
        f"Median of {meta['repeats']} calls.",
        "",
        markdown_table(headers, table),
    ]
    for row in rows:
        for kind, profile in row["profiles"].items():
            if not profile:
                continue
            label = f"batch {row['batch']}, {tokens_label(row['tokens'])} tokens"
            lines += ["", f"Kernels of one {kind} call, {label}:", "",
                      markdown_table(["kernel", "GPU ms", "launches"],
                                     [[k["kernel"].replace("|", "/"), f"{k['ms']:.3f}", str(k["launches"])]
                                      for k in profile])]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(ARCHITECTURES), default="llama-1b")
    parser.add_argument("--kinds", nargs="+", choices=STUDENT_KINDS, default=["gla"])
    add_student_options(parser)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--lengths", type=int, nargs="+", help="tokens (default 2K 8K; smoke: 64)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--profile", type=int, default=0, metavar="TOP",
                        help="also list each row's TOP kernels by GPU time (CUDA only)")
    parser.add_argument("--out", help="write the markdown table here, and JSON next to it")
    parser.add_argument("--smoke", action="store_true", help="tiny shape and lengths, on the CPU, in seconds")
    parser.add_argument("--device", help="default: cuda, or cpu with --smoke")
    args = parser.parse_args(argv)
    device = torch.device(args.device or default_device(args.smoke))
    dtype = default_dtype(device)
    lengths = args.lengths or ([64] if args.smoke else [2048, 8192])
    repeats = 2 if args.smoke else args.repeats
    teacher, rotary, students = teacher_and_students(args.shape, args.kinds, args.window, args.shared_kv, device, dtype,
                                                     args.smoke)
    meta = {"command": command_line("bench.student_prefill", argv), "environment": environment(device),
            "shape": args.shape, "attention": describe_attention(teacher.config),
            "dtype": str(dtype).removeprefix("torch."),
            "window": args.window, "shared_kv": args.shared_kv, "repeats": repeats}
    rows: list[dict] = []
    for batch in args.batches:
        for length in lengths:
            row = unless_oom(lambda: measure(teacher, rotary, students, batch, length, repeats, device, dtype,
                                             args.profile), device)
            rows.append(row or {"batch": batch, "tokens": length, "ms": {"attention": "OOM"}, "profiles": {}})
            meta["backend"] = (row or {}).get("backend", meta.get("backend"))
            print(f"batch {batch} {tokens_label(length)}: " + ", ".join(
                f"{name} {cell(value, '.3f')}" for name, value in rows[-1]["ms"].items()), flush=True)
            write_results(args.out, render(meta, rows, args.kinds), {"meta": meta, "rows": rows})
    print()
    print(render(meta, rows, args.kinds))


if __name__ == "__main__":
    main()

"""Decode step time against the batch, with the CUDA caching allocator's counters, for one model, one
number of linear layers and one context: where does a decode batch stop being served from the
allocator's pool? (bench.hybrid_inference found steps several times slower per token near full memory
without the allocator reporting retries.)

For each batch: median ms per step over --steps steps (after two untimed ones), the host's median time
to issue one step (launch-bound when close to the step time), tokens/s, the peak of
allocated and reserved memory, and what the timed steps cost the allocator: retries (it freed its cache
and tried again), device allocations and frees (cudaMalloc/cudaFree or, with expandable segments, page
mappings), and synchronisations of all streams. With --profile N, N more steps run under
torch.profiler: the device's busy time per step beside the wall time (the gap is the device waiting
on the host), that time by kind of kernel, and the kernels that take most of it.

    python -m bench.decode_batches --model llama-1b --context 65536 --batches 16 32 48 56 64
    python -m bench.decode_batches --model qwen-1.5b --linear 14 --batches 147 --profile 20
    python -m bench.decode_batches --model llama-1b --linear 8 --window 64 --context 4608 --batches 64 --profile 5
    python -m bench.decode_batches --smoke                    # tiny model on the CPU (no counters)
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from bench.common import (
    ALLOCATOR_COUNTERS,
    ARCHITECTURES,
    add_student_options,
    allocator_counters,
    cell,
    default_device,
    default_dtype,
    is_cuda,
    markdown_table,
    median_ms,
    peak_memory_gib,
    release_memory,
    reset_peak_memory,
    student_label,
    synchronize,
    unless_oom,
)
from bench.hybrid_setup import (
    CACHE_KINDS,
    batched_cache,
    build_setup,
    decode_step,
    hybrid,
    prefilled_cache,
    random_tokens,
)
from dtr_core.specs import STUDENT_KINDS, StudentSpec

FLOAT_COLUMNS = ("ms", "host_ms", "tokens_per_s", "allocated_gib", "reserved_gib")
# Kernel kinds by name fragment (first match wins): SDPA's flash / memory-efficient kernels, fla's Triton
# kernels for the students, cuBLAS / CUTLASS matrix products; everything else is "other".
KERNEL_KINDS = (
    ("attention", ("flash", "fmha", "attention", "sdpa", "softmax")),
    ("linear attention", ("gla", "recurrent", "delta_rule")),
    ("matmul", ("gemm", "gemv", "nvjet", "xmma", "cutlass", "mm", "matmul", "linear")),
)


def host_ms(step, steps: int, device) -> float:
    """Median host time to issue one step without waiting for the GPU: close to the step time when
    decoding is bound by Python and kernel launches rather than by the GPU."""
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        step()
        times.append((time.perf_counter() - started) * 1e3)
    synchronize(device)
    return statistics.median(times)


def step_trace(step, steps: int, device) -> list[float]:
    """ms of each of ``steps`` consecutive steps from the first one: how long a fresh batch takes to
    reach its steady speed."""
    times = []
    for _ in range(steps):
        times.append(round(median_ms(step, 1, device, warmup=0), 1))
    return times


def kernel_kind(name: str) -> str:
    lowered = name.lower()
    return next((kind for kind, fragments in KERNEL_KINDS if any(f in lowered for f in fragments)), "other")


def kernel_profile(step, steps: int, device, top: int = 12) -> dict:
    """``steps`` steps under torch.profiler → per step: wall ms, the device's busy ms (the sum of its
    kernels' times: one stream, so they do not overlap), busy ms by kernel kind, and the ``top`` kernels
    as [name, ms, calls]. On the CPU the "kernels" are the aten operators' own (self) times."""
    on_gpu = is_cuda(device)
    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if on_gpu else [ProfilerActivity.CPU]
    synchronize(device)
    started = time.perf_counter()
    with profile(activities=activities) as recorded:
        for _ in range(steps):
            step()
        synchronize(device)
    wall_ms = (time.perf_counter() - started) * 1e3 / steps
    wanted = DeviceType.CUDA if on_gpu else DeviceType.CPU
    kernels = [(event.key, (event.self_device_time_total if on_gpu else event.self_cpu_time_total) / 1e3 / steps,
                event.count / steps)
               for event in recorded.key_averages() if event.device_type == wanted]
    kernels = sorted((k for k in kernels if k[1] > 0), key=lambda k: -k[1])
    by_kind = {kind: 0.0 for kind, _ in KERNEL_KINDS} | {"other": 0.0}
    for name, ms, _ in kernels:
        by_kind[kernel_kind(name)] += ms
    return {"wall_ms": wall_ms, "busy_ms": sum(ms for _, ms, _ in kernels), "by_kind": by_kind,
            "top": [[name[:90], round(ms, 3), round(calls, 1)] for name, ms, calls in kernels[:top]]}


def profile_table(row: dict) -> str:
    """One batch's profile as markdown: the summary line, then its top kernels."""
    found = row["profile"]
    kinds = ", ".join(f"{kind} {ms:.2f}" for kind, ms in found["by_kind"].items())
    head = (f"batch {row['batch']}: {found['wall_ms']:.2f} ms per step, device busy {found['busy_ms']:.2f} ms "
            f"({kinds})")
    return head + "\n\n" + markdown_table(["kernel", "ms per step", "calls per step"],
                                           [[name, f"{ms:.3f}", f"{calls:.1f}"] for name, ms, calls in found["top"]])


def measure(setup, single, batch: int, steps: int, trace: int = 0, profile_steps: int = 0) -> dict:
    cache = batched_cache(setup, single, batch)
    step = decode_step(setup, cache, batch)
    traced = step_trace(step, trace, setup.device) if trace else None
    for _ in range(2):
        step()
    synchronize(setup.device)
    reset_peak_memory(setup.device)
    before = allocator_counters(setup.device)
    ms = median_ms(step, steps, setup.device, warmup=0)
    after = allocator_counters(setup.device)
    row = {"batch": batch, "ms": ms, "host_ms": host_ms(step, steps, setup.device), "tokens_per_s": batch / ms * 1e3,
           **{name: after[name] - before[name] for name in ALLOCATOR_COUNTERS}}
    if traced:
        row["trace_ms"] = traced
    if is_cuda(setup.device):
        row["allocated_gib"] = peak_memory_gib(setup.device)
        row["reserved_gib"] = torch.cuda.max_memory_reserved(setup.device) / 2**30
    if profile_steps:
        row["profile"] = kernel_profile(step, profile_steps, setup.device)
    return row


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama-1b", choices=sorted(ARCHITECTURES))
    parser.add_argument("--linear", type=int, default=0, help="linear layers (evenly spread, as in hybrid_inference)")
    parser.add_argument("--student", default="gla", choices=STUDENT_KINDS)
    add_student_options(parser)
    parser.add_argument("--context", type=int, default=65536)
    parser.add_argument("--batches", type=int, nargs="+", default=[16, 32, 48, 56, 60, 64])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--cache", choices=CACHE_KINDS, default="static",
                        help="decoding (see bench.hybrid_inference): CUDA-graph steps, eager steps, or DynamicCache")
    parser.add_argument("--trace", type=int, default=0,
                        help="also time this many consecutive steps one by one, from the first, per batch")
    parser.add_argument("--profile", type=int, default=0,
                        help="also run this many steps per batch under torch.profiler (kernel time breakdown)")
    parser.add_argument("--smoke", action="store_true", help="tiny model on the CPU, seconds")
    args = parser.parse_args(argv)
    if args.smoke:
        args.context, args.batches, args.steps = 16, [1, 2], 2
        args.profile = min(args.profile, 2)
    device = default_device(args.smoke)
    dtype = default_dtype(device)
    spec = StudentSpec(kind=args.student, window=args.window, shared_kv=args.shared_kv)
    setup = build_setup(args.model, spec, device, dtype, args.smoke, args.steps, max(args.batches), [args.linear],
                        args.cache)
    rows = []
    with torch.inference_mode(), hybrid(setup, args.linear):
        ids = random_tokens(setup, 1, args.context)
        # per batched copy: trace, warm-up, timed, host-timed, profiled
        steps = args.trace + 2 + 2 * args.steps + args.profile
        single = prefilled_cache(setup, ids, steps)
        for batch in args.batches:
            row = unless_oom(lambda: measure(setup, single, batch, args.steps, args.trace, args.profile),
                             device) or {"batch": batch}
            release_memory(device)
            rows.append(row)
            print(row, flush=True)
    columns = ["batch", "ms", "host_ms", "tokens_per_s", "allocated_gib", "reserved_gib", *ALLOCATOR_COUNTERS]
    students = f"{args.student}, {student_label(args.window, args.shared_kv)}"
    print(f"\n{args.model}, {args.linear} linear layers ({students}), context {args.context}, {args.cache} cache, "
          f"PYTORCH_CUDA_ALLOC_CONF={os.environ.get('PYTORCH_CUDA_ALLOC_CONF', '')}")
    print(markdown_table(columns, [[cell(row.get(name), ".2f" if name in FLOAT_COLUMNS else "d")
                                    for name in columns] for row in rows]))
    for row in rows:
        if "profile" in row:
            print("\n" + profile_table(row))


if __name__ == "__main__":
    main()

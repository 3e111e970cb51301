"""Decode step time against the batch, with the CUDA caching allocator's counters, for one model, one
number of linear layers and one context: where does a decode batch stop being served from the
allocator's pool? (bench.hybrid_inference found steps several times slower per token near full memory
without the allocator reporting retries.)

For each batch: median ms per step over --steps steps (after two untimed ones), the host's median time
to issue one step (launch-bound when close to the step time), tokens/s, the peak of
allocated and reserved memory, and what the timed steps cost the allocator: retries (it freed its cache
and tried again), device allocations and frees (cudaMalloc/cudaFree or, with expandable segments, page
mappings), and synchronisations of all streams.

    python -m bench.decode_batches --model llama-1b --context 65536 --batches 16 32 48 56 64
    python -m bench.decode_batches --smoke                    # tiny model on the CPU (no counters)
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from bench.common import (
    ALLOCATOR_COUNTERS,
    ARCHITECTURES,
    allocator_counters,
    cell,
    default_device,
    is_cuda,
    markdown_table,
    median_ms,
    release_memory,
    unless_oom,
)
from bench.hybrid_inference import batched_cache, build_setup, decode_cache, decode_step, hybrid, random_tokens
from dtr_core.specs import StudentSpec

FLOAT_COLUMNS = ("ms", "host_ms", "tokens_per_s", "allocated_gib", "reserved_gib")


def host_ms(step, steps: int, device) -> float:
    """Median host time to issue one step without waiting for the GPU: close to the step time when
    decoding is bound by Python and kernel launches rather than by the GPU."""
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        step()
        times.append((time.perf_counter() - started) * 1e3)
    if is_cuda(device):
        torch.cuda.synchronize()
    return statistics.median(times)


def step_trace(step, steps: int, device) -> list[float]:
    """ms of each of ``steps`` consecutive steps from the first one: how long a fresh batch takes to
    reach its steady speed."""
    times = []
    for _ in range(steps):
        times.append(round(median_ms(step, 1, device, warmup=0), 1))
    return times


def measure(setup, single, batch: int, steps: int, trace: int = 0) -> dict:
    cache = batched_cache(setup, single, batch)
    step = decode_step(setup, cache, batch)
    traced = step_trace(step, trace, setup.device) if trace else None
    for _ in range(2):
        step()
    if is_cuda(setup.device):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(setup.device)
    before = allocator_counters(setup.device)
    ms = median_ms(step, steps, setup.device, warmup=0)
    after = allocator_counters(setup.device)
    row = {"batch": batch, "ms": ms, "host_ms": host_ms(step, steps, setup.device), "tokens_per_s": batch / ms * 1e3,
           **{name: after[name] - before[name] for name in ALLOCATOR_COUNTERS}}
    if traced:
        row["trace_ms"] = traced
    if is_cuda(setup.device):
        row["allocated_gib"] = torch.cuda.max_memory_allocated(setup.device) / 2**30
        row["reserved_gib"] = torch.cuda.max_memory_reserved(setup.device) / 2**30
    return row


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama-1b", choices=sorted(ARCHITECTURES))
    parser.add_argument("--linear", type=int, default=0, help="linear layers (evenly spread, as in hybrid_inference)")
    parser.add_argument("--context", type=int, default=65536)
    parser.add_argument("--batches", type=int, nargs="+", default=[16, 32, 48, 56, 60, 64])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--cache", choices=("preallocated", "dynamic"), default="preallocated")
    parser.add_argument("--trace", type=int, default=0,
                        help="also time this many consecutive steps one by one, from the first, per batch")
    parser.add_argument("--smoke", action="store_true", help="tiny model on the CPU, seconds")
    args = parser.parse_args(argv)
    if args.smoke:
        args.context, args.batches, args.steps = 16, [1, 2], 2
    device = default_device(args.smoke)
    dtype = torch.bfloat16 if is_cuda(device) else torch.float32
    setup = build_setup(args.model, StudentSpec(kind="gla"), device, dtype, args.smoke, args.steps, max(args.batches),
                        [args.linear], args.cache)
    rows = []
    with torch.inference_mode(), hybrid(setup, args.linear):
        ids = random_tokens(setup, 1, args.context)
        steps = args.trace + 2 + 2 * args.steps  # per batched copy: trace, warm-up, timed, host-timed
        single = getattr(setup.model(input_ids=ids, use_cache=True, logits_to_keep=1,
                                     **{setup.cache_arg: decode_cache(setup, args.context, steps)}), setup.cache_arg)
        for batch in args.batches:
            row = unless_oom(lambda: measure(setup, single, batch, args.steps, args.trace), device) or {"batch": batch}
            release_memory(device)
            rows.append(row)
            print(row, flush=True)
    columns = ["batch", "ms", "host_ms", "tokens_per_s", "allocated_gib", "reserved_gib", *ALLOCATOR_COUNTERS]
    print(f"\n{args.model}, {args.linear} linear layers, context {args.context}, {args.cache} cache, "
          f"PYTORCH_CUDA_ALLOC_CONF={os.environ.get('PYTORCH_CUDA_ALLOC_CONF', '')}")
    print(markdown_table(columns, [[cell(row.get(name), ".2f" if name in FLOAT_COLUMNS else "d")
                                    for name in columns] for row in rows]))


if __name__ == "__main__":
    main()

"""Benchmark 2's measurements (see bench/hybrid_inference.py): prefill and decode timings of one hybrid,
the search for the largest and the fastest decode batch, the probed layers' alone-times, and the Amdahl
ceiling and speedups derived from them; ``run_model`` runs a whole plan of (phase, length, k)."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from functools import partial

from torch import nn
from transformers import Cache

from dtr_core.linear.decoding import capture_graph, static_attention

from .common import (
    allocator_counters,
    allocator_retries,
    is_cuda,
    median_ms,
    peak_memory_gib,
    recorded_calls,
    release_memory,
    reset_peak_memory,
    synchronize,
    unless_oom,
    warm_until_steady,
)
from .hybrid_setup import Setup, batched_cache, decode_step, hybrid, prefilled_cache, random_tokens

# The targets are checked from this context on (bench/hybrid_tables.py), so ``plan`` measures
# these lengths first.
LONG_CONTEXT = 32768
WARMUP_WINDOW = 4  # decode steps per window of the warm-up, which runs until a window's time is steady
WARMUP_WINDOWS = 24  # at most
PROCESS_WARMUP_SECONDS = 45.0  # of decoding before the first timed decode step (see warm_up_process)
PROBE_STEPS = 2  # timed decode steps that show a batch fits (after the warm-up)


def amdahl_ceiling(full_ms: float, k: int, attention_ms: float, student_ms: float) -> float:
    """Speedup from swapping k attention layers for students if nothing else changed."""
    return full_ms / (full_ms - k * attention_ms + k * student_ms)


def prefill_repeats(length: int, smoke: bool) -> int:
    if smoke:
        return 1
    return 5 if length <= 8192 else 3 if length <= 32768 else 2


def probed_modules(setup: Setup, layers: list[int]) -> dict[str, nn.Module]:
    """The first full-attention module and the first student of the current model, to time alone."""
    full = [i for i in range(setup.num_layers) if i not in layers]
    probes = {}
    if full:
        probes["attention"] = setup.adapter.attention_module(setup.model, full[0])
    if layers:
        probes["student"] = setup.adapter.attention_module(setup.model, layers[0])
    return probes


def replay_ms(setup: Setup, probes: dict, calls: dict, repeats: int, static: bool = False) -> dict[str, float]:
    """Each probed module re-run alone on its recorded inputs: {"attention_layer_ms", "student_layer_ms"};
    ``static``: the inputs come from a static decoding step (see static_call)."""
    times = {}
    for name, (args, kwargs) in calls.items():
        call = partial(probes[name], *args, **kwargs)
        if static:
            call = static_call(setup, call)
        times[f"{name}_layer_ms"] = median_ms(call, repeats, setup.device)
    return times


def ran_on(probes: dict) -> dict:
    """The operator the probed student's scan last dispatched to ("fla", "fla_recurrent", ...)."""
    return {"student_backend": probes["student"].last_backend} if "student" in probes else {}


def measure_prefill(setup: Setup, length: int, layers: list[int]) -> dict:
    batch = setup.prefill_batch
    ids = random_tokens(setup, batch, length)
    repeats = prefill_repeats(length, setup.smoke)

    def prefill():
        return setup.model(input_ids=ids, use_cache=True, logits_to_keep=1)

    probes = probed_modules(setup, layers)
    with recorded_calls(probes) as calls:
        prefill()  # warm-up, which also records the probed layers' inputs
    for _, kwargs in calls.values():  # re-run without the cache: nothing piles up between repeats
        kwargs.update({key: None for key, value in kwargs.items() if isinstance(value, Cache)})
    layer_times = replay_ms(setup, probes, calls, repeats)
    layer_times.update(ran_on(probes))
    del calls  # before the peak is reset: the recorded inputs are not part of a prefill's memory
    reset_peak_memory(setup.device)
    ms = median_ms(prefill, repeats, setup.device, warmup=0)
    return {"batch": batch, "ms": ms, "tokens_per_s": batch * length / ms * 1e3,
            "peak_gib": peak_memory_gib(setup.device),
            **layer_times}


def static_call(setup: Setup, call):
    """``call`` (a probed layer on the inputs a static step gave it) as the static step runs it: under
    decoding.static_attention, and on CUDA as a replayed CUDA graph, so its time is the device's."""
    if is_cuda(setup.device):
        with static_attention(setup.model):
            return capture_graph(call, setup.device).replay

    def run():
        with static_attention(setup.model):
            call()

    return run


def warm_up(setup: Setup, step) -> int:
    """Decode steps until their time is steady (see warm_until_steady; one window in smoke runs)."""
    return warm_until_steady(step, setup.device, window=WARMUP_WINDOW, max_windows=1 if setup.smoke else WARMUP_WINDOWS)


def warm_up_process(setup: Setup, seconds: float = PROCESS_WARMUP_SECONDS) -> None:
    """Decode (batch 8, 1K context, the full model) for ``seconds`` before anything is timed. On the H200 a
    fresh process decoded 2.5-3x slower, and noisily, for its first ~20-25 s of decoding whatever the
    batch, then dropped to a steady speed for good (per-step traces of bench.decode_batches --trace:
    ~98 ms then 34.8 ms at Llama shape, batch 64, 64K); a per-measurement warm-up cannot tell that slow
    phase from steady speed."""
    batch, context = 8, 1024
    ids = random_tokens(setup, 1, context)
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        steps = 256  # per cache: enough between deadline checks, small enough to stay a small cache
        single = prefilled_cache(setup, ids, steps)
        step = decode_step(setup, batched_cache(setup, single, batch), batch)
        for _ in range(steps):
            step()
        synchronize(setup.device)
    release_memory(setup.device)


def probe_rate(setup: Setup, single: Cache, batch: int) -> float | None:
    """Tokens/s of a few decode steps at ``batch`` (after one untimed step), or None when the batch does
    not fit: it runs out of memory or makes the caching allocator free its cache and retry."""
    def attempt():
        step = decode_step(setup, batched_cache(setup, single, batch), batch)
        retries = allocator_retries(setup.device)
        ms = median_ms(step, PROBE_STEPS, setup.device, warmup=WARMUP_WINDOW)
        return batch / ms * 1e3 if allocator_retries(setup.device) == retries else False

    rate = unless_oom(attempt, setup.device)
    release_memory(setup.device)  # each probe starts from an unfragmented pool
    return rate or None


@dataclass
class BatchSearch:
    largest: int  # the largest batch that fits (0: not even 1)
    fastest: int  # the batch of the highest probed tokens/s among those that fit
    largest_rate: float | None  # probed tokens/s at the largest batch


def search_batches(setup: Setup, single: Cache, known: tuple[int, float] | None) -> BatchSearch:
    """Batches <= setup.max_batch that fit, from one that is known to fit (batch, tokens/s) or from 1:
    doubling, then bisection to within 1/16 of the largest. Every probe is timed, so the search also
    finds the fastest batch: near full memory, steps can get slower per token (allocation), and the
    fastest batch is the one a user would serve with."""
    rates = dict([known]) if known else {}
    if not rates:
        rate = probe_rate(setup, single, 1)
        if rate is None:
            return BatchSearch(0, 0, None)
        rates[1] = rate
    low, high = max(rates), None
    while high is None and low < setup.max_batch:
        candidate = min(2 * low, setup.max_batch)
        rate = probe_rate(setup, single, candidate)
        if rate is None:
            high = candidate
        else:
            low, rates[candidate] = candidate, rate
    while high is not None and high - low > max(1, low // 16):
        middle = (low + high) // 2
        rate = probe_rate(setup, single, middle)
        if rate is None:
            high = middle
        else:
            low, rates[middle] = middle, rate
    return BatchSearch(largest=low, fastest=max(rates, key=rates.get), largest_rate=rates[low])


def time_decode(setup: Setup, single: Cache, batch: int, probes: dict | None = None) -> dict:
    """Median step time at ``batch``; with ``probes``, also their alone-times on one step's inputs."""
    cache = batched_cache(setup, single, batch)
    step = decode_step(setup, cache, batch)
    with recorded_calls(probes or {}) as calls:
        step()  # records the probed layers' inputs (a static decoder's first step: its only eager one)
    reset_peak_memory(setup.device)
    retries = allocator_retries(setup.device)
    warmup_steps = warm_up(setup, step)
    before = allocator_counters(setup.device)
    ms = median_ms(step, setup.decode_steps, setup.device, warmup=0)
    after = allocator_counters(setup.device)
    result = {"batch": batch, "ms": ms, "tokens_per_s": batch / ms * 1e3, "peak_gib": peak_memory_gib(setup.device),
              "allocator_retries": allocator_retries(setup.device) - retries, "warmup_steps": warmup_steps,
              # Device allocations during the timed steps: a step not served from the pool (see BENCHMARKS.md).
              "timed_device_allocs": after["num_device_alloc"] - before["num_device_alloc"]}
    if probes:
        result.update(replay_ms(setup, probes, calls, setup.decode_steps, static=setup.cache == "static"))
        result.update(ran_on(probes))
    return result


def time_decode_fitting(setup: Setup, single: Cache, batch: int, probes: dict | None = None) -> dict | None:
    """``time_decode`` at ``batch``, stepping down by 1/8 while the (longer) timed run runs out of memory or
    makes the allocator retry where the search's short probe did not."""
    while batch > 0:
        result = unless_oom(partial(time_decode, setup, single, batch, probes), setup.device)
        if result is not None and not result["allocator_retries"]:
            return result
        release_memory(setup.device)
        batch = batch * 7 // 8
    return None


def measure_decode(setup: Setup, context: int, layers: list[int], same_batch: int | None) -> dict:
    """Decode at ``context``: (a) at ``same_batch``, (b) at the fastest batch that fits, and the largest
    batch that fits. ``same_batch`` None means this is the full model: its largest batch becomes the
    one every k is compared at."""
    ids = random_tokens(setup, 1, context)
    # The steps a batched copy of the cache takes in time_decode: the recorded step, the warm-up (at most
    # WARMUP_WINDOWS windows) and the timed steps, then the attention layer's replay (one untimed call +
    # the timed ones), which appends to the same copy.
    steps = (1 + WARMUP_WINDOW * WARMUP_WINDOWS + setup.decode_steps) + (1 + setup.decode_steps)
    single = unless_oom(partial(prefilled_cache, setup, ids, steps), setup.device)
    if single is None:
        return {"status": "OOM in prefill"}
    probes = probed_modules(setup, layers)
    if same_batch is None:
        search = search_batches(setup, single, None)
        at_same = time_decode_fitting(setup, single, search.largest, probes)
    else:
        at_same = None
        if same_batch:
            at_same = unless_oom(lambda: time_decode(setup, single, same_batch, probes), setup.device)
        search = search_batches(setup, single, (at_same["batch"], at_same["tokens_per_s"]) if at_same else None)
    if at_same is not None and search.fastest == at_same["batch"]:
        at_best = at_same
    else:
        at_best = time_decode_fitting(setup, single, search.fastest)
    if at_same is not None:
        row = dict(at_same)
    else:
        row = {"batch": same_batch or 0, "status": f"OOM at batch {max(same_batch or 0, 1)}"}
    row.update(max_batch=search.largest, max_batch_capped=search.largest >= setup.max_batch,
               tokens_per_s_largest=search.largest_rate)
    if at_best is not None:
        row.update(best_batch=at_best["batch"], tokens_per_s_best_batch=at_best["tokens_per_s"])
    return row


def plan(prefill_lengths, decode_contexts, counts: list[int], first: int) -> list[tuple[str, int, int]]:
    """(phase, tokens, k) in running order: at >= 32K (decode longest first, then prefill) the full model
    and k = L/2, then the other k there, then the shorter lengths. The full model (k = 0) always runs
    first at a length: the others are compared with it."""
    cells = [("decode", c) for c in sorted(decode_contexts, reverse=True)] + \
            [("prefill", t) for t in sorted(prefill_lengths)]
    long = [c for c in cells if c[1] >= LONG_CONTEXT]
    short = [c for c in cells if c[1] < LONG_CONTEXT]
    tasks = [(phase, tokens, k) for phase, tokens in long for k in (0, first)]
    tasks += [(phase, tokens, k) for phase, tokens in long for k in counts if k not in (0, first)]
    tasks += [(phase, tokens, k) for phase, tokens in short for k in counts]
    return tasks


DERIVED = ("speedup", "ceiling", "of_ceiling", "speedup_best_batch", "speedup_largest_batch",
           "attention_ms_for_ceiling")


def attention_ms_for_ceiling(rows: list[dict], phase: str, tokens: int, batch: int) -> float | None:
    """One full-attention layer's alone-time at (phase, tokens, batch): the median over the hybrids' rows
    that measured it, else the full model's own. The full model's own is the last resort because at its
    largest decode batch memory is full and its replay (which appends to a copy of the cache) was measured
    5-10x slower than the same layer in the hybrids on the H200 (50-68 ms vs 6.3 ms at 32K/64K)."""
    same = [r for r in rows if (r["phase"], r["tokens"], r.get("batch")) == (phase, tokens, batch)
            and "attention_layer_ms" in r]
    hybrids = [r["attention_layer_ms"] for r in same if r["k"] > 0]
    if hybrids:
        return statistics.median(hybrids)
    return same[0]["attention_layer_ms"] if same else None


def compare_all(rows: list[dict]) -> None:
    """(Re)compute every row's speedups and Amdahl ceiling against the full model (k = 0) at its phase
    and length; rows measured later can refine earlier rows' ceilings."""
    references = {(r["phase"], r["tokens"]): r for r in rows if r["k"] == 0}
    for row in rows:
        for key in DERIVED:
            row.pop(key, None)
        reference = references.get((row["phase"], row["tokens"]))
        if reference is None:
            continue
        if "ms" in row and "ms" in reference and row["batch"] == reference["batch"]:
            row["speedup"] = reference["ms"] / row["ms"]
            attention_ms = attention_ms_for_ceiling(rows, row["phase"], row["tokens"], row["batch"])
            if row["k"] == 0:
                row["ceiling"] = 1.0
            elif attention_ms is not None and "student_layer_ms" in row:
                row["attention_ms_for_ceiling"] = attention_ms
                row["ceiling"] = amdahl_ceiling(reference["ms"], row["k"], attention_ms, row["student_layer_ms"])
            if "ceiling" in row:
                row["of_ceiling"] = row["speedup"] / row["ceiling"]
        if "tokens_per_s_best_batch" in row and "tokens_per_s_best_batch" in reference:
            row["speedup_best_batch"] = row["tokens_per_s_best_batch"] / reference["tokens_per_s_best_batch"]
        if row.get("tokens_per_s_largest") and reference.get("tokens_per_s_largest"):
            row["speedup_largest_batch"] = row["tokens_per_s_largest"] / reference["tokens_per_s_largest"]


def run_model(setup: Setup, prefill_lengths, decode_contexts, on_row) -> None:
    """Measure every (phase, length, k) of the plan, handing each finished row to ``on_row``."""
    references: dict[tuple[str, int], dict] = {}
    # First after the full model: the given layer set (benchmark 4's subject), else L/2 (the targets').
    if setup.chosen:
        first = len(setup.chosen)
    else:
        first = setup.num_layers // 2 if setup.num_layers // 2 in setup.counts else max(setup.counts)
    if decode_contexts and is_cuda(setup.device):
        warm_up_process(setup)
    for phase, tokens, k in plan(prefill_lengths, decode_contexts, setup.counts, first):
        with hybrid(setup, k) as layers:
            if phase == "prefill":
                measured = unless_oom(partial(measure_prefill, setup, tokens, layers), setup.device)
                measured = measured or {"status": "OOM"}
            else:
                same_batch = None if k == 0 else references[(phase, tokens)].get("batch", 0)
                measured = measure_decode(setup, tokens, layers, same_batch)
        release_memory(setup.device)
        row = {"model": setup.name, "phase": phase, "tokens": tokens, "k": k, **measured}
        if k == 0:
            references[(phase, tokens)] = row
        on_row(row)

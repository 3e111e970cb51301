"""Benchmark 2 of issue 5: inference speed of hybrids on random-weight models with real shapes.

Models: Llama-3.2-1B-shaped and Qwen2.5-1.5B-shaped causal LMs from hand-written configs (see
bench/common.py), random weights, bf16 on CUDA. Full attention runs under flash-attn 2 when it is
installed and under torch SDPA otherwise (the result header says which). In k = 0, L/4, L/2, 3L/4 and L
layers the attention is swapped for a random-init student (``student_from_teacher`` +
``install_students``); the linear layers are spread evenly: the L - k full-attention layers sit at
floor(i * L / (L - k)), so layer 0 keeps full attention while k < L, and k = L/2 makes every odd layer
linear. Layers swapped out wait on the CPU, so peak memory counts only what the hybrid holds.

Prefill: batch 1, ``use_cache=True`` (the cache counts in peak memory), ``logits_to_keep=1`` (no
vocabulary-sized logits at 128K); tokens/s and peak ``torch.cuda.max_memory_allocated`` (weights
included), reset per measurement.

Decode: each process first decodes for 45 s untimed (``warm_up_process``: fresh processes decoded
2.5-3x slower for their first 20-50 s on the H200), and every timed batch warms until its step time is
steady. One sequence of ``context`` tokens is prefilled, its cache is copied to the batch
(``Cache.batch_repeat_interleave``: a step costs the same whatever the cache holds), then single-token
steps with that cache; median step time. Decoding (--cache): "static" (default), a
``decoding.StaticDecoder`` on a ``students.preallocated_cache`` (full-attention layers write into buffers
sized for the context + the steps run, linear layers update their recurrent state in place; on CUDA
the batch's first step is captured as a CUDA graph and every later step replays it, so the host's
Python no longer sets the pace); "preallocated", the same cache through the model's eager forward (the
keyword is detected: ``cache`` or ``past_key_values``); or "dynamic", transformers' DynamicCache, which
concatenates every full-attention layer's keys and values into new tensors at each step. (a) at the same batch for every k: the largest that fits the full
model; (b) at the fastest batch that fits each model, with the largest beside it (doubling, then
bisection to within 1/16; at most --max-batch; every probe timed). A batch fits when its steps run
without running out of memory *and* without the CUDA caching allocator having to free its cache and
retry: with DynamicCache a batch that only just fits spends most of each step on freeing and
re-allocating (on an H200, 3-4.5x slower steps at the largest batch than at the full model's batch,
for 1.3-1.9x the tokens).

Amdahl ceiling: one full-attention module and one student module are re-run alone on the inputs the
model gave them in the same measurement (prefill: the whole sequence, without a cache; decode: one
token with the cache at that context; with static decoding each as its own replayed CUDA graph),
giving t_attention and t_student; then
ceiling = T_full / (T_full - k * t_attention + k * t_student), with T_full the full model's time at
the same length and batch, and t_attention the median over the hybrids measured at that length and
batch (see ``attention_ms_for_ceiling``). Speedups: prefill and decode (a) against the full model at the same batch,
decode (b) against the full model at its own largest batch (no ceiling: the batches differ).

Work is ordered so the issue's targets come first (contexts >= 32K with k = 0 and L/2), and the
results (markdown + JSON) are rewritten after every measurement: a run cut off by a time limit keeps
what it measured. ``--render RESULTS.json`` rewrites the tables from saved results without measuring.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from transformers import Cache, DynamicCache

from dtr_core.adapters import ModelAdapter, adapter_for
from dtr_core.hybrid import install_students, restore_attention
from dtr_core.linear.build import student_from_teacher
from dtr_core.linear.decoding import StaticDecoder, cache_keyword, capture_graph, static_attention
from dtr_core.linear.students import preallocated_cache
from dtr_core.specs import STUDENT_KINDS, StudentSpec

from .common import (
    ARCHITECTURES,
    allocator_counters,
    allocator_retries,
    build_model,
    cell,
    default_device,
    describe_attention,
    environment,
    environment_line,
    full_attention_implementations,
    is_cuda,
    markdown_table,
    median_ms,
    peak_memory_gib,
    recorded_calls,
    release_memory,
    reset_peak_memory,
    synchronize,
    tokens_label,
    unless_oom,
    warm_until_steady,
    write_results,
)

PREFILL_LENGTHS = (2048, 8192, 32768, 131072)
DECODE_CONTEXTS = (8192, 32768, 65536)
SMOKE_PREFILL_LENGTHS = (16, 64)
SMOKE_DECODE_CONTEXTS = (16, 32)
# The targets: measured >= 90% of the ceiling from 32K on; with L/2 linear layers, decode at 64K
# >= 1.6x the full model at the same batch and >= 1.8x at the largest batch that fits.
LONG_CONTEXT = 32768
TARGET_OF_CEILING = 0.9
TARGET_CONTEXT = 65536
TARGET_SAME_BATCH = 1.6
TARGET_LARGEST_BATCH = 1.8
WARMUP_WINDOW = 4  # decode steps per window of the warm-up, which runs until a window's time is steady
WARMUP_WINDOWS = 24  # at most
PROCESS_WARMUP_SECONDS = 45.0  # of decoding before the first timed decode step (see warm_up_process)
PROBE_STEPS = 2  # timed decode steps that show a batch fits (after the warm-up)
CACHE_DESCRIPTIONS = {
    "static": ("preallocated cache, steps by decoding.StaticDecoder (its full-attention layers attend through "
               "decoding.decode_attention, a Triton kernel, in place of the implementation above; students update "
               "their states in place): on CUDA one CUDA graph per batch, captured at its first step, replays "
               "every step"),
    "preallocated": "preallocated cache (full-attention layers write in place; students.preallocated_cache)",
    "dynamic": "transformers DynamicCache (concatenates at every step)",
}
CACHE_KINDS = tuple(CACHE_DESCRIPTIONS)


def linear_layer_counts(num_layers: int) -> list[int]:
    return sorted({0, num_layers // 4, num_layers // 2, 3 * num_layers // 4, num_layers})


def linear_layers(num_layers: int, k: int) -> list[int]:
    """The k layers made linear: the L - k full-attention layers sit at floor(i * L / (L - k))."""
    full = {i * num_layers // (num_layers - k) for i in range(num_layers - k)} if k < num_layers else set()
    return [i for i in range(num_layers) if i not in full]


def amdahl_ceiling(full_ms: float, k: int, attention_ms: float, student_ms: float) -> float:
    """Speedup from swapping k attention layers for students if nothing else changed."""
    return full_ms / (full_ms - k * attention_ms + k * student_ms)


def prefill_repeats(length: int, smoke: bool) -> int:
    if smoke:
        return 1
    return 5 if length <= 8192 else 3 if length <= 32768 else 2


@dataclass
class Setup:
    """One architecture on the device, with a student built for every layer (kept on the CPU until used)."""

    name: str
    model: nn.Module
    adapter: ModelAdapter
    students: dict[int, nn.Module]
    attention: str
    device: str
    cache_arg: str
    smoke: bool
    decode_steps: int
    max_batch: int
    counts: list[int]  # the numbers of linear layers measured (0 first: the reference)
    cache: str  # one of CACHE_KINDS
    chosen: list[int]  # a given set of linear layers (e.g. a search's M_opt), measured as k = len(chosen)

    def linear_layers(self, k: int) -> list[int]:
        return self.chosen if self.chosen and k == len(self.chosen) else linear_layers(self.num_layers, k)

    @property
    def num_layers(self) -> int:
        return self.adapter.num_layers


def load_model(name: str, device, dtype, attention: str, smoke: bool) -> nn.Module:
    """A random-weight architecture of ARCHITECTURES, or a teacher dtr_core can load (a built-in name such
    as smollm2-135m, or a local Hugging Face folder) with its real weights."""
    if name in ARCHITECTURES:
        return build_model(name, device=device, dtype=dtype, attn_implementation=attention, smoke=smoke)
    from dtr_core.specs import ModelSpec
    from dtr_core.teacher import load_teacher

    spec = ModelSpec(path=name, dtype=str(dtype).removeprefix("torch."), attn_implementation=attention)
    return load_teacher(spec, device=device).model


def build_setup(name: str, spec: StudentSpec, device, dtype, smoke: bool, decode_steps: int,
                max_batch: int, counts: list[int] | None = None, cache: str = "static",
                chosen: list[int] | None = None) -> Setup:
    attention = full_attention_implementations(device)[-1]  # flash-attn 2 when installed, else SDPA
    model = load_model(name, device, dtype, attention, smoke)
    adapter = adapter_for(model)
    students = {}
    for layer in range(adapter.num_layers):
        with torch.device(device):  # initialising on the device is much faster than on the CPU
            student = student_from_teacher(spec, adapter.read_attention_weights(model, layer), causal=True,
                                           seed=layer)
        students[layer] = student.to(dtype).eval().to("cpu")
    chosen = sorted(chosen or [])
    if any(not 0 <= i < adapter.num_layers for i in chosen):
        raise SystemExit(f"--linear-layers {chosen}: {name} has layers 0-{adapter.num_layers - 1}")
    counts = sorted({0, *(counts or linear_layer_counts(adapter.num_layers)), *([len(chosen)] if chosen else [])})
    return Setup(name, model, adapter, students, attention, device, cache_keyword(model), smoke, decode_steps,
                 max_batch, counts, cache, chosen)


@contextmanager
def hybrid(setup: Setup, k: int):
    """``setup.model`` with k evenly spread layers linear; yields those layers' indices."""
    layers = setup.linear_layers(k)
    originals = install_students(setup.model, setup.adapter,
                                 {i: setup.students[i].to(setup.device) for i in layers})
    for module in originals.values():
        module.to("cpu")
    try:
        yield layers
    finally:
        for module in originals.values():
            module.to(setup.device)
        restore_attention(setup.model, setup.adapter, originals)
        for i in layers:
            setup.students[i].to("cpu")


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


def student_backends(rows: list[dict]) -> str:
    found = {}
    for row in rows:
        if "student_backend" in row:
            found.setdefault(row["phase"], set()).add(row["student_backend"])
    return "; ".join(f"{phase} {', '.join(sorted(backends))}" for phase, backends in found.items()) or "none yet"


def random_tokens(setup: Setup, batch: int, length: int) -> torch.Tensor:
    return torch.randint(setup.model.config.vocab_size, (batch, length), device=setup.device)


def measure_prefill(setup: Setup, length: int, layers: list[int]) -> dict:
    ids = random_tokens(setup, 1, length)
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
    return {"batch": 1, "ms": ms, "tokens_per_s": length / ms * 1e3, "peak_gib": peak_memory_gib(setup.device),
            **layer_times}


def decode_cache(setup: Setup, context: int, steps: int | None = None) -> Cache:
    """An empty cache of ``setup.cache``'s kind for one sequence of ``context`` tokens and the ``steps`` decode
    steps any batched copy of it takes; by default time_decode's: its warm-up (at most WARMUP_WINDOWS
    windows), timed and recorded steps, then the attention layer's replay (warm-up + timed), which appends
    to the same copy."""
    if setup.cache == "dynamic":
        return DynamicCache()
    if steps is None:
        steps = (WARMUP_WINDOW * WARMUP_WINDOWS + setup.decode_steps + 1) + (1 + setup.decode_steps)
    return preallocated_cache(setup.num_layers, context + steps)


def batched_cache(setup: Setup, single: Cache, batch: int) -> Cache:
    cache = copy.deepcopy(single)
    cache.batch_repeat_interleave(batch)
    return cache


def decode_step(setup: Setup, cache: Cache, batch: int):
    """One decode step of ``batch`` sequences (token 0 each) as a callable: a StaticDecoder's step (a CUDA
    graph replay from the second call on) for the "static" cache, else the model's forward."""
    if setup.cache == "static":
        return StaticDecoder(setup.model, cache).step
    tokens = torch.zeros(batch, 1, dtype=torch.long, device=setup.device)
    return lambda: setup.model(input_ids=tokens, use_cache=True, **{setup.cache_arg: cache})


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
        single = getattr(setup.model(input_ids=ids, use_cache=True, logits_to_keep=1,
                                     **{setup.cache_arg: decode_cache(setup, context, steps)}), setup.cache_arg)
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
    prefill = partial(setup.model, input_ids=ids, use_cache=True, logits_to_keep=1,
                      **{setup.cache_arg: decode_cache(setup, context)})
    single = unless_oom(lambda: getattr(prefill(), setup.cache_arg), setup.device)
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


def progress_line(row: dict) -> str:
    parts = [f"[{row['model']}] {row['phase']} {tokens_label(row['tokens'])} k={row['k']}:"]
    if "status" in row:
        parts.append(row["status"])
    if "ms" in row:
        parts.append(f"batch {row['batch']}, {row['ms']:.2f} ms, {row['tokens_per_s']:.0f} tok/s, "
                     f"speedup {cell(row.get('speedup'))}, ceiling {cell(row.get('ceiling'))}")
    if "best_batch" in row:
        parts.append(f"largest batch {row['max_batch']}; fastest batch {row['best_batch']}: "
                     f"{row['tokens_per_s_best_batch']:.0f} tok/s ({cell(row.get('speedup_best_batch'))}x)")
    return " ".join(parts)


def _times(value) -> str:
    return cell(value, ".2f") + "x" if value is not None else "—"


def render_model(meta: dict, rows: list[dict]) -> str:
    num_layers = meta["num_layers"]
    ordered = sorted(rows, key=lambda r: (r["tokens"], r["k"]))
    prefill = [[tokens_label(r["tokens"]), f"{r['k']}/{num_layers}", cell(r.get("ms"), ".1f", r.get("status", "—")),
                cell(r.get("tokens_per_s"), ",.0f"), cell(r.get("peak_gib")), _times(r.get("speedup")),
                _times(r.get("ceiling")), cell(r.get("of_ceiling"), ".0%"), cell(r.get("attention_layer_ms"), ".3f"),
                cell(r.get("attention_ms_for_ceiling"), ".3f"), cell(r.get("student_layer_ms"), ".3f")]
               for r in ordered if r["phase"] == "prefill"]
    decode = [[tokens_label(r["tokens"]), f"{r['k']}/{num_layers}", cell(r.get("batch"), "d"),
               cell(r.get("tokens_per_s"), ",.0f", r.get("status", "—")), cell(r.get("ms"), ".2f"),
               cell(r.get("peak_gib")), _times(r.get("speedup")), _times(r.get("ceiling")),
               cell(r.get("of_ceiling"), ".0%"), cell(r.get("attention_layer_ms"), ".3f"),
               cell(r.get("attention_ms_for_ceiling"), ".3f"), cell(r.get("student_layer_ms"), ".3f"),
               cell(r.get("max_batch"), "d") + (" (cap)" if r.get("max_batch_capped") else ""),
               cell(r.get("tokens_per_s_largest"), ",.0f"), _times(r.get("speedup_largest_batch")),
               cell(r.get("best_batch"), "d"), cell(r.get("tokens_per_s_best_batch"), ",.0f"),
               _times(r.get("speedup_best_batch"))]
              for r in ordered if r["phase"] == "decode"]
    env = meta["environment"]
    lines = [
        f"### {meta['model']}: {meta['architecture']} "
        f"({'random' if meta['model'] in ARCHITECTURES else 'real'} weights)",
        "",
        f"Card: {env['card']}. {environment_line(env)}.",
        f"Command: `{meta['command']}`",
        (f"Full attention: {meta['attention']}. Students: {meta['student']}, random init from the "
         f"teacher's projections; operators that ran: {student_backends(rows)}. {meta['dtype']}. "
         f"Cache: {meta['cache']}."),
        "Linear layers (evenly spread unless given): "
        + "; ".join(f"k={k}: {', '.join(map(str, layers)) or '-'}" for k, layers in meta["linear_layers"].items()),
        "",
        "Prefill, batch 1 (speedup and Amdahl ceiling against the full model at the same length):",
        "",
        markdown_table(["tokens", "linear", "ms", "tokens/s", "peak GiB", "speedup", "Amdahl ceiling",
                        "of ceiling", "attention layer ms", "attention ms in ceiling", "student layer ms"], prefill),
        "",
        "Decode, one token per step: (a) at the full model's largest batch; (b) at each model's fastest batch "
        "among those that fit (speedup against the full model's fastest); the largest batch that fits beside it "
        "(speedup against the full model at its largest):",
        "",
        markdown_table(["context", "linear", "batch (a)", "tokens/s (a)", "ms/step", "peak GiB", "speedup (a)",
                        "Amdahl ceiling", "of ceiling", "attention layer ms", "attention ms in ceiling",
                        "student layer ms", "largest batch", "tokens/s at largest", "speedup at largest",
                        "fastest batch (b)",
                        "tokens/s (b)", "speedup (b)"],
                       decode),
        "",
        "Targets (issue 5):",
    ]
    lines += target_lines(rows, num_layers)
    return "\n".join(lines)


def target_lines(rows: list[dict], num_layers: int) -> list[str]:
    lines = []
    long = [r for r in rows if r["tokens"] >= LONG_CONTEXT and r["k"] > 0 and "of_ceiling" in r]
    if long:
        below = [r for r in long if r["of_ceiling"] < TARGET_OF_CEILING]
        lines.append(f"- measured >= {TARGET_OF_CEILING:.0%} of the Amdahl ceiling at >= {tokens_label(LONG_CONTEXT)}: "
                     f"{len(long) - len(below)}/{len(long)} rows"
                     + ("; below: " + ", ".join(f"{r['phase']} {tokens_label(r['tokens'])} k={r['k']} "
                                                 f"({r['of_ceiling']:.0%})" for r in below) if below else ""))
    for r in rows:
        if r["phase"] == "decode" and r["tokens"] == TARGET_CONTEXT and r["k"] == num_layers // 2:
            for key, target, label in (("speedup", TARGET_SAME_BATCH, "same batch"),
                                       ("speedup_largest_batch", TARGET_LARGEST_BATCH, "largest batch that fits"),
                                       ("speedup_best_batch", TARGET_LARGEST_BATCH, "fastest batch that fits")):
                if key in r:
                    verdict = "met" if r[key] >= target else "missed"
                    lines.append(f"- decode at {tokens_label(TARGET_CONTEXT)}, L/2 linear, {label}: "
                                 f"{r[key]:.2f}x (target >= {target}x: {verdict})")
    return lines or ["- not measured yet"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="both",
                        help=f"{', '.join(sorted(ARCHITECTURES))} (random weights), both, or a model dtr_core "
                             "loads with its real weights: smollm2-135m or a local Hugging Face folder")
    parser.add_argument("--linear-counts", type=int, nargs="+",
                        help="numbers of linear layers to measure, e.g. the k of a hybrid DtR found "
                             "(default 0, L/4, L/2, 3L/4, L)")
    parser.add_argument("--linear-layers", type=int, nargs="+",
                        help="one given set of linear layers (e.g. the M_opt a DtR search found), measured "
                             "besides the evenly spread ones as k = its size")
    parser.add_argument("--student", choices=STUDENT_KINDS, default="gla")
    parser.add_argument("--lengths", type=int, nargs="*",
                        help="prefill tokens (default 2K 8K 32K 128K; none given: no prefill)")
    parser.add_argument("--contexts", type=int, nargs="*",
                        help="decode contexts (default 8K 32K 64K; none given: no decode)")
    parser.add_argument("--decode-steps", type=int, help="timed decode steps (default 8; smoke 2)")
    parser.add_argument("--cache", choices=CACHE_KINDS, default="static",
                        help="decoding: static (preallocated buffers, CUDA-graph steps), preallocated (the "
                             "same buffers, eager steps) or transformers' DynamicCache (concatenates at every step)")
    parser.add_argument("--max-batch", type=int, help="largest decode batch tried (default 1024; smoke 8)")
    parser.add_argument("--out", help="write the markdown tables here, and JSON next to it")
    parser.add_argument("--smoke", action="store_true", help="tiny models and lengths, on the CPU, in seconds")
    parser.add_argument("--device", help="default: cuda, or cpu with --smoke")
    parser.add_argument("--render", metavar="RESULTS_JSON",
                        help="measure nothing: rewrite the tables (speedups and ceilings recomputed) from the JSON "
                             "an earlier run wrote, to --out or stdout")
    args = parser.parse_args(argv)
    if args.render:
        render_saved(args.render, args.out)
        return
    device = args.device or default_device(args.smoke)
    if args.smoke:
        torch.set_num_threads(1)  # tiny tensors: extra threads only contend with other processes
    dtype = torch.bfloat16 if is_cuda(device) else torch.float32
    prefill_lengths = args.lengths if args.lengths is not None else (
        SMOKE_PREFILL_LENGTHS if args.smoke else PREFILL_LENGTHS)
    decode_contexts = args.contexts if args.contexts is not None else (
        SMOKE_DECODE_CONTEXTS if args.smoke else DECODE_CONTEXTS)
    decode_steps = args.decode_steps or (2 if args.smoke else 8)
    max_batch = args.max_batch or (8 if args.smoke else 1024)
    command = "python -m bench.hybrid_inference " + " ".join(sys.argv[1:] if argv is None else argv)
    names = sorted(ARCHITECTURES) if args.model == "both" else [args.model]
    spec = StudentSpec(kind=args.student)

    sections: dict[str, tuple[dict, list[dict]]] = {}

    def on_row(row: dict) -> None:
        rows = sections[row["model"]][1]
        rows.append(row)
        compare_all(rows)
        print(progress_line(row), flush=True)
        write_results(args.out, document(sections), results(sections))

    with torch.inference_mode():
        for name in names:
            setup = build_setup(name, spec, device, dtype, args.smoke, decode_steps, max_batch, args.linear_counts,
                                args.cache, args.linear_layers)
            config = setup.model.config
            meta = {
                "model": name, "command": command, "environment": environment(device),
                "architecture": f"{setup.num_layers} layers, {describe_attention(config)}, intermediate "
                                f"{config.intermediate_size}, vocab {config.vocab_size}",
                "num_layers": setup.num_layers, "attention": setup.attention,
                "student": f"{spec.kind} ({spec.feature_map} feature map)",
                "dtype": str(dtype).removeprefix("torch."),
                "cache": (f"{CACHE_DESCRIPTIONS[args.cache]} through `{setup.cache_arg}=`, students' recurrent "
                          "states in it"),
                "linear_layers": {k: setup.linear_layers(k) for k in setup.counts},
                "decode_steps": decode_steps, "max_batch": max_batch,
            }
            sections[name] = (meta, [])
            run_model(setup, prefill_lengths, decode_contexts, on_row)
            del setup
            release_memory(device)
    print()
    print(document(sections))


def document(sections: dict[str, tuple[dict, list[dict]]]) -> str:
    return "\n\n".join(["## Benchmark 2: hybrid inference"]
                       + [render_model(meta, rows) for meta, rows in sections.values()])


def results(sections: dict[str, tuple[dict, list[dict]]]) -> dict:
    return {"models": [{"meta": meta, "rows": rows} for meta, rows in sections.values()]}


def render_saved(path: str, out: str | None) -> None:
    with open(path) as handle:
        saved = json.load(handle)
    sections = {}
    for model in saved["models"]:
        rows = model["rows"]
        compare_all(rows)
        sections[model["meta"]["model"]] = (model["meta"], rows)
    if out:
        write_results(out, document(sections), results(sections))
    print(document(sections))


if __name__ == "__main__":
    main()

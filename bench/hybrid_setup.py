"""Benchmark 2's model side (see bench/hybrid_inference.py): one architecture on the device with a student
for every layer, the hybrid with k of its layers linear, and the decode caches and steps every decode
measurement (bench/hybrid_timing.py, bench/decode_batches.py) runs on."""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from transformers import Cache, DynamicCache

from dtr_core.adapters import ModelAdapter, adapter_for
from dtr_core.hybrid import install_students, restore_attention
from dtr_core.linear.build import student_from_teacher
from dtr_core.linear.cache import preallocated_cache
from dtr_core.linear.decoding import StaticDecoder, cache_keyword
from dtr_core.specs import StudentSpec

from .common import ARCHITECTURES, build_model, full_attention_implementations

# --cache's choices, as the results' header describes them.
CACHE_DESCRIPTIONS = {
    "static": ("preallocated cache, steps by decoding.StaticDecoder (its full-attention layers attend through "
               "decoding.decode_attention, a Triton kernel, in place of the implementation above; students update "
               "their states in place): on CUDA one CUDA graph per batch, captured at its first step, replays "
               "every step"),
    "preallocated": "preallocated cache (full-attention layers write in place; cache.preallocated_cache)",
    "dynamic": "transformers DynamicCache (concatenates at every step)",
}
CACHE_KINDS = tuple(CACHE_DESCRIPTIONS)


def linear_layer_counts(num_layers: int) -> list[int]:
    return sorted({0, num_layers // 4, num_layers // 2, 3 * num_layers // 4, num_layers})


def linear_layers(num_layers: int, k: int) -> list[int]:
    """The k layers made linear: the L - k full-attention layers sit at floor(i * L / (L - k))."""
    full = {i * num_layers // (num_layers - k) for i in range(num_layers - k)} if k < num_layers else set()
    return [i for i in range(num_layers) if i not in full]


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
    prefill_batch: int = 1  # sequences per prefill

    def linear_layers(self, k: int) -> list[int]:
        return self.chosen if self.chosen and k == len(self.chosen) else linear_layers(self.num_layers, k)

    @property
    def num_layers(self) -> int:
        return self.adapter.num_layers


MODEL_HELP = (f"{', '.join(sorted(ARCHITECTURES))} (random weights), both, or a model dtr_core loads with its real "
              "weights: smollm2-135m or a local Hugging Face folder")
LINEAR_LAYERS_HELP = ("one given set of linear layers (e.g. the M_opt a DtR search found), measured besides the "
                      "evenly spread ones as k = its size")


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


def random_tokens(setup: Setup, batch: int, length: int) -> torch.Tensor:
    return torch.randint(setup.model.config.vocab_size, (batch, length), device=setup.device)


def decode_cache(setup: Setup, context: int, steps: int) -> Cache:
    """An empty cache of ``setup.cache``'s kind for one sequence of ``context`` tokens and the ``steps`` decode
    steps any batched copy of it takes (the preallocated buffers cannot grow)."""
    if setup.cache == "dynamic":
        return DynamicCache()
    return preallocated_cache(setup.num_layers, context + steps)


def prefilled_cache(setup: Setup, ids: torch.Tensor, steps: int) -> Cache:
    """``decode_cache`` for one sequence after prefilling it with ``ids`` (1 x context): what a decode batch
    copies (``batched_cache``)."""
    output = setup.model(input_ids=ids, use_cache=True, logits_to_keep=1,
                         **{setup.cache_arg: decode_cache(setup, ids.shape[1], steps)})
    return getattr(output, setup.cache_arg)


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

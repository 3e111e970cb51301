"""Shared pieces of the GPU benchmarks of issue 5 (bench/attention.py, bench/hybrid_inference.py).

Those scripts run on the bare GPU image (torch + transformers, fla from carried wheels): they and this
module import only torch, transformers and dtr_core's core; flash-attn is used when it is installed.
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import json
import math
import platform
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
from transformers.utils import is_flash_attn_2_available

from dtr_core.specs import StudentSpec

# Hand-written configs with the real architectures' shapes; the benchmarks use random weights.
ARCHITECTURES = {
    # Llama-3.2-1B: 16 layers, 32 query heads x 64, 8 K/V heads, tied embeddings.
    "llama-1b": (LlamaConfig, LlamaForCausalLM, dict(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True,
        max_position_embeddings=131072)),
    # Qwen2.5-1.5B: 28 layers, 12 query heads x 128, 2 K/V heads, q/k/v bias (Qwen2's default), tied.
    "qwen-1.5b": (Qwen2Config, Qwen2ForCausalLM, dict(
        vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
        num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True,
        max_position_embeddings=131072)),
}
# --smoke shrinks either architecture to this (same family, GQA kept) so the scripts run on a CPU in seconds.
SMOKE_DIMS = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16)


def build_model(name: str, *, device, dtype: torch.dtype, attn_implementation: str, smoke: bool = False,
                seed: int = 0, **overrides) -> torch.nn.Module:
    """A random-init causal LM of architecture ``name`` (tiny when ``smoke``), in eval mode."""
    config_cls, model_cls, dims = ARCHITECTURES[name]
    config = config_cls(**{**dims, **(SMOKE_DIMS if smoke else {}), **overrides},
                        attn_implementation=attn_implementation)
    torch.manual_seed(seed)
    with torch.device(device):  # initialise on the target device: CPU init of 1.5B parameters takes long
        model = model_cls(config)
    return model.to(dtype).eval()


def attention_head_dim(config) -> int:
    """The width of one attention head of a transformers ``config``."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def describe_attention(config) -> str:
    head_dim = attention_head_dim(config)
    return (f"hidden {config.hidden_size}, {config.num_attention_heads} heads x {head_dim}, "
            f"{config.num_key_value_heads} KV heads")


def add_student_options(parser) -> None:
    """The product's student options a benchmark's students take: ``--window`` and ``--shared-kv``."""
    parser.add_argument("--window", type=int, default=0, help="the students' softmax window (0: none)")
    parser.add_argument("--shared-kv", action=argparse.BooleanOptionalAction, default=StudentSpec.shared_kv,
                        help="students share the teacher's K/V heads by groups of query heads (student.shared_kv)")


def student_label(window: int, shared_kv: bool) -> str:
    """The student options of ``add_student_options``, for a table's description."""
    return ", ".join([f"window {window}"] * bool(window) + ["shared K/V heads" if shared_kv else "K/V per query head"])


def default_device(smoke: bool) -> str:
    return "cpu" if smoke or not torch.cuda.is_available() else "cuda"


def is_cuda(device) -> bool:
    return torch.device(device).type == "cuda"


def default_dtype(device) -> torch.dtype:
    """bf16 on CUDA, the precision the GPU benchmarks measure; fp32 on the CPU (the smoke runs)."""
    return torch.bfloat16 if is_cuda(device) else torch.float32


def command_line(module: str, argv: list[str] | None) -> str:
    """The command a results header quotes: ``python -m module`` with ``argv`` (None: this process's)."""
    return f"python -m {module} " + " ".join(sys.argv[1:] if argv is None else argv)


def full_attention_implementations(device) -> list[str]:
    """The teacher attention backends to run: SDPA always, flash-attn 2 too when it is installed."""
    return ["sdpa", "flash_attention_2"] if is_cuda(device) and is_flash_attn_2_available() else ["sdpa"]


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(device) -> dict:
    """Card and library versions, recorded next to every result."""
    return {
        "card": torch.cuda.get_device_name(device) if is_cuda(device) else f"CPU ({platform.processor() or 'unknown'})",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "triton": _version("triton"),
        "fla": _version("fla-core") or _version("flash-linear-attention"),
        "flash_attn": _version("flash-attn"),
    }


def environment_line(env: dict) -> str:
    """The library versions (the card is named separately)."""
    return ", ".join(f"{key} {value}" for key, value in env.items() if key != "card" and value is not None)


def warm_until_steady(fn, device, window: int = 4, tolerance: float = 0.05, max_windows: int = 24) -> int:
    """Call ``fn`` in windows of ``window`` calls, each timed as a whole, until a window's time is within
    ``tolerance`` of the one before, or after ``max_windows`` windows; returns the calls made.

    Why: on the H200 the first decode steps of a process ran 1.5-4x slower than later steps at the same
    batch, for seconds and over several batches (49.6 then 11.6 ms per step at batch 16; 51.4 then 33.5
    ms at batch 64; bench.decode_batches), which a fixed warm-up of two steps did not cover.
    """
    previous = None
    for windows in range(1, max_windows + 1):
        synchronize(device)
        window_started = time.perf_counter()
        for _ in range(window):
            fn()
        synchronize(device)
        elapsed = time.perf_counter() - window_started
        if previous is not None and abs(elapsed - previous) <= tolerance * previous:
            break
        previous = elapsed
    return windows * window


def synchronize(device) -> None:
    if is_cuda(device):
        torch.cuda.synchronize()


def median_ms(fn, repeats: int, device, warmup: int = 1, before_each=None) -> float:
    """Median time of ``fn()`` in ms over ``repeats`` calls after ``warmup`` untimed ones.

    On CUDA each call is bracketed by events (the host returns before the kernels finish) and the
    host synchronises once at the end; on the CPU wall time is exact. ``before_each`` runs untimed.
    """
    for _ in range(warmup):
        if before_each is not None:
            before_each()
        fn()
    if not is_cuda(device):
        times = []
        for _ in range(repeats):
            if before_each is not None:
                before_each()
            started = time.perf_counter()
            fn()
            times.append((time.perf_counter() - started) * 1e3)
        return statistics.median(times)
    events = []
    for _ in range(repeats):
        if before_each is not None:
            before_each()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        events.append((start, end))
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events)


def release_memory(device) -> None:
    """Hand cached, unused GPU memory back to the device (no-op on the CPU)."""
    if is_cuda(device):
        torch.cuda.empty_cache()


def unless_oom(fn, device):
    """``fn()``, or None if it ran out of GPU memory (that memory is released first). ``fn`` must not
    return None itself."""
    try:
        return fn()
    except RuntimeError as error:  # torch.cuda.OutOfMemoryError, or a library's failed allocation (cuBLAS)
        if not isinstance(error, torch.cuda.OutOfMemoryError) and not _allocation_failed(str(error)):
            raise
    # Outside the except block the traceback is gone; collecting frees the tensors its frames held even
    # where they sit in reference cycles (slow with transformers loaded: only after running out).
    gc.collect()
    release_memory(device)
    return None


def _allocation_failed(message: str) -> bool:
    return "out of memory" in message or "CUBLAS_STATUS_ALLOC_FAILED" in message


ALLOCATOR_COUNTERS = ("num_alloc_retries", "num_device_alloc", "num_device_free", "num_sync_all_streams")


def allocator_counters(device) -> dict[str, int]:
    """The CUDA caching allocator's running counts (all 0 on the CPU): retries (it freed its cache and tried
    again), device allocations and frees (cudaMalloc/cudaFree, or page mappings with expandable
    segments), and synchronisations of all streams. A decode step served from the pool adds none."""
    stats = torch.cuda.memory_stats(device) if is_cuda(device) else {}
    return {name: stats.get(name, 0) for name in ALLOCATOR_COUNTERS}


def allocator_retries(device) -> int:
    """How often the CUDA caching allocator has had to free its cache and retry an allocation: it
    rises when memory is so full that every step waits on freeing and re-allocating (0 on the CPU)."""
    return allocator_counters(device)["num_alloc_retries"]


def reset_peak_memory(device) -> None:
    if is_cuda(device):
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if is_cuda(device) else None


@contextmanager
def recorded_calls(modules: dict):
    """Within the block, remember the (args, kwargs) each of ``modules`` (name -> module) was last
    called with, so a layer can be re-timed alone on exactly the inputs the model gave it."""
    calls = {}
    handles = [
        module.register_forward_pre_hook(
            lambda _module, args, kwargs, name=name: calls.__setitem__(name, (args, dict(kwargs))),
            with_kwargs=True)
        for name, module in modules.items()
    ]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


def tokens_label(count: float) -> str:
    """1024 -> "1K", 131072 -> "128K", 5400 -> "5.3K"."""
    if count < 1024:
        return f"{count:.0f}"
    kilo = count / 1024
    return f"{kilo:.0f}K" if math.isclose(kilo, round(kilo), rel_tol=1e-3) else f"{kilo:.1f}K"


def cell(value, spec: str = ".2f", missing: str = "—") -> str:
    """A table cell: formatted number, the string as given (e.g. "OOM"), or ``missing`` for None."""
    if value is None:
        return missing
    return value if isinstance(value, str) else format(value, spec)


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def write_results(out: str | None, markdown: str, data: dict) -> None:
    """Write ``out`` (markdown) and the same path with suffix .json; called after every measurement, so a
    run killed by its time limit keeps everything it measured."""
    if out is None:
        return
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    for target, text in ((path, markdown), (path.with_suffix(".json"), json.dumps(data, indent=1))):
        staged = target.with_name(f".{target.name}.tmp")
        staged.write_text(text + "\n")
        staged.replace(target)  # atomic: a run killed mid-write leaves the previous complete file

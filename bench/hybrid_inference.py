"""Benchmark 2 of issue 5: inference speed of hybrids on random-weight models with real shapes.

Models: Llama-3.2-1B-shaped and Qwen2.5-1.5B-shaped causal LMs from hand-written configs (see
bench/common.py), random weights, bf16 on CUDA. Full attention runs under flash-attn 2 when it is
installed and under torch SDPA otherwise (the result header says which). In k = 0, L/4, L/2, 3L/4 and L
layers the attention is swapped for a random-init student (``student_from_teacher`` +
``install_students``); the linear layers are spread evenly: the L - k full-attention layers sit at
floor(i * L / (L - k)), so layer 0 keeps full attention while k < L, and k = L/2 makes every odd layer
linear. Layers swapped out wait on the CPU, so peak memory counts only what the hybrid holds.

Prefill: batch 1 (``--prefill-batch``), ``use_cache=True`` (the cache counts in peak memory), ``logits_to_keep=1`` (no
vocabulary-sized logits at 128K); tokens/s and peak ``torch.cuda.max_memory_allocated`` (weights
included), reset per measurement.

Decode: each process first decodes for 45 s untimed (``warm_up_process``: fresh processes decoded
2.5-3x slower for their first 20-50 s on the H200), and every timed batch warms until its step time is
steady. One sequence of ``context`` tokens is prefilled, its cache is copied to the batch
(``Cache.batch_repeat_interleave``: a step costs the same whatever the cache holds), then single-token
steps with that cache; median step time. Decoding (--cache): "static" (default), a
``decoding.StaticDecoder`` on a ``cache.preallocated_cache`` (full-attention layers write into buffers
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

import torch

from dtr_core.specs import STUDENT_KINDS, StudentSpec

from .common import (
    ARCHITECTURES,
    add_student_options,
    command_line,
    default_device,
    default_dtype,
    describe_attention,
    environment,
    release_memory,
    student_label,
    write_results,
)
from .hybrid_setup import CACHE_DESCRIPTIONS, CACHE_KINDS, LINEAR_LAYERS_HELP, MODEL_HELP, build_setup
from .hybrid_tables import document, progress_line, render_saved, results
from .hybrid_timing import compare_all, run_model

PREFILL_LENGTHS = (2048, 8192, 32768, 131072)
DECODE_CONTEXTS = (8192, 32768, 65536)
SMOKE_PREFILL_LENGTHS = (16, 64)
SMOKE_DECODE_CONTEXTS = (16, 32)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="both", help=MODEL_HELP)
    parser.add_argument("--linear-counts", type=int, nargs="+",
                        help="numbers of linear layers to measure, e.g. the k of a hybrid DtR found "
                             "(default 0, L/4, L/2, 3L/4, L)")
    parser.add_argument("--linear-layers", type=int, nargs="+", help=LINEAR_LAYERS_HELP)
    parser.add_argument("--student", choices=STUDENT_KINDS, default="gla")
    add_student_options(parser)
    parser.add_argument("--lengths", type=int, nargs="*",
                        help="prefill tokens (default 2K 8K 32K 128K; none given: no prefill)")
    parser.add_argument("--contexts", type=int, nargs="*",
                        help="decode contexts (default 8K 32K 64K; none given: no decode)")
    parser.add_argument("--prefill-batch", type=int, default=1, help="sequences per prefill (default 1)")
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
    dtype = default_dtype(device)
    prefill_lengths = args.lengths if args.lengths is not None else (
        SMOKE_PREFILL_LENGTHS if args.smoke else PREFILL_LENGTHS)
    decode_contexts = args.contexts if args.contexts is not None else (
        SMOKE_DECODE_CONTEXTS if args.smoke else DECODE_CONTEXTS)
    decode_steps = args.decode_steps or (2 if args.smoke else 8)
    max_batch = args.max_batch or (8 if args.smoke else 1024)
    command = command_line("bench.hybrid_inference", argv)
    names = sorted(ARCHITECTURES) if args.model == "both" else [args.model]
    spec = StudentSpec(kind=args.student, window=args.window, shared_kv=args.shared_kv)

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
            setup.prefill_batch = args.prefill_batch
            config = setup.model.config
            meta = {
                "model": name, "command": command, "environment": environment(device),
                "architecture": f"{setup.num_layers} layers, {describe_attention(config)}, intermediate "
                                f"{config.intermediate_size}, vocab {config.vocab_size}",
                "num_layers": setup.num_layers, "attention": setup.attention,
                "student": ", ".join(filter(None, [f"{spec.kind} ({spec.feature_map} feature map",
                                                   student_label(spec.window, spec.shared_kv)])) + ")",
                "dtype": str(dtype).removeprefix("torch."),
                "cache": (f"{CACHE_DESCRIPTIONS[args.cache]} through `{setup.cache_arg}=`, students' recurrent "
                          "states in it"),
                "linear_layers": {k: setup.linear_layers(k) for k in setup.counts},
                "decode_steps": decode_steps, "max_batch": max_batch, "prefill_batch": args.prefill_batch,
            }
            sections[name] = (meta, [])
            run_model(setup, prefill_lengths, decode_contexts, on_row)
            del setup
            release_memory(device)
    print()
    print(document(sections))


if __name__ == "__main__":
    main()

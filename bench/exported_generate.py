"""Benchmark 5 and generate()'s static path (issue 15): an exported hybrid's own generate() on a batch of
left-padded prompts of mixed lengths, end to end, beside generate_static on the same prompts.

Models: Llama-3.2-1B- and Qwen2.5-1.5B-shaped causal LMs (bench/common.py: random weights, bf16 on CUDA)
with k = 0, L/4, L/2 and 3L/4 of their layers linear (random-init students, spread evenly as in
bench/hybrid_inference.py); or a model with its real weights (``--model smollm2-135m`` or a local folder)
and the layer set a DtR search found (``--linear-layers``: benchmark 5's "found hybrid"; its students start
from the teacher's projections, and their values do not change the speed). Each hybrid is exported
(``dtr_core.export.export_hybrid``) and loaded back with ``trust_remote_code``, as a user would load it;
then, on the same prompts:

* generate: ``model.generate(ids, attention_mask=mask, max_new_tokens=N, do_sample=False,
  eos_token_id=None)``, greedy, on the static, graph-replayed steps it takes by default
  (``decoding.sample_static``; the row says if it fell back to transformers' loop instead);
* generate_static: ``model.generate_static(ids, N, attention_mask=mask, eos_token_id=None)``, the leanest
  static loop (``decoding.static_generate``);
* with --eager also ``generate(..., static_decoding=False)``: transformers' own loop, eager steps.

Prompts: --batch (64) random-token prompts whose lengths are spread evenly over --lengths (1K-8K), left-padded
to the longest; N = --new-tokens (256) each, no eos, so every sequence runs to N. Time: wall clock of the
whole call, prompt included (synchronised), median of --repeats; tokens/s = batch x N / seconds, end to end.
The prompt dominates that time at these lengths, so the decoding steps alone are shown too: "prompt s" is
one generate() with a single new token (the prompt's forward, which every loop runs alike), and decode
tokens/s = batch x (N - 1) / (seconds - prompt s). Target (issue 15): generate >= 0.8x generate_static's
tokens/s. Before an architecture's first timed call one
untimed static generation at the same shapes, on the in-memory hybrid with L/2 linear layers, compiles
the Triton decode kernels for these buffer sizes and lets fla autotune its prompt kernels.

Results (markdown + JSON) are rewritten after every row; --budget SECONDS starts no new row once that
much time has passed, so a GPU call with a time limit returns what it measured.

    python -m bench.exported_generate --out results/exported_generate.md --budget 420
    python -m bench.exported_generate --smoke --eager          # tiny models on the CPU, seconds
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from dtr_core.export import export_hybrid
from dtr_core.linear.decoding import static_generate
from dtr_core.specs import STUDENT_KINDS, ExportSpec, StudentSpec

from .common import (
    ARCHITECTURES,
    add_student_options,
    cell,
    command_line,
    default_device,
    default_dtype,
    describe_attention,
    environment,
    environment_line,
    markdown_table,
    peak_memory_gib,
    release_memory,
    student_label,
    reset_peak_memory,
    synchronize,
    tokens_label,
    write_results,
)
from .hybrid_setup import LINEAR_LAYERS_HELP, MODEL_HELP, Setup, build_setup, hybrid, linear_layer_counts

PAD = 0
TARGET_RATIO = 0.8  # issue 15: exported generate() >= 0.8x generate_static's tokens/s
SMOKE = dict(batch=4, lengths=(8, 24), new_tokens=4)
CALLS = ("generate", "generate_static", "generate_eager")


def padded_prompts(vocab_size: int, batch: int, shortest: int, longest: int, device) -> tuple:
    """``batch`` random prompts, lengths spread evenly from ``shortest`` to ``longest`` tokens, left-padded
    to ``longest``: (input_ids, attention_mask), both [batch, longest]."""
    generator = torch.Generator().manual_seed(0)
    lengths = torch.linspace(shortest, longest, batch).round().long()
    mask = (torch.arange(longest) >= (longest - lengths)[:, None]).long()
    ids = torch.randint(3, vocab_size, (batch, longest), generator=generator) * mask
    return ids.to(device), mask.to(device)


def timed(run, device) -> tuple:
    """(``run()``'s result, its wall-clock seconds, the device's work included)."""
    synchronize(device)
    started = time.perf_counter()
    out = run()
    synchronize(device)
    return out, time.perf_counter() - started


def exported(setup: Setup, layers: list[int], folder: Path, dtype: torch.dtype):
    """The hybrid with ``layers`` linear, exported to ``folder`` and loaded back with trust_remote_code onto
    the device."""
    students = {i: setup.students[i].to(setup.device) for i in layers}
    try:
        export_hybrid(setup.model, setup.adapter, None, students, folder,
                      ExportSpec(dtype=str(dtype).removeprefix("torch.")))
    finally:
        for student in students.values():
            student.to("cpu")
    return AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=dtype).to(setup.device).eval()


def measure(model, ids, mask, new_tokens: int, repeats: int, eager: bool, device) -> dict:
    """Time generate(), generate_static (and with ``eager`` transformers' own loop) on the same prompts."""

    def generate(**options):
        return model.generate(ids, attention_mask=mask, do_sample=False, eos_token_id=None, pad_token_id=PAD,
                              **{"max_new_tokens": new_tokens, **options})

    runs = {"generate": generate,
            "generate_static": lambda: model.generate_static(ids, new_tokens, attention_mask=mask, eos_token_id=None)}
    if eager:
        runs["generate_eager"] = lambda: generate(static_decoding=False)
    row, outputs = {}, {}
    _, row["prompt_s"] = timed(lambda: generate(max_new_tokens=1), device)
    for name, run in runs.items():
        reset_peak_memory(device)
        seconds = []
        for _ in range(repeats):
            outputs[name], elapsed = timed(run, device)
            seconds.append(elapsed)
        row[f"{name}_s"] = statistics.median(seconds)
        row[f"{name}_tokens_per_s"] = ids.shape[0] * new_tokens / row[f"{name}_s"]
        row[f"{name}_decode_tokens_per_s"] = ids.shape[0] * (new_tokens - 1) / (row[f"{name}_s"] - row["prompt_s"])
        row[f"{name}_peak_gib"] = peak_memory_gib(device)
    row["ratio"] = row["generate_tokens_per_s"] / row["generate_static_tokens_per_s"]
    row["decode_ratio"] = row["generate_decode_tokens_per_s"] / row["generate_static_decode_tokens_per_s"]
    new = slice(ids.shape[1], None)  # bf16 near-ties may part the two greedy loops: how often they agree
    row["same_tokens"] = (outputs["generate"][:, new] == outputs["generate_static"][:, new]).float().mean().item()
    # Reasons generate() gave for taking transformers' loop (none: it decoded on static steps).
    row["fallbacks"] = sorted(model._explained_fallbacks)
    return row


def run_architecture(setup: Setup, counts: list[int], args, deadline: float, on_row) -> None:
    """One row per k in ``counts``: export, load, time (see measure); then the next k."""
    device, dtype = setup.device, setup.model.dtype
    ids, mask = padded_prompts(setup.model.config.vocab_size, args.batch, *args.lengths, device)
    with torch.inference_mode(), hybrid(setup, setup.num_layers // 2):  # untimed: kernels compile, autotune
        static_generate(setup.model, ids, args.new_tokens, attention_mask=mask)
    with tempfile.TemporaryDirectory(prefix="dtr-exported-generate-") as scratch:
        for k in counts:
            row = {"model": setup.name, "k": k}
            if time.perf_counter() > deadline:
                on_row({**row, "status": "not run: --budget spent"})
                continue
            started = time.perf_counter()
            model = exported(setup, setup.linear_layers(k), Path(scratch) / f"{setup.name}-k{k}", dtype)
            row["export_load_s"] = time.perf_counter() - started
            row.update(measure(model, ids, mask, args.new_tokens, args.repeats, args.eager, device))
            del model
            release_memory(device)
            on_row(row)


def render(meta: dict, rows: list[dict]) -> str:
    num_layers = meta["num_layers"]
    table = [[f"{r['k']}/{num_layers}", cell(r.get("export_load_s"), ".1f", r.get("status", "—")),
              cell(r.get("prompt_s")),
              *[cell(r.get(f"{call}_{key}"), ",.0f") for call in CALLS for key in ("tokens_per_s", "decode_tokens_per_s")],
              cell(r.get("ratio")), cell(r.get("decode_ratio")), cell(r.get("same_tokens"), ".1%"),
              cell(r.get("generate_peak_gib")),
              ("transformers' loop: " + "; ".join(r["fallbacks"])) if r.get("fallbacks") else
              ("static" if "ratio" in r else "—")]
             for r in rows]
    ratios = [r for r in rows if "ratio" in r]
    met = [r for r in ratios if r["ratio"] >= TARGET_RATIO]
    target = (f"- exported generate() >= {TARGET_RATIO}x generate_static's tokens/s: {len(met)}/{len(ratios)} rows"
              + ("; below: " + ", ".join(f"k={r['k']} ({r['ratio']:.3f}x)" for r in ratios if r not in met)
                 if len(met) < len(ratios) else "")
              + f" (decoding steps alone: {min(r['decode_ratio'] for r in ratios):.2f}x at worst)"
              ) if ratios else "- not measured yet"
    env = meta["environment"]
    return "\n".join([
        f"### {meta['model']}: {meta['architecture']} ({meta['weights']})",
        "",
        f"Card: {env['card']}. {environment_line(env)}.",
        f"Command: `{meta['command']}`",
        f"{meta['prompts']}. Students: {meta['student']}. {meta['dtype']}.",
        "Linear layers (evenly spread): " + "; ".join(f"k={k}: {', '.join(map(str, layers)) or '-'}"
                                                     for k, layers in meta["linear_layers"].items()),
        "",
        "Tokens/s end to end (prompt included), and of the decoding steps alone; ratios generate / generate_static:",
        "",
        markdown_table(["linear", "export + load s", "prompt s", "generate tokens/s", "generate decode tokens/s",
                        "generate_static tokens/s", "generate_static decode tokens/s", "eager generate tokens/s",
                        "eager generate decode tokens/s", "ratio", "decode ratio", "same tokens",
                        "generate peak GiB", "generate() decoded on"],
                       table),
        "",
        "Target (issue 15):",
        target,
    ])


def document(sections: dict) -> str:
    return "\n\n".join(["## Benchmark 5: exported generate() on left-padded batches, end to end"]
                       + [render(meta, rows) for meta, rows in sections.values()])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="both", help=MODEL_HELP)
    parser.add_argument("--linear-layers", type=int, nargs="+", help=LINEAR_LAYERS_HELP)
    parser.add_argument("--linear-counts", type=int, nargs="+", help="default 0, L/4, L/2, 3L/4")
    parser.add_argument("--student", choices=STUDENT_KINDS, default="gla")
    add_student_options(parser)
    parser.add_argument("--batch", type=int, help="prompts per call (default 64; smoke 4)")
    parser.add_argument("--lengths", type=int, nargs=2, metavar=("SHORTEST", "LONGEST"),
                        help="prompt lengths, spread evenly over the batch (default 1024 8192; smoke 8 24)")
    parser.add_argument("--new-tokens", type=int, help="new tokens per sequence (default 256; smoke 4)")
    parser.add_argument("--repeats", type=int, default=1, help="timed calls of each kind per row (median)")
    parser.add_argument("--eager", action="store_true", help="also time generate(static_decoding=False)")
    parser.add_argument("--budget", type=float, help="seconds after which no new row starts")
    parser.add_argument("--out", help="write the markdown tables here, and JSON next to it")
    parser.add_argument("--smoke", action="store_true", help="tiny models and prompts, on the CPU, in seconds")
    parser.add_argument("--device", help="default: cuda, or cpu with --smoke")
    args = parser.parse_args(argv)
    defaults = SMOKE if args.smoke else dict(batch=64, lengths=(1024, 8192), new_tokens=256)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if not 1 <= args.lengths[0] <= args.lengths[1] or args.batch < 1 or args.new_tokens < 2 or args.repeats < 1:
        parser.error(f"need 1 <= SHORTEST <= LONGEST, a positive --batch and --repeats, and --new-tokens >= 2 "
                     f"(the decoding steps are timed apart from the first token); got "
                     f"--lengths {args.lengths}, --batch {args.batch}, --new-tokens {args.new_tokens}, "
                     f"--repeats {args.repeats}")
    device = args.device or default_device(args.smoke)
    if args.smoke:
        torch.set_num_threads(1)  # tiny tensors: extra threads only contend with other processes
    dtype = default_dtype(device)
    deadline = time.perf_counter() + (args.budget if args.budget is not None else float("inf"))
    names = sorted(ARCHITECTURES) if args.model == "both" else [args.model]
    command = command_line("bench.exported_generate", argv)
    sections: dict[str, tuple[dict, list[dict]]] = {}

    def on_row(row: dict) -> None:
        sections[row["model"]][1].append(row)
        print(row, flush=True)
        write_results(args.out, document(sections), {"models": [{"meta": m, "rows": r} for m, r in sections.values()]})

    for name in names:
        if time.perf_counter() > deadline:
            break
        spec = StudentSpec(kind=args.student, window=args.window, shared_kv=args.shared_kv)
        setup = build_setup(name, spec, device, dtype, args.smoke,
                            args.new_tokens, args.batch, chosen=args.linear_layers)
        counts = args.linear_counts or [k for k in linear_layer_counts(setup.num_layers) if k < setup.num_layers]
        if setup.chosen:
            counts = sorted({*counts, len(setup.chosen)})
        config = setup.model.config
        sections[name] = ({
            "model": name, "command": command, "environment": environment(device), "num_layers": setup.num_layers,
            "weights": "random weights" if name in ARCHITECTURES else "real weights",
            "architecture": f"{setup.num_layers} layers, {describe_attention(config)}, vocab {config.vocab_size}",
            "prompts": (f"{args.batch} prompts of {tokens_label(args.lengths[0])}-{tokens_label(args.lengths[1])} "
                        f"tokens (evenly spread, left-padded), {args.new_tokens} new tokens each, greedy"),
            "student": (f"{args.student} ({student_label(args.window, args.shared_kv)})"
                        + ", random init from the teacher's projections (speed does not depend on their values)"),
            "dtype": str(dtype).removeprefix("torch."),
            "linear_layers": {k: setup.linear_layers(k) for k in counts},
        }, [])
        run_architecture(setup, counts, args, deadline, on_row)
        del setup
        release_memory(device)
    print()
    print(document(sections))


if __name__ == "__main__":
    main()

"""Issue 5, benchmark 3: the cost of the DtR pass itself, on a Qwen2.5-1.5B-shaped model (random weights).

1. Streaming distillation throughput: tokens/s for all 28 layers' students trained together
   (dtr_core.streaming, the teacher in bf16), at the given batch shape, for each kind of student in
   ``--student`` (e.g. "gla,gated_deltanet"; ``--window``/``--short-conv`` as the product's), each
   kind's students on their own pass; the row names the backend that trained them (fla or chunked).
2. Greedy-search evaluation throughput: validation examples/s of one candidate evaluation from the
   embeddings (no prefix reuse), and the same averaged over one search round with prefix reuse
   (--candidates of round 1's candidates, evenly spread over the layers: a candidate's cost from the
   embeddings does not depend on its layer, and with prefix reuse it falls linearly with it).
3. The paper's budget projected to GPU-hours on this card: 100M distillation tokens, and a full
   trajectory of 406 evaluations on 500 examples (28·29/2 candidates); with prefix reuse the
   trajectory costs the layer-forwards that bench.cpu counts exactly (latest-layers-first order,
   the unfavourable one seen on SmolLM2).

    python -m bench.dtr_pass --out $OUT/dtr_pass.md          # on the GPU
    python -m bench.dtr_pass --student gla,gated_deltanet --window 64 --distill-only   # cost per kind
    python -m bench.dtr_pass --smoke                          # tiny model on the CPU, seconds
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from bench.common import (
    build_model,
    default_device,
    default_dtype,
    environment,
    environment_line,
    full_attention_implementations,
    markdown_table,
    synchronize,
    write_results,
)
from bench.cpu import trajectory_forwards
from dtr_core.adapters import adapter_for
from dtr_core.evaluation import PrefixCachingEvaluator
from dtr_core.linear.backends import resolve_backend
from dtr_core.linear.build import student_from_teacher
from dtr_core.specs import CaptureSpec, DistillSpec, StudentSpec
from dtr_core.streaming import stream_distill
from dtr_core.targets.tasks import Perplexity

PAPER_DISTILL_TOKENS = 100_000_000
PAPER_EXAMPLES = 500
PAPER_A800_HOURS = (2.5, 2.5)  # distillation, search (arXiv 2601.11667)
TARGET_H100_HOURS = (1.0, 0.5)


def random_batches(count: int, batch_size: int, length: int, vocab: int, device):
    """``count`` fixed batches of random token ids (the same ones on every call, as stream_distill needs)."""
    def batches():
        generator = torch.Generator().manual_seed(0)
        for _ in range(count):
            ids = torch.randint(0, vocab, (batch_size, length), generator=generator)
            yield {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}
    return batches


def distill_throughput(model, adapter, args, spec: StudentSpec, device) -> float:
    students = [student_from_teacher(spec, adapter.read_attention_weights(model, i), causal=True, seed=i).to(device)
                for i in range(adapter.num_layers)]
    tokens_per_batch = args.batch_size * args.length
    capture = CaptureSpec(token_budget=(args.steps + 1) * tokens_per_batch, max_length=args.length,
                          batch_size=args.batch_size, mode="stream")
    distill = DistillSpec(epochs=1, holdout_batches=1, warmup_steps=1, checkpoint_every=10**9)
    batches = random_batches(args.steps + 1, args.batch_size, args.length, model.config.vocab_size, device)
    with tempfile.TemporaryDirectory() as checkpoints:
        result = stream_distill(model, adapter, students, batches, capture, distill, checkpoints, "bench", device)
    return result.tokens_per_second


def training_backend(spec: StudentSpec, device) -> str:
    """Which backend trains this kind of student here ("auto"'s choice for a differentiated call)."""
    probe = torch.empty(1, 2, 1, 1, device=device)
    return resolve_backend("auto", probe, gated_delta_backward=spec.kind == "gated_deltanet")


def evaluation_throughput(model, adapter, args, spec: StudentSpec, device) -> tuple[float, float]:
    """(examples/s from the embeddings, examples/s averaged over round 1 with prefix reuse)."""
    students = {i: student_from_teacher(spec, adapter.read_attention_weights(model, i),
                                        causal=True, seed=i).to(device=device, dtype=model.dtype).eval()
                for i in range(adapter.num_layers)}  # in the teacher's dtype, as the search runs them
    batches = list(random_batches(args.examples // args.eval_batch, args.eval_batch, args.eval_length,
                                  model.config.vocab_size, device)())
    examples = len(batches) * args.eval_batch
    step = max(1, adapter.num_layers // args.candidates)
    layers = range(step // 2, adapter.num_layers, step)  # evenly spread, centred in their stretches

    def seconds(evaluator, candidates) -> float:
        synchronize(device)
        started = time.perf_counter()
        for candidate in candidates:
            evaluator(candidate)
        synchronize(device)
        return time.perf_counter() - started

    plain = PrefixCachingEvaluator(model, adapter, students, batches, Perplexity(), prefix_reuse=False, device=device)
    seconds(plain, [frozenset()])  # warm-up
    full_seconds = seconds(plain, [frozenset({i}) for i in layers]) / len(layers)
    print(f"evaluation from the embeddings: {examples / full_seconds:,.1f} examples/s", flush=True)
    reuse = PrefixCachingEvaluator(model, adapter, students, batches, Perplexity(), prefix_reuse=True, device=device)
    reuse(frozenset())  # the base everything in round 1 starts from
    round_seconds = seconds(reuse, [frozenset({i}) for i in layers]) / len(layers)
    return examples / full_seconds, examples / round_seconds


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student", default="gla",
                        help="a kind of student or several, comma-separated (each timed on its own pass)")
    parser.add_argument("--window", type=int, default=0, help="the students' softmax window (0: none)")
    parser.add_argument("--short-conv", type=int, default=0, help="their q/k/v convolution size (0: none)")
    parser.add_argument("--distill-only", action="store_true", help="time distillation only (no search, projection)")
    parser.add_argument("--batch-size", type=int, default=16, help="distillation rows per step")
    parser.add_argument("--length", type=int, default=2048, help="tokens per distillation row")
    parser.add_argument("--steps", type=int, default=20, help="timed distillation steps")
    parser.add_argument("--examples", type=int, default=PAPER_EXAMPLES, help="validation examples per evaluation")
    parser.add_argument("--eval-length", type=int, default=512, help="tokens per validation example")
    parser.add_argument("--eval-batch", type=int, default=50)
    parser.add_argument("--candidates", type=int, default=7, help="round-1 candidates timed (of one per layer)")
    parser.add_argument("--smoke", action="store_true", help="tiny model and sizes, CPU, seconds")
    parser.add_argument("--out", help="write the markdown table here (and .json beside it)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.batch_size, args.length, args.steps, args.examples, args.eval_length, args.eval_batch = 2, 32, 2, 8, 16, 4
    device = default_device(args.smoke)
    attention = full_attention_implementations(device)[-1]
    model = build_model("qwen-1.5b", device=device, dtype=default_dtype(device),
                        attn_implementation=attention, smoke=args.smoke)
    adapter = adapter_for(model)
    num_layers = adapter.num_layers

    # Progress goes out as soon as each part is measured: a run cut off by a time limit still shows it.
    spec = StudentSpec(kind=args.student, window=args.window, short_conv=args.short_conv)
    rates = {}
    for kind in spec.kinds:
        rates[kind] = distill_throughput(model, adapter, args, spec.of_kind(kind), device)
        print(f"streaming distillation, {kind}: {rates[kind]:,.0f} tokens/s", flush=True)
    student = ", ".join(filter(None, [f"window {args.window}" if args.window else "",
                                      f"convolutions {args.short_conv}" if args.short_conv else ""])) or "plain"
    distill_rows = [[f"streaming distillation, all layers, {kind}", f"{rate:,.0f} tokens/s",
                     f"{args.batch_size}×{args.length} tokens per step, {student}, trained on "
                     f"{training_backend(spec.of_kind(kind), device)}"] for kind, rate in rates.items()]
    env = environment(device)
    title = (f"DtR pass, Qwen2.5-1.5B shape ({num_layers} layers), random weights, on {env['card']} "
             f"({'smoke sizes' if args.smoke else 'bf16'}, full attention: {attention})")
    if args.distill_only:
        markdown = "\n".join([title, environment_line(env), "", markdown_table(["what", "measured", "setting"],
                                                                              distill_rows)])
        print(markdown)
        write_results(args.out, markdown, {"environment": env, "args": vars(args), "tokens_per_second": rates})
        return
    first = spec.of_kind(spec.kinds[0])
    tokens_per_second = rates[first.kind]
    plain_rate, reuse_rate = evaluation_throughput(model, adapter, args, first, device)
    print(f"evaluation: {plain_rate:,.1f} examples/s from the embeddings, {reuse_rate:,.1f} with prefix reuse",
          flush=True)
    with_reuse, without_reuse = trajectory_forwards(num_layers, "late")
    evaluations = num_layers * (num_layers + 1) // 2
    distill_hours = PAPER_DISTILL_TOKENS / tokens_per_second / 3600
    search_hours = evaluations * PAPER_EXAMPLES / plain_rate / 3600
    search_hours_reuse = search_hours * with_reuse / without_reuse

    rows = [
        *distill_rows,
        ["evaluation from the embeddings", f"{plain_rate:,.1f} examples/s",
         f"{args.eval_length} tokens per example, perplexity"],
        ["evaluation, round 1 with prefix reuse", f"{reuse_rate:,.1f} examples/s",
         f"average over {args.candidates} of its candidates, evenly spread"],
        [f"projected: {PAPER_DISTILL_TOKENS / 1e6:.0f}M distillation tokens ({first.kind})", f"{distill_hours:.2f} h",
         f"paper {PAPER_A800_HOURS[0]} A800-h, target ≤ {TARGET_H100_HOURS[0]} H100-h"],
        [f"projected: {evaluations} evaluations × {PAPER_EXAMPLES} examples", f"{search_hours:.2f} h",
         "no prefix reuse"],
        ["the same with prefix reuse", f"{search_hours_reuse:.2f} h",
         f"× {with_reuse}/{without_reuse} layer-forwards (late-first order); paper {PAPER_A800_HOURS[1]} "
         f"A800-h, target ≤ {TARGET_H100_HOURS[1]} H100-h"],
    ]
    markdown = "\n".join([
        title, environment_line(env), "",
        markdown_table(["what", "measured", "setting"], rows),
    ])
    print(markdown)
    write_results(args.out, markdown, {"environment": env, "args": vars(args), "tokens_per_second": rates,
                                       "eval_examples_per_second": plain_rate,
                                       "eval_examples_per_second_round1_reuse": reuse_rate,
                                       "trajectory_layer_forwards": [with_reuse, without_reuse],
                                       "projected_hours": {"distill": distill_hours, "search": search_hours,
                                                           "search_with_reuse": search_hours_reuse}})


if __name__ == "__main__":
    main()

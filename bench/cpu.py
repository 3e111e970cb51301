"""CPU regression guard (`make bench-cpu`, about a minute):

1. the chunked linear-attention forms against their step-by-step references, forward and
   forward+backward, at a few lengths (times: informative only);
2. the layer-forwards a full greedy trajectory costs with and without prefix reuse, for the
   orders in which layers go linear (counts: deterministic, checked in CI by tests/tools/test_bench.py).
"""

from __future__ import annotations

import argparse
import time

import torch

from dtr_core.linear.gated_deltanet import gated_delta_chunked, gated_delta_recurrent
from dtr_core.linear.gla import gla_chunked, gla_recurrent

LENGTHS = (256, 1024, 4096)


def _inputs(mechanism: str, length: int, generator: torch.Generator):
    shape = (1, length, 4, 64)
    q, k, v = (torch.randn(shape, generator=generator) for _ in range(3))
    k = torch.nn.functional.normalize(k, dim=-1)
    if mechanism == "gla":
        g = -torch.rand(shape, generator=generator) * 0.1
        return (q, k, v, g)
    g = -torch.rand(shape[:3], generator=generator) * 0.1
    beta = torch.rand(shape[:3], generator=generator)
    return (q, k, v, g, beta)


def _seconds(fn, inputs, backward: bool, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        leaves = [x.clone().requires_grad_(backward) for x in inputs]
        started = time.perf_counter()
        out, _ = fn(*leaves, scale=1.0)
        if backward:
            out.sum().backward()
        best = min(best, time.perf_counter() - started)
    return best


def time_ops(lengths=LENGTHS) -> list[dict]:
    generator = torch.Generator().manual_seed(42)
    rows = []
    for mechanism, reference, chunked in (("gla", gla_recurrent, gla_chunked),
                                          ("gated_delta", gated_delta_recurrent, gated_delta_chunked)):
        for length in lengths:
            inputs = _inputs(mechanism, length, generator)
            for backward in (False, True):
                ref, fast = _seconds(reference, inputs, backward), _seconds(chunked, inputs, backward)
                rows.append({"mechanism": mechanism, "tokens": length, "pass": "fwd+bwd" if backward else "fwd",
                             "recurrent_ms": ref * 1e3, "chunked_ms": fast * 1e3, "speedup": ref / fast})
    return rows


def trajectory_forwards(num_layers: int, order: str) -> tuple[int, int]:
    """(layer-forwards with prefix reuse, without) for a full run-to-end trajectory in which layers go
    linear latest-first ("late") or earliest-first ("early"), on a tiny random model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from dtr_core.adapters import adapter_for
    from dtr_core.direction import Direction
    from dtr_core.evaluation import PrefixCachingEvaluator
    from dtr_core.linear.build import student_from_teacher
    from dtr_core.search import greedy_replace
    from dtr_core.specs import SearchSpec, StudentSpec

    torch.manual_seed(42)
    config = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=num_layers,
                         num_attention_heads=2, num_key_value_heads=1)
    model = LlamaForCausalLM(config).eval()
    adapter = adapter_for(model)
    spec = StudentSpec(feature_map="identity", window=0)
    students = {i: student_from_teacher(spec, adapter.read_attention_weights(model, i), causal=True, seed=i).eval()
                for i in range(num_layers)}
    batch = {"input_ids": torch.randint(0, 100, (1, 8), generator=torch.Generator().manual_seed(42)),
             "attention_mask": torch.ones(1, 8, dtype=torch.long)}
    sign = 1.0 if order == "late" else -1.0

    class ScriptedOrder:
        """Real forwards; the score only encodes the order in which layers should be kept."""

        direction = Direction.HIGHER
        layers: frozenset = frozenset()

        def collect(self, output, batch):
            return None

        def score(self, collected):
            return sign * float(sum(self.layers))

    scorer = ScriptedOrder()
    evaluator = PrefixCachingEvaluator(model, adapter, students, [batch], scorer, prefix_reuse=True)

    class TellingEvaluator:
        """Tells the scorer which candidate it scores; rebases the real evaluator."""

        def __call__(self, layers):
            scorer.layers = layers
            return evaluator(layers)

        def rebase(self, layers):
            evaluator.rebase(layers)

    greedy_replace(num_layers, TellingEvaluator(), SearchSpec(tolerance=0.99, run_to_end=True), Direction.HIGHER)
    return evaluator.layer_forwards, evaluator.layer_forwards_full


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layers", type=int, nargs="+", default=[6, 28])
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| mechanism | tokens | pass | recurrent ms | chunked ms | speedup |")
    print("|---|---|---|---|---|---|")
    for row in time_ops():
        print(f"| {row['mechanism']} | {row['tokens']} | {row['pass']} | {row['recurrent_ms']:.1f} | "
              f"{row['chunked_ms']:.1f} | {row['speedup']:.1f}x |")
    print("\n| layers | order kept | layer-forwards with reuse | without | saved |")
    print("|---|---|---|---|---|")
    for num_layers in args.layers:
        for order in ("late", "early"):
            with_reuse, without = trajectory_forwards(num_layers, order)
            print(f"| {num_layers} | {order}-first | {with_reuse} | {without} | {1 - with_reuse / without:.0%} |")


if __name__ == "__main__":
    main()

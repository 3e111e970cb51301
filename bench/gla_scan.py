"""Issue 15: GLA's prefill scan alone, ours (``kernels.gla_prefill_triton``) against fla's ``chunk_gla``.

Inputs as a GLA student with hedgehog features hands them to its scan at an architecture's attention shape
(``--shapes``): K = 2 x the head size feature channels, V = the head size, log-decays in [-8, 0], bf16, random.
Per (batch, tokens): fla's ``chunk_gla`` with the all-ones value column that accumulates the normaliser
(V + 1: what the students ran before the scan of their own), the same without the column (what fla costs for
the values alone), and ours, which returns the normaliser apart; the relative difference of ours from fla's
(outputs and normaliser), and ours from the low-rank gates the log-decays came from, as a student's prompt runs it.
``--sweep`` also times ``kernels.ScanTiles`` launch configurations on that form: the chunk-decay and state kernels'
first (the output kernel at its default), then the output kernel's with the best of those; ``--profile`` each
scan's kernels by GPU time.

    python -m bench.gla_scan --out $OUT/gla_scan.md [--sweep]     # on the GPU (fla installed)
    python -m bench.gla_scan --smoke                              # tiny sizes on the CPU (Triton's interpreter)
"""

from __future__ import annotations

import argparse
import itertools

import torch
import torch.nn.functional as F

from bench.common import (
    ARCHITECTURES,
    attention_head_dim,
    cell,
    command_line,
    default_device,
    default_dtype,
    environment,
    environment_line,
    is_cuda,
    markdown_table,
    median_ms,
    tokens_label,
    write_results,
)
from dtr_core.linear import kernels
from dtr_core.linear.base import LOG_DECAY_FLOOR
from dtr_core.linear.gla import gla
from bench.student_prefill import kernel_table


GATE_RANK = 16  # a GLA student's default gate_rank


def scan_inputs(batch: int, length: int, heads: int, head_dim: int, device, dtype, seed: int = 0):
    """q, k [B, T, H, 2D] (positive, each token's features summing to 1 like hedgehog's), v [B, T, H, D],
    log-decays g [B, T, H, 2D] spread over the students' range, and the low-rank gates they come from as a student's
    prompt hands them to the scan: activations [B, T, R] and the up-projection (W [H*2D, R], bias [H*2D])."""
    generator = torch.Generator(device="cpu").manual_seed(seed)

    def draw(*shape):
        return torch.randn(*shape, generator=generator).to(device)

    features = (batch, length, heads, 2 * head_dim)
    q, k = (F.softmax(draw(*features), dim=-1).to(dtype) for _ in range(2))
    # Logits with mean 4 and deviation 3 per channel.
    low_rank = draw(batch, length, GATE_RANK).to(dtype)
    up = ((draw(heads * 2 * head_dim, GATE_RANK) * 3 / GATE_RANK ** 0.5).to(dtype),
          torch.full((heads * 2 * head_dim,), 4.0, device=device, dtype=dtype))
    logits = (low_rank.float() @ up[0].float().T + up[1].float()).view(features)
    g = F.logsigmoid(logits).clamp_min(LOG_DECAY_FLOOR).to(dtype)
    return q, k, draw(batch, length, heads, head_dim).to(dtype), g, (low_rank, up)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def sweep_configurations() -> tuple[list[kernels.ScanTiles], list[kernels.ScanTiles]]:
    """The chunk-decay kernel's warps and the state kernel's tiles, warps, segments and pipeline depths, then the
    output kernel's (the others at their defaults)."""
    default = kernels.ScanTiles()
    states = [default._replace(state_keys=keys, state_values=values, state_warps=warps)
              for keys, values, warps in itertools.product((32, 64), (64, 128), (4, 8))]
    states += [default._replace(state_programs_per_sm=per_sm) for per_sm in (0, 1, 4, 8)]
    states += [default._replace(state_stages=stages, segmented_state_stages=stages) for stages in (1, 2, 3, 4)]
    states += [default._replace(decay_warps=warps) for warps in (1, 4, 8)]
    outputs = [default._replace(output_keys=keys, output_values=values, output_warps=warps)
               for keys, values, warps in itertools.product((32, 64), (64, 128), (4, 8))]
    return states, outputs


def measure(shape: str, batch: int, length: int, repeats: int, device, dtype, sweep: bool, profile: int) -> dict:
    config_cls, _, dims = ARCHITECTURES[shape]
    config = config_cls(**dims)
    heads, head_dim = (config.num_attention_heads, attention_head_dim(config)) if is_cuda(device) else (2, 16)  # smoke
    q, k, v, g, (low_rank, up) = scan_inputs(batch, length, heads, head_dim, device, dtype)
    row = {"shape": shape, "batch": batch, "tokens": length, "ms": {}}
    with torch.inference_mode():
        ones = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)
        backend = "fla" if is_cuda(device) else "chunked"
        reference = gla(q, k, ones, g, 1.0, backend=backend)[0]
        row["ms"]["fla with column"] = median_ms(lambda: gla(q, k, ones, g, 1.0, backend=backend), repeats, device)
        row["ms"]["fla without column"] = median_ms(lambda: gla(q, k, v, g, 1.0, backend=backend), repeats, device)

        def ours(tiles=kernels.ScanTiles()):
            return kernels.gla_prefill_triton(q, k, v, g, 1.0, key_sums=True, tiles=tiles)

        def ours_from_gates(tiles=kernels.ScanTiles()):  # a student's prompt: the scan computes the log-decays
            return kernels.gla_prefill_triton(q, k, v, low_rank, 1.0, key_sums=True, gate_up=up,
                                              logits_floor=LOG_DECAY_FLOOR, tiles=tiles)

        out, mass, _, _ = ours()
        row["output difference"] = relative(out, reference[..., :-1])
        row["normaliser difference"] = relative(mass, reference[..., -1])
        row["gates output difference"] = relative(ours_from_gates()[0], reference[..., :-1])
        row["ms"]["ours"] = median_ms(ours, repeats, device)
        row["ms"]["ours from gates"] = median_ms(ours_from_gates, repeats, device)
        if profile:
            row["profiles"] = {"fla with column": kernel_table(lambda: gla(q, k, ones, g, 1.0, backend=backend),
                                                               device, profile),
                               "ours": kernel_table(ours, device, profile)}
        if sweep:
            states, outputs = sweep_configurations()
            timed = {tiles: median_ms(lambda: ours_from_gates(tiles), repeats, device) for tiles in states}
            best_states = min(timed, key=timed.get)
            for tiles in outputs:
                tiles = tiles._replace(**{name: getattr(best_states, name) for name in kernels.ScanTiles._fields
                                          if name.startswith(("state_", "segmented_", "decay_"))})
                timed[tiles] = median_ms(lambda: ours_from_gates(tiles), repeats, device)
            ranked = sorted(timed, key=timed.get)
            row["sweep"] = [{"tiles": tiles._asdict(), "ms": timed[tiles]} for tiles in ranked]
    print(f"{shape} batch {batch} {tokens_label(length)}: " + ", ".join(
        f"{name} {value:.3f}" for name, value in row["ms"].items()) + (
        f"; best of the sweep {row['sweep'][0]}" if sweep else ""), flush=True)
    return row


def render(meta: dict, rows: list[dict]) -> str:
    headers = ["shape", "batch", "tokens", "fla with column ms", "fla without column ms", "ours ms",
               "ours / fla with column", "ours from gates ms", "output difference", "normaliser difference",
               "from gates: output difference"]
    table = [[row["shape"], str(row["batch"]), tokens_label(row["tokens"]), cell(row["ms"]["fla with column"], ".3f"),
              cell(row["ms"]["fla without column"], ".3f"), cell(row["ms"]["ours"], ".3f"),
              cell(row["ms"]["ours"] / row["ms"]["fla with column"], ".2f"), cell(row["ms"]["ours from gates"], ".3f"),
              cell(row["output difference"], ".1e"), cell(row["normaliser difference"], ".1e"),
              cell(row["gates output difference"], ".1e")] for row in rows]
    lines = ["## GLA's prefill scan: ours against fla's chunk_gla", "",
             f"Card: {meta['environment']['card']}. {environment_line(meta['environment'])}.",
             f"Command: `{meta['command']}`",
             f"{meta['dtype']}, random inputs, K = 2 x the head size (hedgehog), V = the head size; median of "
             f"{meta['repeats']} calls. \"From gates\": ours as a student's prompt runs it, from the gate's rank-"
             f"{GATE_RANK} activations and up-projection (the sweep times this form). Differences: ours from fla's with "
             "the column (Frobenius, relative).", "",
             markdown_table(headers, table)]
    for row in rows:
        if row.get("sweep"):
            lines += ["", f"Launch configurations, {row['shape']} batch {row['batch']} {tokens_label(row['tokens'])}, "
                          "fastest first:", "",
                      markdown_table(list(row["sweep"][0]["tiles"]) + ["ms"],
                                     [[str(value) for value in entry["tiles"].values()] + [f"{entry['ms']:.3f}"]
                                      for entry in row["sweep"][:8]])]
        for name, kernels_run in row.get("profiles", {}).items():
            lines += ["", f"Kernels of {name}, {row['shape']} batch {row['batch']} {tokens_label(row['tokens'])}:", "",
                      markdown_table(["kernel", "GPU ms", "launches"],
                                     [[entry["kernel"], f"{entry['ms']:.3f}", str(entry["launches"])]
                                      for entry in kernels_run])]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", choices=sorted(ARCHITECTURES), default=sorted(ARCHITECTURES))
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--lengths", type=int, nargs="+", help="tokens (default 2K 8K; smoke: 100)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--sweep", action="store_true", help="also time kernels.ScanTiles launch configurations")
    parser.add_argument("--profile", type=int, default=0, metavar="TOP",
                        help="also list each scan's TOP kernels by GPU time")
    parser.add_argument("--out", help="write the markdown table here, and JSON next to it")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (Triton's interpreter)")
    args = parser.parse_args(argv)
    device = torch.device(default_device(args.smoke))
    dtype = default_dtype(device)
    lengths = args.lengths or ([100] if args.smoke else [2048, 8192])
    repeats = 1 if args.smoke else args.repeats
    meta = {"command": command_line("bench.gla_scan", argv), "environment": environment(device),
            "dtype": str(dtype).removeprefix("torch."), "repeats": repeats}
    rows = []
    for shape in args.shapes:
        for batch in args.batches:
            for length in lengths:
                rows.append(measure(shape, batch, length, repeats, device, dtype, args.sweep and not args.smoke,
                                    args.profile))
                write_results(args.out, render(meta, rows), {"meta": meta, "rows": rows})
    print()
    print(render(meta, rows))


if __name__ == "__main__":
    main()

"""Benchmark 2's results as text (see bench/hybrid_inference.py): a progress line per measured row, the
markdown tables per model with the issue's targets, and ``render_saved`` (``--render``), which rebuilds
them from the JSON a run wrote."""

from __future__ import annotations

import json

from .common import ARCHITECTURES, cell, environment_line, markdown_table, tokens_label, write_results
from .hybrid_timing import LONG_CONTEXT, compare_all

# The targets: measured >= 90% of the ceiling from LONG_CONTEXT (32K) on; with L/2 linear layers,
# decode at 64K >= 1.6x the full model at the same batch and >= 1.8x at the largest batch that fits.
TARGET_OF_CEILING = 0.9
TARGET_CONTEXT = 65536
TARGET_SAME_BATCH = 1.6
TARGET_LARGEST_BATCH = 1.8


def student_backends(rows: list[dict]) -> str:
    found = {}
    for row in rows:
        if "student_backend" in row:
            found.setdefault(row["phase"], set()).add(row["student_backend"])
    return "; ".join(f"{phase} {', '.join(sorted(backends))}" for phase, backends in found.items()) or "none yet"


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
        f"Prefill, batch {meta.get('prefill_batch', 1)} (speedup and Amdahl ceiling against the full model at the "
        "same length):",
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

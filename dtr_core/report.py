"""report.json, report.md and plots (search trajectory, per-layer distillation loss) of one run."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .direction import Direction
from .io import write_json, write_text
from .training import TrainingPlan

TRAJECTORY_PLOT = "search_trajectory.png"
RECALL_PLOT = "recall_vs_length.png"
DISTILL_PLOT = "distill_loss.png"


@dataclass
class RunSummary:
    """What one run found and measured: the content of report.json."""

    output_dir: str
    model: str
    family: str
    num_layers: int
    # One per target, the primary first: name, kind, metric, direction, tolerance, tolerance_mode, primary.
    targets: list[dict]
    exported: str  # "opt" or "best"
    linear_layers: tuple[int, ...]
    scores: dict[str, dict[str, dict[str, float]]]  # {"validation"|"test": {target: {"full"|"m_opt"|"m_best": score}}}
    m_opt: tuple[int, ...]
    m_best: tuple[int, ...]
    evaluations: int
    layer_forwards: int
    layer_forwards_without_reuse: int
    stage_seconds: dict[str, float]
    distillation: list[dict]
    capture_tokens: int
    export_dir: str
    report_dir: str
    search: dict
    # The capability card (decoders): {"context_limit", "entries": [{name, kind, length, metric,
    # direction, scores: {full, m_opt, m_best}}], "warnings": [...]}; None for encoders or when off.
    card: dict | None = None
    distillation_warnings: list[str] = field(default_factory=list)  # training.distillation_warnings
    # When every layer had students of several kinds (StudentSpec.kinds): {"kinds": exported layer → kind,
    # "scores": kind → layer → validation score swapped alone, "evaluations": the search's,
    # "one_kind_evaluations": what the same rounds cost with one kind}.
    student_kinds: dict | None = None

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> RunSummary:
        return cls(**data)

    @property
    def primary(self) -> dict:
        return self.targets[0]


def _direction(target: dict) -> Direction:
    return Direction(target["direction"])


def _acceptance_text(result: dict) -> str:
    if result.get("acceptance") != "bootstrap":
        return "point (each target's validation score must meet P_min)"
    confidence = result.get("confidence")
    text = ("bootstrap (each target's pessimistic bound from paired bootstrap resamples of the validation "
            "examples" + (f", at confidence {confidence:g}," if confidence is not None else "") + " must meet P_min)")
    full_bounds = result["evaluations"][0].get("bounds") or {}
    by_score = [t["name"] for t in result["targets"] if t["name"] not in full_bounds]
    if by_score:
        text += f"; judged by the score (no per-example scores): {', '.join(by_score)}"
    return text


def _tolerance_text(target: dict) -> str:
    tolerance, mode = target["tolerance"], target["tolerance_mode"]
    return f"{tolerance:.0%} relative" if mode == "relative" else f"{tolerance:g} absolute"


def _plot_trajectory(summary: RunSummary, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig = trajectory_figure(summary)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def trajectory_figure(summary: RunSummary):
    """One panel per target: every candidate's validation score (grey) and the kept swaps against
    the number of linear layers (whole numbers on that axis); the caller saves and closes it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    result = summary.search["result"]
    thresholds = result["selection"]["thresholds"]
    fig, axes = plt.subplots(len(summary.targets), 1, figsize=(6, 3.2 * len(summary.targets)), squeeze=False)
    for ax, target in zip(axes[:, 0], summary.targets):
        name = target["name"]
        for evaluation in result["evaluations"]:
            ax.scatter(len(evaluation["linear_layers"]), evaluation["scores"][name], s=10, color="0.7", zorder=1)
        xs = [0] + [len(step["linear_layers"]) for step in result["trajectory"]]
        ys = [result["full_scores"][name]] + [step["scores"][name] for step in result["trajectory"]]
        ax.plot(xs, ys, marker="o", color="C0", label="kept swaps", zorder=2)
        if name in thresholds:
            ax.axhline(thresholds[name], color="C3", linestyle="--", label="P_min")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("linear-attention layers")
        ax.set_ylabel(f"{name}: validation {target['metric']}")
        ax.legend()
    axes[0, 0].set_title("Greedy replacement (grey: every candidate evaluated)")
    fig.tight_layout()
    return fig


def _plot_recall(summary: RunSummary, path: Path) -> None:
    _save(recall_figure(summary), path)


def _plot_distillation(summary: RunSummary, path: Path) -> None:
    _save(distillation_figure(summary), path)


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=120)
    plt.close(fig)


def recall_figure(summary: RunSummary):
    """Each probe's test score against context length, for the full model, M_opt and M_best; the caller saves and
    closes it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    probes = [e for e in summary.card["entries"] if e["length"] is not None]
    kinds = list(dict.fromkeys(e["kind"] for e in probes))
    fig, axes = plt.subplots(1, len(kinds), figsize=(4.5 * len(kinds), 3.5), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        rows = sorted((e for e in probes if e["kind"] == kind), key=lambda e: e["length"])
        for model, style in (("full", "o-"), ("m_opt", "s--"), ("m_best", "^:")):
            ax.plot([e["length"] for e in rows], [e["scores"][model] for e in rows], style, label=model)
        ax.set_xscale("log", base=2)
        ax.set_xticks([e["length"] for e in rows], [str(e["length"]) for e in rows])
        ax.set_ylim(-0.05, 1.05)
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel(f"{kind} ({rows[0]['metric']}, test)")
        ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def distillation_figure(summary: RunSummary):
    """Every layer's relative error by training step (log scale); the caller saves and closes it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for record in summary.distillation:
        ax.plot(record["loss_curve"], label=f"layer {record['layer_idx']}")
    ax.set_yscale("log")
    _plain_log_ticks(ax.yaxis)
    ax.set_xlabel("step")
    ax.set_ylabel("relative error (MSE / output variance)")
    ax.set_title("Blockwise local distillation")
    ax.legend(fontsize="small", ncol=2)
    fig.tight_layout()
    return fig


def _plain_log_ticks(axis) -> None:
    """Log-scale tick labels as plain numbers: matplotlib's default writes them in mathtext, whose lookups of fonts a
    machine lacks (STIX, Computer Modern) print about 20 "findfont" warnings per run."""
    from matplotlib.ticker import LogFormatter

    axis.set_major_formatter(LogFormatter())
    axis.set_minor_formatter(LogFormatter())


def render_markdown(summary: RunSummary) -> str:
    scores = summary.scores
    result = summary.search["result"]
    targets = summary.targets
    lines = [
        "# DtR run report",
        "",
        f"- Teacher: `{summary.model}` ({summary.family}, {summary.num_layers} layers)",
        "- Targets: " + "; ".join(
            f"{t['name']} ({t['metric']}, {_direction(t).phrase}, tolerance {_tolerance_text(t)}"
            + (", primary: the search optimises it" if t["primary"] else ", guard") + ")" for t in targets),
        f"- Acceptance: {_acceptance_text(result)}",
        f"- Exported: M_{summary.exported} — linear layers {list(summary.linear_layers)} "
        f"({len(summary.linear_layers)}/{summary.num_layers}) → `{summary.export_dir}`",
        f"- Evaluations: {summary.evaluations}; layer-forwards {summary.layer_forwards} "
        f"(without prefix reuse {summary.layer_forwards_without_reuse}, saved "
        f"{summary.layer_forwards_without_reuse - summary.layer_forwards})",
        "",
        "## Scores",
        "",
        f"M_opt: linear layers {list(summary.m_opt)}; {_best_text(summary)}.",
        "",
        "| target | P_min | full val | M_opt val | M_best val | full test | M_opt test | M_best test |",
        "|---|---|---|---|---|---|---|---|",
    ]
    thresholds = result["selection"]["thresholds"]
    for t in targets:
        name = t["name"]
        val, test = scores["validation"][name], scores["test"][name]
        p_min = f"{thresholds[name]:.4f}" if name in thresholds else "—"
        lines.append(f"| {name} ({t['metric']}) | {p_min} | {val['full']:.4f} | {val['m_opt']:.4f} | "
                     f"{val['m_best']:.4f} | {test['full']:.4f} | {test['m_opt']:.4f} | {test['m_best']:.4f} |")
    lines += ["", "## Search trajectory", "", *_trajectory_markdown(result, [t["name"] for t in targets]),
              f"\n![trajectory]({TRAJECTORY_PLOT})", ""]
    if summary.card is not None:
        lines += _card_markdown(summary)
    lines += [
        "## Distillation",
        "",
        f"Students: {students_text(summary.distillation)}.",
        "",
        f"Every student: {TrainingPlan.of_record(summary.distillation[0]).describe()}.",
        "",
        *[f"**Warning:** {warning}." for warning in summary.distillation_warnings],
        "",
        *_kinds_lines(summary),
        "| layer | relative error at init | after | steps | seconds |",
        "|---|---|---|---|---|",
    ]
    for record in summary.distillation:
        lines.append(f"| {record['layer_idx']} | {record['rel_error_init']:.4f} | {record['rel_error_final']:.4f} | "
                     f"{record['steps']} | {record['seconds']:.1f} |")
    lines += [
        f"\n![distillation]({DISTILL_PLOT})",
        "",
        "## Time per stage (s)",
        "",
        "| " + " | ".join(summary.stage_seconds) + " |",
        "|" + "---|" * len(summary.stage_seconds),
        "| " + " | ".join(f"{v:.1f}" for v in summary.stage_seconds.values()) + " |",
        "",
    ]
    return "\n".join(lines)


def _best_text(summary: RunSummary) -> str:
    """M_best is the best-scoring hybrid, not necessarily the best model: when it scores below the
    full model on the primary target's validation split, the full model is best."""
    primary = summary.primary
    val = summary.scores["validation"][primary["name"]]
    if not summary.m_best:
        return "M_best: none (no hybrid held every guard), so the full model is best"
    if _direction(primary).better(val["full"], val["m_best"]):
        return (f"the full model is best: the best-scoring hybrid, M_best {list(summary.m_best)}, scores "
                f"{val['m_best']:.4f} against its {val['full']:.4f} ({primary['name']}, validation)")
    return f"M_best: {list(summary.m_best)}"


def _hybrid_of(entry: dict) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """A recorded evaluation's or step's hybrid: its layers and their kinds (empty with one kind)."""
    return tuple(entry["linear_layers"]), tuple(entry.get("kinds") or ())


def _trajectory_markdown(result: dict, names: list[str]) -> list[str]:
    """The kept swaps as a table; when the first round kept none, a sentence instead of an empty table."""
    if not result["trajectory"]:
        return [f"No layer could be replaced: {result['stopped_because']}."]
    lines = ["| round | added layer | linear layers | " + " | ".join(names) + " | within every tolerance |",
             "|---|---|---|" + "---|" * len(names) + "---|"]
    for step in result["trajectory"]:
        added = step["added_layer"]
        if step.get("kinds"):  # a search over several kinds of student: the kind the added layer took
            added = f"{added} ({dict(zip(step['linear_layers'], step['kinds']))[added]})"
        lines.append(f"| {step['round']} | {added} | {list(step['linear_layers'])} | "
                     + " | ".join(f"{step['scores'][n]:.4f}" for n in names)
                     + f" | {'yes' if step['meets_p_min'] else 'no'} |")
    return lines + [f"\nStopped: {result['stopped_because']}."]


def _card_markdown(summary: RunSummary) -> list[str]:
    card = summary.card
    lines = [
        "## Capability card",
        "",
        "Test scores on what the search did not look at (the run's own targets are above). "
        f"Context limit of the teacher: {card['context_limit']} tokens.",
        "",
        "| capability | metric | full | M_opt | M_best |",
        "|---|---|---|---|---|",
    ]
    for entry in card["entries"]:
        scores = entry["scores"]
        lines.append(f"| {entry['name']} | {entry['metric']} | {scores['full']:.4f} | {scores['m_opt']:.4f} | "
                     f"{scores['m_best']:.4f} |")
    lines += [""] + [f"**Warning:** {warning}." for warning in card["warnings"]]
    if any(e["length"] is not None for e in card["entries"]):
        lines += [f"\n![recall against context length]({RECALL_PLOT})"]
    return lines + [""]


def write_report(summary: RunSummary, out_dir: str | Path) -> Path:
    """Write the three report artefacts; returns the folder."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # The numbers first: they should survive a plotting failure.
    write_json(out_dir / "report.json", summary.to_json())
    write_text(out_dir / "report.md", render_markdown(summary))
    _plot_trajectory(summary, out_dir / TRAJECTORY_PLOT)
    _plot_distillation(summary, out_dir / DISTILL_PLOT)
    if summary.card is not None and any(e["length"] is not None for e in summary.card["entries"]):
        _plot_recall(summary, out_dir / RECALL_PLOT)
    return out_dir


def _kinds_lines(summary: RunSummary) -> list[str]:
    """The report's table of every kind's single-swap validation score per layer and the kind each
    exported layer runs, when the search chose among kinds."""
    if summary.student_kinds is None:
        return []
    by_kind = summary.student_kinds["scores"]
    kept = summary.student_kinds["kinds"]
    name = summary.primary["name"]
    headers = " | ".join(f"{name} with {kind} alone" for kind in by_kind)
    lines = [f"Student kinds: {_kinds_text(summary.student_kinds)}.", "",
             f"| layer | exported as | {headers} |",
             "|---|---|" + "---|" * len(by_kind)]
    for layer in next(iter(by_kind.values())):
        scores = " | ".join(f"{by_kind[kind][layer]:.4f}" for kind in by_kind)
        lines.append(f"| {layer} | {kept.get(layer, 'full attention')} | {scores} |")
    return [*lines, ""]


def students_text(records: Sequence[Mapping]) -> str:
    """What the distilled students are (``StudentRecord`` json), one description per distinct setting: kind,
    feature map, softmax window (resolved: "auto" is 64 tokens on decoders, none on encoders), convolutions, shared
    K/V heads (absent from the records of students made before they existed)."""
    descriptions = []
    for record in records:
        config = record["student_config"]
        parts = [f"{config['feature_map']} features"]
        window = config["window"]
        parts.append(f"{window}-token softmax window" if window else "no softmax window")
        if config["short_conv"]:
            parts.append(f"q/k/v convolutions of {config['short_conv']}")
        if config.get("kv_heads", config.get("num_heads", 0)) < config.get("num_heads", 0):
            parts.append(f"{config['kv_heads']} shared K/V heads")
        text = f"{config['kind']} ({', '.join(parts)})"
        if text not in descriptions:
            descriptions.append(text)
    return "; ".join(descriptions)


def _kinds_text(student_kinds: dict) -> str:
    """Which exported layers run which kind of student, and what offering every kind cost the search."""
    chosen: dict[str, list[int]] = {kind: [] for kind in student_kinds["scores"]}
    for layer, kind in student_kinds["kinds"].items():
        chosen[kind].append(int(layer))
    return ("; ".join(f"{kind} {sorted(layers)}" for kind, layers in chosen.items())
            + f" (every layer offered with each kind in every round: {student_kinds['evaluations']} evaluations, "
              f"{student_kinds['one_kind_evaluations']} with one kind; {len(chosen)} students distilled per layer)")


BAR_WIDTH = 30  # characters of the summary's trade-off bars


def trajectory_lines(summary: RunSummary) -> list[str]:
    """The trade-off along the search, for the terminal: the primary target's validation score (and,
    under the bootstrap rule, the pessimistic bound acceptance judged) for the full model, each kept
    swap and, when the search stopped, the best candidate of the round that stopped it; which hybrid
    was exported. Each row's bar is solid up to the lower of its score and bound and shaded on to the
    higher, with │ at P_min: a hybrid is within tolerance when its bound (under the point rule, its
    score) lies on P_min's good side (higher is better: the solid part reaches │; lower: the bar stops
    short of it)."""
    result = summary.search["result"]
    primary = summary.primary
    name, direction = primary["name"], _direction(primary)
    p_min = result["selection"]["thresholds"].get(name)
    bootstrap = result.get("acceptance") == "bootstrap"
    by_hybrid = {_hybrid_of(e): e for e in result["evaluations"]}
    rows = [(by_hybrid[(), ()], "full model")]
    rows += [(by_hybrid[_hybrid_of(step)], "kept" if step["meets_p_min"] else "kept, outside tolerance")
             for step in result["trajectory"]]
    stopping_round = [e for e in result["evaluations"] if e["round"] == len(result["trajectory"]) + 1]
    if stopping_round:
        best = stopping_round[0]
        for e in stopping_round[1:]:
            if direction.better(e["scores"][name], best["scores"][name]):
                best = e
        rows.append((best, "best candidate, outside tolerance: the search stopped"))

    def judged(e: dict) -> float | None:
        return (e.get("bounds") or {}).get(name) if bootstrap else None

    values = [e["scores"][name] for e, _ in rows] + [v for e, _ in rows if (v := judged(e)) is not None]
    values += [p_min] if p_min is not None else []
    span = (max(values) - min(values)) or 1.0
    low = min(values) - 0.25 * span  # the lowest row still gets a visible bar

    def column(value: float) -> int:
        return round((value - low) / (max(values) - low) * BAR_WIDTH)

    title = f"validation {primary['metric']} ({direction.phrase}) by number of linear layers"
    if p_min is not None:
        title += f"; │ marks P_min {p_min:.4f} (tolerance {_tolerance_text(primary)}"
        title += ", judged on the bootstrap bound)" if bootstrap else ")"
    lines = [f"  trade-off: {title}",
             f"    {'linear':<8}{'layers':<20}{'score':>8}" + (f"{'bound':>8}" if bootstrap else "")]
    for e, verdict in rows:
        layers = tuple(e["linear_layers"])
        score, bound = e["scores"][name], judged(e)
        ends = (score, score) if bound is None else (min(score, bound), max(score, bound))
        bar = ["█" if i < column(ends[0]) else "░" if i < column(ends[1]) else " " for i in range(BAR_WIDTH + 1)]
        if p_min is not None:
            bar[column(p_min)] = "│"
        exported = f" ← exported (M_{summary.exported})" if layers == tuple(summary.linear_layers) and layers else ""
        lines.append(f"    {f'{len(layers)}/{summary.num_layers}':<8}{str(list(layers)):<20}{score:>8.4f}"
                     + (f"{bound:>8.4f}" if bootstrap and bound is not None else " " * 8 if bootstrap else "")
                     + f"  {''.join(bar)}  {verdict}{exported}")
    return lines


def format_summary(summary: RunSummary) -> str:
    """The short text summary printed at the end of a run: one line per target."""
    chosen = "M_opt" if summary.exported == "opt" else "M_best"
    key = "m_opt" if summary.exported == "opt" else "m_best"
    saved = summary.layer_forwards_without_reuse - summary.layer_forwards
    times = ", ".join(f"{name} {seconds:.1f}s" for name, seconds in summary.stage_seconds.items())
    names = [(t["name"], t["metric"]) for t in summary.targets]
    names += [(e["name"], e["metric"]) for e in (summary.card or {}).get("entries", ())]
    width = max(18, *(len(name) + len(metric) + 3 for name, metric in names))
    lines = [
        "DtR summary",
        f"  {'teacher':<{width}} {summary.model} ({summary.family}, {summary.num_layers} layers)",
        f"  {'layers replaced':<{width}} {len(summary.linear_layers)}/{summary.num_layers}: "
        f"{list(summary.linear_layers)} ({chosen})",
    ]
    for t in summary.targets:
        val, test = summary.scores["validation"][t["name"]], summary.scores["test"][t["name"]]
        label = f"{t['name']} ({t['metric']})" if t["name"] != t["metric"] else t["name"]
        lines.append(f"  {label:<{width}} full val {val['full']:.4f} test {test['full']:.4f}  →  "
                     f"hybrid val {val[key]:.4f} test {test[key]:.4f}  (tolerance {_tolerance_text(t)})")
    lines += trajectory_lines(summary)
    for entry in (summary.card or {}).get("entries", ()):
        scores = entry["scores"]
        label = f"{entry['name']} ({entry['metric']})"
        lines.append(f"  {label:<{width}} full test {scores['full']:.4f}  →  hybrid test {scores[key]:.4f}  "
                     "(card: not guarded)")
    lines += [f"  WARNING: {warning}" for warning in (summary.card or {}).get("warnings", ())]
    lines += [f"  {'students':<{width}} {students_text(summary.distillation)}",
              f"  {'distillation':<{width}} {TrainingPlan.of_record(summary.distillation[0]).describe()}"]
    lines += [f"  WARNING: {warning}" for warning in summary.distillation_warnings]
    if summary.student_kinds is not None:
        lines.append(f"  {'student kinds':<{width}} {_kinds_text(summary.student_kinds)}")
    lines += [
        f"  {'evaluations':<{width}} {summary.evaluations} (layer-forwards {summary.layer_forwards}, "
        f"{saved} saved by prefix reuse)",
        f"  {'time per stage':<{width}} {times}",
        f"  {'exported model':<{width}} {summary.export_dir}",
        f"  {'report':<{width}} {summary.report_dir}/report.md",
    ]
    return "\n".join(lines)

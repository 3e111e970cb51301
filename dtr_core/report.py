"""report.json, report.md and plots (search trajectory, per-layer distillation loss) of one run."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from .direction import Direction
from .io import write_json, write_text

TRAJECTORY_PLOT = "search_trajectory.png"
DISTILL_PLOT = "distill_loss.png"


@dataclass
class RunSummary:
    """What one run found and measured: the content of report.json."""

    output_dir: str
    model: str
    family: str
    num_layers: int
    metric: str
    direction: Direction
    exported: str  # "opt" or "best"
    linear_layers: tuple[int, ...]
    scores: dict[str, dict[str, float]]  # {"validation"|"test": {"full"|"m_opt"|"m_best": score}}
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

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> RunSummary:
        return cls(**{**data, "direction": Direction(data["direction"])})


def _plot_trajectory(summary: RunSummary, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    result = summary.search["result"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for evaluation in result["evaluations"]:
        ax.scatter(len(evaluation["linear_layers"]), evaluation["score"], s=10, color="0.7", zorder=1)
    xs = [0] + [len(step["linear_layers"]) for step in result["trajectory"]]
    ys = [result["full_score"]] + [step["score"] for step in result["trajectory"]]
    ax.plot(xs, ys, marker="o", color="C0", label="kept swaps", zorder=2)
    ax.axhline(result["selection"]["p_min"], color="C3", linestyle="--", label="P_min")
    ax.set_xlabel("linear-attention layers")
    ax.set_ylabel(f"validation {summary.metric}")
    ax.set_title("Greedy replacement (grey: every candidate evaluated)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_distillation(summary: RunSummary, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for record in summary.distillation:
        ax.plot(record["loss_curve"], label=f"layer {record['layer_idx']}")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("relative error (MSE / output variance)")
    ax.set_title("Blockwise local distillation")
    ax.legend(fontsize="small", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def render_markdown(summary: RunSummary) -> str:
    scores = summary.scores
    selection = summary.search["result"]["selection"]
    lines = [
        "# DtR run report",
        "",
        f"- Teacher: `{summary.model}` ({summary.family}, {summary.num_layers} layers)",
        f"- Metric: {summary.metric} ({summary.direction.phrase}); tolerance {selection['tolerance']} "
        f"({selection['tolerance_mode']}), P_min = {selection['p_min']:.4f}",
        f"- Exported: M_{summary.exported} — linear layers {list(summary.linear_layers)} "
        f"({len(summary.linear_layers)}/{summary.num_layers}) → `{summary.export_dir}`",
        f"- Evaluations: {summary.evaluations}; layer-forwards {summary.layer_forwards} "
        f"(without prefix reuse {summary.layer_forwards_without_reuse}, saved "
        f"{summary.layer_forwards_without_reuse - summary.layer_forwards})",
        "",
        "## Scores",
        "",
        "| model | linear layers | validation | test |",
        "|---|---|---|---|",
        f"| full | [] | {scores['validation']['full']:.4f} | {scores['test']['full']:.4f} |",
        f"| M_opt | {list(summary.m_opt)} | {scores['validation']['m_opt']:.4f} | {scores['test']['m_opt']:.4f} |",
        f"| M_best | {list(summary.m_best)} | {scores['validation']['m_best']:.4f} | {scores['test']['m_best']:.4f} |",
        "",
        "## Search trajectory",
        "",
        "| round | added layer | linear layers | validation score | meets P_min |",
        "|---|---|---|---|---|",
    ]
    for step in summary.search["result"]["trajectory"]:
        lines.append(f"| {step['round']} | {step['added_layer']} | {list(step['linear_layers'])} | "
                     f"{step['score']:.4f} | {'yes' if step['meets_p_min'] else 'no'} |")
    lines += [
        f"\nStopped: {summary.search['result']['stopped_because']}.",
        f"\n![trajectory]({TRAJECTORY_PLOT})",
        "",
        "## Distillation",
        "",
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


def write_report(summary: RunSummary, out_dir: str | Path) -> Path:
    """Write the three report artefacts; returns the folder."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # The numbers first: they should survive a plotting failure.
    write_json(out_dir / "report.json", summary.to_json())
    write_text(out_dir / "report.md", render_markdown(summary))
    _plot_trajectory(summary, out_dir / TRAJECTORY_PLOT)
    _plot_distillation(summary, out_dir / DISTILL_PLOT)
    return out_dir


def format_summary(summary: RunSummary) -> str:
    """The short text summary printed at the end of a run."""
    chosen = "M_opt" if summary.exported == "opt" else "M_best"
    key = "m_opt" if summary.exported == "opt" else "m_best"
    val, test = summary.scores["validation"], summary.scores["test"]
    saved = summary.layer_forwards_without_reuse - summary.layer_forwards
    times = ", ".join(f"{name} {seconds:.1f}s" for name, seconds in summary.stage_seconds.items())
    return "\n".join([
        "DtR summary",
        f"  teacher            {summary.model} ({summary.family}, {summary.num_layers} layers)",
        f"  layers replaced    {len(summary.linear_layers)}/{summary.num_layers}: {list(summary.linear_layers)} ({chosen})",
        f"  {summary.metric:<18} full model  val {val['full']:.4f}  test {test['full']:.4f}",
        f"  {'':<18} hybrid      val {val[key]:.4f}  test {test[key]:.4f}",
        f"  evaluations        {summary.evaluations} (layer-forwards {summary.layer_forwards}, "
        f"{saved} saved by prefix reuse)",
        f"  time per stage     {times}",
        f"  exported model     {summary.export_dir}",
        f"  report             {summary.report_dir}/report.md",
    ])

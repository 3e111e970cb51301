"""report.md and the trajectory plot read a real search's result the way a user would."""

import pytest

from dtr_core.direction import Direction
from dtr_core.report import RunSummary, render_markdown, trajectory_figure
from dtr_core.search import CandidateScores, TargetGuard, greedy_replace
from dtr_core.specs import SearchSpec

FULL = 0.90


class ScoreTable:
    """An evaluator with a fixed accuracy per set of linear layers (the full model: ``FULL``)."""

    def __init__(self, scores: dict[frozenset[int], float]) -> None:
        self.scores = {frozenset(): FULL, **scores}

    def __call__(self, linear_layers: frozenset[int]) -> dict[str, float]:
        return {"accuracy": self.scores[linear_layers]}

    def rebase(self, linear_layers: frozenset[int]) -> None:
        pass


def summary_of(scores: dict[frozenset[int], float], tolerance: float = 0.05) -> RunSummary:
    """The summary of a 3-layer run whose search scored ``scores`` (validation and test alike)."""
    spec = SearchSpec(tolerance=tolerance, acceptance="point")
    guard = TargetGuard("accuracy", Direction.HIGHER, tolerance)
    result = greedy_replace(3, ScoreTable(scores), spec, [guard])
    selection = result.selection
    per_set = {"full": FULL, "m_opt": selection.m_opt_score, "m_best": selection.m_best_score}
    record = {"layer_idx": 0, "loss_curve": [0.5, 0.2], "rel_error_init": 0.5, "rel_error_final": 0.2,
              "steps": 2, "seconds": 1.0, "data_tokens": 1000, "token_budget": 1000, "train_tokens": 1000,
              "student_config": {"kind": "gla", "feature_map": "hedgehog", "window": 0, "short_conv": 0}}
    return RunSummary(
        output_dir="run", model="tiny", family="bert", num_layers=3,
        targets=[{"name": "accuracy", "kind": "classification", "metric": "accuracy", "direction": "higher",
                  "tolerance": tolerance, "tolerance_mode": "relative", "primary": True}],
        exported="opt", linear_layers=selection.m_opt, scores={"validation": {"accuracy": per_set},
                                                                "test": {"accuracy": per_set}},
        m_opt=selection.m_opt, m_best=selection.m_best, evaluations=len(result.evaluations), layer_forwards=0,
        layer_forwards_without_reuse=0, stage_seconds={"search": 1.0}, distillation=[record], capture_tokens=1000,
        export_dir="run/hybrid", report_dir="run/report",
        search={"result": result.to_json(), "layer_forwards": 0, "layer_forwards_without_reuse": 0, "seconds": 1.0},
    )


def one_set(layers: set[int], score: float) -> dict[frozenset[int], float]:
    return {frozenset(layers): score}


# Layer 2 swaps in at a small cost, then everything else falls far below P_min (0.855).
KEEPS_ONE = {**one_set({0}, 0.5), **one_set({1}, 0.6), **one_set({2}, 0.88),
             **one_set({0, 2}, 0.5), **one_set({1, 2}, 0.5)}
# Every first-round candidate misses P_min; the best of them still scores below the full model.
KEEPS_NONE = {**one_set({0}, 0.5), **one_set({1}, 0.6), **one_set({2}, 0.7)}


def test_a_kept_swap_is_a_trajectory_row_and_the_best_hybrid_is_named_against_the_full_model():
    text = render_markdown(summary_of(KEEPS_ONE))
    assert "| 1 | 2 | [2] | 0.8800 | yes |" in text and "No layer could be replaced" not in text
    # M_best [2] scores 0.88 < 0.90: the full model is the best model, and the report says so.
    assert "the full model is best: the best-scoring hybrid, M_best [2], scores 0.8800 against its 0.9000" in text
    assert "M_best: [2]" not in text


def test_a_hybrid_at_least_as_good_as_the_full_model_is_m_best():
    text = render_markdown(summary_of({**KEEPS_ONE, **one_set({2}, 0.91)}))
    assert "M_best: [2]." in text and "the full model is best" not in text


def test_a_failed_first_round_says_no_layer_could_be_replaced_instead_of_an_empty_table():
    text = render_markdown(summary_of(KEEPS_NONE))
    trajectory = text.split("## Search trajectory")[1].split("![trajectory]")[0]
    assert "No layer could be replaced: round 1: the best candidate misses P_min: accuracy 0.7" in trajectory
    assert "| round |" not in trajectory


@pytest.mark.parametrize("scores", [KEEPS_ONE, {**KEEPS_ONE, **one_set({0, 2}, 0.87), **one_set({0, 1, 2}, 0.86)}],
                         ids=["one-swap", "three-swaps"])
def test_the_trajectory_plot_counts_layers_in_whole_numbers(scores):
    import matplotlib.pyplot as plt

    fig = trajectory_figure(summary_of(scores))
    try:
        fig.canvas.draw()
        ticks = fig.axes[0].get_xticks()
        assert len(ticks) >= 2 and all(float(tick).is_integer() for tick in ticks)
    finally:
        plt.close(fig)


def trade_off_rows(summary: RunSummary) -> dict[str, str]:
    """The summary's trade-off rows by their first column ("k/3": k linear layers)."""
    from dtr_core.report import trajectory_lines

    return {line.split()[0]: line for line in trajectory_lines(summary)[2:]}


def solid_before_p_min(row: str) -> bool:
    """Whether the row's bar is solid up to the P_min mark (what acceptance judged reaches it)."""
    return row[row.index("│") - 1] == "█"


def test_the_summary_shows_the_trade_off_once_with_p_min_and_the_exported_hybrid():
    from dtr_core.report import format_summary

    summary = summary_of(KEEPS_ONE)
    text = format_summary(summary)
    assert text.count("trade-off:") == 1 and "│ marks P_min 0.8550 (tolerance 5% relative)" in text
    rows = trade_off_rows(summary)
    assert list(rows) == ["0/3", "1/3", "2/3"]
    assert "0.9000" in rows["0/3"] and rows["0/3"].endswith("full model")
    assert "[2] " in rows["1/3"] and rows["1/3"].endswith("kept ← exported (M_opt)") and solid_before_p_min(rows["1/3"])
    # The round that stopped the search: its best candidate, below P_min.
    assert "[0, 2]" in rows["2/3"] and "0.5000" in rows["2/3"] and not solid_before_p_min(rows["2/3"])
    assert rows["2/3"].endswith("best candidate, outside tolerance: the search stopped")


class BoundedTable(ScoreTable):
    """Like ``ScoreTable`` under the bootstrap rule: each hybrid's bound lies ``margin`` below its score."""

    def __init__(self, scores: dict[frozenset[int], float], margin: float) -> None:
        super().__init__(scores)
        self.margin = margin

    def __call__(self, linear_layers: frozenset[int]) -> CandidateScores:
        score = self.scores[linear_layers]
        return CandidateScores({"accuracy": score}, {"accuracy": score - (self.margin if linear_layers else 0.0)})


def test_under_the_bootstrap_rule_a_score_past_p_min_with_its_bound_short_of_it_is_shaded_across():
    spec = SearchSpec(tolerance=0.05, acceptance="bootstrap")
    result = greedy_replace(3, BoundedTable(KEEPS_ONE, margin=0.04), spec,
                            [TargetGuard("accuracy", Direction.HIGHER, 0.05)])
    summary = summary_of(KEEPS_ONE)
    summary.search = {**summary.search, "result": result.to_json()}
    summary.linear_layers = result.selection.m_opt
    rows = trade_off_rows(summary)
    # Layer 2 scores 0.88 above P_min 0.855, but its bound, 0.84, is what acceptance judges.
    assert list(rows) == ["0/3", "1/3"] and "0.8800  0.8400" in rows["1/3"]
    bar = rows["1/3"].split("0.8400")[1]
    assert "░│░" in bar and not solid_before_p_min(rows["1/3"]) and "exported" not in rows["1/3"]


def test_log_scale_plots_label_their_ticks_without_mathtext():
    """Mathtext tick labels made matplotlib look up fonts the machine lacks: ~20 "findfont" warnings per run."""
    import matplotlib.pyplot as plt

    from dtr_core.report import distillation_figure, recall_figure

    summary = summary_of(KEEPS_ONE)
    summary.distillation[0]["loss_curve"] = [0.5, 0.2, 0.05, 0.03]
    summary.card = {"entries": [{"kind": "passkey", "metric": "contains", "length": length,
                                 "scores": {"full": 1.0, "m_opt": 0.5, "m_best": 0.9}} for length in (256, 1024, 4096)]}
    for figure in (distillation_figure(summary), recall_figure(summary)):
        try:
            figure.canvas.draw()
            labels = [label.get_text() for ax in figure.axes for axis in (ax.xaxis, ax.yaxis)
                      for label in axis.get_ticklabels(which="both")]
            assert labels and not [label for label in labels if "$" in label], labels
        finally:
            plt.close(figure)

"""Greedy search semantics (Algorithm 1) with scripted scores: no model involved."""

import pytest

from dtr_core.direction import Direction
from dtr_core.search import RoundEvaluator, greedy_replace, read_off
from dtr_core.specs import SearchSpec, SpecError


class Scripted:
    """Score = base − sum of per-layer costs (+ optional interactions); records calls and rebases."""

    def __init__(self, costs, base=1.0, sign=-1.0, interactions=None):
        self.costs, self.base, self.sign = costs, base, sign
        self.interactions = interactions or {}
        self.calls, self.rebased = [], []

    def __call__(self, layers):
        self.calls.append(tuple(sorted(layers)))
        score = self.base + self.sign * sum(self.costs[i] for i in layers)
        for pair, extra in self.interactions.items():
            if set(pair) <= layers:
                score += self.sign * extra
        return score

    def rebase(self, layers):
        self.rebased.append(tuple(sorted(layers)))


COSTS = [0.05, 0.0, 0.02, 0.001, 0.3]


def test_stops_when_best_candidate_misses_p_min():
    evaluator = Scripted(COSTS)
    result = greedy_replace(5, evaluator, SearchSpec(tolerance=0.03), Direction.HIGHER)
    # P_min = 0.97: layer 1 (0), then 3 (0.001), then 2 (0.021 total), then 0 would give 0.929 → stop.
    assert [s.added_layer for s in result.trajectory] == [1, 3, 2]
    assert result.selection.m_opt == (1, 2, 3)
    assert result.selection.p_min == pytest.approx(0.97)
    # Evaluations: full model + 5 + 4 + 3 + 2 (the failing round is evaluated, then the search stops).
    assert len(result.evaluations) == 1 + 5 + 4 + 3 + 2
    assert evaluator.calls[0] == ()
    assert evaluator.rebased == [(1,), (1, 3), (1, 2, 3)]
    assert "below P_min" in result.stopped_because
    assert all(e.seconds >= 0 for e in result.evaluations)


def test_ties_within_round_go_to_lowest_layer_and_m_best_prefers_more_layers():
    evaluator = Scripted([0.0, 0.0, 0.5])
    result = greedy_replace(3, evaluator, SearchSpec(tolerance=0.1), Direction.HIGHER)
    assert [s.added_layer for s in result.trajectory] == [0, 1]
    # Every hybrid with layers {0}, {1} and {0, 1} scores 1.0: M_best takes the one with most layers.
    assert result.selection.m_best == (0, 1)
    assert result.selection.m_best_score == 1.0


def test_lower_is_better_metric_with_absolute_tolerance():
    evaluator = Scripted([1.0, 3.0, 0.5], base=20.0, sign=+1.0)  # perplexity grows with each swap
    spec = SearchSpec(tolerance=1.6, tolerance_mode="absolute")
    result = greedy_replace(3, evaluator, spec, Direction.LOWER)
    assert result.selection.p_min == pytest.approx(21.6)
    assert result.selection.m_opt == (0, 2)
    assert result.selection.m_opt_score == pytest.approx(21.5)
    assert result.selection.m_best == (2,)  # 20.5 is the lowest perplexity among hybrids


def test_score_equal_to_p_min_is_accepted():
    result = greedy_replace(2, Scripted([0.25, 0.5]), SearchSpec(tolerance=0.25), Direction.HIGHER)
    assert result.selection.m_opt == (0,)


def test_run_to_end_records_whole_trajectory_and_read_off_matches_direct_runs():
    costs = [0.05, 0.0, 0.02, 0.001, 0.3, 0.04]
    interactions = {(0, 5): 0.2}
    full = greedy_replace(6, Scripted(costs, interactions=interactions),
                          SearchSpec(tolerance=0.01, run_to_end=True), Direction.HIGHER)
    assert len(full.trajectory) == 6
    assert len(full.evaluations) == 1 + 6 * 7 // 2  # L(L+1)/2 candidates + the full model
    assert [s.meets_p_min for s in full.trajectory][:2] == [True, True]
    for tolerance in (0.0, 0.005, 0.01, 0.03, 0.1, 0.2, 0.5, 0.9):
        direct = greedy_replace(6, Scripted(costs, interactions=interactions), SearchSpec(tolerance=tolerance),
                                Direction.HIGHER)
        assert read_off(full, tolerance) == direct.selection, tolerance


def test_read_off_refuses_to_extrapolate_a_stopped_search():
    stopped = greedy_replace(5, Scripted(COSTS), SearchSpec(tolerance=0.03), Direction.HIGHER)
    assert read_off(stopped, 0.001).m_opt == (1, 3)  # tighter: answerable
    with pytest.raises(ValueError, match="run_to_end"):
        read_off(stopped, 0.2)


def test_candidate_layers_restrict_the_search():
    evaluator = Scripted(COSTS)
    result = greedy_replace(5, evaluator, SearchSpec(tolerance=0.5, candidate_layers=(0, 4)), Direction.HIGHER)
    assert {layer for call in evaluator.calls for layer in call} <= {0, 4}
    assert result.selection.m_opt == (0, 4)
    with pytest.raises(ValueError, match="outside"):
        greedy_replace(3, Scripted(COSTS), SearchSpec(candidate_layers=(0, 7)), Direction.HIGHER)


def test_worst_acceptable_score_in_both_directions():
    assert Direction.HIGHER.worst_acceptable(0.9, 0.1, "relative") == pytest.approx(0.81)
    assert Direction.LOWER.worst_acceptable(30.0, 0.05, "relative") == pytest.approx(31.5)
    assert Direction.LOWER.worst_acceptable(30.0, 2.0, "absolute") == pytest.approx(32.0)
    with pytest.raises(ValueError, match="tolerance_mode='percent'"):
        Direction.HIGHER.worst_acceptable(0.9, 0.1, "percent")


@pytest.mark.parametrize("kwargs, field", [
    (dict(tolerance=1.5), "tolerance"),
    (dict(tolerance=-0.1), "tolerance"),
    (dict(tolerance=-1.0, tolerance_mode="absolute"), "tolerance"),
    (dict(tolerance_mode="percent"), "tolerance_mode"),
    (dict(candidate_layers=(1, 1)), "candidate_layers"),
], ids=["relative>1", "negative", "absolute-negative", "bad-mode", "duplicate-layers"])
def test_bad_search_specs_are_named(kwargs, field):
    with pytest.raises(SpecError, match=f"SearchSpec.{field}="):
        SearchSpec(**kwargs)


def test_rounds_can_be_scored_together():
    """An evaluator with evaluate_round gets each round's candidates at once, with the same outcome."""
    sequential = greedy_replace(5, Scripted(COSTS), SearchSpec(tolerance=0.03), Direction.HIGHER)
    rounds = []

    class ScriptedRounds(Scripted):
        def evaluate_round(self, layer_sets):
            rounds.append(len(layer_sets))
            return [(self(s), 0.5) for s in layer_sets]

    batched = ScriptedRounds(COSTS)
    assert isinstance(batched, RoundEvaluator) and not isinstance(Scripted(COSTS), RoundEvaluator)
    result = greedy_replace(5, batched, SearchSpec(tolerance=0.03), Direction.HIGHER)
    assert rounds == [1, 5, 4, 3, 2]
    assert result.trajectory == sequential.trajectory and result.selection == sequential.selection
    assert [e.score for e in result.evaluations] == [e.score for e in sequential.evaluations]
    assert all(e.seconds == 0.5 for e in result.evaluations)

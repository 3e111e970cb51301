"""Greedy search semantics (Algorithm 1) with scripted scores: no model involved."""

import pytest

from dtr_core.direction import Direction
from dtr_core.search import (RoundEvaluator, SearchResult, TargetGuard, greedy_replace,
                             read_off)
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
    assert "misses P_min: score 0.929 (P_min 0.97)" in result.stopped_because
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


# --- several targets -------------------------------------------------------------------------------

class ScriptedTargets:
    """Per-target scores: accuracy-like ``task`` and ``recall`` (1 − costs), perplexity-like ``ppl``."""

    def __init__(self, task, recall, ppl=None):
        self.costs = {"task": task, "recall": recall, "ppl": ppl or [0.0] * len(task)}
        self.calls = []

    def __call__(self, layers):
        self.calls.append(tuple(sorted(layers)))
        return {"task": 1.0 - sum(self.costs["task"][i] for i in layers),
                "recall": 1.0 - sum(self.costs["recall"][i] for i in layers),
                "ppl": 10.0 + sum(self.costs["ppl"][i] for i in layers)}

    def rebase(self, layers):
        pass


def guards(task=0.1, recall=0.05, ppl=None):
    targets = [TargetGuard("task", Direction.HIGHER, task), TargetGuard("recall", Direction.HIGHER, recall, "absolute")]
    if ppl is not None:
        targets.append(TargetGuard("ppl", Direction.LOWER, ppl))
    return targets


# Layer 0 costs the task nothing but destroys recall; layer 2 costs the task a little and keeps recall.
TASK, RECALL = [0.0, 0.02, 0.01, 0.5], [0.6, 0.0, 0.01, 0.0]


def test_a_guard_steers_the_search_away_from_a_layer_that_breaks_it():
    unguarded = greedy_replace(4, ScriptedTargets(TASK, RECALL), SearchSpec(), guards()[:1])
    assert unguarded.trajectory[0].added_layer == 0  # best for the task alone
    result = greedy_replace(4, ScriptedTargets(TASK, RECALL), SearchSpec(), guards())
    assert [s.added_layer for s in result.trajectory] == [2, 1]
    assert result.selection.m_opt == (1, 2)
    assert result.selection.m_opt_scores == pytest.approx({"task": 0.97, "recall": 0.99})
    assert result.selection.thresholds == pytest.approx({"task": 0.9, "recall": 0.95})
    # Round 3: {0,1,2} breaks recall, {1,2,3} breaks the task; the stop names what was missed.
    assert "round 3" in result.stopped_because and "P_min" in result.stopped_because
    # Only the searched targets are recorded (not the evaluator's "ppl"), the primary first.
    assert all(list(e.scores) == ["task", "recall"] for e in result.evaluations)


def test_every_target_must_hold_including_a_lower_is_better_one():
    evaluator = ScriptedTargets([0.0, 0.0, 0.0], [0.0, 0.0, 0.0], ppl=[0.2, 2.0, 0.4])
    result = greedy_replace(3, evaluator, SearchSpec(), guards(ppl=0.05))  # ppl ≤ 10.5
    assert result.selection.m_opt == (0,)  # {0,2} has ppl 10.6; {0,1} 12.2
    assert result.selection.thresholds["ppl"] == pytest.approx(10.5)


def test_run_to_end_continues_with_the_least_violating_candidate():
    evaluator = ScriptedTargets([0.0, 0.0, 0.3], [0.0, 0.2, 0.0])
    result = greedy_replace(3, evaluator, SearchSpec(run_to_end=True), guards(task=0.1, recall=0.1))
    # Round 1: {0} acceptable. Round 2: {0,1} recall 0.8 (slack -0.1), {0,2} task 0.7 (slack -0.2).
    assert [s.added_layer for s in result.trajectory] == [0, 1, 2]
    assert [s.meets_p_min for s in result.trajectory] == [True, False, False]
    assert result.selection.m_opt == (0,)
    assert len(result.evaluations) == 1 + 3 + 2 + 1


def test_m_best_needs_every_guard_and_prefers_more_layers_on_ties():
    # {1} has the best task score but breaks recall; {0} and {0, 2} tie on the task: more layers win.
    evaluator = ScriptedTargets([0.0, -0.05, 0.0, 0.5], [0.0, 0.5, 0.0, 0.0])
    result = greedy_replace(4, evaluator, SearchSpec(run_to_end=True), guards(task=0.02))
    assert result.selection.m_best == (0, 2)
    assert result.selection.m_best_scores["task"] == pytest.approx(1.0)


def test_read_off_per_target_and_for_other_tolerances():
    spec = SearchSpec(run_to_end=True)
    recorded = greedy_replace(4, ScriptedTargets(TASK, RECALL), spec, guards())
    # Tighter tolerances follow the recorded path: exact.
    tighter = read_off(recorded, {"task": (0.015, "relative"), "recall": 0.02})
    direct = greedy_replace(4, ScriptedTargets(TASK, RECALL), spec,
                            [TargetGuard("task", Direction.HIGHER, 0.015), TargetGuard("recall", Direction.HIGHER, 0.02, "absolute")])
    assert tighter == direct.selection
    assert tighter.m_opt == (2,)
    # Per target: the task alone would have taken layer 0 first, a path this run never scored.
    with pytest.raises(ValueError, match=r"never scored.*run_to_end"):
        read_off(recorded, {"recall": None})
    # A looser task tolerance on this run follows the same path (round 3 still breaks a guard).
    looser = read_off(recorded, {"task": (0.2, "relative")})
    assert looser.m_opt == (1, 2) and looser.thresholds["task"] == pytest.approx(0.8)
    with pytest.raises(ValueError, match="unknown target"):
        read_off(recorded, {"perplexity": 0.1})


def test_an_evaluator_missing_a_target_is_named():
    class Partial(ScriptedTargets):
        def __call__(self, layers):
            return {"task": 1.0}

    with pytest.raises(ValueError, match=r"no score for target\(s\) \['recall'\]"):
        greedy_replace(2, Partial([0, 0], [0, 0]), SearchSpec(), guards())


def test_multi_target_result_round_trips_through_json():
    import json

    result = greedy_replace(4, ScriptedTargets(TASK, RECALL), SearchSpec(run_to_end=True), guards(ppl=0.1))
    # As the stage cache writes it: sorted keys put "ppl" before "task", the primary.
    restored = SearchResult.from_json(json.loads(json.dumps(result.to_json(), sort_keys=True)))
    assert restored == result and restored.selection == result.selection
    assert list(restored.evaluations[3].scores) == ["task", "recall", "ppl"]
    assert restored.selection.m_opt_score == restored.selection.m_opt_scores["task"]


# --- several kinds of student ---------------------------------------------------------------------

class ScriptedKinds:
    """Perplexity-like ``ppl`` and a ``recall`` guard per (layer, kind): each swap adds its costs."""

    def __init__(self, ppl, recall):
        self.ppl, self.recall = ppl, recall  # kind → per-layer cost
        self.calls, self.rebased = [], []

    def __call__(self, layers, kinds):
        assert set(kinds) == set(layers)
        self.calls.append(tuple(sorted(kinds.items())))
        return {"ppl": 10.0 + sum(self.ppl[kinds[i]][i] for i in layers),
                "recall": 0.9 - sum(self.recall[kinds[i]][i] for i in layers)}

    def rebase(self, layers, kinds):
        self.rebased.append(tuple(sorted(kinds.items())))


# Perplexity costs per kind and layer: layer 1 is cheapest with GLA, but that student forgets (recall
# −0.3); layer 2 is cheaper with Gated DeltaNet. P_min: perplexity 10.3, recall 0.85.
PPL = {"gla": [0.1, 0.05, 0.3], "gdn": [0.2, 0.15, 0.1]}
FORGETS = {"gla": [0.0, 0.3, 0.0], "gdn": [0.0, 0.0, 0.0]}
KIND_GUARDS = [TargetGuard("ppl", Direction.LOWER, 0.03), TargetGuard("recall", Direction.HIGHER, 0.05, "absolute")]


def test_every_round_offers_each_layer_with_each_kind():
    """Round 1 scores 3 layers × 2 kinds: GLA at 1 breaks recall, GLA at 0 and Gated DeltaNet at 2 tie
    at 10.1 (the lower layer wins); round 2 adds Gated DeltaNet at 2 (10.2); round 3 has only layer 1
    left, whose GLA student breaks recall and whose Gated DeltaNet student passes P_min (10.35)."""
    evaluator = ScriptedKinds(PPL, FORGETS)
    result = greedy_replace(3, evaluator, SearchSpec(run_to_end=True), KIND_GUARDS, kinds=["gla", "gdn"])
    assert evaluator.calls[0] == ()
    assert len(result.evaluations) == 1 + 6 + 4 + 2  # every remaining layer with each kind, each round
    assert evaluator.calls[1:7] == [((0, "gla"),), ((0, "gdn"),), ((1, "gla"),), ((1, "gdn"),), ((2, "gla"),),
                                    ((2, "gdn"),)]
    assert [(s.added_layer, s.kinds) for s in result.trajectory] == [
        (0, ("gla",)), (2, ("gla", "gdn")), (1, ("gla", "gdn", "gdn"))]
    assert [s.meets_p_min for s in result.trajectory] == [True, True, False]  # 10.35 + 0.15 > 10.5
    # A kept layer keeps its kind: rounds 2 and 3 build on GLA at 0, the rebase says so.
    assert all(call[0] == (0, "gla") for call in evaluator.calls[7:])
    assert evaluator.rebased == [((0, "gla"),), ((0, "gla"), (2, "gdn"))]
    selection = result.selection
    assert (selection.m_opt, selection.m_opt_kinds) == ((0, 2), ("gla", "gdn"))
    assert (selection.m_best, selection.m_best_kinds) == ((0,), ("gla",))  # every hybrid's ppl grows: the least
    assert result.kinds == ("gla", "gdn")


def test_a_kind_per_swap_replays_and_round_trips():
    import json

    result = greedy_replace(3, ScriptedKinds(PPL, FORGETS), SearchSpec(run_to_end=True), KIND_GUARDS,
                            kinds=["gla", "gdn"])
    restored = SearchResult.from_json(json.loads(json.dumps(result.to_json(), sort_keys=True)))
    assert restored == result and restored.selection == result.selection
    # A wider perplexity tolerance follows the same path one round further, from the recorded scores.
    wider = read_off(result, {"ppl": (0.05, "relative")})
    assert (wider.m_opt, wider.m_opt_kinds) == ((0, 1, 2), ("gla", "gdn", "gdn"))
    # Without the recall guard, GLA at layer 1 comes first: a path the run never took, named by kinds.
    with pytest.raises(ValueError, match=r"\[0 gdn, 1 gla\], which the recorded run never scored"):
        read_off(result, {"recall": None})


def test_kinds_reach_a_round_evaluator_and_one_kind_changes_nothing():
    rounds = []

    class ScriptedKindRounds(ScriptedKinds):
        def evaluate_round(self, layer_sets, kinds):
            rounds.append(len(layer_sets))
            assert [frozenset(k) for k in kinds] == list(layer_sets)
            return [(self(layers, k), 0.5) for layers, k in zip(layer_sets, kinds)]

    batched = greedy_replace(3, ScriptedKindRounds(PPL, FORGETS), SearchSpec(run_to_end=True), KIND_GUARDS,
                             kinds=["gla", "gdn"])
    sequential = greedy_replace(3, ScriptedKinds(PPL, FORGETS), SearchSpec(run_to_end=True), KIND_GUARDS,
                                kinds=["gla", "gdn"])
    assert rounds == [1, 6, 4, 2] and batched.trajectory == sequential.trajectory
    # A single kind is the plain search: the evaluator is called without kinds, nothing records them.
    single = greedy_replace(5, Scripted(COSTS), SearchSpec(tolerance=0.03), Direction.HIGHER, kinds=["gla"])
    assert single.kinds is None and single.selection.m_opt_kinds is None
    assert all(e.kinds is None for e in single.evaluations)

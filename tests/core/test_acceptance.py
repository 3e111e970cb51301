"""The bootstrap acceptance rule: bounds by hand-checkable cases, every scorer's per-example scores
adding up to its score, and the search judging candidates by their bounds."""

import json

import numpy as np
import pytest
import torch

from dtr_core.acceptance import ExampleScores, paired_bootstrap_bound
from dtr_core.direction import Direction
from dtr_core.search import CandidateScores, SearchResult, TargetGuard, greedy_replace, read_off
from dtr_core.specs import SearchSpec, SpecError
from dtr_core.targets.decoder_tasks import Contains, MultipleChoice
from dtr_core.targets.tasks import LinearProbe, Perplexity, ProbeClassification


def accuracy(correct):
    correct = np.asarray(correct, dtype=np.float64)
    return ExampleScores(correct, np.ones_like(correct))


def test_a_candidate_equal_to_the_full_model_is_its_own_bound():
    full = accuracy([1, 0, 1, 1, 0, 1, 1, 1])
    assert paired_bootstrap_bound(full, full, Direction.HIGHER, 0.9, 500, 0) == pytest.approx(full.score())


def test_a_candidate_losing_examples_is_bounded_below_its_score():
    full = accuracy([1] * 40)
    candidate = accuracy([1] * 38 + [0] * 2)  # 0.95 on this split
    bound = paired_bootstrap_bound(full, candidate, Direction.HIGHER, 0.9, 2000, 0)
    # The loss of two in 40 resampled: its 90% pessimistic quantile is about 4/40.
    assert 0.88 <= bound < 0.95
    assert bound == paired_bootstrap_bound(full, candidate, Direction.HIGHER, 0.9, 2000, 0)  # seeded
    assert paired_bootstrap_bound(full, candidate, Direction.HIGHER, 0.5, 2000, 0) > bound  # less confident


def test_perplexity_bounds_lie_above_the_score():
    rng = np.random.default_rng(1)
    tokens = rng.integers(20, 60, size=30).astype(np.float64)
    full = ExampleScores(tokens * 3.0, tokens, exponent=True)
    candidate = ExampleScores(tokens * 3.0 + rng.normal(0.5, 2.0, size=30), tokens, exponent=True)
    bound = paired_bootstrap_bound(full, candidate, Direction.LOWER, 0.9, 1000, 0)
    assert candidate.score() < bound and full.score() == pytest.approx(np.exp(3.0))


def test_paired_resamples_need_the_same_examples():
    with pytest.raises(ValueError, match="same examples"):
        paired_bootstrap_bound(accuracy([1, 0]), accuracy([1, 0, 1]), Direction.HIGHER, 0.9, 100, 0)


def test_every_scorer_s_examples_add_up_to_its_score():
    from types import SimpleNamespace

    # Perplexity: two batches of right-padded rows.
    scorer = Perplexity()
    collected = []
    for seed in (0, 1):
        generator = torch.Generator().manual_seed(seed)
        logits = torch.randn(3, 6, 11, generator=generator)
        mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 2 + [0] * 4])
        batch = {"input_ids": torch.randint(0, 11, (3, 6), generator=generator), "attention_mask": mask}
        collected.append(scorer.collect(SimpleNamespace(logits=logits), batch))
    assert scorer.examples(collected).score() == pytest.approx(scorer.score(collected), rel=1e-6)  # float32 sums
    assert len(scorer.examples(collected).values) == 6

    probe = ProbeClassification(LinearProbe(np.eye(2, dtype=np.float32), np.zeros(2, dtype=np.float32)))
    probe_collected = [(np.array([0, 1, 1]), np.array([0, 0, 1])), (np.array([1]), np.array([1]))]
    assert probe.examples(probe_collected).score() == probe.score(probe_collected) == 0.75

    choice = MultipleChoice()
    choice_collected = [(np.array([0, 0, 1, 1]), np.array([0, 1, 0, 1]), np.array([-1.0, -2.0, -3.0, -0.5]),
                         np.array([0, 0, 0, 0]))]
    assert choice.examples(choice_collected).score() == choice.score(choice_collected) == 0.5

    contains = Contains(tokenizer=None, max_new_tokens=4)
    answer_collected = [np.array([1.0, 0.0, 1.0]), np.array([1.0])]
    assert contains.examples(answer_collected).score() == contains.score(answer_collected) == 0.75


class Bounded:
    """Scores per layer set, with a bound below each score by the layer set's 'noise'."""

    def __init__(self, costs, noise):
        self.costs, self.noise = costs, noise

    def __call__(self, layers):
        score = 1.0 - sum(self.costs[i] for i in layers)
        return CandidateScores({"task": score}, {"task": score - sum(self.noise[i] for i in layers)})

    def rebase(self, layers):
        pass


GUARD = [TargetGuard("task", Direction.HIGHER, 0.05)]


def test_the_search_judges_candidates_by_their_bounds():
    # Layer 1 costs nothing but is noisy: its bound (0.93) misses P_min = 0.95.
    evaluator = Bounded([0.01, 0.0, 0.02], [0.0, 0.07, 0.0])
    point = greedy_replace(3, evaluator, SearchSpec(acceptance="point"), GUARD)
    bootstrap = greedy_replace(3, evaluator, SearchSpec(), GUARD)  # the default rule
    assert point.selection.m_opt == (0, 1, 2)
    assert bootstrap.selection.m_opt == (0, 2) and bootstrap.trajectory[0].added_layer == 0
    assert bootstrap.evaluations[1].bounds == {"task": pytest.approx(0.99)}
    # Recorded bounds replay: read_off under another tolerance, and through JSON.
    restored = SearchResult.from_json(json.loads(json.dumps(bootstrap.to_json(), sort_keys=True)))
    assert restored == bootstrap and read_off(restored, 0.03).m_opt == (0, 2)
    with pytest.raises(ValueError, match="never scored"):  # looser: layer 1 first, a path not taken
        read_off(restored, 0.2)


def test_targets_without_bounds_are_judged_by_their_score():
    """A target whose evaluator gives no bound (a corpus-level lm-eval metric) is judged by its
    score beside the bounded ones; an evaluator with no bounds at all is the point rule."""
    bounded = Bounded([0.01, 0.0, 0.02], [0.0, 0.07, 0.0])
    corpus_costs = [0.0, 0.0, 0.1]  # layer 2 breaks the unbounded target

    def evaluator(layers):
        task = bounded(layers)
        return CandidateScores({**task.scores, "corpus": 1.0 - sum(corpus_costs[i] for i in layers)}, task.bounds)

    evaluator.rebase = lambda layers: None
    guards = [*GUARD, TargetGuard("corpus", Direction.HIGHER, 0.05)]
    result = greedy_replace(3, evaluator, SearchSpec(), guards)
    assert result.selection.m_opt == (0,)  # 1: the task's bound misses; 2: the corpus score misses
    assert all(set(e.bounds) == {"task"} for e in result.evaluations)
    assert "task 0.92 (P_min 0.95)" in result.stopped_because  # {0, 1} violates least
    assert greedy_replace(3, evaluator, SearchSpec(acceptance="point"), guards).selection.m_opt == (0, 1)
    restored = SearchResult.from_json(json.loads(json.dumps(result.to_json(), sort_keys=True)))
    assert restored == result and restored.selection == result.selection

    def unbounded(layers):
        return {"task": bounded(layers).scores["task"]}

    unbounded.rebase = lambda layers: None
    assert greedy_replace(3, unbounded, SearchSpec(), GUARD).selection.m_opt == (0, 1, 2)


def test_bootstrap_spec_checks():
    with pytest.raises(SpecError, match="SearchSpec.confidence=1.0"):
        SearchSpec(confidence=1.0)

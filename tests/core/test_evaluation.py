"""Prefix reuse: candidates evaluated from cached hidden states score exactly as full recomputation."""

import pytest
import torch
from conftest import tiny_model

from dtr_core.adapters import adapter_for
from dtr_core.direction import Direction
from dtr_core.evaluation import PrefixCachingEvaluator
from dtr_core.linear.build import student_from_teacher
from dtr_core.search import greedy_replace
from dtr_core.specs import SearchSpec, StudentSpec
from dtr_core.targets.tasks import LinearProbe, Perplexity, ProbeClassification, mean_pooled

NUM_LAYERS = 4


class PooledMean:
    """A continuous encoder score (mean of pooled embeddings), so equality is checked to the last bit."""

    direction = Direction.HIGHER

    def collect(self, output, batch):
        return mean_pooled(output, batch["attention_mask"]).sum().item(), batch["input_ids"].shape[0]

    def score(self, collected):
        return sum(c[0] for c in collected) / sum(c[1] for c in collected)


def batches(seed=42):
    rng = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(3):
        ids = torch.randint(4, 100, (4, 12), generator=rng)
        mask = torch.ones_like(ids)
        mask[1, 9:] = 0
        mask[3, 5:] = 0
        out.append({"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1, 2, 0])})
    return out


def build(family, kind="gla"):
    model = tiny_model(family, num_layers=NUM_LAYERS)
    adapter = adapter_for(model)
    students = {i: student_from_teacher(StudentSpec(kind=kind), adapter.read_attention_weights(model, i),
                                        causal=adapter.causal).eval() for i in range(NUM_LAYERS)}
    return model, adapter, students


@pytest.mark.parametrize("kind", ["gla", "gated_deltanet"])
def test_prefix_reuse_gives_identical_scores(family, kind):
    model, adapter, students = build(family, kind)
    scorer = PooledMean() if family == "bert" else Perplexity()
    spec = SearchSpec(tolerance=0.5, run_to_end=True)
    results = {}
    for reuse in (True, False):
        evaluator = PrefixCachingEvaluator(model, adapter, students, batches(), scorer, prefix_reuse=reuse)
        results[reuse] = (greedy_replace(NUM_LAYERS, evaluator, spec, scorer.direction), evaluator)
    with_reuse, without = results[True][0], results[False][0]
    assert [e.linear_layers for e in with_reuse.evaluations] == [e.linear_layers for e in without.evaluations]
    for a, b in zip(with_reuse.evaluations, without.evaluations):
        assert a.score == pytest.approx(b.score, rel=1e-6, abs=1e-7), a.linear_layers
    assert with_reuse.trajectory == without.trajectory
    reuse_eval, plain_eval = results[True][1], results[False][1]
    evaluations = len(with_reuse.evaluations)
    assert plain_eval.layer_forwards == plain_eval.layer_forwards_full == evaluations * NUM_LAYERS
    assert reuse_eval.layer_forwards < reuse_eval.layer_forwards_full
    # The model is left as it was: base attention everywhere.
    assert all(adapter.attention_module(model, i) is not students[i] for i in range(NUM_LAYERS))


class ScriptedPreference(Perplexity):
    """Runs real forwards but scores candidates by a script: later layers are preferred."""

    direction = Direction.HIGHER
    layers: frozenset = frozenset()

    def score(self, collected):
        return float(sum(self.layers))


@pytest.mark.parametrize("prefix_reuse, expected", [(True, 34), (False, 44)], ids=["reuse", "no-reuse"])
def test_forward_count_of_a_full_trajectory(prefix_reuse, expected):
    """L=4 run to the end, layers kept 3, 2, 1, 0: the deterministic count CI can check.

    With reuse: full model 4; round 1: 4+3+2+1; round 2: 4+3+2; round 3: 4+3; round 4: 4 = 34
    (each rebase adopts the states of the round's best candidate, so costs nothing).
    Without: 11 evaluations × 4 layers = 44.
    """
    model, adapter, students = build("llama")
    scorer = ScriptedPreference()
    evaluator = PrefixCachingEvaluator(model, adapter, students, batches(), scorer, prefix_reuse=prefix_reuse)

    class ScriptedEvaluator:
        """Tells the scorer which candidate it scores; rebases the real evaluator."""

        def __call__(self, layers):
            scorer.layers = layers
            return evaluator(layers)

        def rebase(self, layers):
            evaluator.rebase(layers)

    result = greedy_replace(NUM_LAYERS, ScriptedEvaluator(), SearchSpec(tolerance=0.5, run_to_end=True),
                            Direction.HIGHER)
    assert [s.added_layer for s in result.trajectory] == [3, 2, 1, 0]
    assert evaluator.layer_forwards == expected
    assert evaluator.layer_forwards_full == 44


def test_probe_accuracy_scorer_matches_between_modes():
    model, adapter, students = build("bert")
    torch.manual_seed(42)
    probe = LinearProbe(torch.randn(3, 64).numpy(), torch.zeros(3).numpy())
    scores = []
    for reuse in (True, False):
        evaluator = PrefixCachingEvaluator(model, adapter, students, batches(), ProbeClassification(probe),
                                           prefix_reuse=reuse)
        scores.append([evaluator(s) for s in (frozenset(), frozenset({2}), frozenset({2, 3}))])
    assert scores[0] == scores[1]

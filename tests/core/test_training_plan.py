"""The distillation budget: how many tokens the students train on, and what the run warns about."""

import pytest

from dtr_core.training import MANY_PASSES, TrainingPlan, distillation_warnings, plan_training


def test_the_budget_is_the_contract():
    # Data far below the budget: cycled until the budget (less the held-out tokens) is spent.
    plan = plan_training(data_tokens=190_000, holdout_tokens=10_000, budget=1_000_000, epochs=None)
    assert plan.train_tokens == 990_000 and plan.passes == pytest.approx(990_000 / 190_000)
    assert plan.describe() == "190,000 tokens of data, budget 1,000,000, 5.21 passes (990,000 training tokens)"
    # Data up to the budget (they are drawn up to it): one pass, at least.
    assert plan_training(54_000, 6_000, 60_000, None).passes == 1.0
    assert plan_training(54_000, 6_000, 50_000, None).train_tokens == 54_000
    # distill.epochs fixes the passes, whatever the budget.
    fixed = plan_training(190_000, 10_000, 1_000_000, epochs=2)
    assert (fixed.train_tokens, fixed.passes) == (380_000, 2.0)
    with pytest.raises(ValueError, match="no training tokens"):
        plan_training(0, 100, 1000, None)


def record(layer_idx, init, final, data_tokens=100_000, budget=200_000):
    return {"layer_idx": layer_idx, "rel_error_init": init, "rel_error_final": final, "data_tokens": data_tokens,
            "token_budget": budget, "train_tokens": budget}


def test_warnings_name_a_starved_budget_and_students_that_got_worse():
    assert distillation_warnings([record(0, 0.8, 0.2), record(1, 0.9, 0.3)]) == []
    assert distillation_warnings([]) == []
    starved = distillation_warnings([record(0, 0.8, 0.2, data_tokens=30_000, budget=30_000 * int(MANY_PASSES) + 1)])
    assert len(starved) == 1 and "30,000 tokens against a budget of 150,001" in starved[0]
    worse = distillation_warnings([record(0, 0.8, 0.2), record(3, 3.8, 8.2), record(4, 1.4, 1.1)])
    assert worse == [
        "layer 3's student ended worse than it started (held-out relative error 3.800 → 8.200): "
        "it is under-trained or cannot fit this layer",
        "layer 4's student ended no better than predicting the mean (held-out relative error 1.400 → 1.100): "
        "it is under-trained or cannot fit this layer",
    ]
    assert TrainingPlan.of_record(record(0, 1, 1)).passes == 2.0

"""The deterministic half of `make bench-cpu`: layer-forwards saved by prefix reuse per full trajectory."""

import pytest

from bench.cpu import trajectory_forwards


@pytest.mark.parametrize("num_layers", [4, 6, 9])
def test_prefix_reuse_counts_match_closed_forms(num_layers):
    full_model = num_layers  # the first evaluation runs every layer
    without = (num_layers * (num_layers + 1) // 2 + 1) * num_layers
    # Latest-first: a round with k layers left costs sum_{j=L-k+1..L} j; in total sum of j^2.
    late = full_model + sum(j * j for j in range(1, num_layers + 1))
    # Earliest-first: a round with m candidates costs 1+2+...+m.
    early = full_model + sum(m * (m + 1) // 2 for m in range(1, num_layers + 1))
    assert trajectory_forwards(num_layers, "late") == (late, without)
    assert trajectory_forwards(num_layers, "early") == (early, without)

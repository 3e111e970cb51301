"""Accepting a candidate under the validation split's noise: a paired bootstrap bound.

A greedy search scores hundreds of candidates on one validation split and keeps those that pass:
with a small split it keeps the ones that were lucky on it, and the kept hybrid then falls short on
test (issue 13 measured pass-key recall at 0.95 on 40 validation examples and 0.75 on test). With
``SearchSpec.acceptance="bootstrap"`` a candidate is acceptable only when a pessimistic bound of its
score meets P_min: the full model's score plus the ``confidence`` quantile, on the losing side, of
the candidate's change against the full model over bootstrap resamples of the validation examples
(paired: each resample takes the same examples for both, so what both get right or wrong alike
cancels). The bound depends on the scores only, never on a tolerance, so a recorded search can still
be read off at any tolerance.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .direction import Direction


@dataclass(frozen=True)
class ExampleScores:
    """A split's score, example by example: score = Σ values / Σ weights (accuracy-like: weights 1),
    or exp of it when ``exponent`` (perplexity: values are summed negative log-likelihoods, weights
    token counts)."""

    values: np.ndarray
    weights: np.ndarray
    exponent: bool = False

    def score(self, rows: np.ndarray | None = None) -> np.ndarray | float:
        """The score of the whole split, or of each resample when ``rows`` is ``[resamples, examples]``."""
        if rows is None:
            mean = self.values.sum() / max(self.weights.sum(), 1e-12)
        else:
            mean = self.values[rows].sum(-1) / np.maximum(self.weights[rows].sum(-1), 1e-12)
        return np.exp(mean) if self.exponent else mean

    def to_json(self) -> dict:
        return {"values": self.values.tolist(), "weights": self.weights.tolist(), "exponent": self.exponent}

    @classmethod
    def from_json(cls, data: dict) -> ExampleScores:
        return cls(np.asarray(data["values"], dtype=np.float64), np.asarray(data["weights"], dtype=np.float64),
                   bool(data["exponent"]))


def paired_bootstrap_bound(full: ExampleScores, candidate: ExampleScores, direction: Direction, confidence: float,
                           samples: int, seed: int) -> float:
    """The candidate's pessimistic score: the full model's score plus the ``confidence`` quantile of
    the candidate's change on the losing side (down for higher-is-better, up for lower-is-better)."""
    count = len(full.values)
    if len(candidate.values) != count:
        raise ValueError(f"paired bootstrap needs the same examples: {count} for the full model, "
                         f"{len(candidate.values)} for the candidate")
    rows = np.random.default_rng(seed).integers(0, count, size=(samples, count))
    change = candidate.score(rows) - full.score(rows)
    losing_side = 1.0 - confidence if direction is Direction.HIGHER else confidence
    return float(full.score() + np.quantile(change, losing_side))

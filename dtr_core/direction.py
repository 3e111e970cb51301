"""Which way a metric improves: the one notion the scorers, the evaluators and the search share."""

from __future__ import annotations

from enum import Enum


class Direction(str, Enum):
    """``HIGHER`` for accuracy-like metrics, ``LOWER`` for perplexity-like ones.

    A ``str`` enum, so it serialises to JSON as ``"higher"`` / ``"lower"``.
    """

    HIGHER = "higher"
    LOWER = "lower"

    @property
    def higher_is_better(self) -> bool:
        return self is Direction.HIGHER

    @property
    def phrase(self) -> str:
        return f"{self.value} is better"

    def better(self, a: float, b: float) -> bool:
        """``a`` strictly better than ``b``."""
        return a > b if self is Direction.HIGHER else a < b

    def meets(self, score: float, threshold: float) -> bool:
        """``score`` at least as good as ``threshold``."""
        return score >= threshold if self is Direction.HIGHER else score <= threshold

    def best(self, scores) -> float:
        return max(scores) if self is Direction.HIGHER else min(scores)

    def worst_acceptable(self, reference: float, tolerance: float, mode: str) -> float:
        """P_min: the worst score within ``tolerance`` of ``reference`` (``mode`` relative or absolute)."""
        if mode == "relative":
            margin = abs(reference) * tolerance
        elif mode == "absolute":
            margin = tolerance
        else:
            raise ValueError(f"tolerance_mode={mode!r}: must be 'relative' or 'absolute'")
        return reference - margin if self is Direction.HIGHER else reference + margin

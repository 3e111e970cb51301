"""Greedy layer replacement (Algorithm 1 of arXiv 2601.11667), with the evaluator injected.

Start from the full model. Each round, score every remaining full-attention layer swapped for its
student (on top of the swaps kept so far), keep the best swap if its score meets P_min, repeat.
Which swap is best in a round never depends on the tolerance — only where the search stops does —
so one trajectory recorded with ``run_to_end`` answers every tolerance (``read_off``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Protocol, runtime_checkable

from .direction import Direction
from .specs import SearchSpec


@runtime_checkable
class Evaluator(Protocol):
    """Scores candidate hybrids for the search: ``evaluator(linear_layers) -> validation score``."""

    def __call__(self, linear_layers: frozenset[int]) -> float:
        """The validation score of the model with ``linear_layers`` replaced by their students."""

    def rebase(self, linear_layers: frozenset[int]) -> None:
        """The search kept ``linear_layers``: later candidates extend it (an evaluator that caches
        the current hybrid's hidden states moves them; others do nothing)."""


@runtime_checkable
class RoundEvaluator(Evaluator, Protocol):
    """An evaluator that takes a whole round's candidates at once (e.g. to score them in parallel)."""

    def evaluate_round(self, layer_sets: Sequence[frozenset[int]]) -> list[tuple[float, float]]:
        """(score, seconds) per candidate, in order."""


@dataclass(frozen=True)
class Evaluation:
    round: int  # 0 = the full model
    linear_layers: tuple[int, ...]
    score: float
    seconds: float


@dataclass(frozen=True)
class Step:
    """The swap kept in one round of the trajectory."""

    round: int
    added_layer: int
    linear_layers: tuple[int, ...]
    score: float
    meets_p_min: bool


@dataclass(frozen=True)
class Selection:
    """What the search returns for one tolerance."""

    tolerance: float
    tolerance_mode: str
    p_min: float
    m_opt: tuple[int, ...]  # most linear layers on the trajectory before P_min is first missed
    m_opt_score: float
    m_best: tuple[int, ...]  # best-scoring hybrid among the evaluations made until then
    m_best_score: float
    evaluations_used: int


@dataclass(frozen=True)
class SearchResult:
    num_layers: int
    candidates: tuple[int, ...]
    direction: Direction
    tolerance: float
    tolerance_mode: str
    full_score: float
    evaluations: tuple[Evaluation, ...]
    trajectory: tuple[Step, ...]
    stopped_because: str

    @property
    def selection(self) -> Selection:
        """M_opt and M_best for the tolerance the search ran with."""
        return read_off(self, self.tolerance, self.tolerance_mode)

    def to_json(self) -> dict:
        return {**asdict(self), "selection": asdict(self.selection)}

    @classmethod
    def from_json(cls, data: dict) -> SearchResult:
        """The inverse of ``to_json`` (the selection is derived again, not read)."""
        fields = {k: v for k, v in data.items() if k != "selection"}
        return cls(**{
            **fields,
            "candidates": tuple(fields["candidates"]),
            "direction": Direction(fields["direction"]),
            "evaluations": tuple(Evaluation(**{**e, "linear_layers": tuple(e["linear_layers"])})
                                 for e in fields["evaluations"]),
            "trajectory": tuple(Step(**{**s, "linear_layers": tuple(s["linear_layers"])})
                                for s in fields["trajectory"]),
        })


def greedy_replace(num_layers: int, evaluator: Evaluator, spec: SearchSpec, direction: Direction,
                   clock: Callable[[], float] = time.perf_counter) -> SearchResult:
    """Run the greedy search; ``evaluator`` is called once per candidate (see ``Evaluator``).

    ``evaluator.rebase`` is called each time a swap is kept. A ``RoundEvaluator`` gets each round's
    candidates (independent of each other) together. Ties within a round go to the lowest layer
    index (deterministic).
    """
    candidates = sorted(range(num_layers) if spec.candidate_layers is None else spec.candidate_layers)
    if any(i >= num_layers for i in candidates):
        raise ValueError(f"candidate_layers {candidates} include layers outside 0..{num_layers - 1}")
    evaluations: list[Evaluation] = []

    def timed(layers: frozenset[int]) -> tuple[float, float]:
        started = clock()
        score = evaluator(layers)
        return score, clock() - started

    def score_round(round_: int, layer_sets: list[frozenset[int]]) -> list[float]:
        if isinstance(evaluator, RoundEvaluator):
            results = evaluator.evaluate_round(layer_sets)
        else:
            results = [timed(s) for s in layer_sets]
        for layers, (score, seconds) in zip(layer_sets, results, strict=True):
            evaluations.append(Evaluation(round_, tuple(sorted(layers)), float(score), seconds))
        return [float(score) for score, _ in results]

    (full_score,) = score_round(0, [frozenset()])
    p_min = direction.worst_acceptable(full_score, spec.tolerance, spec.tolerance_mode)
    kept: frozenset[int] = frozenset()
    trajectory: list[Step] = []
    stopped_because = "every candidate layer is linear"
    for round_ in range(1, len(candidates) + 1):
        remaining = [layer_idx for layer_idx in candidates if layer_idx not in kept]
        scores = score_round(round_, [kept | {layer_idx} for layer_idx in remaining])
        best_layer, best_score = None, None
        for layer_idx, score in zip(remaining, scores):
            if best_score is None or direction.better(score, best_score):
                best_layer, best_score = layer_idx, score
        meets = direction.meets(best_score, p_min)
        if not meets and not spec.run_to_end:
            stopped_because = f"round {round_}: best candidate scored {best_score:.6g}, below P_min {p_min:.6g}"
            break
        kept = kept | {best_layer}
        trajectory.append(Step(round_, best_layer, tuple(sorted(kept)), best_score, meets))
        if round_ < len(candidates):
            evaluator.rebase(kept)

    return SearchResult(
        num_layers=num_layers, candidates=tuple(candidates), direction=direction,
        tolerance=spec.tolerance, tolerance_mode=spec.tolerance_mode, full_score=full_score,
        evaluations=tuple(evaluations), trajectory=tuple(trajectory), stopped_because=stopped_because,
    )


def read_off(result: SearchResult, tolerance: float, tolerance_mode: str = "relative") -> Selection:
    """What Algorithm 1 returns for this tolerance, from a recorded trajectory, without re-running.

    Exact when the recorded run went at least as far as this tolerance would have (always true for
    a ``run_to_end`` trajectory; otherwise a looser tolerance than the run's raises).
    """
    direction = result.direction
    p_min = direction.worst_acceptable(result.full_score, tolerance, tolerance_mode)
    accepted = []
    stop_round = None
    for step in result.trajectory:
        if not direction.meets(step.score, p_min):
            stop_round = step.round
            break
        accepted.append(step)
    if stop_round is None and len(result.trajectory) < len(result.candidates):
        # The recorded run stopped early: only safe if this tolerance also fails its next round.
        next_round = len(result.trajectory) + 1
        round_scores = [e.score for e in result.evaluations if e.round == next_round]
        if not round_scores:
            raise ValueError("the recorded search stopped before this tolerance would; rerun with run_to_end")
        if direction.meets(direction.best(round_scores), p_min):
            raise ValueError(
                f"tolerance {tolerance} would continue past where the recorded search stopped; "
                "rerun the search with run_to_end=True"
            )
        stop_round = next_round
    last_round = stop_round if stop_round is not None else len(result.trajectory)
    used = [e for e in result.evaluations if e.round <= last_round]
    m_opt = accepted[-1].linear_layers if accepted else ()
    m_opt_score = accepted[-1].score if accepted else result.full_score
    hybrids = [e for e in used if e.linear_layers]
    m_best, m_best_score = (), result.full_score
    for e in hybrids:
        # Ties toward more replacements.
        if (m_best == () or direction.better(e.score, m_best_score)
                or (e.score == m_best_score and len(e.linear_layers) > len(m_best))):
            m_best, m_best_score = e.linear_layers, e.score
    return Selection(
        tolerance=tolerance, tolerance_mode=tolerance_mode, p_min=p_min, m_opt=m_opt, m_opt_score=m_opt_score,
        m_best=m_best, m_best_score=m_best_score, evaluations_used=len(used),
    )


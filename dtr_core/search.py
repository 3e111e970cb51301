"""Greedy layer replacement (Algorithm 1 of arXiv 2601.11667) over one or more targets, with the
evaluator injected.

Start from the full model. Each round, score every remaining full-attention layer swapped for its
student (on top of the swaps kept so far) on every target, keep one swap, repeat.

Several targets (``TargetGuard``): the first is the *primary* target, the others guard it. Each
target has a threshold P_min from its own tolerance around the full model's validation score.

- A candidate is **acceptable** when every target meets its P_min (with ``acceptance="bootstrap"``,
  when every target's pessimistic bound does: ``acceptance.py``; a target the evaluator gives no
  bound for, e.g. a corpus-level lm-eval metric, is judged by its score).
- The kept swap is the acceptable candidate with the best primary score. When no candidate is
  acceptable the search stops there (with ``run_to_end`` it keeps going with the candidate that
  violates least: the largest smallest *relative slack* ``±(score − P_min) / |full score|``).
  Ties go to the lowest layer index.
- **M_opt**: the hybrid kept by the last round in which a candidate was acceptable.
- **M_best**: among the hybrids evaluated until the search stopped, the best primary score with
  every guard (every target but the primary) held; ties toward more linear layers.

With one target this is the paper's search: the best swap each round, whatever the tolerance.
With guards the path depends on their tolerances, so ``read_off`` replays the recorded scores
under other tolerances and says when the replay needs a candidate the run never scored.

**Kinds of student** (``kinds``, when every layer has students of several kinds): a swap is a layer
*and* the kind of student put there, so each round scores every remaining layer with each kind, and
the rule above chooses among all of them (ties to the lowest layer, then the first kind). A kept
layer keeps its kind; a hybrid is named by its layers and, in the same order, their kinds.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Protocol, runtime_checkable

from .direction import Direction
from .specs import SearchSpec

# The one target's name when ``greedy_replace`` is given a single float-scoring evaluator.
SINGLE_TARGET = "score"


@runtime_checkable
class Evaluator(Protocol):
    """Scores candidate hybrids: ``evaluator(linear_layers) -> {target name: validation score}``
    (a plain float for a single-target search, see ``greedy_replace``). Only a search over several
    kinds of student passes ``kinds`` (layer → kind, for every linear layer)."""

    def __call__(self, linear_layers: frozenset[int], kinds: Mapping[int, str] | None = None
                 ) -> Mapping[str, float] | float:
        """The validation score(s) of the model with ``linear_layers`` replaced by their students."""

    def rebase(self, linear_layers: frozenset[int], kinds: Mapping[int, str] | None = None) -> None:
        """The search kept ``linear_layers``: later candidates extend it (an evaluator that caches
        the current hybrid's hidden states moves them; others do nothing)."""


@runtime_checkable
class RoundEvaluator(Evaluator, Protocol):
    """An evaluator that takes a whole round's candidates at once (e.g. to score them in parallel)."""

    def evaluate_round(self, layer_sets: Sequence[frozenset[int]], kinds: Sequence[Mapping[int, str]] | None = None
                       ) -> list[tuple[Mapping[str, float] | float, float]]:
        """(score(s), seconds) per candidate, in order (with several kinds, ``kinds``: one
        layer → kind mapping per candidate)."""


@dataclass(frozen=True)
class CandidateScores:
    """What an evaluator may return for a candidate: each target's score and, for the bootstrap
    acceptance rule, the pessimistic bound (``acceptance.paired_bootstrap_bound``) of each target
    that has one (targets without per-example scores have none and are judged by their score)."""

    scores: Mapping[str, float]
    bounds: Mapping[str, float] | None = None


@dataclass(frozen=True)
class TargetGuard:
    """One target as the search sees it: its name, which way it improves and how far it may fall."""

    name: str
    direction: Direction
    tolerance: float
    tolerance_mode: str = "relative"

    def p_min(self, full_score: float) -> float:
        return self.direction.worst_acceptable(full_score, self.tolerance, self.tolerance_mode)

    @classmethod
    def from_json(cls, data: Mapping) -> TargetGuard:
        return cls(**{**data, "direction": Direction(data["direction"])})


def _primary(scores: Mapping[str, float]) -> float:
    return next(iter(scores.values()))


def hybrid_key(linear_layers: Sequence[int], kinds: Sequence[str] | None = None) -> frozenset:
    """What names a hybrid: its (layer, kind) pairs; the kind is None when the run had one kind."""
    return frozenset(zip(linear_layers, kinds if kinds is not None else [None] * len(linear_layers)))


def kinds_in_order(layers: Iterable[int], kinds: Mapping[int, str | None] | None) -> tuple[str, ...] | None:
    """The kinds of ``layers`` in layer order, as records name them (None when ``kinds`` is)."""
    return None if kinds is None else tuple(kinds[layer] for layer in sorted(layers))


def hybrid_name(layers: Sequence[int], kinds: Sequence[str] | None) -> str:
    """A hybrid as logs and messages write it: its layers, each with its kind when the run had several."""
    if kinds is None:
        return str(list(layers))
    return "[" + ", ".join(f"{layer} {kind}" for layer, kind in zip(layers, kinds)) + "]"


@dataclass(frozen=True)
class Evaluation:
    round: int  # 0 = the full model
    linear_layers: tuple[int, ...]
    scores: dict[str, float]  # per target, the primary first
    seconds: float
    bounds: dict[str, float] | None = None  # pessimistic scores of the targets that have them (bootstrap)
    kinds: tuple[str, ...] | None = None  # each linear layer's kind of student (None: the run had one)

    @property
    def score(self) -> float:
        """The primary target's score."""
        return _primary(self.scores)

    @property
    def hybrid(self) -> frozenset:
        return hybrid_key(self.linear_layers, self.kinds)


@dataclass(frozen=True)
class Step:
    """The swap kept in one round of the trajectory."""

    round: int
    added_layer: int
    linear_layers: tuple[int, ...]
    scores: dict[str, float]
    meets_p_min: bool  # every target met its P_min
    kinds: tuple[str, ...] | None = None  # as in Evaluation

    @property
    def score(self) -> float:
        return _primary(self.scores)


@dataclass(frozen=True)
class Selection:
    """What the search returns for one set of tolerances."""

    tolerances: dict[str, tuple[float, str] | None]  # per target, the primary first; None: not guarded
    thresholds: dict[str, float]  # P_min per guarded target
    m_opt: tuple[int, ...]  # most linear layers kept before a round found no acceptable candidate
    m_opt_scores: dict[str, float]
    m_best: tuple[int, ...]  # best primary score among evaluated hybrids with every guard held
    m_best_scores: dict[str, float]
    evaluations_used: int
    m_opt_kinds: tuple[str, ...] | None = None  # each M_opt layer's kind of student (None: one kind)
    m_best_kinds: tuple[str, ...] | None = None

    @property
    def primary(self) -> str:
        return next(iter(self.tolerances))

    @property
    def m_opt_score(self) -> float:
        return self.m_opt_scores[self.primary]

    @property
    def m_best_score(self) -> float:
        return self.m_best_scores[self.primary]

    @property
    def p_min(self) -> float | None:
        """The primary target's P_min (None when it does not guard)."""
        return self.thresholds.get(self.primary)


@dataclass(frozen=True)
class SearchResult:
    num_layers: int
    candidates: tuple[int, ...]
    targets: tuple[TargetGuard, ...]  # the primary first
    full_scores: dict[str, float]
    evaluations: tuple[Evaluation, ...]
    trajectory: tuple[Step, ...]
    stopped_because: str
    run_to_end: bool = field(default=False)
    acceptance: str = "point"  # what acceptance judges: the scores, or their bounds ("bootstrap")
    confidence: float | None = None  # the bootstrap bound's confidence (None under "point")
    kinds: tuple[str, ...] | None = None  # the kinds of student each layer could take (None: one)

    @property
    def full_score(self) -> float:
        return _primary(self.full_scores)

    @property
    def direction(self) -> Direction:
        """The primary target's direction."""
        return self.targets[0].direction

    @property
    def selection(self) -> Selection:
        """M_opt and M_best for the tolerances the search ran with."""
        return read_off(self)

    def to_json(self) -> dict:
        return {**asdict(self), "selection": asdict(self.selection)}

    @classmethod
    def from_json(cls, data: dict) -> SearchResult:
        """The inverse of ``to_json`` (the selection is derived again, not read)."""
        fields = {k: v for k, v in data.items() if k != "selection"}
        targets = tuple(TargetGuard.from_json(t) for t in fields["targets"])

        def in_order(scores: Mapping[str, float]) -> dict[str, float]:
            # JSON written with sorted keys loses the order: the primary target comes first again.
            return {t.name: scores[t.name] for t in targets if t.name in scores}

        def kinds_of(entry: Mapping) -> tuple[str, ...] | None:
            return None if entry.get("kinds") is None else tuple(entry["kinds"])

        return cls(**{
            **fields,
            "kinds": kinds_of(fields),
            "candidates": tuple(fields["candidates"]),
            "targets": targets,
            "full_scores": in_order(fields["full_scores"]),
            "evaluations": tuple(Evaluation(**{
                **e, "linear_layers": tuple(e["linear_layers"]), "scores": in_order(e["scores"]),
                "bounds": in_order(e["bounds"]) if e.get("bounds") is not None else None, "kinds": kinds_of(e)})
                for e in fields["evaluations"]),
            "trajectory": tuple(Step(**{**s, "linear_layers": tuple(s["linear_layers"]), "scores": in_order(s["scores"]),
                                        "kinds": kinds_of(s)})
                                for s in fields["trajectory"]),
        })


# --- the rule: shared by the search and by read_off's replay -------------------------------------

def _thresholds(targets: Sequence[TargetGuard], full_scores: Mapping[str, float]) -> dict[str, float]:
    return {t.name: t.p_min(full_scores[t.name]) for t in targets}


def _acceptable(targets: Sequence[TargetGuard], p_min: Mapping[str, float], scores: Mapping[str, float]) -> bool:
    return all(t.direction.meets(scores[t.name], p_min[t.name]) for t in targets)


def _least_violation(targets: Sequence[TargetGuard], p_min: Mapping[str, float], full_scores: Mapping[str, float],
                     scores: Mapping[str, float]) -> float:
    """The smallest relative slack over the guarded targets (negative: outside its tolerance)."""
    slacks = []
    for t in targets:
        sign = 1.0 if t.direction.higher_is_better else -1.0
        slacks.append(sign * (scores[t.name] - p_min[t.name]) / max(abs(full_scores[t.name]), 1e-12))
    return min(slacks, default=0.0)


def _choose(primary: TargetGuard, guarded: Sequence[TargetGuard], p_min: Mapping[str, float],
            full_scores: Mapping[str, float], round_scores: Sequence[tuple[int, Mapping[str, float], Mapping[str, float]]]
            ) -> tuple[int, Mapping[str, float], bool]:
    """The swap a round keeps: (layer, its scores, acceptable). ``round_scores``: (layer, scores,
    what acceptance judges: the scores or their bounds), in layer order."""
    acceptable = [(layer, s) for layer, s, judged in round_scores if _acceptable(guarded, p_min, judged)]
    best = None
    if acceptable:
        for layer, scores in acceptable:
            if best is None or primary.direction.better(scores[primary.name], best[1][primary.name]):
                best = (layer, scores)
        return best[0], best[1], True
    for layer, scores, judged in round_scores:
        slack = _least_violation(guarded, p_min, full_scores, judged)
        if best is None or slack > best[2]:
            best = (layer, scores, slack)
    return best[0], best[1], False


def _judged(evaluation: Evaluation | CandidateScores, acceptance: str) -> Mapping[str, float]:
    """What acceptance looks at: the scores, or under "bootstrap" each target's pessimistic bound
    (its score where the evaluator gave no bound)."""
    if acceptance == "point" or evaluation.bounds is None:
        return evaluation.scores
    return {**evaluation.scores, **evaluation.bounds}


# --- the search ----------------------------------------------------------------------------------

class _NamedScore:
    """A float-scoring evaluator seen as one named target's."""

    def __init__(self, evaluator: Evaluator, name: str) -> None:
        self.evaluator, self.name = evaluator, name

    # *kinds: passed on only when the search passes them (a search over several kinds of student).
    def __call__(self, linear_layers: frozenset[int], *kinds) -> dict[str, float]:
        return {self.name: self.evaluator(linear_layers, *kinds)}

    def rebase(self, linear_layers: frozenset[int], *kinds) -> None:
        self.evaluator.rebase(linear_layers, *kinds)


class _NamedRoundScores(_NamedScore):
    def evaluate_round(self, layer_sets, *kinds):
        return [({self.name: score}, seconds) for score, seconds in self.evaluator.evaluate_round(layer_sets, *kinds)]


def greedy_replace(num_layers: int, evaluator: Evaluator, spec: SearchSpec,
                   targets: Direction | Sequence[TargetGuard],
                   clock: Callable[[], float] = time.perf_counter,
                   kinds: Sequence[str] | None = None) -> SearchResult:
    """Run the greedy search; ``evaluator`` is called once per candidate (see ``Evaluator``).

    ``targets``: the ``TargetGuard`` of every target, the primary first (the evaluator returns a
    score per target name); or one ``Direction`` for a single target guarded by ``spec``'s
    tolerance, whose evaluator returns a float. ``evaluator.rebase`` is called each time a swap is
    kept. A ``RoundEvaluator`` gets each round's candidates (independent of each other) together.
    ``kinds``: the kinds of student every layer has, when several (each round then scores every
    remaining layer with each kind).
    """
    if isinstance(targets, Direction):
        named = _NamedRoundScores if isinstance(evaluator, RoundEvaluator) else _NamedScore
        evaluator = named(evaluator, SINGLE_TARGET)
        targets = (TargetGuard(SINGLE_TARGET, targets, spec.tolerance, spec.tolerance_mode),)
    targets = tuple(targets)
    if not targets:
        raise ValueError("greedy_replace needs at least one target")
    kinds = tuple(kinds) if kinds is not None and len(kinds) > 1 else None
    candidates = sorted(range(num_layers) if spec.candidate_layers is None else spec.candidate_layers)
    if any(i >= num_layers for i in candidates):
        raise ValueError(f"candidate_layers {candidates} include layers outside 0..{num_layers - 1}")
    names = [t.name for t in targets]
    evaluations: list[Evaluation] = []

    def in_order(scores: Mapping[str, float]) -> dict[str, float]:
        missing = [n for n in names if n not in scores]
        if missing:
            raise ValueError(f"the evaluator returned no score for target(s) {missing}")
        return {n: float(scores[n]) for n in names}

    def evaluation(round_: int, hybrid: Mapping[int, str | None], returned, seconds: float) -> Evaluation:
        returned = returned if isinstance(returned, CandidateScores) else CandidateScores(returned)
        bounds = None if returned.bounds is None else {n: float(returned.bounds[n]) for n in names
                                                       if n in returned.bounds}
        layers = tuple(sorted(hybrid))
        return Evaluation(round_, layers, in_order(returned.scores), seconds, bounds,
                          kinds_in_order(layers, hybrid if kinds else None))

    def timed(hybrid: Mapping[int, str | None]) -> tuple[Mapping[str, float], float]:
        started = clock()
        scores = evaluator(frozenset(hybrid), dict(hybrid)) if kinds else evaluator(frozenset(hybrid))
        return scores, clock() - started

    def score_round(round_: int, hybrids: list[dict[int, str | None]]) -> list[Evaluation]:
        if isinstance(evaluator, RoundEvaluator):
            layer_sets = [frozenset(hybrid) for hybrid in hybrids]
            results = (evaluator.evaluate_round(layer_sets, hybrids) if kinds
                       else evaluator.evaluate_round(layer_sets))
        else:
            results = [timed(hybrid) for hybrid in hybrids]
        scored = [evaluation(round_, hybrid, returned, seconds)
                  for hybrid, (returned, seconds) in zip(hybrids, results, strict=True)]
        evaluations.extend(scored)
        return scored

    (full,) = score_round(0, [{}])
    full_scores = full.scores
    p_min = _thresholds(targets, full_scores)
    kept: dict[int, str | None] = {}  # layer → its student's kind
    trajectory: list[Step] = []
    stopped_because = "every candidate layer is linear"
    for round_ in range(1, len(candidates) + 1):
        options = [(layer_idx, kind) for layer_idx in candidates if layer_idx not in kept for kind in kinds or [None]]
        scored = score_round(round_, [{**kept, layer_idx: kind} for layer_idx, kind in options])
        option, chosen, acceptable = _choose(targets[0], targets, p_min, full_scores, [
            (option, e.scores, _judged(e, spec.acceptance)) for option, e in zip(options, scored)])
        if not acceptable and not spec.run_to_end:
            judged = _judged(scored[options.index(option)], spec.acceptance)
            stopped_because = f"round {round_}: {_why_unacceptable(targets, p_min, full_scores, judged)}"
            break
        layer, kind = option
        kept[layer] = kind
        layers = tuple(sorted(kept))
        trajectory.append(Step(round_, layer, layers, chosen, acceptable, kinds_in_order(layers, kept if kinds else None)))
        if round_ < len(candidates):
            if kinds:
                evaluator.rebase(frozenset(kept), dict(kept))
            else:
                evaluator.rebase(frozenset(kept))

    return SearchResult(
        num_layers=num_layers, candidates=tuple(candidates), targets=targets, full_scores=full_scores,
        evaluations=tuple(evaluations), trajectory=tuple(trajectory), stopped_because=stopped_because,
        run_to_end=spec.run_to_end, acceptance=spec.acceptance,
        confidence=spec.confidence if spec.acceptance == "bootstrap" else None, kinds=kinds,
    )


def _why_unacceptable(targets: Sequence[TargetGuard], p_min: Mapping[str, float], full_scores: Mapping[str, float],
                      scores: Mapping[str, float]) -> str:
    missed = [f"{t.name} {scores[t.name]:.6g} (P_min {p_min[t.name]:.6g})" for t in targets
              if not t.direction.meets(scores[t.name], p_min[t.name])]
    return "the best candidate misses P_min: " + ", ".join(missed)


# --- reading a recorded search under other tolerances ------------------------------------------

def read_off(result: SearchResult, tolerances: Mapping[str, tuple[float, str] | float | None] | None = None
             ) -> Selection:
    """What the search returns under ``tolerances``, replayed from the recorded scores.

    ``tolerances`` maps target names to ``(tolerance, mode)`` (a bare number keeps the target's
    mode) or to None (the target does not guard); targets not named keep the run's. A float alone
    is the primary target's tolerance. Exact whenever every candidate the replay needs was scored
    by the recorded run (always, for one target and a ``run_to_end`` run); otherwise it raises and
    names the candidate, since those tolerances lead where the run never went.
    """
    primary = result.targets[0]
    if tolerances is None:
        tolerances = {}
    elif not isinstance(tolerances, Mapping):
        tolerances = {primary.name: tolerances}
    unknown = sorted(set(tolerances) - {t.name for t in result.targets})
    if unknown:
        raise ValueError(f"read_off: unknown target(s) {unknown}; the run's are {[t.name for t in result.targets]}")

    guarded: list[TargetGuard] = []
    chosen_tolerances: dict[str, tuple[float, str] | None] = {}
    for t in result.targets:
        value = tolerances.get(t.name, (t.tolerance, t.tolerance_mode))
        if value is None:
            chosen_tolerances[t.name] = None
            continue
        tolerance, mode = value if isinstance(value, tuple) else (value, t.tolerance_mode)
        guarded.append(TargetGuard(t.name, t.direction, float(tolerance), mode))
        chosen_tolerances[t.name] = (float(tolerance), mode)

    scored = {e.hybrid: e for e in result.evaluations}
    full_scores = result.full_scores
    p_min = _thresholds(guarded, full_scores)
    kept: dict[int, str | None] = {}
    m_opt, m_opt_scores = {}, dict(full_scores)
    used: list[tuple[dict[int, str | None], Mapping[str, float], Mapping[str, float]]] = [
        ({}, full_scores, full_scores)]
    while len(kept) < len(result.candidates):
        round_scores = []
        for layer in result.candidates:
            for kind in (() if layer in kept else result.kinds or [None]):
                hybrid = {**kept, layer: kind}
                e = scored.get(hybrid_key(list(hybrid), list(hybrid.values())))
                if e is None:
                    raise ValueError(
                        f"these tolerances lead the search to {_hybrid_name(hybrid, result.kinds)}, which the "
                        "recorded run never scored; rerun the search with them (run_to_end=True records more; "
                        "scores already made are cached)")
                round_scores.append(((layer, kind), e.scores, _judged(e, result.acceptance)))
        used += [({**kept, layer: kind}, s, judged) for (layer, kind), s, judged in round_scores]
        (layer, kind), scores, acceptable = _choose(primary, guarded, p_min, full_scores, round_scores)
        if not acceptable:
            break
        kept = {**kept, layer: kind}
        m_opt, m_opt_scores = kept, dict(scores)

    others = [t for t in guarded if t.name != primary.name]
    m_best, m_best_scores = {}, dict(full_scores)
    for hybrid, scores, judged in used:
        if not hybrid or not _acceptable(others, p_min, judged):
            continue
        if (not m_best or primary.direction.better(scores[primary.name], m_best_scores[primary.name])
                or (scores[primary.name] == m_best_scores[primary.name] and len(hybrid) > len(m_best))):
            m_best, m_best_scores = hybrid, dict(scores)
    with_kinds = result.kinds is not None
    return Selection(
        tolerances=chosen_tolerances, thresholds=p_min, m_opt=tuple(sorted(m_opt)), m_opt_scores=m_opt_scores,
        m_best=tuple(sorted(m_best)), m_best_scores=m_best_scores, evaluations_used=len(used),
        m_opt_kinds=kinds_in_order(m_opt, m_opt if with_kinds else None),
        m_best_kinds=kinds_in_order(m_best, m_best if with_kinds else None),
    )


def _hybrid_name(hybrid: Mapping[int, str | None], kinds: Sequence[str] | None) -> str:
    layers = sorted(hybrid)
    return hybrid_name(layers, kinds_in_order(layers, hybrid) if kinds else None)

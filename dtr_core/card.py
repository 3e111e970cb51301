"""The capability card: what the full model, M_opt and M_best keep beyond the run's own targets.

A hybrid is judged by what its search looked at; the card shows what it did not: in-context recall
(the built-in probes at several context lengths) and perplexity on general text that is not the
target, each on its test split, for the three models a run reports. A capability the run did not
guard that M_opt loses more than ``CardSpec.warn_drop`` on becomes a warning in the summary.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from .direction import Direction
from .specs import CardSpec, RunSpec, TargetSpec


# Positions kept free above a probe's prompt for the answer the model writes.
ANSWER_ROOM = 32


@dataclass(frozen=True)
class CardEntry:
    """One capability as the card scores it: a target built for the card, and its context length."""

    target: TargetSpec
    length: int | None  # probes: context tokens; None for perplexity


def card_entries(run: RunSpec, context_limit: int | None) -> list[CardEntry]:
    """The card's capabilities for this run: every probe at every length (capped at ``max_tokens``
    and at the teacher's context limit less ``ANSWER_ROOM``, repeats dropped) and perplexity on general text unless that
    text is the primary target's own data."""
    spec = run.card
    cap = min(spec.max_tokens, context_limit - ANSWER_ROOM if context_limit else spec.max_tokens)
    lengths = sorted({min(length, cap) for length in spec.lengths if min(length, cap) >= 32})
    entries = [
        CardEntry(TargetSpec(dataset=spec.haystack, kind=kind, name=f"{kind}_{length}", context_tokens=length,
                             num_examples=spec.examples, batch_size=spec.batch_size, seed=run.seed), length)
        for kind in spec.probes for length in lengths
    ]
    if spec.general_text and spec.general_text != run.target.dataset:
        entries.append(CardEntry(TargetSpec(
            dataset=spec.general_text, kind="perplexity", name=f"{spec.general_text}_perplexity",
            max_length=min(spec.general_max_length, cap), max_eval_examples=spec.general_examples,
            batch_size=spec.batch_size, seed=run.seed), None))
    return entries


def loss(scores: Mapping[str, float], direction: Direction, model: str = "m_opt") -> float:
    """How much ``model`` lost against the full model: points for scores in [0, 1] (accuracy-like),
    a relative change otherwise (perplexity); positive is worse."""
    full, hybrid = scores["full"], scores[model]
    change = hybrid - full if direction is Direction.LOWER else full - hybrid
    if direction is Direction.HIGHER and 0.0 <= full <= 1.0:
        return change
    return change / abs(full) if full else math.inf


def warnings(card: Mapping, spec: CardSpec) -> list[str]:
    """One line per card capability that M_opt loses more than ``spec.warn_drop`` on."""
    lines = []
    for entry in card["entries"]:
        lost = loss(entry["scores"], Direction(entry["direction"]))
        if lost > spec.warn_drop:
            amount = f"{lost * 100:.0f} points" if entry["metric"] != "perplexity" else f"{lost:+.0%} perplexity"
            lines.append(f"M_opt loses {amount} on {entry['name']} ({entry['scores']['full']:.4g} → "
                         f"{entry['scores']['m_opt']:.4g}), which the run did not guard")
    return lines

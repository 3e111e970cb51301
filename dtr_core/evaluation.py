"""Scoring hybrids on a fixed split, reusing the hidden states of layers a candidate leaves unchanged.

A candidate that adds layer ℓ to the current hybrid computes exactly what the current hybrid
computes before ℓ, so its forward pass can start from the current hybrid's cached input to layer ℓ.
Scores from generation (``GenerationEvaluator``) run the whole model for every candidate.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any, Protocol

import torch
from torch import nn

from .acceptance import ExampleScores
from .adapters import ModelAdapter
from .direction import Direction
from .hybrid import hybrid_view
from .targets.tasks import model_inputs


class Scorer(Protocol):
    """Turns model outputs on a split into one validation score."""

    direction: Direction

    def collect(self, output: Any, batch: Mapping[str, torch.Tensor]) -> Any:
        """What the score needs from one batch's output (small; kept until ``score``)."""

    def score(self, collected: Sequence[Any]) -> float:
        """The split's score from every batch's collected values."""

    def examples(self, collected: Sequence[Any]) -> ExampleScores:
        """The same, example by example (for the bootstrap acceptance rule)."""


Scored = tuple[float, ExampleScores]


class _PassThrough(nn.Module):
    """Stands in for a layer whose output is already cached: returns its input hidden state."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return hidden_states


def _first_difference(a: frozenset[int], b: frozenset[int], num_layers: int) -> int:
    differing = a ^ b
    return min(differing) if differing else num_layers


class PrefixCachingEvaluator:
    """``search.Evaluator`` for scores computed from forward passes (every kind but generation).

    Keeps the per-layer input hidden states of one *base* hybrid (the first one evaluated, then
    whatever ``rebase`` names). A candidate whose first difference from the base is layer ``j``
    runs only layers ``j..L-1``. It also keeps the states of the best-scoring candidate since the
    last rebase: the search usually keeps exactly that one, and then rebasing costs nothing.
    ``prefix_reuse=False`` always runs the whole model.
    ``layer_forwards`` counts layer passes over the split actually run; ``layer_forwards_full``
    what running every candidate from the embeddings would have cost.
    """

    def __init__(self, model: nn.Module, adapter: ModelAdapter, students: Mapping[int, nn.Module],
                 batches: Sequence[Mapping[str, torch.Tensor]], scorer: Scorer, *, prefix_reuse: bool = True,
                 device: torch.device | str = "cpu") -> None:
        self.model, self.adapter, self.students = model, adapter, students
        self.batches, self.scorer = batches, scorer
        self.prefix_reuse, self.device = prefix_reuse, device
        self.num_layers = adapter.num_layers
        self.layer_forwards = 0
        self.layer_forwards_full = 0
        self._base: frozenset[int] | None = None
        self._base_score: tuple[float, list[Any]] | None = None  # the base's score and collected values
        self._base_states: list[list[torch.Tensor | None]] = []
        self._best: tuple[frozenset[int], tuple[float, list[Any]], list[list[torch.Tensor | None]]] | None = None
        self._pending_base: frozenset[int] | None = None

    def __call__(self, linear_layers: Iterable[int]) -> float:
        return self._score(linear_layers)[0]

    def evaluate(self, linear_layers: Iterable[int]) -> Scored:
        """The score of the hybrid with ``linear_layers`` linear, and its per-example scores."""
        score, collected = self._score(linear_layers)
        return score, self.scorer.examples(collected)

    def _score(self, linear_layers: Iterable[int]) -> tuple[float, list[Any]]:
        layers = frozenset(linear_layers)
        self.layer_forwards_full += self.num_layers
        if not self.prefix_reuse:
            collected = self._run(layers)[0]
            return self.scorer.score(collected), collected
        if layers == self._base and self._base_score is not None:
            return self._base_score
        self._materialise_pending_base()
        collected, states = self._run(layers)
        scored = self.scorer.score(collected), collected
        if self._base is None:
            self._base, self._base_score, self._base_states = layers, scored, states
        elif self._best is None or self.scorer.direction.better(scored[0], self._best[1][0]):
            self._best = (layers, scored, states)
        return scored

    def rebase(self, linear_layers: Iterable[int]) -> None:
        """Make ``linear_layers`` the hybrid whose hidden states candidates start from."""
        layers = frozenset(linear_layers)
        if not self.prefix_reuse or layers == self._base:
            return
        if self._best is not None and self._best[0] == layers:
            self._base, self._base_score, self._base_states = self._best
        else:
            # Computed only when a candidate needs it: with cached scores it may never be.
            self._pending_base = layers
        self._best = None

    def _materialise_pending_base(self) -> None:
        if self._pending_base is None:
            return
        layers, self._pending_base = self._pending_base, None
        _, states = self._run(layers)
        self._base, self._base_score, self._base_states = layers, None, states

    def _start_layer(self, layers: frozenset[int]) -> int:
        if not self.prefix_reuse or self._base is None:
            return 0
        # Equal sets still need one layer run to reach the final hidden state.
        return min(_first_difference(layers, self._base, self.num_layers), self.num_layers - 1)

    @torch.no_grad()
    def _run(self, layers: frozenset[int]) -> tuple[list[Any], list[list[torch.Tensor | None]]]:
        """Forward every batch with ``layers`` linear; returns collected values and layer inputs
        (those before the start layer shared with the base; none without prefix reuse)."""
        start = self._start_layer(layers)
        self.layer_forwards += self.num_layers - start
        collected, all_states = [], []
        for index, batch in enumerate(self.batches):
            states = list(self._base_states[index]) if start > 0 else [None] * self.num_layers
            with ExitStack() as stack:
                stack.enter_context(hybrid_view(self.model, self.adapter, self.students, layers))
                if start > 0:
                    stack.enter_context(self._resume_at(start, states[start]))
                if self.prefix_reuse:
                    stack.enter_context(self._record_inputs(start, states))
                # Scoring needs no generation cache: decoders would build one per batch by default.
                no_cache = {"use_cache": False} if self.adapter.causal else {}
                output = self.model(**model_inputs(batch, self.device), **no_cache)
            collected.append(self.scorer.collect(output, batch))
            all_states.append(states)
        return collected, all_states

    @contextmanager
    def _resume_at(self, start: int, hidden_state: torch.Tensor):
        """Layers before ``start`` pass their input through; the embeddings emit the cached state."""
        stack = self.adapter.layer_stack(self.model)
        skipped = [stack[i] for i in range(start)]
        handle = self.adapter.embedding_output_module(self.model).register_forward_hook(
            lambda module, args, output: hidden_state.to(self.device)
        )
        for i in range(start):
            stack[i] = _PassThrough()
        try:
            yield
        finally:
            handle.remove()
            for i, layer in enumerate(skipped):
                stack[i] = layer

    @contextmanager
    def _record_inputs(self, start: int, states: list[torch.Tensor | None]):
        stack = self.adapter.layer_stack(self.model)

        def hook_for(layer_idx: int):
            def keep(module, args, kwargs):
                hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
                states[layer_idx] = hidden.detach()
            return keep

        handles = [stack[i].register_forward_pre_hook(hook_for(i), with_kwargs=True)
                   for i in range(start, self.num_layers)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


class GenerationScorer(Protocol):
    """Turns greedy generations on a split into one validation score."""

    direction: Direction
    max_new_tokens: int

    def collect(self, generated: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> Any:
        """What the score needs from one batch's new tokens ``[B, ≤ max_new_tokens]``."""

    def score(self, collected: Sequence[Any]) -> float:
        """The split's score from every batch's collected values."""

    def examples(self, collected: Sequence[Any]) -> ExampleScores:
        """The same, example by example."""


class GenerationEvaluator:
    """``search.Evaluator`` for scores from greedy generation (e.g. exact match).

    ``batches`` are left-padded prompts, so every row's new tokens follow its last real token.
    No prefix reuse: ``generate`` feeds the prompt once and then one token at a time through every
    layer with its cache, so there is no single forward whose unchanged prefix could be reused.
    ``layer_forwards`` counts, like ``PrefixCachingEvaluator``, one pass over the split per layer.
    """

    def __init__(self, model: nn.Module, adapter: ModelAdapter, students: Mapping[int, nn.Module],
                 batches: Sequence[Mapping[str, torch.Tensor]], scorer: GenerationScorer, *, pad_token_id: int,
                 device: torch.device | str = "cpu") -> None:
        from transformers import GenerationConfig

        self.model, self.adapter, self.students = model, adapter, students
        self.batches, self.scorer, self.device = batches, scorer, device
        self.num_layers = adapter.num_layers
        self.layer_forwards = 0
        self.layer_forwards_full = 0
        # A fresh config, so sampling settings shipped in the model's generation_config never apply.
        self.generation_config = GenerationConfig(
            do_sample=False, max_new_tokens=scorer.max_new_tokens, pad_token_id=pad_token_id,
            eos_token_id=model.generation_config.eos_token_id,
        )

    def __call__(self, linear_layers: Iterable[int]) -> float:
        return self.scorer.score(self._generate(linear_layers))

    def evaluate(self, linear_layers: Iterable[int]) -> Scored:
        """The score of the hybrid with ``linear_layers`` linear, and its per-example scores."""
        collected = self._generate(linear_layers)
        return self.scorer.score(collected), self.scorer.examples(collected)

    @torch.no_grad()
    def _generate(self, linear_layers: Iterable[int]) -> list[Any]:
        self.layer_forwards += self.num_layers
        self.layer_forwards_full += self.num_layers
        collected = []
        with hybrid_view(self.model, self.adapter, self.students, linear_layers):
            for batch in self.batches:
                inputs = model_inputs(batch, self.device)
                generated = self.model.generate(**inputs, generation_config=self.generation_config)
                collected.append(self.scorer.collect(generated[:, inputs["input_ids"].shape[1]:].cpu(), batch))
        return collected

    def rebase(self, linear_layers: Iterable[int]) -> None:
        """Nothing to move: every candidate is generated from scratch."""

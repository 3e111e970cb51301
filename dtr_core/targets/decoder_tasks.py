"""Prompted target tasks for decoders: log-likelihood multiple choice and generation exact match.

Every labelled example becomes a prompt: ``num_fewshot`` train examples, each written as
``prompt_template`` + ``answer_template``, then the query's ``prompt_template``. The answers are the
task's label names written with ``answer_template``.

- ``MultipleChoice``: one row per (example, answer) = prompt + answer; the answer with the highest
  summed log-probability of its tokens is the prediction (lm-eval's ``acc``). Forward-only, so it
  runs in ``PrefixCachingEvaluator`` like perplexity.
- ``ExactMatch``: the model generates greedily after the prompt; the first line of what it wrote
  must equal the answer (case, surrounding whitespace and punctuation ignored). It needs
  ``GenerationEvaluator``. A model can rank the right answer highest and still fail to write it,
  which log-likelihood scores cannot see.
"""

from __future__ import annotations

import itertools
import random
import string
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ..batching import pad_rows
from ..direction import Direction
from ..specs import TargetSpec
from .data import DataError, TaskData, TextSplit

# Between few-shot examples and before the query, as in lm-eval.
FEWSHOT_SEPARATOR = "\n\n"


def truncate_text(tokenizer, text: str, max_tokens: int) -> str:
    """``text`` with its whitespace collapsed, cut after its first ``max_tokens`` tokens.

    Whitespace is collapsed so an article's paragraph breaks cannot look like the few-shot separator.
    The cut is made in the string (at the end of the last kept token's characters), so the text is
    tokenised once more together with the templates, as the model will see it.
    """
    text = " ".join(text.split())
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = encoded["offset_mapping"]
    if len(offsets) <= max_tokens:
        return text
    return text[:offsets[max_tokens - 1][1]]


def select_fewshot(labels: Sequence[int], count: int, seed: int) -> list[int]:
    """Indices of ``count`` train examples, labels taken in turn so every class is shown about equally.

    The label order and which example of each label is taken are drawn with ``seed``.
    """
    rng = random.Random(seed)
    by_label: dict[int, list[int]] = {}
    for index, label in enumerate(labels):
        by_label.setdefault(label, []).append(index)
    queues = [by_label[label] for label in sorted(by_label)]
    for queue in queues:
        rng.shuffle(queue)
    rng.shuffle(queues)
    in_turn = [i for round_ in itertools.zip_longest(*queues) for i in round_ if i is not None]
    return in_turn[:count]


def answers(spec: TargetSpec, label_names: Sequence[str]) -> list[str]:
    """Each label written as the answer that follows a prompt (index = label id)."""
    return [spec.answer_template.replace("{label}", name) for name in label_names]


def prompts(tokenizer, data: TaskData, split: TextSplit, spec: TargetSpec) -> list[str]:
    """The full prompt (few-shot examples + query) for every example of ``split``."""
    written = answers(spec, data.label_names)

    def prompt(text: str) -> str:
        return spec.prompt_template.replace("{text}", truncate_text(tokenizer, text, spec.max_length))

    shots = [prompt(data.train.texts[i]) + written[data.train.labels[i]]
             for i in select_fewshot(data.train.labels, spec.num_fewshot, spec.seed)]
    context = "".join(shot + FEWSHOT_SEPARATOR for shot in shots)
    return [context + prompt(text) for text in split.texts]


def _encode(tokenizer, text: str) -> list[int]:
    # With the tokenizer's own special tokens (a BOS for Llama tokenizers), as the model was trained.
    return tokenizer(text)["input_ids"]


def _common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    length = 0
    for x, y in zip(a, b):
        if x != y:
            break
        length += 1
    return length


def tokenize_choices(tokenizer, data: TaskData, split: TextSplit, spec: TargetSpec) -> list[dict[str, torch.Tensor]]:
    """Right-padded batches of ``batch_size`` rows, one per (example, answer).

    A row is the tokenised string prompt + answer. Its continuation — the tokens scored — is
    everything after the longest prefix it shares with the prompt's own tokens, so a token that
    merges the prompt's end with the answer's start (BPE) is scored, and no answer token is missed.
    Extra keys: ``continuation_mask`` ``[B, T]`` (bool), ``example_index``, ``choice_index`` and
    ``labels`` (the example's gold label id), each ``[B]``.
    """
    written = answers(spec, data.label_names)
    rows, continuations, examples, choices, golds = [], [], [], [], []
    for example, (prompt, gold) in enumerate(zip(prompts(tokenizer, data, split, spec), split.labels)):
        context = _encode(tokenizer, prompt)
        for choice, answer in enumerate(written):
            ids = _encode(tokenizer, prompt + answer)
            start = _common_prefix_length(context, ids)
            if start == 0 or start == len(ids):
                raise DataError(
                    f"answer {answer!r} cannot be scored after the prompt: its tokens "
                    f"{'swallow the whole prompt' if start == 0 else 'are empty'}; start answer_template "
                    f"with a space or end prompt_template with a separator (e.g. 'Topic:' + ' {{label}}')"
                )
            rows.append(ids)
            continuations.append((start, len(ids)))
            examples.append(example)
            choices.append(choice)
            golds.append(gold)

    batches = []
    for first in range(0, len(rows), spec.batch_size):
        span = slice(first, first + spec.batch_size)
        ids, mask = pad_rows(rows[span], tokenizer.pad_token_id)
        continuation = torch.zeros_like(mask, dtype=torch.bool)
        for i, (start, end) in enumerate(continuations[span]):
            continuation[i, start:end] = True
        batches.append({
            "input_ids": ids, "attention_mask": mask, "continuation_mask": continuation,
            "example_index": torch.tensor(examples[span]), "choice_index": torch.tensor(choices[span]),
            "labels": torch.tensor(golds[span]),
        })
    return batches


def tokenize_prompts(tokenizer, data: TaskData, split: TextSplit, spec: TargetSpec) -> list[dict[str, torch.Tensor]]:
    """Left-padded prompt batches for generation (new tokens then follow every row's last real
    token); ``labels`` are the gold label ids. The tokenizer itself is left as it is."""
    encoded = [_encode(tokenizer, prompt) for prompt in prompts(tokenizer, data, split, spec)]
    batches = []
    for first in range(0, len(encoded), spec.batch_size):
        ids, mask = pad_rows(encoded[first:first + spec.batch_size], tokenizer.pad_token_id, left=True)
        batches.append({"input_ids": ids, "attention_mask": mask,
                        "labels": torch.tensor(split.labels[first:first + spec.batch_size])})
    return batches


class MultipleChoice:
    """Accuracy of the answer with the highest summed log-probability of its continuation tokens."""

    direction = Direction.HIGHER
    metric_name = "mc_accuracy"

    def collect(self, output: Any, batch: Mapping[str, torch.Tensor]) -> tuple[np.ndarray, ...]:
        logits = output.logits[:, :-1]  # position t predicts token t + 1
        scored = batch["continuation_mask"][:, 1:].to(logits.device)
        targets = batch["input_ids"][:, 1:].to(logits.device)[scored]
        # Log-softmax only at scored positions: the full [B, T, vocab] table would be large.
        log_probs = logits[scored].float().log_softmax(-1).gather(-1, targets[:, None])[:, 0]
        rows = torch.arange(scored.shape[0], device=logits.device)[:, None].expand_as(scored)[scored]
        sums = torch.zeros(scored.shape[0], device=logits.device).index_add_(0, rows, log_probs)
        return (batch["example_index"].numpy(), batch["choice_index"].numpy(), sums.cpu().numpy(),
                batch["labels"].numpy())

    def score(self, collected: Sequence[tuple[np.ndarray, ...]]) -> float:
        examples, choices, log_likelihoods, golds = (np.concatenate(part) for part in zip(*collected))
        table = np.full((examples.max() + 1, choices.max() + 1), -np.inf)
        table[examples, choices] = log_likelihoods
        gold = np.zeros(len(table), dtype=np.int64)
        gold[examples] = golds
        return float((table.argmax(1) == gold).mean())


def normalise_answer(text: str) -> str:
    """First non-empty line, lower case, whitespace collapsed, punctuation at either end dropped."""
    line = next((line for line in text.splitlines() if line.strip()), "")
    return " ".join(line.lower().split()).strip(string.punctuation + " ")


def default_max_new_tokens(tokenizer, spec: TargetSpec, label_names: Sequence[str]) -> int:
    """The longest answer's tokens + 1: one more token shows whether the model ended the word
    there (" sport" then "s" is "sports", not "sport")."""
    return max(len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers(spec, label_names)) + 1


class ExactMatch:
    """Fraction of examples whose generated answer, normalised, equals the gold answer, normalised.

    ``collect`` takes the generated new tokens ``[B, max_new_tokens]`` (not a forward output).
    """

    direction = Direction.HIGHER
    metric_name = "exact_match"

    def __init__(self, tokenizer, answer_texts: Sequence[str], max_new_tokens: int) -> None:
        self.tokenizer = tokenizer
        self.answers = tuple(normalise_answer(a) for a in answer_texts)
        self.max_new_tokens = max_new_tokens

    def collect(self, generated: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> np.ndarray:
        texts = self.tokenizer.batch_decode(generated, skip_special_tokens=True)
        return np.array([normalise_answer(text) == self.answers[gold]
                         for text, gold in zip(texts, batch["labels"].tolist())])

    def score(self, collected: Sequence[np.ndarray]) -> float:
        return float(np.concatenate(collected).mean())


def exact_match_for(tokenizer, data: TaskData, spec: TargetSpec) -> ExactMatch:
    """The exact-match scorer for ``data``'s labels, with ``spec.max_new_tokens`` or its default."""
    max_new_tokens = spec.max_new_tokens or default_max_new_tokens(tokenizer, spec, data.label_names)
    return ExactMatch(tokenizer, answers(spec, data.label_names), max_new_tokens)

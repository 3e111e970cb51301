"""Prompted target tasks for decoders: log-likelihood multiple choice and generation scores.

Every example becomes a prompt: ``num_fewshot`` train examples, each written as
``prompt_template`` + ``answer_template`` (with the example's first answer, or its label name),
then the query's ``prompt_template``. The few-shot examples are drawn once with ``seed``: labels in
turn when the task has labels (multiple choice, or a closed answer set — see ``targets/data.py``),
else at random.

- ``MultipleChoice``: one row per (example, label name) = prompt + answer; the answer with the
  highest summed log-probability of its tokens is the prediction (lm-eval's ``acc``). Forward-only,
  so it runs in ``PrefixCachingEvaluator`` like perplexity.
- Generation scorers (``GenerationEvaluator``): the model generates greedily after the prompt, at
  most ``max_new_tokens`` tokens (default: the longest answer written with ``answer_template``, in
  tokens, + 1); the decoded text (special tokens skipped) is compared with each accepted answer of
  the example and the best match counts. A model can rank the right answer highest and still fail
  to write it, which log-likelihood scores cannot see.

  - ``ExactMatch`` ("exact_match"): 1 when ``normalise_answer`` of the generation equals
    ``normalise_answer`` of an accepted answer. ``normalise_answer``: the first non-empty line,
    lower case, whitespace runs collapsed to one space, punctuation (``string.punctuation``) and
    spaces at either end dropped.
  - ``Contains`` ("contains"): 1 when an accepted answer, lower-cased, whitespace collapsed and
    punctuation at either end dropped, occurs as a substring of the whole generation, lower-cased
    and whitespace collapsed (all lines; no word boundaries: "4" occurs in "14"). An answer that is
    only punctuation is looked for as written (lower-cased, whitespace collapsed).
  - ``TokenF1`` ("token_f1"): SQuAD's F1. Generation (its first non-empty line, like exact match)
    and answer are normalised by ``squad_normalise``: lower case, every ``string.punctuation``
    character removed, the articles a/an/the removed as whole words, split on whitespace. F1 of the
    two bags of tokens (precision = shared / generated tokens, recall = shared / answer tokens);
    both empty gives 1.0, one empty 0.0; the best over the accepted answers.

  Each scorer scores the fraction (or mean F1) over all examples.
"""

from __future__ import annotations

import itertools
import random
import re
import string
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ..batching import pad_rows
from ..acceptance import ExampleScores
from ..direction import Direction
from ..specs import GENERATION_KINDS, TargetSpec
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


def fewshot_indices(data: TaskData, spec: TargetSpec) -> list[int]:
    """The train examples shown before every query: labels in turn when the task has labels
    (``select_fewshot``), else ``num_fewshot`` drawn at random with ``seed``."""
    if data.train.labels is not None:
        return select_fewshot(data.train.labels, spec.num_fewshot, spec.seed)
    count = min(spec.num_fewshot, len(data.train.texts))
    return random.Random(spec.seed).sample(range(len(data.train.texts)), count)


def answers(spec: TargetSpec, label_names: Sequence[str]) -> list[str]:
    """Each label (or answer) written as the answer that follows a prompt (index = label id)."""
    return [spec.answer_template.replace("{label}", name) for name in label_names]


def split_answers(data: TaskData, split: TextSplit) -> tuple[tuple[str, ...], ...]:
    """The accepted answers of every example of ``split``: its own, or its label's name."""
    if split.answers is not None:
        return split.answers
    if split.labels is not None and data.label_names is not None:
        return tuple((data.label_names[label],) for label in split.labels)
    raise DataError(f"{data.source} has neither answers nor labels; generation targets need answers "
                    "(TargetSpec.label_field)")


def prompts(tokenizer, data: TaskData, split: TextSplit, spec: TargetSpec) -> list[str]:
    """The full prompt (few-shot examples + query) for every example of ``split``."""
    shot_answers = split_answers(data, data.train)

    def prompt(text: str) -> str:
        return spec.prompt_template.replace("{text}", truncate_text(tokenizer, text, spec.max_length))

    shots = [prompt(data.train.texts[i]) + spec.answer_template.replace("{label}", shot_answers[i][0])
             for i in fewshot_indices(data, spec)]
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


def tokenize_prompts(tokenizer, data: TaskData, split: TextSplit, spec: TargetSpec) -> list[dict[str, Any]]:
    """Left-padded prompt batches for generation (``prompt_batches``); ``labels``: the gold label
    ids, only when the split has labels. The tokenizer itself is left as it is."""
    encoded = [_encode(tokenizer, prompt) for prompt in prompts(tokenizer, data, split, spec)]
    return prompt_batches(encoded, split_answers(data, split), tokenizer.pad_token_id, spec.batch_size,
                          labels=split.labels)


def prompt_batches(encoded: Sequence[Sequence[int]], golds: Sequence[tuple[str, ...]], pad_token_id: int,
                   batch_size: int, labels: Sequence[int] | None = None) -> list[dict[str, Any]]:
    """Left-padded batches of tokenised prompts (new tokens then follow every row's last real
    token). ``answers``: one tuple of accepted answer strings per row; ``labels`` rides along when given."""
    batches = []
    for first in range(0, len(encoded), batch_size):
        span = slice(first, first + batch_size)
        ids, mask = pad_rows(list(encoded[span]), pad_token_id, left=True)
        batch: dict[str, Any] = {"input_ids": ids, "attention_mask": mask, "answers": list(golds[span])}
        if labels is not None:
            batch["labels"] = torch.tensor(labels[span])
        batches.append(batch)
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
        return float(self._correct(collected).mean())

    def examples(self, collected: Sequence[tuple[np.ndarray, ...]]) -> ExampleScores:
        correct = self._correct(collected).astype(np.float64)
        return ExampleScores(correct, np.ones_like(correct))

    @staticmethod
    def _correct(collected: Sequence[tuple[np.ndarray, ...]]) -> np.ndarray:
        examples, choices, log_likelihoods, golds = (np.concatenate(part) for part in zip(*collected))
        table = np.full((examples.max() + 1, choices.max() + 1), -np.inf)
        table[examples, choices] = log_likelihoods
        gold = np.zeros(len(table), dtype=np.int64)
        gold[examples] = golds
        return table.argmax(1) == gold


def normalise_answer(text: str) -> str:
    """First non-empty line, lower case, whitespace collapsed, punctuation at either end dropped."""
    line = next((line for line in text.splitlines() if line.strip()), "")
    return " ".join(line.lower().split()).strip(string.punctuation + " ")


def _collapse(text: str) -> str:
    return " ".join(text.lower().split())


def contains_form(answer: str) -> str:
    """An answer as ``Contains`` looks for it: lower case, whitespace collapsed, punctuation at
    either end dropped (a punctuation-only answer is kept as it is, lower-cased and collapsed)."""
    collapsed = _collapse(answer)
    return collapsed.strip(string.punctuation + " ") or collapsed


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def squad_normalise(text: str) -> list[str]:
    """SQuAD's answer normalisation as tokens: lower case, punctuation removed, articles removed."""
    return _ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION)).split()


def token_f1(prediction: str, answer: str) -> float:
    """SQuAD's F1 of the bags of normalised tokens; both empty gives 1.0, one empty 0.0."""
    predicted, gold = squad_normalise(prediction), squad_normalise(answer)
    if not predicted or not gold:
        return float(predicted == gold)
    shared = sum((Counter(predicted) & Counter(gold)).values())
    if shared == 0:
        return 0.0
    precision, recall = shared / len(predicted), shared / len(gold)
    return 2 * precision * recall / (precision + recall)


def first_line(text: str) -> str:
    """The first non-empty line of ``text`` ("" when there is none)."""
    return next((line for line in text.splitlines() if line.strip()), "")


def default_max_new_tokens(tokenizer, spec: TargetSpec, answer_texts: Iterable[str]) -> int:
    """The longest answer's tokens (written with ``answer_template``) + 1: one more token shows
    whether the model ended the word there (" sport" then "s" is "sports", not "sport")."""
    written = answers(spec, sorted(set(answer_texts)))
    return max(len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in written) + 1


class AnswerScorer:
    """Mean over examples of ``match(generated text, accepted answers)``.

    ``collect`` takes the generated new tokens ``[B, max_new_tokens]`` (not a forward output) and the
    batch, whose ``answers`` hold each row's accepted answers.
    """

    direction = Direction.HIGHER
    metric_name = ""

    def __init__(self, tokenizer, max_new_tokens: int) -> None:
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens

    def match(self, generated: str, accepted: Sequence[str]) -> float:
        raise NotImplementedError

    def collect(self, generated: torch.Tensor, batch: Mapping[str, Any]) -> np.ndarray:
        texts = self.tokenizer.batch_decode(generated, skip_special_tokens=True)
        golds = batch["answers"]
        if len(golds) != len(texts):
            raise ValueError(f"{len(texts)} generations but {len(golds)} answer tuples in the batch")
        return np.array([self.match(text, accepted) for text, accepted in zip(texts, golds)], dtype=np.float64)

    def score(self, collected: Sequence[np.ndarray]) -> float:
        return float(np.concatenate(collected).mean())

    def examples(self, collected: Sequence[np.ndarray]) -> ExampleScores:
        values = np.concatenate(collected).astype(np.float64)
        return ExampleScores(values, np.ones_like(values))


class ExactMatch(AnswerScorer):
    """Fraction of examples whose generation, normalised, equals an accepted answer, normalised."""

    metric_name = "exact_match"

    def match(self, generated: str, accepted: Sequence[str]) -> float:
        written = normalise_answer(generated)
        return float(any(written == normalise_answer(answer) for answer in accepted))


class Contains(AnswerScorer):
    """Fraction of examples whose whole generation contains an accepted answer (see the module)."""

    metric_name = "contains"

    def match(self, generated: str, accepted: Sequence[str]) -> float:
        written = _collapse(generated)
        return float(any(contains_form(answer) in written for answer in accepted))


class TokenF1(AnswerScorer):
    """Mean SQuAD token F1 of the generation's first line, best over the accepted answers."""

    metric_name = "token_f1"

    def match(self, generated: str, accepted: Sequence[str]) -> float:
        line = first_line(generated)
        return max(token_f1(line, answer) for answer in accepted)


SCORERS: dict[str, type[AnswerScorer]] = {"exact_match": ExactMatch, "contains": Contains, "token_f1": TokenF1}


def generation_scorer(tokenizer, data: TaskData, spec: TargetSpec) -> AnswerScorer:
    """The scorer for ``spec.kind`` (one of ``GENERATION_KINDS``), with ``spec.max_new_tokens`` or
    the longest answer of any split (written with ``answer_template``) in tokens + 1."""
    if spec.kind not in GENERATION_KINDS:
        raise ValueError(f"generation_scorer: kind {spec.kind!r} is not one of {list(GENERATION_KINDS)}")
    max_new_tokens = spec.max_new_tokens or default_max_new_tokens(
        tokenizer, spec, (answer for split in (data.train, data.validation, data.test)
                          for accepted in split_answers(data, split) for answer in accepted))
    return SCORERS[spec.kind](tokenizer, max_new_tokens)

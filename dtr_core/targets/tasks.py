"""Target-task metrics: what "quality kept" means for the search.

- ``ProbeClassification`` (encoders, or any backbone): a logistic-regression probe is fit once on
  the *full* model's pooled train embeddings and then applied unchanged to every candidate — the
  hybrid has to be a drop-in backbone for the classifier already deployed. Accuracy, higher is better.
- ``Perplexity`` (decoders): token-level perplexity on held-out text, lower is better.

Prompted decoder tasks (log-likelihood multiple choice, generation exact match) are in
``decoder_tasks.py``; retrieval (encoders) in ``retrieval.py``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ..acceptance import ExampleScores
from ..direction import Direction
from ..specs import DECODER_KINDS, GENERATION_KINDS, LABELLED_KINDS, PROMPTED_KINDS, TargetSpec
from .data import DataError, TaskData, TextSplit

SPLITS = ("train", "validation", "test")


def tokenize_split(tokenizer, split: TextSplit, spec: TargetSpec) -> list[dict[str, torch.Tensor]]:
    """Fixed batches (padded to the batch's longest text) for one split; labels ride along."""
    batches = []
    for start in range(0, len(split.texts), spec.batch_size):
        texts = list(split.texts[start:start + spec.batch_size])
        batch = dict(tokenizer(texts, truncation=True, max_length=spec.max_length, padding=True,
                               return_tensors="pt"))
        batch.pop("token_type_ids", None)  # every supported model defaults them correctly
        if split.labels is not None:
            batch["labels"] = torch.tensor(split.labels[start:start + spec.batch_size])
        batches.append(batch)
    return batches


# Batches may carry more than the model takes (labels, a task's per-row indices and masks).
MODEL_INPUT_KEYS = ("input_ids", "attention_mask")


def model_inputs(batch: Mapping[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
    """The keys of ``batch`` the model's forward takes, on ``device``."""
    return {k: batch[k].to(device) for k in MODEL_INPUT_KEYS if k in batch}


def mean_pooled(output: Any, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of the last hidden state over real tokens, L2-normalised: [B, hidden] (sentence-transformers' pooling)."""
    hidden = output.last_hidden_state if getattr(output, "last_hidden_state", None) is not None \
        else output.hidden_states[-1]
    mask = attention_mask.to(hidden.device)[..., None].to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
    return torch.nn.functional.normalize(pooled.float(), dim=-1)


@dataclass
class LinearProbe:
    """A fitted multinomial logistic regression: logits = x @ coef.T + intercept."""

    coef: np.ndarray  # [classes, hidden]
    intercept: np.ndarray  # [classes]

    def predict(self, features: np.ndarray) -> np.ndarray:
        return (features @ self.coef.T + self.intercept).argmax(-1)

    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {"coef": torch.from_numpy(self.coef), "intercept": torch.from_numpy(self.intercept)}

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor]) -> LinearProbe:
        return cls(tensors["coef"].numpy(), tensors["intercept"].numpy())


class ProbeClassification:
    """Accuracy of a frozen probe on the candidate's pooled embeddings."""

    direction = Direction.HIGHER
    metric_name = "accuracy"

    def __init__(self, probe: LinearProbe) -> None:
        self.probe = probe

    def collect(self, output: Any, batch: Mapping[str, torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
        features = mean_pooled(output, batch["attention_mask"]).cpu().numpy()
        return self.probe.predict(features), batch["labels"].numpy()

    def score(self, collected: Sequence[tuple[np.ndarray, np.ndarray]]) -> float:
        predictions = np.concatenate([c[0] for c in collected])
        labels = np.concatenate([c[1] for c in collected])
        return float((predictions == labels).mean())

    def examples(self, collected: Sequence[tuple[np.ndarray, np.ndarray]]) -> ExampleScores:
        correct = np.concatenate([c[0] == c[1] for c in collected]).astype(np.float64)
        return ExampleScores(correct, np.ones_like(correct))


@torch.no_grad()
def fit_probe(model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], *, inverse_regularisation: float = 10.0,
              seed: int = 42, device="cpu") -> LinearProbe:
    """Fit the probe on the full model's train embeddings (once; reused for every candidate)."""
    from sklearn.linear_model import LogisticRegression

    features, labels = [], []
    for batch in batches:
        output = model(**model_inputs(batch, device), output_hidden_states=True)
        features.append(mean_pooled(output, batch["attention_mask"]).cpu().numpy())
        labels.append(batch["labels"].numpy())
    classifier = LogisticRegression(C=inverse_regularisation, max_iter=2000, random_state=seed)
    classifier.fit(np.concatenate(features), np.concatenate(labels))
    coef, intercept = classifier.coef_, classifier.intercept_
    if coef.shape[0] == 1:  # sklearn stores a binary problem as one row; make it two logits
        coef, intercept = np.concatenate([-coef, coef]) / 2, np.concatenate([-intercept, intercept]) / 2
    return LinearProbe(coef.astype(np.float32), intercept.astype(np.float32))


class Perplexity:
    """exp(mean next-token negative log-likelihood over real tokens)."""

    direction = Direction.LOWER
    metric_name = "perplexity"

    def collect(self, output: Any, batch: Mapping[str, torch.Tensor]) -> tuple[float, int, np.ndarray, np.ndarray]:
        """The batch's summed NLL and token count (what the score adds up), and both per text."""
        logits = output.logits[:, :-1].float()
        targets = batch["input_ids"][:, 1:].to(logits.device)
        mask = batch["attention_mask"][:, 1:].to(logits.device).bool()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
        per_text = (nll * mask).sum(1).double().cpu().numpy()
        return float(nll[mask].sum()), int(mask.sum()), per_text, mask.sum(1).double().cpu().numpy()

    def score(self, collected: Sequence[tuple[float, int, np.ndarray, np.ndarray]]) -> float:
        total_nll = sum(c[0] for c in collected)
        total_tokens = sum(c[1] for c in collected)
        return float(np.exp(total_nll / max(total_tokens, 1)))

    def examples(self, collected: Sequence[tuple[float, int, np.ndarray, np.ndarray]]) -> ExampleScores:
        return ExampleScores(np.concatenate([c[2] for c in collected]), np.concatenate([c[3] for c in collected]),
                             exponent=True)


def check_task_fits_model(spec: TargetSpec, data: TaskData, causal: bool) -> None:
    """Reject combinations that cannot give a meaningful score, before any model runs."""
    if spec.kind in DECODER_KINDS and not causal:
        raise DataError(f"target kind {spec.kind!r} needs a decoder (causal LM); this teacher is an encoder — "
                        "use kind=classification or kind=retrieval")
    if spec.kind == "retrieval" and causal:
        raise DataError("target kind 'retrieval' ranks documents by pooled encoder embeddings; this teacher is a "
                        "decoder (causal LM) — use kind=perplexity or a prompted kind")
    if spec.kind in LABELLED_KINDS and data.label_names is None:
        raise DataError(f"target kind {spec.kind!r} needs labels, but {data.source} has none; "
                        "give every example a label, or use kind=perplexity")
    if spec.kind in GENERATION_KINDS:
        # Answers may be free-form; a split with labels but no answers uses its label names.
        for name in SPLITS:
            split = getattr(data, name)
            if split.answers is None and (split.labels is None or data.label_names is None):
                raise DataError(f"target kind {spec.kind!r} needs answers, but the {name} split of {data.source} "
                                "has none; give every example an answer (TargetSpec.label_field), "
                                "or use kind=perplexity")
    if spec.kind in PROMPTED_KINDS and spec.num_fewshot > len(data.train.texts):
        raise DataError(f"num_fewshot={spec.num_fewshot} but the train split of {data.source} has only "
                        f"{len(data.train.texts)} examples to draw them from; lower num_fewshot")

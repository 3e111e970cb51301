"""The training core both distillation loops share: the optimizer, one step, the loss and the
learning-rate schedule.

Disk mode (``distill.py``) trains one student from its layer's captured activations; stream mode
(``streaming.py``) trains every layer's student at once from the streamed teacher. Both measure a
student by the same relative error, train it with the same AdamW step and decay the learning rate
on the same warm-up-then-cosine curve, so a student distilled either way is trained alike.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .specs import DistillSpec

MAX_GRAD_NORM = 1.0  # per student: one layer's large gradient never shrinks another layer's step
# A budget this many times the data is "far above" it and the run says so: the students see the
# same text again and again (issue 14's small target, 190K tokens against a 1M budget, is 5.3).
MANY_PASSES = 5.0

# ``log_curve(layer_idx, first_step, losses)``: the training losses of steps first_step,
# first_step + 1, … (0-based, counted over the whole run, resumed sessions included), handed over
# while training runs; the chunks of one layer, in call order, make up its ``loss_curve``.
CurveLogger = Callable[[int, int, Sequence[float]], None]


@dataclass
class DistillResult:
    """One layer's distilled student and its measurements (disk or stream mode)."""

    layer_idx: int
    state_dict: dict[str, torch.Tensor]
    loss_curve: list[float]  # training loss per step, as relative error (MSE / target variance)
    rel_error_init: float  # on held-out sequences, before training
    rel_error_final: float  # on held-out sequences, after training
    steps: int
    train_tokens: int  # tokens trained on, every pass counted
    seconds: float
    data_tokens: int  # distinct tokens of the training data (held-out ones excluded)
    token_budget: int  # CaptureSpec.token_budget


@dataclass(frozen=True)
class TrainingPlan:
    """How much the students train: ``train_tokens`` tokens over ``data_tokens`` distinct ones.

    ``CaptureSpec.token_budget`` is the contract: the data are drawn up to the budget, and the
    students train on the budget (held-out tokens count against it; at least one pass), cycling the
    data as often as that takes. ``DistillSpec.epochs`` instead fixes the number of passes.
    """

    data_tokens: int
    budget: int
    train_tokens: int

    @property
    def passes(self) -> float:
        return self.train_tokens / self.data_tokens

    def describe(self) -> str:
        return (f"{self.data_tokens:,} tokens of data, budget {self.budget:,}, {self.passes:.2f} passes "
                f"({self.train_tokens:,} training tokens)")

    @classmethod
    def of_record(cls, record: Mapping) -> TrainingPlan:
        """The plan a distilled layer followed (``StudentRecord`` json), as it was carried out."""
        return cls(record["data_tokens"], record["token_budget"], record["train_tokens"])


def plan_training(data_tokens: int, holdout_tokens: int, budget: int, epochs: int | None) -> TrainingPlan:
    """The ``TrainingPlan`` for ``data_tokens`` distinct training tokens (``holdout_tokens`` more held out)."""
    if data_tokens <= 0:
        raise ValueError("the distillation data hold no training tokens beyond the held-out ones; raise the "
                         "capture token_budget or give more text")
    if epochs is not None:
        return TrainingPlan(data_tokens, budget, epochs * data_tokens)
    return TrainingPlan(data_tokens, budget, max(budget - holdout_tokens, data_tokens))


def distillation_warnings(records: Sequence[Mapping]) -> list[str]:
    """What a user must hear about the students (``StudentRecord`` json): data far below the budget,
    and students that ended worse than they started or no better than predicting the mean."""
    if not records:
        return []
    warnings = []
    plan = TrainingPlan.of_record(records[0])  # every layer trains on the same data
    if plan.budget > MANY_PASSES * plan.data_tokens:
        warnings.append(f"the distillation data hold {plan.data_tokens:,} tokens against a budget of "
                        f"{plan.budget:,}: {plan.passes:.1f} passes over the same text; give more text "
                        "(capture.text_files, or a share of general text) or a smaller budget")
    for record in records:
        init, final = record["rel_error_init"], record["rel_error_final"]
        if final >= init or final >= 1.0:
            why = "worse than it started" if final >= init else "no better than predicting the mean"
            warnings.append(f"layer {record['layer_idx']}'s student ended {why} (held-out relative error "
                            f"{init:.3f} → {final:.3f}): it is under-trained or cannot fit this layer")
    return warnings


def trained_weights(student: nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of ``student``'s state dict, detached from later training."""
    return {k: v.detach().cpu().clone() for k, v in student.state_dict().items()}


def masked_squared_error(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum over real (``mask``) positions and channels of (pred - target)², in fp32. [B, T, D], [B, T]."""
    weights = mask[..., None].to(torch.float32)
    return ((pred.float() - target.float()) ** 2 * weights).sum()


def relative_error(squared: torch.Tensor | float, tokens: torch.Tensor | int, width: int,
                   variance: torch.Tensor | float) -> torch.Tensor | float:
    """Mean squared error per value divided by the teacher output's variance: 1.0 is as bad as
    predicting the mean. ``squared / (tokens × width) / variance``, the training loss and the
    held-out error of both loops.

    Python numbers or tensors, evaluated in exactly this order with the operands the caller gives:
    ``squared`` a sum of squared errors (a scalar, or [L] per layer), ``tokens`` the real tokens it
    covers (int or tensor), ``width`` the output channels, ``variance`` (float, scalar or [L]).
    """
    return squared / (tokens * width) / variance


def warmup_cosine(step: int, warmup_steps: int, progress: float) -> float:
    """Learning-rate factor: linear warm-up over the first ``warmup_steps`` steps, then a cosine
    from 1 down to 0 as ``progress`` (fraction of the training done, clipped to 1) grows."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def build_optimizer(students: Sequence[nn.Module], spec: DistillSpec) -> torch.optim.AdamW:
    """One AdamW over every student's parameters, in order, starting with no gradients (so the
    first backward alone makes the first step's gradient, and a data-parallel rank without rows
    can tell it has none)."""
    optimizer = torch.optim.AdamW([p for s in students for p in s.parameters()], lr=spec.learning_rate,
                                  weight_decay=spec.weight_decay)
    optimizer.zero_grad(set_to_none=True)
    return optimizer


def optimizer_step(optimizer: torch.optim.Optimizer, students: Sequence[nn.Module], lr: float) -> None:
    """Apply the gradients the caller's backward left (summed over ranks when data-parallel):
    clip each student's gradient norm on its own, step at ``lr``, then drop the gradients (None,
    not zeros: the next step's backward starts from nothing)."""
    for student in students:
        torch.nn.utils.clip_grad_norm_(student.parameters(), MAX_GRAD_NORM)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)

"""The training core both distillation loops share: the optimizer, one step, the loss and the
learning-rate schedule.

Disk mode (``distill.py``) trains one student from its layer's captured activations; stream mode
(``streaming.py``) trains every layer's student at once from the streamed teacher. Both measure a
student by the same relative error, train it with the same AdamW step and decay the learning rate
on the same warm-up-then-cosine curve, so a student distilled either way is trained alike.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .specs import DistillSpec

MAX_GRAD_NORM = 1.0  # per student: one layer's large gradient never shrinks another layer's step

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
    train_tokens: int
    seconds: float


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

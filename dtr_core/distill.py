"""Blockwise local distillation of one layer: the student learns to map the teacher's attention
input to the teacher's attention output, from that layer's captured activations alone."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import nn

from .capture import LayerActivations
from .linear.students import LinearAttentionStudent
from .specs import DistillSpec


@dataclass
class DistillResult:
    layer_idx: int
    state_dict: dict[str, torch.Tensor]
    loss_curve: list[float]  # training loss per step, as relative error (MSE / target variance)
    rel_error_init: float  # on held-out sequences, before training
    rel_error_final: float  # on held-out sequences, after training
    steps: int
    train_tokens: int
    seconds: float


def masked_squared_error(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum over real (``mask``) positions and channels of (pred - target)², in fp32. [B, T, D], [B, T]."""
    weights = mask[..., None].to(torch.float32)
    return ((pred.float() - target.float()) ** 2 * weights).sum()


def _masked_rel_error(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, variance: float) -> torch.Tensor:
    """Masked MSE divided by the teacher output's variance: 1.0 = as bad as predicting the mean."""
    return masked_squared_error(pred, target, mask) / (mask.sum() * pred.shape[-1]) / variance


def warmup_cosine(step: int, warmup_steps: int, progress: float) -> float:
    """Learning-rate factor: linear warm-up over the first ``warmup_steps`` steps, then a cosine
    from 1 down to 0 as ``progress`` (fraction of the training done, clipped to 1) grows."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _target_variance(outputs: torch.Tensor, mask: torch.Tensor) -> float:
    real = outputs[mask].float()
    return float(real.var(dim=0, unbiased=False).mean().clamp_min(1e-12))


@torch.no_grad()
def evaluate_rel_error(student: nn.Module, data: LayerActivations, variance: float, batch_size: int,
                       device: torch.device | str) -> float:
    total_sq, total_count = 0.0, 0
    for start in range(0, data.inputs.shape[0], batch_size):
        x = data.inputs[start:start + batch_size].to(device, torch.float32)
        y = data.outputs[start:start + batch_size].to(device, torch.float32)
        m = data.attention_mask[start:start + batch_size].to(device)
        pred, _ = student(x, attention_mask=m)
        total_sq += float(masked_squared_error(pred, y, m))
        total_count += int(m.sum()) * y.shape[-1]
    return total_sq / max(total_count, 1) / variance


def _split_holdout(count: int, fraction: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    order = torch.randperm(count, generator=generator)
    held = max(1, int(round(count * fraction))) if count > 1 else 0
    return order[held:], order[:held]


def _subset(data: LayerActivations, index: torch.Tensor) -> LayerActivations:
    return LayerActivations(data.inputs[index], data.outputs[index], data.attention_mask[index])


def distill_layer(student: LinearAttentionStudent, data: LayerActivations, spec: DistillSpec, layer_idx: int,
                  device: torch.device | str = "cpu") -> DistillResult:
    """Train ``student`` (in place) on one layer's activations; only its own parameters move.

    Loss: masked MSE to the teacher's attention output, reported relative to the output variance.
    AdamW with linear warm-up then cosine decay, ``spec.epochs`` passes over the training part.
    """
    started = time.perf_counter()
    generator = torch.Generator().manual_seed(spec.seed + layer_idx)
    train_idx, holdout_idx = _split_holdout(data.inputs.shape[0], spec.holdout_fraction, generator)
    if len(train_idx) == 0 or len(holdout_idx) == 0:
        raise ValueError(
            f"layer {layer_idx}: {data.inputs.shape[0]} captured sequence(s) cannot be split into train and "
            "held-out parts; raise the capture token_budget"
        )
    train, holdout = _subset(data, train_idx), _subset(data, holdout_idx)
    variance = _target_variance(train.outputs, train.attention_mask)

    student.to(device).float()
    calibration = train.inputs[:spec.batch_size].to(device, torch.float32)
    student.calibrate_readout_scale(calibration, train.attention_mask[:spec.batch_size].to(device))
    student.train()
    rel_error_init = evaluate_rel_error(student, holdout, variance, spec.batch_size, device)

    steps_per_epoch = math.ceil(len(train_idx) / spec.batch_size)
    total_steps = steps_per_epoch * spec.epochs
    optimizer = torch.optim.AdamW(student.parameters(), lr=spec.learning_rate, weight_decay=spec.weight_decay)
    warmup = min(spec.warmup_steps, total_steps // 2)

    def lr_factor(step: int) -> float:
        return warmup_cosine(step, warmup, (step - warmup) / max(1, total_steps - warmup))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    curve: list[float] = []
    train_tokens = 0
    for _ in range(spec.epochs):
        order = torch.randperm(len(train_idx), generator=generator)
        for start in range(0, len(order), spec.batch_size):
            pick = order[start:start + spec.batch_size]
            x = train.inputs[pick].to(device, torch.float32)
            y = train.outputs[pick].to(device, torch.float32)
            m = train.attention_mask[pick].to(device)
            pred, _ = student(x, attention_mask=m)
            loss = _masked_rel_error(pred, y, m, variance)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            curve.append(loss.item())
            train_tokens += int(m.sum())

    student.eval()
    rel_error_final = evaluate_rel_error(student, holdout, variance, spec.batch_size, device)
    return DistillResult(
        layer_idx=layer_idx,
        state_dict={k: v.detach().cpu().clone() for k, v in student.state_dict().items()},
        loss_curve=curve,
        rel_error_init=rel_error_init,
        rel_error_final=rel_error_final,
        steps=total_steps,
        train_tokens=train_tokens,
        seconds=time.perf_counter() - started,
    )

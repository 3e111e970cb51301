"""Blockwise local distillation of one layer: the student learns to map the teacher's attention
input to the teacher's attention output, from that layer's captured activations alone."""

from __future__ import annotations

import math
import time

import torch
from torch import nn

from .capture import LayerActivations
from .linear.base import LinearAttentionStudent
from .progress import Progress
from .runner import Log
from .specs import DistillSpec
from .training import (CurveLogger, DistillResult, build_optimizer, masked_squared_error, optimizer_step,
                       plan_training, relative_error, trained_weights, warmup_cosine)

CURVE_LOG_EVERY = 25  # steps between calls of distill_layer's ``log_curve``


def _target_variance(outputs: torch.Tensor, mask: torch.Tensor) -> float:
    real = outputs[mask].float()
    return float(real.var(dim=0, unbiased=False).mean().clamp_min(1e-12))


@torch.no_grad()
def evaluate_rel_error(student: nn.Module, data: LayerActivations, variance: float, batch_size: int,
                       device: torch.device | str) -> float:
    """``student``'s relative error over every real token of ``data`` (see ``training.relative_error``),
    in batches of ``batch_size`` sequences."""
    total_sq, total_tokens = 0.0, 0
    for start in range(0, data.inputs.shape[0], batch_size):
        x = data.inputs[start:start + batch_size].to(device, torch.float32)
        y = data.outputs[start:start + batch_size].to(device, torch.float32)
        m = data.attention_mask[start:start + batch_size].to(device)
        pred, _ = student(x, attention_mask=m)
        total_sq += float(masked_squared_error(pred, y, m))
        total_tokens += int(m.sum())
    return relative_error(total_sq, max(total_tokens, 1), data.outputs.shape[-1], variance)


def _split_holdout(count: int, fraction: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    order = torch.randperm(count, generator=generator)
    held = max(1, int(round(count * fraction))) if count > 1 else 0
    return order[held:], order[:held]


def _subset(data: LayerActivations, index: torch.Tensor) -> LayerActivations:
    return LayerActivations(data.inputs[index], data.outputs[index], data.attention_mask[index])


def distill_layer(student: LinearAttentionStudent, data: LayerActivations, spec: DistillSpec, layer_idx: int,
                  token_budget: int, device: torch.device | str = "cpu",
                  log_curve: CurveLogger | None = None, log: Log | None = None) -> DistillResult:
    """Train ``student`` (in place) on one layer's activations; only its own parameters move.

    Loss: masked MSE to the teacher's attention output, relative to the output variance
    (``training.relative_error``). AdamW with linear warm-up then cosine decay over the planned
    tokens: ``token_budget`` of them (``training.plan_training``: the training part is cycled, a
    fresh order each pass, until the budget is spent), or ``spec.epochs`` passes when given.

    Args:
        data: the layer's captured activations, inputs [N, T, hidden], outputs [N, T, width] and
            attention_mask [N, T]; a ``spec.holdout_fraction`` of the sequences is held out.
        log_curve: called as ``log_curve(layer_idx, first_step, losses)`` with the losses of the
            steps since its last call, every ``CURVE_LOG_EVERY`` steps and once at the end.
        log: where the training's progress line goes (``progress.Progress``; None: nowhere).
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

    plan = plan_training(int(train.attention_mask.sum()), int(holdout.attention_mask.sum()), token_budget,
                         spec.epochs)
    planned_steps = math.ceil(plan.passes * math.ceil(len(train_idx) / spec.batch_size))
    optimizer = build_optimizer([student], spec)
    warmup = min(spec.warmup_steps, planned_steps // 2)
    curve: list[float] = []
    logged = 0  # curve[:logged] has been given to log_curve
    progress = Progress(f"distill layer {layer_idx}", planned_steps, log, unit="steps")

    def flush_curve() -> None:
        nonlocal logged
        if log_curve is not None and len(curve) > logged:
            log_curve(layer_idx, logged, curve[logged:])
            logged = len(curve)

    train_tokens = 0
    while train_tokens < plan.train_tokens:
        order = torch.randperm(len(train_idx), generator=generator)
        for start in range(0, len(order), spec.batch_size):
            if train_tokens >= plan.train_tokens:
                break  # the budget ends inside this pass
            step = len(curve)
            pick = order[start:start + spec.batch_size]
            x = train.inputs[pick].to(device, torch.float32)
            y = train.outputs[pick].to(device, torch.float32)
            m = train.attention_mask[pick].to(device)
            pred, _ = student(x, attention_mask=m)
            loss = relative_error(masked_squared_error(pred, y, m), m.sum(), pred.shape[-1], variance)
            loss.backward()
            factor = warmup_cosine(step, warmup, (step - warmup) / max(1, planned_steps - warmup))
            optimizer_step(optimizer, [student], spec.learning_rate * factor)
            curve.append(loss.item())
            train_tokens += int(m.sum())
            progress.advance(detail=f"loss {curve[-1]:.4f}")
            if len(curve) % CURVE_LOG_EVERY == 0:
                flush_curve()
    flush_curve()
    progress.close()

    student.eval()
    rel_error_final = evaluate_rel_error(student, holdout, variance, spec.batch_size, device)
    return DistillResult(
        layer_idx=layer_idx,
        state_dict=trained_weights(student),
        loss_curve=curve,
        rel_error_init=rel_error_init,
        rel_error_final=rel_error_final,
        steps=len(curve),
        train_tokens=train_tokens,
        seconds=time.perf_counter() - started,
        data_tokens=plan.data_tokens,
        token_budget=token_budget,
    )

"""Streaming blockwise distillation: the frozen teacher runs once per batch and every layer's
student trains on that batch's activations, so no activation is ever stored.

This is the mode for distillation budgets whose capture would not fit on disk (the paper distils
from ~100M tokens: terabytes of activations). One step:

1. one teacher forward without autograd, in the teacher's own dtype; forward hooks keep each
   layer's attention input (after the pre-norm) and output on the device;
2. each student's forward on its own layer's input, and backward of its masked MSE to the
   teacher's output, relative to that output's variance (``training.relative_error``, as in disk
   mode). The layers' losses are independent, so backward per layer gives the gradients of their
   sum while freeing each layer's activations at once;
3. one AdamW step over all students (``training.optimizer_step``; fp32 master weights, forward
   under bf16 autocast on CUDA).

The first ``DistillSpec.holdout_batches`` batches of the stream are never trained on: they fix each
layer's normaliser (the teacher output's variance) and measure the relative error before and after.

Checkpoints (every ``DistillSpec.checkpoint_every`` steps and at the end) go to
``<checkpoint_root>/<configuration digest>/``; a run started again with the same configuration
resumes from the last one (``checkpoints.py``), skipping the batches it had consumed, and ends with
the same weights as an uninterrupted run. A different configuration has a different digest, so it
never resumes from it.

Data parallel: when ``torch.distributed`` is initialised (torchrun), each rank runs the teacher and
the students on its own contiguous slice of every global batch; gradients are summed over ranks
(the loss is normalised by the global batch's token count, so the sum is the single-process
gradient) before every rank takes the same step. Only rank 0 writes checkpoints.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import torch
from torch import nn

from .adapters import ModelAdapter
from .capture import AttentionRecorder
from .checkpoints import load_checkpoint, save_checkpoint
from .distributed import all_reduce_sum, rank_and_world
from .linear.base import LinearAttentionStudent
from .progress import Progress
from .specs import CaptureSpec, DistillSpec, SpecError, spec_digest, spec_to_dict
from .training import (CurveLogger, DistillResult, build_optimizer, masked_squared_error, optimizer_step,
                       plan_training, relative_error, trained_weights, warmup_cosine)

GB = 10**9


# --- choosing the mode -------------------------------------------------------------------------

@dataclass(frozen=True)
class ModeChoice:
    mode: str  # "disk" or "stream"
    capture_bytes: int  # estimated size of a capture to disk
    reason: str


def estimate_capture_bytes(spec: CaptureSpec, num_layers: int, hidden_size: int) -> int:
    """Size of a capture to disk: tokens × layers × hidden × 2 (input and output) × bytes per value.

    Encoders' padding is stored too, so for them this is a lower bound.
    """
    itemsize = torch.empty((), dtype=getattr(torch, spec.dtype)).element_size()
    return spec.token_budget * num_layers * hidden_size * 2 * itemsize


def choose_mode(spec: CaptureSpec, num_layers: int, hidden_size: int, world_size: int = 1) -> ModeChoice:
    """Disk or stream, and why: ``spec.mode`` if explicit, else stream when the capture would not
    fit ``spec.disk_budget_gb`` or when the run is data-parallel (a capture is one process's job)."""
    size = estimate_capture_bytes(spec, num_layers, hidden_size)
    described = (f"a capture of {spec.token_budget:,} tokens × {num_layers} layers × {hidden_size} hidden × 2 "
                 f"in {spec.dtype} is about {size / GB:.2f} GB")
    if world_size > 1:
        if spec.mode == "disk":
            raise SpecError(f"CaptureSpec.mode='disk': a data-parallel run ({world_size} processes) needs "
                            "mode 'stream' or 'auto'; run disk mode in a single process")
        return ModeChoice("stream", size, f"data-parallel run ({world_size} processes) streams; {described}")
    if spec.mode != "auto":
        return ModeChoice(spec.mode, size, f"mode={spec.mode} requested; {described}")
    if size > spec.disk_budget_gb * GB:
        return ModeChoice("stream", size, f"{described}, over disk_budget_gb={spec.disk_budget_gb:g}")
    return ModeChoice("disk", size, f"{described}, within disk_budget_gb={spec.disk_budget_gb:g}")


# --- results -----------------------------------------------------------------------------------

@dataclass
class StreamResult:
    """Every layer's student and measurements, plus the run's totals (all ranks together)."""

    layers: list[DistillResult]
    steps: int
    train_tokens: int  # over all passes
    tokens_per_pass: int  # distinct tokens streamed, held-out ones included (a capture's token count)
    seconds: float  # training time, summed over resumed sessions
    tokens_per_second: float  # trained tokens per second of this session, all layers together
    resumed_from_step: int  # 0 for a fresh start
    # This session's first step, waited for (0.0 when it ran none): on a GPU it includes the kernels compiling
    # or autotuning on first use; and the rate of the steps after it (0.0 with fewer than two steps).
    first_step_seconds: float = 0.0
    steady_tokens_per_second: float = 0.0


@dataclass
class _Progress:
    """Where the run stands; everything a checkpoint needs besides the weights and optimizer (its
    fields are the checkpoint's ``progress``: renaming one orphans existing checkpoints)."""

    variance: torch.Tensor  # [S] fp32, the teacher output's variance per student (its layer's) on the held-out batches
    rel_error_init: list[float]
    holdout_tokens: int
    step: int = 0
    epoch: int = 0  # passes over the data completed
    batches_done: int = 0  # batches of the current pass consumed, held-out ones included
    train_tokens: int = 0
    seconds: float = 0.0
    curve: list[list[float]] = dataclasses.field(default_factory=list)  # per layer, one loss per step

    def to_checkpoint(self) -> dict:
        """Plain values and CPU tensors, as ``checkpoints.save_checkpoint`` takes them."""
        return {**dataclasses.asdict(self), "variance": self.variance.cpu()}

    @classmethod
    def from_checkpoint(cls, saved: dict, device: torch.device) -> _Progress:
        """What ``to_checkpoint`` gave, the variance back on ``device``."""
        return cls(**{**saved, "variance": saved["variance"].to(device)})


def checkpoint_digest(capture: CaptureSpec, distill: DistillSpec, students: Sequence[LinearAttentionStudent],
                      fingerprint: str) -> str:
    """What a checkpoint belongs to: the data and training settings, the students, the teacher.

    The mode-choice fields are left out: they do not change what is trained.
    """
    data = {k: v for k, v in spec_to_dict(capture).items() if k not in ("mode", "disk_budget_gb")}
    return spec_digest(data, distill, [s.config_dict() for s in students], fingerprint)


# --- the trainer -------------------------------------------------------------------------------

class _StreamTrainer:
    def __init__(self, model: nn.Module, adapter: ModelAdapter, students: Sequence[LinearAttentionStudent],
                 layers: Sequence[int], distill: DistillSpec, device: torch.device) -> None:
        self.backbone = adapter.backbone(model)  # no LM head: its logits would be wasted work
        self.students = list(students)
        self.layers = list(layers)  # the layer each student replaces
        self.device = device
        self.rank, self.world = rank_and_world()
        # fp32 master weights; on CUDA the forward runs under bf16 autocast.
        self.autocast = device.type == "cuda"
        for student in self.students:
            student.to(device).float().train()
        self.parameters = [p for s in self.students for p in s.parameters()]
        self.optimizer = build_optimizer(self.students, distill)
        first = self.students[0]
        self.output_width = first.o_proj.out_features if first.o_proj is not None else first.num_heads * first.head_dim
        modules = [adapter.attention_module(model, i) for i in range(adapter.num_layers)]
        self.recorder = AttentionRecorder(modules)  # no dtype/device: kept as computed, on the device

    def close(self) -> None:
        self.recorder.remove()

    def _share(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor] | None:
        """This rank's contiguous slice of a global batch, on the device (None if it has no rows)."""
        ids = batch["input_ids"].tensor_split(self.world)[self.rank]
        mask = batch["attention_mask"].tensor_split(self.world)[self.rank]
        if ids.shape[0] == 0:
            return None
        return ids.to(self.device), mask.to(self.device)

    def _teacher(self, ids: torch.Tensor, mask: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each student's layer's (attention input, attention output) for this batch, on the device."""
        # no_grad, not inference_mode: the students' autograd must be able to save these tensors.
        with torch.no_grad():
            self.backbone(input_ids=ids, attention_mask=mask, use_cache=False)
        pairs = list(zip(self.recorder.inputs, self.recorder.outputs))
        return [pairs[layer] for layer in self.layers]

    def _student_forward(self, student: LinearAttentionStudent, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            pred, _ = student(x if self.autocast else x.float(), attention_mask=mask)
        return pred

    @torch.no_grad()
    def calibrate(self, batch: dict) -> None:
        """Start each student's readout at its teacher's scale, from a whole global batch (the same
        on every rank, so every rank starts from identical students)."""
        ids, mask = batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)
        for student, (x, _) in zip(self.students, self._teacher(ids, mask)):
            student.calibrate_readout_scale(x.float(), mask)
        self.recorder.clear()

    @torch.no_grad()
    def holdout_statistics(self, holdout: Sequence[dict]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sums over the held-out batches and ranks, in fp64: each student's squared error [S], its
        teacher output's sum and squared sum stacked [2, S, D], and the real-token count [1]."""
        squared = torch.zeros(len(self.students), dtype=torch.float64, device=self.device)
        moments = torch.zeros(2, len(self.students), self.output_width, dtype=torch.float64, device=self.device)
        tokens = torch.zeros(1, dtype=torch.float64, device=self.device)
        for batch in holdout:
            share = self._share(batch)
            if share is None:  # this rank's zeros still join the sum
                continue
            ids, mask = share
            real = mask.bool()
            tokens += real.sum()
            for index, (student, (x, y)) in enumerate(zip(self.students, self._teacher(ids, mask))):
                squared[index] += masked_squared_error(self._student_forward(student, x, mask), y, mask).double()
                target = y[real].double()
                moments[0, index] += target.sum(0)
                moments[1, index] += target.pow(2).sum(0)
            self.recorder.clear()
        if self.world > 1:
            all_reduce_sum([squared, moments, tokens])
        return squared, moments, tokens

    def step(self, batch: dict, variance: torch.Tensor, lr: float) -> torch.Tensor:
        """One training step on a global batch; returns each student's loss [S] (on the device)."""
        global_tokens = int(batch["attention_mask"].sum())
        share = self._share(batch)
        losses = torch.zeros(len(self.students), device=self.device)
        if share is not None:
            ids, mask = share
            for index, (student, (x, y)) in enumerate(zip(self.students, self._teacher(ids, mask))):
                pred = self._student_forward(student, x, mask)
                loss = relative_error(masked_squared_error(pred, y, mask), global_tokens, y.shape[-1],
                                      variance[index])
                loss.backward()
                losses[index] = loss.detach()
            self.recorder.clear()
        if self.world > 1:
            grads = []
            for p in self.parameters:
                if p.grad is None:  # a rank with no rows still takes part in the sum
                    p.grad = torch.zeros_like(p)
                grads.append(p.grad)
            all_reduce_sum([*grads, losses])
        optimizer_step(self.optimizer, self.students, lr)
        return losses


# --- the loop ----------------------------------------------------------------------------------

# A first step this many times the later ones' mean (and over a minute) spent its time compiling kernels.
SLOW_FIRST_STEP_RATIO = 10.0


def first_step_note(first_step_seconds: float, later_seconds: float, later_steps: int) -> str:
    """What the summary adds when a session's first step took far longer than the rest: on CUDA, fla's Triton kernels
    autotune on first use and the compiled backend compiles (256 s against 39 s for SmolLM2-135M's 30 students on an
    H200, BENCHMARKS.md), which Triton's cache then keeps."""
    if later_steps < 1 or first_step_seconds < 60:
        return ""
    if first_step_seconds < SLOW_FIRST_STEP_RATIO * later_seconds / later_steps:
        return ""
    return ("; the first step compiled or autotuned kernels, which Triton keeps in its cache (TRITON_CACHE_DIR, "
            "default ~/.triton/cache): keep it between runs")


def _silent(_: str) -> None:
    pass


def stream_distill(
    model: nn.Module,
    adapter: ModelAdapter,
    students: Sequence[LinearAttentionStudent],
    batches: Callable[[], Iterable[dict]],
    capture: CaptureSpec,
    distill: DistillSpec,
    checkpoint_root: str | Path,
    fingerprint: str,
    device: str | torch.device = "cpu",
    log: Callable[[str], None] = _silent,
    log_curve: CurveLogger | None = None,
    layers: Sequence[int] | None = None,
) -> StreamResult:
    """Distil every layer's student (in place) from one pass of the teacher per batch.

    Args:
        model, adapter: the frozen teacher (on ``device``) and its family's adapter.
        students: one per layer, indexed by ``layer_idx`` (as ``pipeline.new_student`` builds them);
            or, with ``layers`` (the layer each student replaces), several per layer (students of
            several kinds, all trained on the same teacher pass).
        batches: returns a fresh iterator over the same global batches (``input_ids`` and
            ``attention_mask`` [B, T], e.g. ``capture.tokenize_for_capture``) on every call; called
            once per epoch, and for the held-out batches.
        capture, distill: the token budget and training settings (``training.plan_training``: the
            students train on the budget, cycling the data, or on ``distill.epochs`` passes).
        checkpoint_root: checkpoints go to ``checkpoint_root/<digest[:16]>``.
        fingerprint: identifies the teacher and data (part of the checkpoint digest).
        log: progress messages (every rank).
        log_curve: called as ``log_curve(index, first_step, losses)`` for every student whenever
            the losses waiting on the device come to the host: at each checkpoint and at the end
            (never a device sync per step). Steps count from the run's start, so a resumed run
            continues the series; every rank gets the same (all-reduced) losses.
    """
    layers = list(range(adapter.num_layers)) if layers is None else list(layers)
    if len(students) != len(layers) or set(layers) != set(range(adapter.num_layers)):
        raise ValueError(f"got {len(students)} students for a teacher with {adapter.num_layers} layers (their "
                         f"layers: {layers}); give one per layer, or several per layer with `layers` covering "
                         "every layer")
    device = torch.device(device)
    digest = checkpoint_digest(capture, distill, students, fingerprint)
    folder = Path(checkpoint_root) / digest[:16]
    trainer = _StreamTrainer(model, adapter, students, layers, distill, device)
    if device.type == "cuda" and next(model.parameters()).dtype == torch.float32:
        log("stream distill: the teacher runs in float32; loading it in bfloat16 (ModelSpec.dtype) halves its time")
    try:
        return _run(trainer, batches, capture, distill, folder, digest, log, log_curve)
    finally:
        trainer.close()


def _run(trainer: _StreamTrainer, batches: Callable[[], Iterable[dict]], capture: CaptureSpec,
         distill: DistillSpec, folder: Path, digest: str, log: Callable[[str], None],
         log_curve: CurveLogger | None) -> StreamResult:
    holdout = list(islice(batches(), distill.holdout_batches))
    if not holdout or int(holdout[0]["attention_mask"].sum()) == 0:
        raise ValueError("the distillation text yielded no tokens")

    saved = load_checkpoint(folder, digest, trainer.students, trainer.optimizer, trainer.device)
    if saved is None:
        trainer.calibrate(holdout[0])
        squared, moments, tokens = trainer.holdout_statistics(holdout)
        mean, mean_sq = moments / tokens
        variance = (mean_sq - mean.pow(2)).mean(-1).clamp_min(1e-12).float()  # [S]
        progress = _Progress(variance=variance, holdout_tokens=int(tokens.item()),
                             rel_error_init=relative_error(squared, tokens, trainer.output_width,
                                                           variance.double()).tolist(),
                             curve=[[] for _ in trainer.students])
    else:
        progress = _Progress.from_checkpoint(saved, trainer.device)
        log(f"resuming from the checkpoint at step {progress.step} ({progress.train_tokens:,} tokens) in {folder}")
    resumed_from = progress.step

    # One pass of tokenization only (no teacher) counts the data, for the plan: the budget, cycling
    # the data, or distill.epochs passes. The cosine decays over the planned tokens; warm-up is in steps.
    pass_tokens = sum(int(batch["attention_mask"].sum()) for batch in islice(batches(), distill.holdout_batches, None))
    if pass_tokens == 0:
        raise ValueError(f"the stream has no batch beyond the {distill.holdout_batches} held-out one(s); "
                         "raise the capture token_budget or lower holdout_batches")
    plan = plan_training(pass_tokens, progress.holdout_tokens, capture.token_budget, distill.epochs)
    warmup = min(distill.warmup_steps, math.ceil(plan.train_tokens / (capture.batch_size * capture.max_length)) // 2)
    pending: list[torch.Tensor] = []  # per-step losses [S] not yet moved to the host (avoids a sync per step)

    def flush_curve() -> None:
        if pending:
            for index, values in enumerate(torch.stack(pending).T.tolist()):
                if log_curve is not None:
                    log_curve(index, len(progress.curve[index]), values)
                progress.curve[index].extend(values)
            pending.clear()

    def checkpoint() -> None:
        flush_curve()
        if trainer.rank == 0:
            save_checkpoint(folder, digest, progress.step, trainer.students, trainer.optimizer,
                            progress.to_checkpoint(), trainer.device)
        latest = [curve[-1] for curve in progress.curve]
        log(f"stream distill: step {progress.step}, {progress.train_tokens:,} tokens, {progress.seconds:.0f}s; "
            f"loss mean {sum(latest) / len(latest):.4f}, max {max(latest):.4f} (checkpoint saved)")

    prior_seconds, session_started = progress.seconds, time.perf_counter()
    session_tokens, last_saved = 0, progress.step
    first_step_seconds, first_step_tokens = 0.0, 0
    # Between checkpoints a line every PERIODIC_SECONDS (or one redrawn on a terminal), with the time left.
    ticker = Progress("stream distill", plan.train_tokens, None if log is _silent else log, unit="training tokens")
    ticker.advance(progress.train_tokens, worked=False)
    if trainer.device.type == "cuda":  # otherwise minutes of silence before the first line
        log("stream distill: the first step compiles the students' GPU kernels and autotunes them on first use: "
            "minutes with an empty Triton cache (TRITON_CACHE_DIR), seconds with a kept one")
    while progress.train_tokens < plan.train_tokens:  # one pass over the data per iteration
        for index, batch in enumerate(batches()):
            if index < distill.holdout_batches or index < progress.batches_done:
                continue  # held out, or consumed before the checkpoint this run resumed from
            if progress.train_tokens >= plan.train_tokens:
                break  # the budget ends inside this pass
            lr = distill.learning_rate * warmup_cosine(progress.step, warmup, progress.train_tokens / plan.train_tokens)
            pending.append(trainer.step(batch, progress.variance, lr))
            tokens = int(batch["attention_mask"].sum())
            progress.step, progress.batches_done = progress.step + 1, index + 1
            progress.train_tokens += tokens
            session_tokens += tokens
            ticker.advance(tokens)
            if session_tokens == tokens:  # the session's first step, timed alone: reading its losses waits for it
                pending[-1].tolist()
                first_step_seconds, first_step_tokens = time.perf_counter() - session_started, tokens
            if progress.step % distill.checkpoint_every == 0:
                progress.seconds = prior_seconds + time.perf_counter() - session_started
                checkpoint()
                last_saved = progress.step
        else:
            progress.epoch, progress.batches_done = progress.epoch + 1, 0
    flush_curve()  # waits for the device, so the time below counts the work, not just its launch
    ticker.close()
    session_seconds = time.perf_counter() - session_started
    progress.seconds = prior_seconds + session_seconds
    if progress.step != last_saved:
        checkpoint()

    squared, _, tokens = trainer.holdout_statistics(holdout)
    rel_error_final = relative_error(squared, tokens, trainer.output_width, progress.variance.double()).tolist()
    results = [
        DistillResult(
            layer_idx=trainer.layers[index],
            state_dict=trained_weights(student),
            loss_curve=progress.curve[index],
            rel_error_init=progress.rel_error_init[index],
            rel_error_final=rel_error_final[index],
            steps=progress.step,
            train_tokens=progress.train_tokens,
            seconds=progress.seconds,
            data_tokens=plan.data_tokens,
            token_budget=plan.budget,
        )
        for index, student in enumerate(trainer.students)
    ]
    throughput = session_tokens / session_seconds if session_tokens else 0.0
    later_seconds = session_seconds - first_step_seconds
    steady = (session_tokens - first_step_tokens) / later_seconds if session_tokens > first_step_tokens else 0.0
    log(f"stream distill: {progress.step} steps, {progress.train_tokens:,} tokens in {progress.seconds:.1f}s "
        f"({throughput:,.0f} tokens/s this session, all {len(results)} students"
        + (f"; its first step took {first_step_seconds:.1f}s, the rest ran at {steady:,.0f} tokens/s)" if steady
           else ")")
        + first_step_note(first_step_seconds, later_seconds, progress.step - resumed_from - 1))
    return StreamResult(layers=results, steps=progress.step, train_tokens=progress.train_tokens,
                        tokens_per_pass=progress.holdout_tokens + plan.data_tokens,
                        seconds=progress.seconds, tokens_per_second=throughput, resumed_from_step=resumed_from,
                        first_step_seconds=first_step_seconds, steady_tokens_per_second=steady)

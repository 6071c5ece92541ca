"""The hot path: the training step, and one training epoch made of them.

The epoch takes its batches from the feed (usi/training/feed.py: where and why an epoch stops) and
hands each step's losses to the meter (usi/training/meter.py: the interval statistics, read with one
host sync per logging interval). The engine knows nothing about YAML or files.

What a step reads is split in two: `StepConfig`, the constant settings (precision, accumulation,
clipping, the loss), and `TrainState`, the mutable objects (models, optimizer, scheduler, EMA).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
from timm.data import Mixup
from timm.data.mixup import mixup_target

from usi.distill.features import FeatureKD, refuse_task_state
from usi.distill.loss import DistillLoss
from usi.models import Compute
from usi.training.feed import Feed, Position
from usi.training.meter import Meter


@dataclass(frozen=True)
class StepConfig:
    """A training step's constant settings."""
    compute: Compute
    num_classes: int
    loss: DistillLoss
    accum_steps: int = 1
    clip_grad: float | None = None
    label_smoothing: float = 0.0


@dataclass
class TrainState:
    """The mutable objects a training step touches."""
    student: nn.Module  # the plain student: EMA source, checkpoints, evaluation
    wrapped: nn.Module  # the student as trained: DDP-wrapped under torchrun, compiled when asked
    optimizer: torch.optim.Optimizer
    scheduler: object  # timm scheduler, stepped per optimizer update
    teacher: nn.Module | None = None
    ema: object | None = None  # timm ModelEmaV3
    scaler: torch.amp.GradScaler | None = None
    mixup: Mixup | None = None
    features: FeatureKD | None = None  # feature KD: the teacher's tap and the loss (wrapped returns features)
    soft_labels: Callable | None = None  # teacher.soft_labels: answers for the teacher in the step (a StoredLabels)

    @property
    def projector(self) -> nn.Module | None:
        """Feature KD's projection: trained, checkpointed, never exported."""
        return self.features.projector if self.features is not None else None

    def trained_parameters(self) -> list[nn.Parameter]:
        """Everything the optimizer updates: the student's parameters, and the projection's."""
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def models_to_eval(self) -> dict[str, nn.Module]:
        """The weights evaluated and exported: raw, and EMA when kept."""
        return {"raw": self.student} | ({"ema": self.ema.module} if self.ema is not None else {})

    def get_task_state(self) -> dict:
        """Checkpoint entries of the trained parts beside the student, EMA and optimizer (feature KD's)."""
        return self.features.get_task_state() if self.features is not None else {}

    def load_task_state(self, saved: dict, where: str) -> None:
        """Restores them from a checkpoint's entries, refusing one of another kind of run."""
        if self.features is not None:
            self.features.load_task_state(saved, where)
        else:
            refuse_task_state(saved, where)


def prepare_batch(state: TrainState, cfg: StepConfig, x: torch.Tensor, y: torch.Tensor):
    """Mixup/cutmix once: the student and the teacher see this same tensor."""
    if state.mixup is not None:
        x, y = state.mixup(x, y)
    else:
        y = mixup_target(y, cfg.num_classes, smoothing=cfg.label_smoothing)
    return cfg.compute.layout(x), y


def forward_backward(state: TrainState, cfg: StepConfig, x: torch.Tensor, y: torch.Tensor, *, sync: bool):
    """Returns detached (task, kd, feature) losses of this micro-batch; gradients are accumulated."""
    no_sync = getattr(state.wrapped, "no_sync", None)
    with (no_sync() if (no_sync is not None and not sync) else contextlib.nullcontext()):
        with cfg.compute.autocast():
            if state.features is not None:
                state.features.tap.clear()  # what the teacher records now, not what evaluation left
            teacher = state.soft_labels if state.soft_labels is not None else state.teacher
            teacher_logits = teacher(x) if teacher is not None else None
            out = state.wrapped(x)
        # feature KD's wrapper returns (logits, features); a DeiT student with loss.distill_token returns its
        # two heads as a tuple too, which the loss takes apart
        student_logits, projected = out if state.features is not None else (out, None)
        task, kd = cfg.loss(student_logits, y, teacher_logits)
        feature = state.features.loss(projected) if state.features is not None else torch.zeros_like(task)
        loss = (task + kd + feature) / cfg.accum_steps
        (state.scaler.scale(loss) if state.scaler is not None else loss).backward()
    return task.detach(), kd.detach(), feature.detach()


def optimizer_update(state: TrainState, cfg: StepConfig) -> torch.Tensor:
    """Clip, step (skipped when the gradient norm is not finite), zero. Returns the skip flag.

    The norm is taken after DDP's all-reduce, so every rank makes the same decision. Fused AdamW
    reads `found_inf` on the device and skips without a host sync, as it does under GradScaler.
    """
    opt = state.optimizer
    if state.scaler is not None:
        state.scaler.unscale_(opt)
    params = [p for p in state.trained_parameters() if p.grad is not None]
    if cfg.clip_grad:
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    bad = ~torch.isfinite(norm)
    if state.scaler is not None:
        state.scaler.step(opt)  # skips non-finite steps itself
        state.scaler.update()
    elif getattr(opt, "_step_supports_amp_scaling", False) and opt.defaults.get("fused"):
        opt.found_inf = bad.float()
        opt.step()
        del opt.found_inf
    elif not bad.item():  # optimizers without a fused path: one sync per update
        opt.step()
    opt.zero_grad(set_to_none=True)
    return bad


@dataclass(frozen=True)
class EpochResult:
    stats: dict  # mean losses, lr, updates skipped in this epoch, images/s
    end: Position  # where the next step starts: (epoch + 1, 0) after a whole epoch
    stopped_by: int = 0  # the signal that stopped the epoch early, 0 if none


def train_one_epoch(state: TrainState, cfg: StepConfig, feed: Feed, meter: Meter, *,
                    on_update: Callable[[Position], None] | None = None) -> EpochResult:
    """Trains on the feed's batches (one epoch, from feed.epoch(start) on, as far as the feed goes).

    After every optimizer update, on_update(position) is called with the position to resume from.
    """
    state.wrapped.train()
    meter.begin(feed.start.epoch)
    for x, y in feed:
        # ---- forward and backward on one (mixed) batch
        x, y = prepare_batch(state, cfg, x, y)
        losses = forward_backward(state, cfg, x, y, sync=feed.ends_update)
        # ---- every accum_steps micro-batches: optimizer, lr, EMA
        bad = update(state, cfg, updates=feed.updates) if feed.ends_update else None
        if bad is not None and on_update is not None:
            on_update(feed.at)  # the ledger: a mid-epoch checkpoint when one is due
        # ---- the interval's sums and non-finite guard; at the interval's end, its one host sync
        meter.add(losses, step=feed.step, updates=feed.updates, bad=bad)
    if feed.dropped:  # a signal killed the loader mid-update: back to the last update's end
        state.optimizer.zero_grad(set_to_none=True)
    return EpochResult(meter.end(stopped=bool(feed.stopped_by)), feed.end, feed.stopped_by)


def update(state: TrainState, cfg: StepConfig, *, updates: int) -> torch.Tensor:
    """One optimizer update (the `updates`-th): step, lr, EMA. Returns the skip flag (on the device)."""
    bad = optimizer_update(state, cfg)
    state.scheduler.step_update(num_updates=updates)
    if state.ema is not None:
        state.ema.update(state.student, step=updates)
    return bad

"""The hot path: one training epoch and one evaluation pass.

No host-device sync per step: losses and the non-finite guard accumulate on the device and are read
only every `log_interval` steps. The engine knows nothing about YAML or files.

What a step reads is split in two: `StepConfig`, the constant settings (precision, accumulation,
clipping, the loss), and `TrainState`, the mutable objects (models, optimizer, scheduler, EMA).
"""
from __future__ import annotations

import contextlib
import statistics
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
from timm.data import Mixup
from timm.data.mixup import mixup_target

from usi.data.loader import next_batch
from usi.distill.features import FeatureKD
from usi.distill.loss import DistillLoss
from usi.models import Compute
from usi.runtime.progress import Progress, Rate, step_line


class NonFiniteError(RuntimeError):
    pass


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

    @property
    def projector(self) -> nn.Module | None:
        """Feature KD's projection: trained, checkpointed, never exported."""
        return self.features.projector if self.features is not None else None

    def trained_parameters(self) -> list[nn.Parameter]:
        """Everything the optimizer updates: the student's parameters, and the projection's."""
        return [p for group in self.optimizer.param_groups for p in group["params"]]


@dataclass(frozen=True)
class Position:
    """Where training stands: `step` is the next step of `epoch`, after `updates` optimizer updates."""
    epoch: int
    step: int
    updates: int


@dataclass
class Guard:
    """Counts skipped (non-finite) updates on the device; checked at log time only."""
    device: torch.device
    limit: int
    skipped: torch.Tensor = None
    streak: torch.Tensor = None
    worst: torch.Tensor = None
    worst_step: torch.Tensor = None

    def __post_init__(self):
        z = lambda: torch.zeros((), dtype=torch.int64, device=self.device)  # noqa: E731
        self.skipped, self.streak, self.worst, self.worst_step = z(), z(), z(), z()

    def record(self, bad: torch.Tensor, update: int) -> None:
        bad = bad.to(torch.int64)
        self.skipped += bad
        self.streak.mul_(bad).add_(bad)
        hit = (self.streak >= self.limit) & (self.worst < self.limit)
        self.worst_step = torch.where(hit, update, self.worst_step)
        self.worst = torch.maximum(self.worst, self.streak)


def due(count: int, every: int, last: int | None = None) -> bool:
    """The one predicate for periodic actions: every `every`-th count, and at `last`."""
    return (every > 0 and count % every == 0) or count == last


def prepare_batch(state: TrainState, cfg: StepConfig, x: torch.Tensor, y: torch.Tensor):
    """Mixup/cutmix once: the student and the teacher see this same tensor."""
    if state.mixup is not None:
        x, y = state.mixup(x, y)
    else:
        y = mixup_target(y, cfg.num_classes, smoothing=cfg.label_smoothing)
    return cfg.compute.layout(x), y


def forward_backward(state: TrainState, cfg: StepConfig, x: torch.Tensor, y: torch.Tensor, *, sync: bool):
    """Returns detached (task, kd) losses of this micro-batch; gradients are accumulated."""
    no_sync = getattr(state.wrapped, "no_sync", None)
    with (no_sync() if (no_sync is not None and not sync) else contextlib.nullcontext()):
        with cfg.compute.autocast():
            if state.features is not None:
                state.features.tap.clear()  # what the teacher records now, not what evaluation left
            teacher_logits = state.teacher(x) if state.teacher is not None else None
            out = state.wrapped(x)
        student_logits, projected = out if isinstance(out, tuple) else (out, None)
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
    stats: dict  # mean losses, lr, skipped updates, images/s
    end: Position  # where the next step starts: (epoch + 1, 0) after a whole epoch
    stopped_by: int = 0  # the signal that stopped the epoch early, 0 if none


def train_one_epoch(state: TrainState, cfg: StepConfig, batches, *, start: Position, steps: int, epochs: int,
                    guard: Guard, progress: Progress, log_interval: int, images_per_step: int,
                    on_update: Callable[[Position], None] | None = None,
                    should_stop: Callable[[bool], tuple[int, bool]] | None = None,
                    on_log: Callable[[int, dict], None] | None = None) -> EpochResult:
    """Runs steps [start.step, steps) of start.epoch.

    After every optimizer update, on_update(position) is called with the position to resume from; at every
    logging interval, on_log(updates, the interval's losses, lr and images/s).
    Before every micro-batch, should_stop(loader_failed) -> (signal number or 0, any loader failed)
    is asked on every rank at once: a signal ends the epoch once the update in progress is done; a
    loader that broke after a signal ends it at once, at the last finished update.
    """
    state.wrapped.train()
    sums = torch.zeros(3, device=cfg.compute.device)
    counted, rate, timer_images, last, rates = 0, Rate(), 0, {}, []
    updates, stopped_by, end = start.updates, 0, None
    boundary = start  # the last position between two updates
    for step in range(start.step, steps):
        # ---- the next batch, and whether to go on
        batch, error = next_batch(batches)
        if should_stop is None and error is not None:
            raise error
        if should_stop is not None:
            stopped_by, failed = should_stop(error is not None)
            if failed and not stopped_by:  # a loader broke with no signal: a real failure, on every rank
                raise error or RuntimeError("another rank's data loader failed")
            if failed:  # a signal killed the loader: the rest of this update cannot be fetched
                state.optimizer.zero_grad(set_to_none=True)  # back to the last update's end
                end = boundary
                break
            if stopped_by and step % cfg.accum_steps == 0:  # between two updates: start no new one
                end = boundary
                break
        if batch is None:
            break
        # ---- forward and backward on one (mixed) batch
        x, y = prepare_batch(state, cfg, *batch)
        sync = (step + 1) % cfg.accum_steps == 0
        sums += torch.stack(forward_backward(state, cfg, x, y, sync=sync))
        counted += 1
        timer_images += images_per_step
        # ---- update: optimizer, lr, EMA, non-finite guard
        if sync:
            bad = optimizer_update(state, cfg)
            updates += 1
            state.scheduler.step_update(num_updates=updates)
            if state.ema is not None:
                state.ema.update(state.student, step=updates)
            guard.record(bad, updates)
            boundary = Position(start.epoch, step + 1, updates)
            if on_update is not None:
                on_update(boundary)
        # ---- logging: the one host sync of an interval
        if due(step + 1, log_interval, last=steps):
            last = read_logs(state, sums, counted, guard)
            rates.append(rate(timer_images))
            timer_images = 0
            shown = {"task": last["task_loss"], "kd": last["kd_loss"]} | (
                {"feat": last["feature_loss"]} if "feature_loss" in last else {})
            progress.show(step_line({**shown, "lr": last["lr"], "img/s": round(rates[-1])}, epoch=start.epoch,
                                    epochs=epochs, step=step + 1, steps=steps,
                                    seconds_per_step=images_per_step / max(rates[-1], 1e-9)))
            if on_log is not None:
                on_log(updates, {k: v for k, v in last.items() if k.endswith("_loss")}
                       | {"lr": last["lr"], "img_per_s": rates[-1]})
        if stopped_by and sync and step + 1 < steps:  # at the epoch's last step, the epoch ends as usual
            end = boundary
            break
    progress.done()
    end = end or Position(start.epoch + 1, 0, updates)
    if counted and (not last or stopped_by):
        last = read_logs(state, sums, counted, guard)
    last["img_per_s"] = float(statistics.median(rates)) if rates else 0.0
    last["images"] = counted * images_per_step
    return EpochResult(last, end, stopped_by)

def read_logs(state: TrainState, sums: torch.Tensor, counted: int, guard: Guard) -> dict:
    """The one host sync of a logging interval; stops the run after too many bad updates in a row."""
    task, kd, feature, skipped, worst, worst_step = torch.cat([
        sums / max(counted, 1), torch.stack([guard.skipped, guard.worst, guard.worst_step]).float()]).tolist()
    lr = max(group["lr"] for group in state.optimizer.param_groups)  # the peak (layer decay scales the others)
    if worst >= guard.limit:
        raise NonFiniteError(f"{int(worst)} non-finite updates in a row (run.max_nonfinite={guard.limit} reached "
                             f"at update {int(worst_step)}; lr now {lr:.3g})")
    out = {"task_loss": task, "kd_loss": kd, "lr": lr, "skipped_updates": int(skipped)}
    if state.features is not None:
        out["feature_loss"] = feature
    return out


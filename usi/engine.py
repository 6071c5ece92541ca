"""The hot path: one training epoch and one evaluation pass.

No host-device sync per step: losses and the non-finite guard accumulate on the device and are read
only every `log_interval` steps. The engine knows nothing about YAML or files.
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

from usi import distributed
from usi.loss import usi_loss
from usi.metrics import MetricSums
from usi.progress import Progress, Rate, step_line


class NonFiniteError(RuntimeError):
    pass


@dataclass
class Parts:
    """Everything a training step touches."""
    student: nn.Module  # what runs forward/backward: DDP-wrapped under torchrun, possibly compiled
    raw: nn.Module  # the unwrapped student (EMA source, checkpoints, evaluation)
    teacher: nn.Module | None
    ema: object | None  # timm ModelEmaV3
    optimizer: torch.optim.Optimizer
    scheduler: object  # timm scheduler, stepped per optimizer update
    scaler: torch.amp.GradScaler | None
    mixup: Mixup | None
    num_classes: int
    device: torch.device
    amp_dtype: torch.dtype | None = None
    channels_last: bool = False
    accum_steps: int = 1
    clip_grad: float | None = None
    kd_weight: float = 5.0
    temperature: float = 1.0
    hard_label: bool = True
    label_smoothing: float = 0.0


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


def autocast(parts: Parts):
    if parts.amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(parts.device.type, dtype=parts.amp_dtype)


def prepare_batch(parts: Parts, x: torch.Tensor, y: torch.Tensor):
    """Mixup/cutmix once: the student and the teacher see this same tensor."""
    if parts.mixup is not None:
        x, y = parts.mixup(x, y)
    else:
        y = mixup_target(y, parts.num_classes, smoothing=parts.label_smoothing)
    if parts.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y


def forward_backward(parts: Parts, x: torch.Tensor, y: torch.Tensor, sync: bool):
    """Returns detached (task, kd) losses of this micro-batch; gradients are accumulated."""
    no_sync = getattr(parts.student, "no_sync", None)
    with (no_sync() if (no_sync is not None and not sync) else contextlib.nullcontext()):
        with autocast(parts):
            teacher_logits = parts.teacher(x) if parts.teacher is not None else None
            student_logits = parts.student(x)
        task, kd = usi_loss(student_logits, y, teacher_logits, parts.kd_weight, parts.temperature,
                            parts.hard_label)
        loss = (task + kd) / parts.accum_steps
        (parts.scaler.scale(loss) if parts.scaler is not None else loss).backward()
    return task.detach(), kd.detach()


def optimizer_update(parts: Parts) -> torch.Tensor:
    """Clip, step (skipped when the gradient norm is not finite), zero. Returns the skip flag.

    The norm is taken after DDP's all-reduce, so every rank makes the same decision. Fused AdamW
    reads `found_inf` on the device and skips without a host sync, as it does under GradScaler.
    """
    opt = parts.optimizer
    if parts.scaler is not None:
        parts.scaler.unscale_(opt)
    params = [p for p in parts.raw.parameters() if p.grad is not None]
    if parts.clip_grad:
        norm = torch.nn.utils.clip_grad_norm_(params, parts.clip_grad)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    bad = ~torch.isfinite(norm)
    if parts.scaler is not None:
        parts.scaler.step(opt)  # skips non-finite steps itself
        parts.scaler.update()
    elif getattr(opt, "_step_supports_amp_scaling", False) and opt.defaults.get("fused"):
        opt.found_inf = bad.float()
        opt.step()
        del opt.found_inf
    elif not bad.item():  # optimizers without a fused path: one sync per update
        opt.step()
    opt.zero_grad(set_to_none=True)
    return bad


def train_one_epoch(parts: Parts, batches, epoch: int, epochs: int, start_step: int, steps: int,
                    num_updates: int, guard: Guard, log_interval: int, progress: Progress,
                    images_per_step: int, on_update: Callable[[int, int], None] | None = None) -> tuple[dict, int]:
    """Runs steps [start_step, steps) of `epoch`; returns (mean losses and throughput, num_updates)."""
    parts.student.train()
    sums = torch.zeros(2, device=parts.device)
    counted, rate, timer_images, last = 0, Rate(), 0, {}
    rates = []
    for step in range(start_step, steps):
        try:
            x, y = next(batches)
        except StopIteration:
            break
        x, y = prepare_batch(parts, x, y)
        sync = (step + 1) % parts.accum_steps == 0
        task, kd = forward_backward(parts, x, y, sync)
        sums += torch.stack([task, kd])
        counted += 1
        timer_images += images_per_step
        if sync:
            bad = optimizer_update(parts)
            num_updates += 1
            parts.scheduler.step_update(num_updates=num_updates)
            if parts.ema is not None:
                parts.ema.update(parts.raw, step=num_updates)
            guard.record(bad, num_updates)
            if on_update is not None:
                on_update(step + 1, num_updates)
        if (step + 1) % log_interval == 0 or step + 1 == steps:
            last = read_logs(parts, sums, counted, guard)
            rates.append(rate(timer_images))
            timer_images = 0
            progress.show(step_line(epoch, epochs, step + 1, steps, {
                "task": last["task_loss"], "kd": last["kd_loss"], "lr": last["lr"], "img/s": round(rates[-1])}))
    progress.done()
    if counted and not last:
        last = read_logs(parts, sums, counted, guard)
    last["img_per_s"] = float(statistics.median(rates)) if rates else 0.0
    return last, num_updates


def read_logs(parts: Parts, sums: torch.Tensor, counted: int, guard: Guard) -> dict:
    """The one host sync of a logging interval; stops the run after too many bad updates in a row."""
    task, kd, skipped, worst, worst_step = torch.cat([
        sums / max(counted, 1), torch.stack([guard.skipped, guard.worst, guard.worst_step]).float()]).tolist()
    lr = parts.optimizer.param_groups[-1]["lr"]
    if worst >= guard.limit:
        raise NonFiniteError(f"{int(worst)} non-finite updates in a row ending at update {int(worst_step)} "
                             f"(lr {lr:.3g}); the last good checkpoint is kept")
    return {"task_loss": task, "kd_loss": kd, "lr": lr, "skipped_updates": int(skipped)}


@torch.no_grad()
def evaluate(models: dict[str, nn.Module], loader, parts_like: Parts, n_bins: int = 15,
             teacher: nn.Module | None = None, teacher_logits: torch.Tensor | None = None,
             keep_teacher_logits: bool = False):
    """One pass over this rank's shard; every model sees the same batch. Exact across ranks.

    Teacher logits come from `teacher_logits` (this rank's shard, in loader order) when given, else
    from running `teacher`, whose own metrics are then reported as "teacher". Returns
    ({name: metrics}, this rank's teacher logits if kept, else None).
    """
    for m in models.values():
        m.eval()
    device = parts_like.device
    run_teacher = teacher is not None and teacher_logits is None
    sums = {name: MetricSums(n_bins, device) for name in list(models) + (["teacher"] if run_teacher else [])}
    kept, offset = [], 0
    for x, y in loader:
        if parts_like.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(parts_like):
            if teacher_logits is not None:
                t = teacher_logits[offset:offset + len(y)].to(device, non_blocking=True)
            else:
                t = teacher(x).float() if teacher is not None else None
            for name, model in models.items():
                sums[name].add(model(x).float(), y, t)
        if run_teacher:
            sums["teacher"].add(t, y)
        if keep_teacher_logits and t is not None:
            kept.append(t.float().cpu())  # fp32: cached and live metrics match exactly
        offset += len(y)
    results = {}
    if sums:
        flat = distributed.sum_across(torch.stack([s.flat() for s in sums.values()]))
        for (name, s), row in zip(sums.items(), flat):
            s.load_flat(row)
            results[name] = s.result()
    return results, (torch.cat(kept) if kept else None)

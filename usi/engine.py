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

from usi import distributed
from usi.features import FeatureKD
from usi.loss import DistillLoss
from usi.metrics import MetricSums
from usi.progress import Progress, Rate, step_line
from usi.teacher import Ensemble, combine_logits


class NonFiniteError(RuntimeError):
    pass


@dataclass(frozen=True)
class Compute:
    """How tensors are computed: the device, the autocast dtype (None: fp32) and the memory format."""
    device: torch.device
    amp_dtype: torch.dtype | None = None
    channels_last: bool = False

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def layout(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


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


def next_batch(batches) -> tuple:
    """(batch or None at the epoch's end, the loader's error or None). A SIGTERM sent to every process
    kills the loader's workers; whether that is a stop or a failure is for all ranks to decide."""
    try:
        return next(batches), None
    except StopIteration:
        return None, None
    except (RuntimeError, OSError, EOFError) as e:  # "DataLoader worker (pid ...) exited unexpectedly", or
        return None, e  # the pipe to a worker that died mid-transfer (ConnectionResetError)


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


def fp32_logits(model: nn.Module, x: torch.Tensor, compute: Compute) -> torch.Tensor:
    """Logits for metrics: the body under autocast, the classifier head in fp32. Rounding 1000-class
    logits to bf16 ties or flips the top class of about 1% of rows; the head is a small part of the cost."""
    if compute.amp_dtype is None:
        return model(x).float()
    if not (hasattr(model, "forward_features") and hasattr(model, "forward_head")):
        return model(x).float()  # not split into body and head: the whole forward in fp32
    with compute.autocast():
        features = model.forward_features(x)
    with torch.autocast(compute.device.type, enabled=False):
        return model.forward_head(features.float()).float()


class LoaderBroken(RuntimeError):
    """An evaluation's loader died (on this rank or another): after a stop signal, a stop; else a failure."""


def teacher_outputs(teacher: nn.Module, x: torch.Tensor, compute: Compute) -> torch.Tensor:
    """A teacher's logits for metrics, [B, C]; an ensemble's are [B, 1 + M, C]: combined, then each member."""
    if isinstance(teacher, Ensemble):
        members = [fp32_logits(m, x, compute) for m in teacher.members]
        return torch.stack([combine_logits(members, teacher.combine), *members], dim=1)
    return fp32_logits(teacher, x, compute)


def member_count(teacher: nn.Module | None, teacher_logits: torch.Tensor | None) -> int:
    if isinstance(teacher, Ensemble):
        return len(teacher.members)
    return teacher_logits.shape[1] - 1 if teacher_logits is not None and teacher_logits.ndim == 3 else 0


@torch.no_grad()
def evaluate(models: dict[str, nn.Module], loader, compute: Compute, *, n_bins: int = 15,
             teacher: nn.Module | None = None, teacher_logits: torch.Tensor | None = None,
             keep_teacher_logits: bool = False):
    """One pass over this rank's shard; every model sees the same batch. Exact across ranks.

    Teacher logits come from `teacher_logits` (this rank's samples, by position in its pass) when given,
    else from running `teacher`, whose own metrics are then reported as "teacher". An ensemble's logits
    carry its members' too ([n, 1 + M, C]): agreement and KL are then against the ensemble, and each
    model's "members" lists them against each member. Returns ({name: metrics}, this rank's teacher
    logits by position if kept, else None).
    """
    for m in models.values():
        m.eval()
    run_teacher = teacher is not None and teacher_logits is None
    members = member_count(teacher, teacher_logits)
    names = list(models) + (["teacher"] if run_teacher else [])
    sums = {(name, i): MetricSums(n_bins, compute.device) for name in names for i in [None, *range(members)]}
    if teacher_logits is not None:
        teacher_logits = teacher_logits.to(compute.device)
    kept = []  # (positions, logits) of this rank's samples
    batches = iter(loader)
    while True:
        batch, broken = next_batch(batches)  # a worker killed by a SIGTERM to the group: broken
        if batch is None:
            break
        x, target = batch  # target rows: [label, the sample's position in this rank's pass]
        if len(target) == 0:
            continue  # every image of this batch was unreadable
        y, pos = target[:, 0], target[:, 1]
        x = compute.layout(x)
        if teacher_logits is not None:
            t = teacher_logits.index_select(0, pos)
        else:
            t = teacher_outputs(teacher, x, compute) if teacher is not None else None
        # against: None (no teacher), or [the teacher's (ensemble's) logits, then each member's]
        against = None if t is None else ([t] if t.ndim == 2 else list(t.unbind(1)))
        for name, model in models.items():
            logits = fp32_logits(model, x, compute)
            for i, target_logits in enumerate(against or [None]):
                sums[name, i - 1 if i else None].add(logits, y, target_logits)
        if run_teacher:
            for i, teacher_part in enumerate(against):
                sums["teacher", i - 1 if i else None].add(teacher_part, y)
        if keep_teacher_logits and t is not None:
            kept.append((pos.cpu(), t.float().cpu()))  # fp32: cached and live metrics match exactly
    # every rank reaches this point, broken or not: all agree before the collective that sums the metrics
    if distributed.max_across(torch.tensor([float(broken is not None)], device=compute.device)).item():
        raise LoaderBroken("evaluation's data loader failed" + (f": {broken}" if broken else " on another rank"))
    return summed(sums, names), (by_position(kept, local_size(loader)) if kept else None)


def summed(sums: dict, names: list[str]) -> dict:
    """{name: metrics} summed across ranks; with ensemble members, metrics["members"] lists each
    member's: agreement and KL for a student, the member's own metrics for the teacher."""
    if not sums:
        return {}
    flat = distributed.sum_across(torch.stack([s.flat() for s in sums.values()]))
    for s, row in zip(sums.values(), flat):
        s.load_flat(row)
    results = {}
    for name in names:
        results[name] = sums[name, None].result()
        parts = [sums[key].result() for key in sums if key[0] == name and key[1] is not None]
        if parts:
            keep = (lambda m: m) if name == "teacher" else (
                lambda m: {k: m[k] for k in ("agreement", "kl") if k in m})
            results[name]["members"] = [keep(m) for m in parts]
    return results


def local_size(loader) -> int:
    """How many samples this rank's pass holds, when its sampler knows (image folders); else 0."""
    try:
        return len(loader.sampler)
    except TypeError:  # an iterable dataset (shards): as many as were seen
        return 0


def by_position(chunks: list, size: int) -> torch.Tensor:
    """[max(size, last position + 1), (1 + members,) classes] logits, row p for the sample at position p; rows of
    samples that could not be read stay NaN."""
    positions = torch.cat([p for p, _ in chunks])
    logits = torch.cat([v for _, v in chunks])
    out = torch.full((max(size, int(positions.max()) + 1), *logits.shape[1:]), float("nan"))
    out[positions] = logits
    return out

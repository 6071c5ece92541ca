"""The meter: an epoch's interval statistics.

Losses and the non-finite guard accumulate on the device; they are read once per logging interval
(run.log_interval steps, and the epoch's last), the only host sync of the hot path. At that read the
meter draws the progress line (its ETA counts the evaluations still to come), hands the interval's means
to the trackers and times images/s; at the epoch's end it gives the epoch's means for metrics.jsonl.
"""
from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass

import torch

from usi.runtime.progress import Progress, Rate, step_line
from usi.training.feed import due

# Before the first evaluation is timed, an evaluation's cost per val image as a share of a training step's per
# image: it runs the raw and EMA forwards only, where a step runs the teacher's and the student's forward
# and the student's backward (about four forwards' work).
EVAL_SHARE = 0.5


class NonFiniteError(RuntimeError):
    pass


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
        z = lambda: torch.zeros((), dtype=torch.int64, device=self.device)
        self.skipped, self.streak, self.worst, self.worst_step = z(), z(), z(), z()

    def record(self, bad: torch.Tensor, update: int) -> None:
        bad = bad.to(torch.int64)
        self.skipped += bad
        self.streak.mul_(bad).add_(bad)
        hit = (self.streak >= self.limit) & (self.worst < self.limit)
        self.worst_step = torch.where(hit, update, self.worst_step)
        self.worst = torch.maximum(self.worst, self.streak)


class Meter:
    """For the whole run (the guard counts since this process started); `begin(epoch)` starts an epoch.

    optimizer: its peak lr is shown. feature_kd: a third loss (feature KD's) is kept. on_log(updates,
    the interval's losses, lr and images/s) is called at every interval (the trackers). val_images,
    eval_every and eval_s (the last evaluation's seconds; the loop sets it after each): the ETA's evaluations.
    """

    def __init__(self, optimizer, *, guard: Guard, progress: Progress, log_interval: int, images_per_step: int,
                 steps: int, epochs: int, feature_kd: bool = False,
                 on_log: Callable[[int, dict], None] | None = None, val_images: int = 0, eval_every: int = 1,
                 eval_s: float | None = None):
        self.optimizer, self.guard, self.progress, self.on_log = optimizer, guard, progress, on_log
        self.log_interval, self.images_per_step = log_interval, images_per_step
        self.steps, self.epochs, self.feature_kd = steps, epochs, feature_kd
        self.val_images, self.eval_every, self.eval_s = val_images, eval_every, eval_s
        self.skipped_before = 0  # the guard's count at the last epoch's end
        self.begin(0)

    def begin(self, epoch: int) -> None:
        self.epoch, self.sums, self.counted = epoch, torch.zeros(3, device=self.guard.device), 0
        self.rate, self.images, self.last, self.rates = Rate(), 0, {}, []

    def add(self, losses: tuple, *, step: int, updates: int, bad: torch.Tensor | None = None) -> None:
        """After micro-batch `step` (its update done, if it ended one: `bad`, the update's skip flag)."""
        self.sums += torch.stack(losses)
        self.counted += 1
        self.images += self.images_per_step
        if bad is not None:
            self.guard.record(bad, updates)
        if due(step + 1, self.log_interval, last=self.steps):
            self.log(step, updates)

    def log(self, step: int, updates: int) -> None:
        self.last = self.read()
        self.rates.append(self.rate(self.images))
        self.images = 0
        last, rate = self.last, self.rates[-1]
        shown = {"task": last["task_loss"], "kd": last["kd_loss"]} | (
            {"feat": last["feature_loss"]} if "feature_loss" in last else {})
        self.progress.show(step_line({**shown, "lr": last["lr"], "img/s": round(rate)}, epoch=self.epoch,
                                     epochs=self.epochs, step=step + 1, steps=self.steps,
                                     seconds_per_step=self.images_per_step / max(rate, 1e-9),
                                     eval_left_s=self.eval_left(rate)))
        if self.on_log is not None:
            self.on_log(updates, {k: v for k, v in last.items() if k.endswith("_loss")}
                        | {"lr": last["lr"], "img_per_s": rate})

    def eval_left(self, rate: float) -> tuple[float, float]:
        """Seconds of evaluation still to come: (this epoch's, the run's), from the last evaluation's time or,
        before one was timed, from the val split's size at this pace."""
        each = self.eval_s if self.eval_s is not None else EVAL_SHARE * self.val_images / max(rate, 1e-9)
        due_epochs = [e for e in range(self.epoch, self.epochs) if due(e + 1, self.eval_every, last=self.epochs)]
        return (each if self.epoch in due_epochs else 0.0), each * len(due_epochs)

    def read(self) -> dict:
        """The one host sync of a logging interval; stops the run after too many bad updates in a row."""
        g = self.guard
        task, kd, feature, skipped, worst, worst_step = torch.cat([
            self.sums / max(self.counted, 1), torch.stack([g.skipped, g.worst, g.worst_step]).float()]).tolist()
        lr = max(group["lr"] for group in self.optimizer.param_groups)  # the peak (layer decay scales the others)
        if worst >= g.limit:
            raise NonFiniteError(f"{int(worst)} non-finite updates in a row (run.max_nonfinite={g.limit} reached "
                                 f"at update {int(worst_step)}; lr now {lr:.3g})")
        out = {"task_loss": task, "kd_loss": kd, "lr": lr, "skipped_updates": int(skipped)}
        if self.feature_kd:
            out["feature_loss"] = feature
        return out

    def end(self, stopped: bool) -> dict:
        """The epoch's means (every micro-batch counted), images/s (the intervals' median), images, and the
        updates skipped as non-finite during it."""
        self.progress.done()
        last = self.last
        if self.counted and (not last or stopped):
            last = self.read()
        last["img_per_s"] = float(statistics.median(self.rates)) if self.rates else 0.0
        last["images"] = self.counted * self.images_per_step
        if "skipped_updates" in last:
            last["skipped_updates"], self.skipped_before = (last["skipped_updates"] - self.skipped_before,
                                                            last["skipped_updates"])
        return last

"""Recipe sections -> torch objects: student, teacher, precision, optimizer, scheduler, EMA, mixup.

Shared by `usi train` and `usi eval`; nothing here touches the run directory or the data.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from timm.data import Mixup
from timm.optim import create_optimizer_v2, param_groups_weight_decay
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from torch.nn.parallel import DistributedDataParallel

from usi import data
from usi.data.loader import seed_everything
from usi.distill.loss import DistillLoss
from usi.distill.teacher import Ensemble
from usi.errors import UsageError
from usi.models import (
    Compute,
    check_input_size,
    compute_for,
    create_student,
    input_spec,
    place,
    teacher_for,
)
from usi.recipe import Recipe, mixes
from usi.runtime import distributed, environment
from usi.training import tracking
from usi.training.engine import StepConfig, TrainState

log = logging.getLogger("usi")


def batch_plan(recipe: Recipe, world: int) -> tuple[int, float, str]:
    """(gradient accumulation steps, lr, a line saying so) that reconcile this world size with
    optim.global_batch."""
    per_step = recipe.data.batch_size * world
    target, lr, rule = recipe.optim.global_batch, recipe.optim.lr, recipe.optim.batch_rule
    if rule == "accumulate":
        if target % per_step:
            raise UsageError(f"optim.global_batch={target} is not a multiple of data.batch_size x processes "
                             f"= {recipe.data.batch_size} x {world}; change one, or set optim.batch_rule=linear")
        accum = target // per_step
        return accum, lr, f"global batch {target} = {recipe.data.batch_size} x {world} processes x {accum} accumulation"
    scale = {"linear": per_step / target, "sqrt": math.sqrt(per_step / target), "none": 1.0}[rule]
    return 1, lr * scale, (f"global batch {per_step} (recipe: {target}), "
                           f"lr {lr:g} x {scale:.4g} ({rule}) = {lr * scale:g}")


def create_optimizer(recipe: Recipe, student: torch.nn.Module, lr: float,
                     extra: torch.nn.Module | None = None) -> torch.optim.Optimizer:
    """timm's optimizer for the student; `extra` (feature KD's projection) joins it as groups of its own,
    at the full lr with the same weight decay (none on biases), so layer decay sees the student alone."""
    fused = recipe.optim.name in ("adamw", "adam") and all(p.dtype == torch.float32 for p in student.parameters())
    try:
        optimizer = create_optimizer_v2(student, opt=recipe.optim.name, lr=lr,
                                        weight_decay=recipe.optim.weight_decay, eps=recipe.optim.eps,
                                        layer_decay=recipe.optim.layer_decay, **({"fused": True} if fused else {}))
    except (ValueError, AssertionError) as e:
        raise UsageError(f"optim.name={recipe.optim.name!r}: {e}") from None
    if extra is not None:
        for group in param_groups_weight_decay(extra, recipe.optim.weight_decay):
            if group["params"]:
                optimizer.add_param_group(group)
    return optimizer


def feature_kd(recipe: Recipe, student: torch.nn.Module, teacher, size: int):
    """(the student wrapped with its projection, the teacher side) for features.student/teacher."""
    from usi.distill import features
    from usi.distill.teacher import primary

    first = primary(teacher)
    wrapper, kd = features.build(recipe.features, student, first.model, size, first.input_size,
                                 next(student.parameters()).device)
    log.info(features.describe(wrapper, recipe.features))
    return wrapper, kd


def create_scheduler(recipe: Recipe, optimizer, updates_per_epoch: int):
    """(timm scheduler stepped per update, total epochs including cool-down)."""
    s = recipe.sched
    return create_scheduler_v2(optimizer, sched=s.name, num_epochs=s.epochs, warmup_epochs=s.warmup_epochs,
                               warmup_lr=s.warmup_lr, min_lr=s.min_lr, cooldown_epochs=s.cooldown_epochs,
                               step_on_epochs=False, updates_per_epoch=max(1, updates_per_epoch))


def create_ema(recipe: Recipe, student: torch.nn.Module) -> ModelEmaV3 | None:
    return ModelEmaV3(student, decay=recipe.ema.decay) if recipe.ema.enabled else None


def create_mixup(recipe: Recipe, num_classes: int) -> Mixup | None:
    a = recipe.aug
    if not mixes(a):
        return None
    return Mixup(mixup_alpha=a.mixup_alpha, cutmix_alpha=a.cutmix_alpha, prob=a.mixup_prob,
                 switch_prob=a.mixup_switch_prob, mode=a.mixup_mode, label_smoothing=a.label_smoothing,
                 num_classes=num_classes)


def step_config(recipe: Recipe, compute: Compute, num_classes: int, accum_steps: int) -> StepConfig:
    loss = DistillLoss(kd_weight=recipe.loss.kd_weight, temperature=recipe.loss.temperature,
                       hard_label=recipe.loss.hard_label, weighting=recipe.loss.weighting, alpha=recipe.loss.alpha)
    return StepConfig(compute=compute, num_classes=num_classes, loss=loss, accum_steps=accum_steps,
                      clip_grad=recipe.optim.clip_grad, label_smoothing=recipe.aug.label_smoothing)


def grad_scaler(compute: Compute) -> torch.amp.GradScaler | None:
    """fp16 needs loss scaling; bf16 and fp32 do not."""
    return torch.amp.GradScaler("cuda") if compute.amp_dtype == torch.float16 else None


# ---------------------------------------------------------------- a whole training run


@dataclass
class Training:
    """Everything a run holds once built."""
    recipe: Recipe
    dist: distributed.Dist
    run_dir: Path
    state: TrainState
    cfg: StepConfig
    train_split: data.Split
    val_split: data.Split
    train_loader: object
    val_loader: object
    steps: int  # per epoch
    epochs: int  # including cool-down
    params: int
    versions: dict  # usi, torch, timm, CUDA, cuDNN, git: recorded in every checkpoint

    @property
    def classes(self) -> list[str]:
        return self.train_split.classes


def build_training(recipe: Recipe, dist: distributed.Dist, run_dir: Path, fresh: bool = True) -> Training:
    """Every object a training run needs, checked, before anything is written. `fresh`: a new run (a
    resumed one takes its weights from the checkpoint, so model.weights and model.pretrained are not read)."""
    accum, lr, plan = batch_plan(recipe, dist.world)  # the world size is known: fail before any work
    tracking.check_available(recipe.run.loggers)
    train_split, val_split = data.open_splits(recipe.data)
    num_classes = len(train_split.classes)
    seed_everything(recipe.run.seed)
    student = create_student(recipe.model, num_classes, recipe.data.input_size, starting_weights=fresh)
    spec = input_spec(student, recipe.data.input_size)
    check_input_size(recipe.model, num_classes, spec.size)
    compute = compute_for(recipe, dist.device)
    environment.set_backend_flags(recipe.run, dist.device)
    teacher = teacher_for(recipe, num_classes, spec, compute)
    place(student, compute)

    train_loader = data.train_loader(train_split, recipe.data, recipe.aug, spec, seed=recipe.run.seed, dist=dist)
    val_loader = data.val_loader(val_split, recipe.data, recipe.aug, spec, dist=dist)
    steps = train_loader.steps_per_epoch()
    if recipe.run.max_steps:
        steps = min(steps, recipe.run.max_steps)
    if steps == 0:
        raise UsageError(f"data.batch_size={recipe.data.batch_size} x {dist.world} processes is larger than one "
                         f"epoch of {len(train_split)} training samples")

    log.info(plan)
    if steps % accum:
        log.warning(f"{steps} steps per epoch is not a multiple of {accum} accumulation steps; "
                    f"the last {steps % accum} steps of each epoch carry gradient into the next")
    ema = create_ema(recipe, student)  # before feature KD's hook: the EMA copy must not carry it
    wrapped, features = student, None
    if recipe.features.student:
        wrapped, features = feature_kd(recipe, student, teacher, spec.size)
    optimizer = create_optimizer(recipe, student, lr, extra=features.projector if features else None)
    scheduler, epochs = create_scheduler(recipe, optimizer, steps // accum)
    if dist.distributed:
        device_ids = [dist.device.index] if dist.device.type == "cuda" else None
        wrapped = DistributedDataParallel(wrapped, device_ids=device_ids)
    if recipe.run.compile:
        if features is not None:
            # dynamo shares one compiled graph between instances of a class (an ensemble's two ResNets) and
            # by default does not guard on forward hooks: the tapped teacher could run its hook-less twin's
            # graph and never record its feature. Guarding on hooks gives each its own graph.
            torch._dynamo.config.skip_nnmodule_hook_guards = False
        wrapped = torch.compile(wrapped)
        if teacher is not None:
            teacher.compile()
    state = TrainState(student=student, wrapped=wrapped, optimizer=optimizer, scheduler=scheduler, teacher=teacher,
                       ema=ema, scaler=grad_scaler(compute), mixup=create_mixup(recipe, num_classes),
                       features=features)
    params = sum(p.numel() for p in student.parameters())
    log.info(f"student {recipe.model.name}: {params / 1e6:.2f}M params, input {spec.size}, {num_classes} classes, "
             f"{len(train_split)} train / {len(val_split)} val images, {steps} steps x {epochs} epochs"
             + (f", teacher {' + '.join(t.name for t in recipe.teachers())}" if teacher is not None
                else ", no teacher"))
    return Training(recipe=recipe, dist=dist, run_dir=run_dir, state=state,
                    cfg=step_config(recipe, compute, num_classes, accum), train_split=train_split,
                    val_split=val_split, train_loader=train_loader, val_loader=val_loader, steps=steps, epochs=epochs,
                    params=params, versions=environment.versions())


def dry_run(recipe: Recipe) -> str:
    """`usi train --dry-run`: everything a start checks (recipe, run directory, data layout and counts, the
    student, the teacher's weights and classes), and the plan it would follow. Writes nothing."""
    from usi.training import rundir

    dist = distributed.Dist(world=int(os.environ.get("WORLD_SIZE", "1")))  # no process group is joined
    accum, lr, plan = batch_plan(recipe, dist.world)
    tracking.check_available(recipe.run.loggers)
    run_dir = recipe.run_dir()
    resume_from = rundir.resume_source(recipe, run_dir)
    train_split, val_split = data.open_splits(recipe.data)
    classes = len(train_split.classes)
    student = create_student(recipe.model, classes, recipe.data.input_size)
    spec = input_spec(student, recipe.data.input_size)
    check_input_size(recipe.model, classes, spec.size)
    teacher = teacher_for(recipe, classes, spec, Compute(torch.device("cpu")))
    feature_line = []
    if recipe.features.student:
        from usi.distill import features

        feature_line = [features.describe(feature_kd(recipe, student, teacher, spec.size)[0], recipe.features)]
    steps = data.train_loader(train_split, recipe.data, recipe.aug, spec, seed=recipe.run.seed,
                              dist=dist).steps_per_epoch()
    steps = min(steps, recipe.run.max_steps) if recipe.run.max_steps else steps
    epochs = recipe.sched.epochs + recipe.sched.cooldown_epochs
    params = sum(p.numel() for p in student.parameters())
    members = teacher.members if isinstance(teacher, Ensemble) else [teacher] if teacher is not None else []
    teacher_line = "; ".join(
        f"{cfg.name}, {sum(p.numel() for p in m.parameters()) / 1e6:.1f}M params, "
        f"{cfg.weights or 'timm pretrained weights'}, {classes} classes, sees {m.input_size or spec.size} px"
        for cfg, m in zip(recipe.teachers(), members)) or "none"
    if len(members) > 1:
        teacher_line = f"an ensemble of {len(members)} (mean of their {recipe.teacher.combine}): {teacher_line}"
    return "\n".join([
        "# the effective recipe", recipe.to_yaml().rstrip(), "",
        "# the plan (nothing was written)",
        f"run directory: {run_dir} ({'resume from ' + str(resume_from) if resume_from else 'a fresh start'})",
        f"data: {recipe.data.format} at {recipe.data.root}: {len(train_split)} train / {len(val_split)} val images, "
        f"{classes} classes",
        f"student: {recipe.model.name}, {params / 1e6:.2f}M params, input {spec.size} px",
        f"teacher: {teacher_line}",
        *feature_line,
        f"batch: {plan}; lr {lr:g}",
        f"steps: {steps} per epoch x {epochs} epochs = {steps * epochs} steps, {steps // accum * epochs} updates",
    ])

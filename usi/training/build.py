"""Recipe sections -> torch objects: student, teacher, precision, optimizer, scheduler, EMA, mixup, and
the whole of a training run (`build_training`), which `usi train --dry-run` builds too and stops there.

Nothing here touches the run directory.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import NamedTuple

import torch
from timm.data import Mixup
from timm.optim import create_optimizer_v2, param_groups_weight_decay
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from torch.nn.parallel import DistributedDataParallel

from usi import data
from usi.data.loader import seed_everything
from usi.distill.loss import DistillLoss, train_distillation_token
from usi.distill.teacher import Ensemble
from usi.errors import UsageError, printable, quote, shorten
from usi.models import Compute, check_input_size, compute_for, create_student, input_spec, place, teacher_for
from usi.recipe import Recipe, mixes
from usi.runtime import distributed, environment
from usi.training import stored_teacher, tracking
from usi.training.engine import StepConfig, TrainState

log = logging.getLogger("usi")


class BatchPlan(NamedTuple):
    accum: int  # gradient accumulation steps
    lr: float
    line: str  # the plan in words


def batch_plan(recipe: Recipe, world: int) -> BatchPlan:
    """(gradient accumulation steps, lr, a line saying so) that reconcile this world size with
    optim.global_batch."""
    per_step = recipe.data.batch_size * world
    target, lr, rule = recipe.optim.global_batch, recipe.optim.lr, recipe.optim.batch_rule
    if rule == "accumulate":
        if target % per_step:
            raise UsageError(f"optim.global_batch={target} is not a multiple of data.batch_size x processes "
                             f"= {recipe.data.batch_size} x {world}; change one, or set optim.batch_rule=linear")
        accum = target // per_step
        return BatchPlan(accum, lr, f"global batch {target} = {recipe.data.batch_size} x {world} processes x "
                                    f"{accum} accumulation")
    scale = {"linear": per_step / target, "sqrt": math.sqrt(per_step / target), "none": 1.0}[rule]
    return BatchPlan(1, lr * scale, f"global batch {per_step} (recipe: {target}), "
                                    f"lr {lr:g} x {scale:.4g} ({rule}) = {lr * scale:g}")


def check_updates(recipe: Recipe, *, steps: int, accum: int, world: int, samples: int) -> None:
    """A run that would make no optimizer update, or never leave its warm-up, is refused with the numbers
    that make it so (it would train nothing and save its random weights as the best)."""
    per_epoch, s = steps // accum, recipe.sched
    total, warmup = per_epoch * (s.epochs + s.cooldown_epochs), per_epoch * s.warmup_epochs
    per_step = recipe.data.batch_size * world
    capped = f" (run.max_steps={steps})" if recipe.run.max_steps == steps else ""
    if total == 0:
        raise UsageError(f"this recipe makes no optimizer update: an epoch of {samples} training samples is "
                         f"{steps} steps{capped} of data.batch_size={recipe.data.batch_size} x {world} processes, "
                         f"fewer than the {accum} accumulated steps of one update "
                         f"(optim.global_batch={recipe.optim.global_batch}); set optim.global_batch to at most "
                         f"{steps * per_step}, or optim.batch_rule=linear")
    if total <= warmup:
        raise UsageError(f"this recipe never leaves its warm-up: {total} optimizer updates in all, "
                         f"sched.warmup_epochs={s.warmup_epochs} x {per_epoch} updates per epoch = {warmup}")


def create_optimizer(recipe: Recipe, student: torch.nn.Module, lr: float,
                     extra: torch.nn.Module | None = None) -> torch.optim.Optimizer:
    """timm's optimizer for the student; `extra` (feature KD's projection) joins it as groups of its own,
    at the full lr with the same weight decay (none on biases), so layer decay sees the student alone."""
    o = recipe.optim
    fused = (o.name in ("adamw", "adam") and not o.kwargs.keys() & {"fused", "foreach"}
             and all(p.dtype == torch.float32 for p in student.parameters()))
    args = {"fused": True} if fused else {}
    if o.betas is not None:
        args["betas"] = tuple(o.betas)
    if o.momentum is not None:
        args["momentum"] = o.momentum
    try:
        optimizer = create_optimizer_v2(student, opt=o.name, lr=lr, weight_decay=o.weight_decay, eps=o.eps,
                                        layer_decay=o.layer_decay, **args, **o.kwargs)
    except (ValueError, AssertionError, TypeError) as e:  # e.g. nesterov without momentum
        given = f" with optim.kwargs {o.kwargs}" if o.kwargs else ""
        raise UsageError(f"optim.name={quote(o.name)}{given}: {shorten(str(e), 200)}") from None
    if extra is not None:
        for group in param_groups_weight_decay(extra, recipe.optim.weight_decay):
            if group["params"]:
                optimizer.add_param_group(group)
    return optimizer


def layer_lrs(optimizer, student: torch.nn.Module, lr: float, decay: float) -> str:
    """Layer decay's peak learning rates in one line: group count, range, and each level's first parameter
    (the first three and the last two levels)."""
    names = {id(p): n for n, p in student.named_parameters()}
    levels = {}
    for g in optimizer.param_groups:
        first = next((names[id(p)] for p in g["params"] if id(p) in names), None)
        if first is not None:
            levels.setdefault(g.get("lr_scale", 1.0), first)
    shown = [f"{lr * scale:.3g} {name}" for scale, name in sorted(levels.items())]
    if len(shown) > 5:
        shown = shown[:3] + ["..."] + shown[-2:]
    return (f"layer decay {decay:g}: {len(optimizer.param_groups)} param groups at {len(levels)} peak learning "
            f"rates, {lr * min(levels):.3g} .. {lr * max(levels):.3g}: {', '.join(shown)}")


def grad_checkpointing(student: torch.nn.Module, name: str) -> None:
    """model.grad_checkpointing: timm's own switch; the models without it assert or lack the method."""
    try:
        student.set_grad_checkpointing(True)
    except (AssertionError, AttributeError, NotImplementedError):
        raise UsageError(f"model.grad_checkpointing=true: {name} does not support gradient checkpointing in timm; "
                         f"set it to false") from None


def sync_batchnorm(student: torch.nn.Module, dist: distributed.Dist) -> torch.nn.Module:
    """run.sync_bn: timm's convert_sync_batchnorm (torch's BatchNorm and timm's BatchNormAct) under DDP, as
    timm's train.py does; the state_dict keys stay, so checkpoints, EMA and exports do not change. One
    process: nothing to synchronize. torch 2.14's SyncBatchNorm refuses CPU tensors once a process group
    exists (and aten::batch_norm_stats has no CPU kernel), so several CPU processes are refused here."""
    if not dist.distributed:
        return student
    if dist.device.type == "cpu":
        raise UsageError(f"run.sync_bn=true needs GPUs: torch's SyncBatchNorm refuses CPU tensors ({dist.world} "
                         f"CPU processes); set run.sync_bn=false")
    from timm.layers import convert_sync_batchnorm

    return convert_sync_batchnorm(student)


def feature_kd(recipe: Recipe, student: torch.nn.Module, teacher, size: int):
    """(the student wrapped with its projection, the teacher side) for features.student/teacher."""
    from usi.distill import features
    from usi.distill.teacher import primary

    first = primary(teacher)
    try:
        wrapper, kd = features.build(recipe.features, student, first.model, size=size,
                                     teacher_size=first.input_size, device=next(student.parameters()).device)
    except UsageError as e:
        if not (recipe.model.grad_checkpointing and str(e).startswith("features.student=") and "not run" in str(e)):
            raise
        raise UsageError(f"{e}: with model.grad_checkpointing=true timm calls a stage's blocks one by one, so a "
                         f"stage never runs as a whole; name its last block (e.g. layer3.1 for layer3)") from None
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
                       hard_label=recipe.loss.hard_label, weighting=recipe.loss.weighting, alpha=recipe.loss.alpha,
                       task=recipe.loss.task, bce_target_thresh=recipe.loss.bce_target_thresh,
                       distill_token=recipe.loss.distill_token)
    return StepConfig(compute=compute, num_classes=num_classes, loss=loss, accum_steps=accum_steps,
                      clip_grad=recipe.optim.clip_grad, label_smoothing=recipe.aug.label_smoothing)


def grad_scaler(compute: Compute) -> torch.amp.GradScaler | None:
    """fp16 needs loss scaling; bf16 and fp32 do not."""
    return torch.amp.GradScaler("cuda") if compute.amp_dtype == torch.float16 else None


# ---------------------------------------------------------------- a whole training run


@dataclass
class Training:
    """Everything a run holds once built (what it has done, and keeps, is the ledger's)."""
    recipe: Recipe
    dist: distributed.Dist
    batch: BatchPlan
    state: TrainState
    cfg: StepConfig
    train_split: data.Split
    val_split: data.Split
    train_loader: object
    val_loader: object
    steps: int  # per epoch
    epochs: int  # including cool-down
    minival_split: data.Split | None = None  # data.minival: held out from train, selects best.safetensors
    minival_loader: object = None

    @property
    def selection(self) -> str:
        """The split best.safetensors is selected on, in words (summary.json's "selection")."""
        return f"minival ({len(self.minival_split)} images)" if self.minival_split is not None else "val"

    @property
    def classes(self) -> list[str]:
        return self.train_split.classes

    @property
    def params(self) -> int:
        return sum(p.numel() for p in self.state.student.parameters())


def build_training(recipe: Recipe, dist: distributed.Dist, *, fresh: bool = True, dry: bool = False) -> Training:
    """Every object a training run needs, checked, before anything is written. `fresh`: a new run (a
    resumed one takes its weights from the checkpoint, so model.weights and model.pretrained are not read).
    `dry`: for `usi train --dry-run`, the same objects but no DDP, no compilation and no starting weights
    (a download would write); the run directory is never the build's business."""
    batch = batch_plan(recipe, dist.world)  # the world size is known: fail before any work
    tracking.check_available(recipe.run.loggers)
    train_split, val_split = data.open_splits(recipe.data)
    train_split, minival_split = data.hold_out(train_split, recipe.data)
    num_classes = len(train_split.classes)
    seed_everything(recipe.run.seed)
    student = create_student(recipe.model, num_classes, recipe.data.input_size, starting_weights=fresh and not dry,
                             classes=train_split.classes)
    if recipe.loss.distill_token:
        log.info(train_distillation_token(student, recipe.model.name, recipe.loss.distill_token))
    if recipe.model.grad_checkpointing:
        grad_checkpointing(student, recipe.model.name)
    spec = input_spec(student, recipe.data.input_size)
    check_input_size(recipe.model, num_classes, spec.size)
    compute = compute_for(recipe, dist.device)
    environment.set_backend_flags(recipe.run, dist.device)
    teacher = teacher_for(recipe, train_split.classes, spec, compute)
    place(student, compute)
    if recipe.run.sync_bn and not dry:  # as DDP: a dry run joins no process group
        student = sync_batchnorm(student, dist)

    train_loader = data.train_loader(train_split, recipe.data, recipe.aug, spec, seed=recipe.run.seed, dist=dist)
    val_loader = data.val_loader(val_split, recipe.data, recipe.aug, spec, dist=dist)
    minival_loader = (data.val_loader(minival_split, recipe.data, recipe.aug, spec, dist=dist)
                      if minival_split is not None else None)
    steps = train_loader.steps_per_epoch()
    if recipe.run.max_steps:
        steps = min(steps, recipe.run.max_steps)
    if steps == 0:
        raise UsageError(f"data.batch_size={recipe.data.batch_size} x {dist.world} processes is larger than one "
                         f"epoch of {len(train_split)} training samples")

    check_updates(recipe, steps=steps, accum=batch.accum, world=dist.world, samples=len(train_split))
    log.info(batch.line)
    if steps % batch.accum:
        log.warning(f"{steps} steps per epoch is not a multiple of {batch.accum} accumulation steps; "
                    f"the last {steps % batch.accum} steps of each epoch carry gradient into the next")
    ema = create_ema(recipe, student)  # before feature KD's hook: the EMA copy must not carry it
    wrapped, features = student, None
    if recipe.features.student:
        wrapped, features = feature_kd(recipe, student, teacher, spec.size)
    optimizer = create_optimizer(recipe, student, batch.lr, extra=features.projector if features else None)
    if recipe.optim.layer_decay is not None:
        log.info(layer_lrs(optimizer, student, batch.lr, recipe.optim.layer_decay))
    scheduler, epochs = create_scheduler(recipe, optimizer, steps // batch.accum)
    if dist.distributed and not dry:
        device_ids = [dist.device.index] if dist.device.type == "cuda" else None
        wrapped = DistributedDataParallel(wrapped, device_ids=device_ids)
    if recipe.run.compile and not dry:
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
    t = Training(recipe=recipe, dist=dist, batch=batch, state=state,
                 cfg=step_config(recipe, compute, num_classes, batch.accum), train_split=train_split,
                 val_split=val_split, train_loader=train_loader, val_loader=val_loader, steps=steps, epochs=epochs,
                 minival_split=minival_split, minival_loader=minival_loader)
    if recipe.teacher.soft_labels:  # the store answers for the teacher in the steps; checked before any is made
        stored_teacher.attach(t, check=not dry)
    log.info(f"student {recipe.model.name}: {t.params / 1e6:.2f}M params, input {spec.size}, {num_classes} classes, "
             f"{len(train_split)} train / {len(val_split)} val images, {steps} steps x {epochs} epochs, best "
             f"weights selected on {t.selection}"
             + (f", teacher {' + '.join(c.name for c in recipe.teachers())}" if teacher is not None
                else ", no teacher"))
    return t


# ---------------------------------------------------------------- the dry run


def dry_run(recipe: Recipe) -> str:
    """`usi train --dry-run`: the real start stopped before the first step: the run directory's checks
    (usi/training/rundir.py), then build_training(dry=True) (data layout and counts, the student, the
    teacher's weights and classes, feature KD, optimizer and schedule), and the plan read from what was
    built. Writes nothing."""
    from usi.training import rundir

    dist = distributed.Dist(world=int(os.environ.get("WORLD_SIZE", "1")))  # no process group is joined
    run_dir = recipe.run_dir()
    resume_from = rundir.resume_source(recipe, run_dir)
    t = build_training(recipe, dist, fresh=resume_from is None, dry=True)
    start = f"resume from {resume_from}" if resume_from else "a fresh start"
    plan = [f"run directory: {run_dir} ({start})", f"initial weights: {starting_weights(recipe, resume_from)}",
            *plan_lines(t)]
    return "\n".join(["# the effective recipe", recipe.to_yaml().rstrip(), "",
                      "# the plan (nothing was written)", *map(printable, plan)])  # names' line breaks escaped  # names' line breaks escaped


def starting_weights(recipe: Recipe, resume_from) -> str:
    if resume_from:
        return f"the checkpoint {resume_from} (model.weights and model.pretrained are not read)"
    if recipe.model.weights:
        return f"{recipe.model.weights} (model.weights)"
    if recipe.model.pretrained:
        return f"timm's pretrained {recipe.model.name} (model.pretrained, from its hub)"
    return f"random initialization (timm's, seed {recipe.run.seed})"


def schedule_points(t: Training) -> str:
    """The lr at the schedule's key updates, from a twin of the run's scheduler (the run's is not stepped)."""
    s, per_epoch = t.recipe.sched, t.steps // t.cfg.accum_steps
    twin = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=t.batch.lr)
    scheduler, _ = create_scheduler(t.recipe, twin, per_epoch)
    total = per_epoch * t.epochs
    points = {}
    for update, name in ((0, "start"), (s.warmup_epochs * per_epoch, "end of warm-up"), (total // 2, "middle"),
                         (max(total - 1, 0), "last update")):
        points.setdefault(update, []).append(name)
    words = []
    for update, names in sorted(points.items()):
        scheduler.step_update(num_updates=update)
        words.append(f"{twin.param_groups[0]['lr']:.3g} at update {update} ({', '.join(names)})")
    return "lr: " + ", ".join(words)


def plan_lines(t: Training) -> list[str]:
    """What a built run will do, in words."""
    recipe, state = t.recipe, t.state
    size = input_spec(state.student, recipe.data.input_size).size
    teacher = state.teacher
    members = teacher.members if isinstance(teacher, Ensemble) else [teacher] if teacher is not None else []
    teacher_line = "; ".join(
        f"{cfg.name}, {sum(p.numel() for p in m.parameters()) / 1e6:.1f}M params, "
        f"{cfg.weights or 'timm pretrained weights'}, {len(t.classes)} classes, sees {m.input_size or size} px"
        for cfg, m in zip(recipe.teachers(), members)) or "none"
    if len(members) > 1:
        teacher_line = f"an ensemble of {len(members)} (mean of their {recipe.teacher.combine}): {teacher_line}"
    feature_line = []
    if state.features is not None:
        from usi.distill import features

        feature_line = [features.describe(state.wrapped, recipe.features)]
    labels = state.soft_labels
    if labels is not None:  # its facts and chunks were checked by now (stored_teacher.attach)
        m = labels.manifest
        feature_line.append(f"soft labels: {labels.folder}, top-{m['top_k']} of {m['classes']} classes"
                            f"{' (exact)' if m['top_k'] == m['classes'] else ''}, {len(m['chunks'])} chunks present; "
                            f"facts match; the live recompute of stored steps runs at start")
    steps, epochs, accum = t.steps, t.epochs, t.cfg.accum_steps
    from usi.models import forward_macs  # what the dry run alone counts

    return [
        (f"data: {recipe.data.format} at {recipe.data.root}: {len(t.train_split)} train / {len(t.val_split)} val "
         f"images, {len(t.classes)} classes; best weights selected on {t.selection}"),
        (f"student: {recipe.model.name}, {t.params / 1e6:.2f}M params, "
         f"{forward_macs(state.student, size) / 1e9:.3g} GMACs per image, input {size} px"),
        f"teacher: {teacher_line}",
        *feature_line,
        f"batch: {t.batch.line}; lr {t.batch.lr:g}",
        f"steps: {steps} per epoch x {epochs} epochs = {steps * epochs} steps, {steps // accum * epochs} updates",
        schedule_points(t),
    ]

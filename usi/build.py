"""Recipe sections -> torch objects: student, teacher, precision, optimizer, scheduler, EMA, mixup.

Shared by `usi train` and `usi eval`; nothing here touches the run directory or the data.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from timm.data import Mixup, resolve_model_data_config
from timm.optim import create_optimizer_v2, param_groups_weight_decay
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from torch.nn.parallel import DistributedDataParallel

from usi import checkpoint, data, distributed, environment, tracking
from usi.data import InputSpec
from usi.data.loader import seed_everything
from usi.engine import Compute, StepConfig, TrainState
from usi.errors import UsageError
from usi.loss import DistillLoss
from usi.recipe import Recipe, mixes
from usi.teacher import Ensemble, Teacher, build_teachers

log = logging.getLogger("usi")


def create_student(model_cfg, num_classes: int, input_size: int | None, starting_weights: bool = False
                   ) -> torch.nn.Module:
    """The student, built for `input_size` when its constructor takes img_size (ViTs, MLP-Mixers); from
    model.pretrained or model.weights when `starting_weights` (training; evaluation loads its own)."""
    pretrained = starting_weights and model_cfg.pretrained
    kwargs = dict(model_cfg.kwargs)
    if model_cfg.drop_path_rate is not None:
        kwargs["drop_path_rate"] = model_cfg.drop_path_rate
    try:
        model = None
        if input_size and "img_size" not in kwargs:
            try:
                model = timm.create_model(model_cfg.name, pretrained=pretrained, num_classes=num_classes,
                                          img_size=input_size, **kwargs)
            except TypeError:
                pass  # a CNN: any input size works without telling it
        # timm re-initializes a pretrained classifier for another class count
        model = model or timm.create_model(model_cfg.name, pretrained=pretrained, num_classes=num_classes, **kwargs)
    except Exception as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        if pretrained and not isinstance(e, TypeError):  # no hub access, no weights for this name, ...
            raise UsageError(f"could not get pretrained weights for {model_cfg.name} from timm ({first}); "
                             f"set model.weights to a local .safetensors or .pth file instead") from None
        # e.g. a dropout rate of 2 (ValueError), act_layer: nosuch (KeyError), an unknown argument (TypeError)
        raise UsageError(f"model.kwargs {kwargs} do not fit {model_cfg.name}: {type(e).__name__}: {first}") from None
    if starting_weights and model_cfg.weights:
        log.info(load_starting_weights(model, Path(model_cfg.weights)))
    return model


def load_starting_weights(model: torch.nn.Module, path: Path) -> str:
    """Weights from a local file (checked, weights_only); a classifier of another shape is left freshly
    initialized, as timm does for pretrained weights. Returns a line saying what was loaded."""
    from usi.teacher import read_weights

    state = read_weights(path)
    own = model.state_dict()
    classifier = model.pretrained_cfg.get("classifier")
    heads = [classifier] if isinstance(classifier, str) else list(classifier or [])
    dropped = [k for k in list(state) if any(k.startswith(h + ".") for h in heads)
               and k in own and state[k].shape != own[k].shape]
    for key in dropped:
        del state[key]
    try:  # strict=False still raises on a shape mismatch (another architecture's file)
        result = model.load_state_dict(state, strict=False)
    except RuntimeError:
        result = None
    if result is None or result.unexpected_keys or set(result.missing_keys) - set(dropped):
        raise UsageError(f"model.weights={path} do not fit {type(model).__name__}: "
                         f"{checkpoint.mismatch(model, state)}")
    reinit = f"; classifier re-initialized ({len(dropped)} tensors of another class count)" if dropped else ""
    return f"student weights from {path}{reinit}"


def check_input_size(model_cfg, num_classes: int, size: int) -> None:
    """A forward pass on the meta device (no memory, no compute): a ViT whose patch does not divide
    data.input_size fails here in one line, before anything is written."""
    with torch.device("meta"):
        model = create_student(model_cfg, num_classes, size).eval()
        kwargs = f" with model.kwargs {model_cfg.kwargs}" if model_cfg.kwargs else ""
        try:
            with torch.no_grad():
                out = model(torch.empty(2, 3, size, size))
        except NotImplementedError:
            return  # an op without a meta kernel: nothing to learn here
        except (AssertionError, RuntimeError, ValueError) as e:
            raise UsageError(f"model.name={model_cfg.name}{kwargs} fails on {size} px inputs (data.input_size): "
                             f"{str(e).strip().splitlines()[0][:160]}") from None
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, num_classes):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise UsageError(f"model.name={model_cfg.name}{kwargs} does not give class logits (batch x {num_classes}): "
                         f"it returns {got}")


def input_spec(model: torch.nn.Module, input_size: int | None) -> InputSpec:
    """The student's input: data.input_size or its default size, and the mean/std it expects."""
    cfg = resolve_model_data_config(model)
    return InputSpec(size=input_size or cfg["input_size"][-1], mean=tuple(cfg["mean"]), std=tuple(cfg["std"]))


def amp_dtype(run_cfg, device: torch.device) -> torch.dtype | None:
    """Autocast dtype: bf16/fp16 on GPU as the recipe says; CPU runs fp32 unless run.amp_on_cpu (bf16)."""
    if device.type != "cuda":
        return torch.bfloat16 if run_cfg.amp_on_cpu and run_cfg.amp == "bf16" else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(run_cfg.amp)


def channels_last(run_cfg, device: torch.device) -> bool:
    """auto: on CUDA, where it speeds convolutions up; off on CPU, where torch 2.14's channels_last
    backward crashes for some families (fastvit, mobileone, repvgg) and gains little."""
    return run_cfg.channels_last == "true" or (run_cfg.channels_last == "auto" and device.type == "cuda")


def compute_for(recipe: Recipe, device: torch.device) -> Compute:
    return Compute(device=device, amp_dtype=amp_dtype(recipe.run, device),
                   channels_last=channels_last(recipe.run, device))


def place(model: torch.nn.Module, compute: Compute) -> torch.nn.Module:
    model.to(compute.device)
    if compute.channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def teacher_for(recipe: Recipe, num_classes: int, spec: InputSpec, compute: Compute) -> Teacher | Ensemble | None:
    """The frozen teacher, or the ensemble of teacher and teacher.extra; None without distillation."""
    if not recipe.kd:
        return None
    return build_teachers(recipe.teachers(), recipe.teacher.combine, num_classes,
                          temperature=recipe.loss.temperature, student_mean=spec.mean,
                          student_std=spec.std, student_size=spec.size, device=compute.device,
                          channels_last=compute.channels_last)


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
    from usi import features
    from usi.teacher import primary

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
    from usi import rundir

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
        from usi import features

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

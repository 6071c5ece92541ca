"""Recipe sections -> torch objects: student, teacher, precision, optimizer, scheduler, EMA, mixup.

Shared by `usi train` and `usi eval`; nothing here touches the run directory or the data.
"""
from __future__ import annotations

import logging
import math

import timm
import torch
from timm.data import Mixup, resolve_model_data_config
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3

from usi.data import InputSpec
from usi.engine import Compute, StepConfig
from usi.errors import UsageError
from usi.loss import DistillLoss
from usi.recipe import Recipe, mixes
from usi.teacher import Teacher, build_teacher

log = logging.getLogger("usi")


def create_student(model_cfg, num_classes: int, input_size: int | None) -> torch.nn.Module:
    """The student, built for `input_size` when its constructor takes img_size (ViTs, MLP-Mixers)."""
    kwargs = dict(model_cfg.kwargs)
    if model_cfg.drop_path_rate is not None:
        kwargs["drop_path_rate"] = model_cfg.drop_path_rate
    try:
        if input_size and "img_size" not in kwargs:
            try:
                return timm.create_model(model_cfg.name, num_classes=num_classes, img_size=input_size, **kwargs)
            except TypeError:
                pass  # a CNN: any input size works without telling it
        return timm.create_model(model_cfg.name, pretrained=False, num_classes=num_classes, **kwargs)
    except TypeError as e:
        raise UsageError(f"model.kwargs {kwargs} do not fit {model_cfg.name}: {e}") from None


def input_spec(model: torch.nn.Module, input_size: int | None) -> InputSpec:
    """The student's input: data.input_size or its default size, and the mean/std it expects."""
    cfg = resolve_model_data_config(model)
    return InputSpec(size=input_size or cfg["input_size"][-1], mean=tuple(cfg["mean"]), std=tuple(cfg["std"]))


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype: bf16/fp16 on GPU as the recipe says; CPU always runs fp32."""
    if device.type != "cuda":
        return None
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)


def compute_for(recipe: Recipe, device: torch.device) -> Compute:
    return Compute(device=device, amp_dtype=amp_dtype(recipe.run.amp, device), channels_last=recipe.run.channels_last)


def place(model: torch.nn.Module, compute: Compute) -> torch.nn.Module:
    model.to(compute.device)
    if compute.channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def teacher_for(recipe: Recipe, num_classes: int, spec: InputSpec, compute: Compute) -> Teacher | None:
    if not recipe.kd:
        return None
    return build_teacher(recipe.teacher, num_classes, student_mean=spec.mean, student_std=spec.std,
                         device=compute.device, channels_last=compute.channels_last)


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


def create_optimizer(recipe: Recipe, student: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    fused = recipe.optim.name in ("adamw", "adam") and all(p.dtype == torch.float32 for p in student.parameters())
    try:
        return create_optimizer_v2(student, opt=recipe.optim.name, lr=lr, weight_decay=recipe.optim.weight_decay,
                                   eps=recipe.optim.eps, **({"fused": True} if fused else {}))
    except (ValueError, AssertionError) as e:
        raise UsageError(f"optim.name={recipe.optim.name!r}: {e}") from None


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
                       hard_label=recipe.loss.hard_label)
    return StepConfig(compute=compute, num_classes=num_classes, loss=loss, accum_steps=accum_steps,
                      clip_grad=recipe.optim.clip_grad, label_smoothing=recipe.aug.label_smoothing)


def grad_scaler(compute: Compute) -> torch.amp.GradScaler | None:
    """fp16 needs loss scaling; bf16 and fp32 do not."""
    return torch.amp.GradScaler("cuda") if compute.amp_dtype == torch.float16 else None

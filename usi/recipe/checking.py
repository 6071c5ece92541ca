"""Checking a recipe: every error the recipe alone can reveal, before any model or data is touched.

A field's own facts (choices, range) are checked by `check_field` from usi/recipe/schema.py; here are
the checks that span fields, and the names looked up in timm's registries (no model is built).
"""
from __future__ import annotations

import os

from usi.errors import UsageError, quote, shorten, suggest
from usi.recipe.schema import SECTIONS, LossSection, Recipe, check_field, fields_of, mixes


def validate(recipe: Recipe) -> None:
    """Every error the recipe alone can reveal, before any model or data is touched."""
    for section in SECTIONS:
        for f in fields_of(section):
            check_field(f"{section}.{f.name}", getattr(getattr(recipe, section), f.name), f.metadata)
    for key in ("scale", "ratio"):
        pair = getattr(recipe.aug, key)
        if (len(pair) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in pair)
                or not 0 < pair[0] <= pair[1]):
            raise UsageError(f"aug.{key}={quote(pair)} must be two numbers 0 < low <= high")
    if recipe.sched.warmup_epochs >= recipe.sched.epochs + recipe.sched.cooldown_epochs:
        raise UsageError(f"sched.warmup_epochs={recipe.sched.warmup_epochs} must be less than "
                         f"sched.epochs={recipe.sched.epochs}")
    if mixes(recipe.aug) and recipe.data.batch_size % 2:
        raise UsageError(f"data.batch_size={recipe.data.batch_size} must be even for mixup/cutmix")
    if recipe.loss.weighting == "hinton" and (recipe.loss.kd_weight != LossSection.kd_weight or
                                               not recipe.loss.hard_label):
        raise UsageError("loss.weighting=hinton weighs the terms by loss.alpha alone: leave loss.kd_weight and "
                         "loss.hard_label as they are (alpha=0 is KD only)")
    if recipe.run.best_metric in ("agreement", "kl") and not recipe.kd:
        raise UsageError(f"run.best_metric={recipe.run.best_metric} needs a teacher (teacher.name is null); "
                         f"use top1, top5, nll or ece")
    if recipe.aug.auto_augment:
        check_auto_augment(recipe.aug.auto_augment)
    for logger in recipe.run.loggers:
        if logger not in ("tensorboard", "wandb"):
            raise UsageError(f"run.loggers: {quote(logger)} is not one of tensorboard, wandb"
                             f"{suggest(logger, ('tensorboard', 'wandb'))}")
    if recipe.aug.randaugment_on == "device" and (recipe.aug.color_jitter or not str(
            recipe.aug.auto_augment or "rand").startswith("rand")):
        raise UsageError("aug.randaugment_on=device does RandAugment strings (rand-...) without color jitter; "
                         "use aug.randaugment_on=workers for other augmentations")
    if recipe.run.amp == "fp16" and recipe.run.device == "cpu":
        raise UsageError("run.amp=fp16 needs a GPU; use run.amp=none or bf16 on CPU (CPU runs fp32 anyway)")
    if recipe.run.amp_on_cpu and recipe.run.amp == "fp16":  # with run.amp=none it is simply fp32
        raise UsageError("run.amp_on_cpu=true needs run.amp=bf16 (CPU autocast is bf16 only), got fp16")
    resume = recipe.run.resume
    if resume not in ("never", "auto") and not os.path.isfile(resume):  # False for a name too long
        raise UsageError(f"run.resume={quote(resume)} must be never, auto or an existing checkpoint file")
    check_optimizer(recipe.optim.name)
    reserved = {"pretrained": "model.pretrained", "num_classes": "the data (its class folders)",
                "pretrained_cfg_overlay": "model.weights", "checkpoint_path": "model.weights"}
    for key in reserved.keys() & recipe.model.kwargs.keys():
        raise UsageError(f"model.kwargs sets {key}, which usi sets from {reserved[key]}; remove it from model.kwargs")
    if recipe.model.pretrained and recipe.model.weights:
        raise UsageError("model.pretrained=true and model.weights both choose starting weights; keep one")
    if recipe.model.weights and not os.path.isfile(recipe.model.weights):
        raise UsageError(f"model.weights={quote(recipe.model.weights)} does not exist")
    check_model_name("model.name", recipe.model.name)
    check_teachers(recipe)
    check_features(recipe)
    recipe.run_dir()  # fails early on a bad template


def check_teachers(recipe: Recipe) -> None:
    if recipe.teacher.extra and not recipe.kd:
        raise UsageError("teacher.extra lists ensemble members but teacher.name is null; name the first teacher")
    for i, t in enumerate(recipe.teachers()):
        key = "teacher" if i == 0 else f"teacher.extra[{i - 1}]"
        check_model_name(f"{key}.name", t.name)
        if t.weights and not os.path.isfile(t.weights):
            raise UsageError(f"{key}.weights={quote(t.weights)} does not exist")


def check_features(recipe: Recipe) -> None:
    f = recipe.features
    if bool(f.student) != bool(f.teacher):
        given, missing = ("student", "teacher") if f.student else ("teacher", "student")
        raise UsageError(f"features.{given} is set but features.{missing} is not: feature KD matches a student "
                         f"module to a teacher module")
    if f.student and not recipe.kd:
        raise UsageError("features.student needs a teacher (teacher.name is null)")


def check_optimizer(name: str) -> None:
    from timm.optim import list_optimizers  # deferred, as for model names

    names = list_optimizers()
    parts = name.lower().split("_")  # timm's own parsing: an optional lookahead_ prefix, then the name
    if parts[-1] not in names or (len(parts) > 1 and parts[0] != "lookahead"):
        raise UsageError(f"optim.name={quote(name)} is not a timm optimizer{suggest(name, names)}")


def check_model_name(key: str, name: str) -> None:
    import timm  # deferred: listing models imports torch, and the recipe is otherwise pure data

    arch, _, tag = name.partition(".")
    if not timm.is_model(arch):
        names = timm.list_models() + timm.list_models(pretrained=True)
        raise UsageError(f"{key}={quote(name)} is not a timm model{suggest(name, names)}")
    if tag and name not in timm.list_pretrained(f"{arch}.*"):
        tags = [n.partition(".")[2] for n in timm.list_pretrained(f"{arch}.*")]
        raise UsageError(f"{key}={quote(name)}: {arch} has no pretrained tag {quote(tag)} "
                         f"(its tags: {', '.join(tags) or 'none'}){suggest(tag, tags)}")


def check_auto_augment(config: str) -> None:
    """The string timm's create_transform would parse, parsed the same way (a typo fails here, not in a
    loader worker)."""
    from timm.data import auto_augment as aa

    hparams = {"translate_const": 100, "img_mean": (124, 116, 104)}
    build = (aa.rand_augment_transform if config.startswith("rand") else
             aa.augment_and_mix_transform if config.startswith("augmix") else aa.auto_augment_transform)
    try:
        build(config, hparams)
    except Exception as e:  # timm asserts on unknown policies and sections
        raise UsageError(f"aug.auto_augment={quote(config)} is not a timm augmentation string "
                         f"({shorten(str(e) or type(e).__name__, 120)}); e.g. rand-m7-mstd0.5-inc1, augmix-m5, v0, or null") from None


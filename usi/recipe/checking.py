"""Checking a recipe: every error the recipe alone can reveal, before any model or data is touched.

A field's own facts (choices, range) are checked by `check_field` from usi/recipe/schema.py; here are
the checks that span fields, and the names looked up in timm's registries (no model is built).
"""
from __future__ import annotations

import os

from usi.errors import UsageError, file_problem, quote, shorten, suggest
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
    check_wandb(recipe.run)
    if recipe.aug.randaugment_on == "device" and (recipe.aug.color_jitter or not str(
            recipe.aug.auto_augment or "rand").startswith("rand")):
        raise UsageError("aug.randaugment_on=device does RandAugment strings (rand-...) without color jitter; "
                         "use aug.randaugment_on=workers for other augmentations")
    if recipe.run.amp == "fp16" and recipe.run.device == "cpu":
        raise UsageError("run.amp=fp16 needs a GPU; use run.amp=none or bf16 on CPU (CPU runs fp32 anyway)")
    if recipe.run.amp_on_cpu and recipe.run.amp == "fp16":  # with run.amp=none it is simply fp32
        raise UsageError("run.amp_on_cpu=true needs run.amp=bf16 (CPU autocast is bf16 only), got fp16")
    resume = recipe.run.resume
    if resume not in ("never", "auto") and file_problem(resume):
        raise UsageError(f"run.resume={quote(resume)} must be never, auto or an existing checkpoint file: it "
                         f"{file_problem(resume)}")
    check_minival(recipe.data)
    check_optimizer(recipe.optim.name)
    check_optimizer_args(recipe.optim)
    if recipe.data.class_map is not None and recipe.data.format == "shards":
        raise UsageError("data.class_map works on image folders (data.format=folder): shards carry their labels; "
                         "write shards of those classes with usi shards from a folder holding only them")
    reserved = {"pretrained": "model.pretrained", "num_classes": "the data (its class folders)",
                "pretrained_cfg_overlay": "model.weights", "checkpoint_path": "model.weights"}
    for key in reserved.keys() & recipe.model.kwargs.keys():
        raise UsageError(f"model.kwargs sets {key}, which usi sets from {reserved[key]}; remove it from model.kwargs")
    if recipe.model.pretrained and recipe.model.weights:
        raise UsageError("model.pretrained=true and model.weights both choose starting weights; keep one")
    if recipe.model.weights and file_problem(recipe.model.weights):
        raise UsageError(f"model.weights={quote(recipe.model.weights)} {file_problem(recipe.model.weights)}")
    check_model_name("model.name", recipe.model.name)
    check_teachers(recipe)
    check_features(recipe)
    check_loss(recipe)
    recipe.run_dir()  # fails early on a bad template


def check_teachers(recipe: Recipe) -> None:
    if recipe.teacher.extra and not recipe.kd:
        raise UsageError("teacher.extra lists ensemble members but teacher.name is null; name the first teacher")
    for i, t in enumerate(recipe.teachers()):
        key = "teacher" if i == 0 else f"teacher.extra[{i - 1}]"
        check_model_name(f"{key}.name", t.name)
        if t.weights and file_problem(t.weights):
            raise UsageError(f"{key}.weights={quote(t.weights)} {file_problem(t.weights)}")
    check_soft_labels(recipe)


def check_soft_labels(recipe: Recipe) -> None:
    fill = recipe.aug.randaugment_fill
    if fill is not None and not (isinstance(fill, list) and len(fill) == 3
                                 and all(type(v) is int and 0 <= v <= 255 for v in fill)):
        raise UsageError(f"aug.randaugment_fill={fill!r}: expected 3 integers 0..255 (e.g. [124, 116, 104]) or null")
    if fill is not None and not recipe.aug.auto_augment:
        raise UsageError("aug.randaugment_fill sets RandAugment's fill, but aug.auto_augment is null (no "
                         "RandAugment); leave the fill null")
    store = recipe.teacher.soft_labels
    if store is None:
        return
    if not recipe.kd:
        raise UsageError(f"teacher.soft_labels={quote(store)} needs the teacher that wrote it (teacher.name is null)")
    if recipe.features.student:
        raise UsageError("teacher.soft_labels stores logits; feature KD (features.student) needs the live teacher")
    if file_problem(os.path.join(store, "manifest.json")):
        raise UsageError(f"teacher.soft_labels={quote(store)} is not a soft-label store (no manifest.json); write one "
                         f"with usi soft-labels")


def check_features(recipe: Recipe) -> None:
    f = recipe.features
    if bool(f.student) != bool(f.teacher):
        given, missing = ("student", "teacher") if f.student else ("teacher", "student")
        raise UsageError(f"features.{given} is set but features.{missing} is not: feature KD matches a student "
                         f"module to a teacher module")
    if f.student and not recipe.kd:
        raise UsageError("features.student needs a teacher (teacher.name is null)")


def check_loss(recipe: Recipe) -> None:
    loss = recipe.loss
    if loss.bce_target_thresh is not None and loss.task != "bce":
        raise UsageError(f"loss.bce_target_thresh={loss.bce_target_thresh} applies to loss.task=bce only "
                         f"(loss.task={loss.task}); set loss.task=bce or leave it null")
    if loss.distill_token and not recipe.kd:
        raise UsageError(f"loss.distill_token={loss.distill_token} needs a teacher (teacher.name is null)")
    if loss.distill_token and not loss.hard_label:
        raise UsageError("loss.distill_token trains the class token on the mixed targets: loss.hard_label=false "
                         "would leave it untrained")


def check_minival(data) -> None:
    """data.minival: a fraction below 1 or a whole count of image-folder train images (what the images
    allow, e.g. a class left with none to train on, is checked when the folder is read)."""
    if data.minival >= 1 and data.minival != int(data.minival):
        raise UsageError(f"data.minival={data.minival} must be a fraction below 1 or a whole number of images")
    if data.minival and data.format == "shards":
        # shards stream in a fixed order with fixed steps per epoch; holding samples out would break both,
        # and evaluating them each epoch would read every train shard
        raise UsageError("data.minival needs data.format=folder: shards stream a fixed count of train samples "
                         "per epoch, none can be held out; set data.minival=0 (select on val)")


def check_wandb(run) -> None:
    """What wandb.init would refuse only once training has started (its own limits)."""
    bad = sorted(set("/\\#?%:") & set(run.wandb_project))
    if not run.wandb_project or len(run.wandb_project) > 128 or bad:
        raise UsageError(f"run.wandb_project={run.wandb_project!r} must be 1 to 128 characters, none of / \\ # ? % :"
                         + (f" (it has {' '.join(bad)})" if bad else ""))
    for tag in run.wandb_tags:
        if not isinstance(tag, str) or not 1 <= len(tag) <= 64:
            raise UsageError(f"run.wandb_tags: {tag!r} is not a tag of 1 to 64 characters")


def check_optimizer(name: str) -> None:
    from timm.optim import list_optimizers  # deferred, as for model names

    names = list_optimizers()
    parts = name.lower().split("_")  # timm's own parsing: an optional lookahead_ prefix, then the name
    if parts[-1] not in names or (len(parts) > 1 and parts[0] != "lookahead"):
        raise UsageError(f"optim.name={quote(name)} is not a timm optimizer{suggest(name, names)}")


# create_optimizer_v2 keywords a recipe cannot pass in optim.kwargs, and arguments other keys set
FACTORY_OWN = {"model_or_params", "opt", "param_group_fn", "kwargs"}
OPTIM_KEYS = {"lr": "optim.lr", "weight_decay": "optim.weight_decay", "eps": "optim.eps", "betas": "optim.betas",
              "momentum": "optim.momentum", "layer_decay": "optim.layer_decay"}


def check_optimizer_args(optim) -> None:
    """optim.betas, momentum and kwargs against the optimizer class's own signature and create_optimizer_v2's
    keywords: timm silently drops betas and momentum an optimizer does not take, and a typo would fail late."""
    import inspect

    from timm.optim import create_optimizer_v2, get_optimizer_class

    for key in OPTIM_KEYS.keys() & optim.kwargs.keys():
        raise UsageError(f"optim.kwargs sets {key}, which usi sets from {OPTIM_KEYS[key]}; set that instead")
    try:
        cls = get_optimizer_class(optim.name.lower().split("_")[-1], bind_defaults=False)
        params = inspect.signature(cls).parameters
    except Exception:  # apex / bitsandbytes (CUDA and their package): create_optimizer_v2 says what is missing
        return
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return  # takes any keyword: nothing to check against
    own = [p for p in params if p != "params"]
    for key in ("betas", "momentum"):
        if getattr(optim, key) is not None and key not in own:
            raise UsageError(f"optim.{key}: {optim.name} ({cls.__name__}) takes no {key}; its arguments: "
                             f"{', '.join(own)}")
    factory = [p for p in inspect.signature(create_optimizer_v2).parameters if p not in FACTORY_OWN | OPTIM_KEYS.keys()]
    valid = list(dict.fromkeys([p for p in own if p not in OPTIM_KEYS] + factory))
    for key in optim.kwargs:
        if key not in valid:
            raise UsageError(f"optim.kwargs.{key} is not an argument of {optim.name} ({cls.__name__}) or of timm's "
                             f"create_optimizer_v2; valid: {', '.join(valid)}{suggest(key, valid)}")
    default = params["betas"].default if "betas" in params else None
    betas = optim.betas
    if betas is not None and isinstance(default, tuple) and (len(betas) != len(default) or not all(
            isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in betas)):
        raise UsageError(f"optim.betas={betas} must be {len(default)} numbers in [0, 1) for {optim.name} "
                         f"(its default: {list(default)})")


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


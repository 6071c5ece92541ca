"""The Recipe: typed sections, YAML load, dotted overrides, validation, save.

The recipe knows nothing about torch: it is data. Model names are checked against timm's registry
(a name lookup, no model is built) so a typo fails before any heavy work starts.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from usi.errors import UsageError


@dataclass
class Model:
    name: str = "resnet50"
    drop_path_rate: Optional[float] = None  # None keeps the model's own default
    kwargs: dict = field(default_factory=dict)  # extra timm.create_model arguments (e.g. img_size)


@dataclass
class Teacher:
    # None or "" trains without distillation: the baseline rows, or a teacher of your own.
    name: Optional[str] = "tresnet_v2_l.miil_in21k_ft_in1k"
    weights: Optional[str] = None  # a local .pth/.pt/.safetensors; None asks timm's pretrained source
    input_size: Optional[int] = None  # None: the student's batch as is; an int: resized to that size
    fold_bn: bool = True
    kwargs: dict = field(default_factory=dict)


@dataclass
class Data:
    root: str = "data/imagenet"  # holds train/ and val/: class folders, or shards with index.json
    format: str = "folder"  # folder | shards (written by tools/make_shards.py)
    train_shards: Optional[str] = None  # shards: a brace pattern or pipe: URL; None: the index's own files
    val_shards: Optional[str] = None
    train_split: str = "train"
    val_split: str = "val"
    batch_size: int = 128  # per process (per GPU)
    eval_batch_size: Optional[int] = None  # None: 2 x batch_size
    workers: int = 8  # loader processes per GPU
    input_size: Optional[int] = None  # None: the student's default input size
    max_bad_samples: int = 1000  # unreadable images skipped per run before it stops


@dataclass
class Aug:
    scale: list = field(default_factory=lambda: [0.08, 1.0])
    ratio: list = field(default_factory=lambda: [0.75, 1.3333333333333333])
    interpolation: str = "bicubic"
    hflip: float = 0.5
    auto_augment: Optional[str] = "rand-m7-mstd0.5-inc1"
    color_jitter: float = 0.0
    re_prob: float = 0.0  # random erasing
    mixup_alpha: float = 0.8
    cutmix_alpha: float = 1.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_mode: str = "batch"
    label_smoothing: float = 0.0
    repeats: int = 3  # repeated augmentation (RepeatAugSampler); 1 turns it off
    eval_crop_pct: float = 0.95
    eval_interpolation: str = "bicubic"


@dataclass
class Loss:
    kd_weight: float = 5.0
    temperature: float = 1.0
    hard_label: bool = True  # false: KD term only, no cross-entropy on mixed targets


@dataclass
class Optim:
    name: str = "adamw"
    lr: float = 2e-3
    weight_decay: float = 0.02
    eps: float = 1e-8
    global_batch: int = 1024  # the batch the lr was tuned for (128 x 8 GPUs)
    # How a different world size or per-GPU batch is reconciled with global_batch:
    #   accumulate: accumulate gradients to reach global_batch exactly (fails if it does not divide)
    #   linear / sqrt: keep the batch, scale lr by (actual / global_batch) or its square root
    #   none: keep the batch and the lr as they are
    batch_rule: str = "accumulate"
    clip_grad: Optional[float] = None


@dataclass
class Sched:
    name: str = "cosine"
    epochs: int = 300
    warmup_epochs: int = 5
    warmup_lr: float = 1e-4
    min_lr: float = 1e-6
    cooldown_epochs: int = 0


@dataclass
class Ema:
    enabled: bool = True
    decay: float = 0.99996


@dataclass
class Run:
    dir: str = "runs/{model.name}"  # {section.key} fields are filled from the recipe
    seed: int = 42
    device: str = "auto"  # auto | cpu | cuda
    amp: str = "bf16"  # bf16 | fp16 | none; CPU always runs fp32
    channels_last: bool = False
    compile: bool = False
    resume: str = "never"  # never | auto | path to a checkpoint
    log_interval: int = 50
    ckpt_every_steps: int = 0  # extra mid-epoch checkpoints; 0: at epoch ends only
    eval_every: int = 1
    best_metric: str = "top1"  # top1 | top5 | nll | ece | agreement | kl; ranked over raw and EMA
    ece_bins: int = 15
    max_nonfinite: int = 20  # non-finite losses in a row before the run stops
    max_steps: int = 0  # stop each epoch after this many steps (smoke tests); 0: full epochs
    stop_after: int = 0  # train this many epochs in this invocation, then exit (time-limited jobs)


SECTIONS = {
    "model": Model, "teacher": Teacher, "data": Data, "aug": Aug, "loss": Loss,
    "optim": Optim, "sched": Sched, "ema": Ema, "run": Run,
}


@dataclass
class Recipe:
    model: Model = field(default_factory=Model)
    teacher: Teacher = field(default_factory=Teacher)
    data: Data = field(default_factory=Data)
    aug: Aug = field(default_factory=Aug)
    loss: Loss = field(default_factory=Loss)
    optim: Optim = field(default_factory=Optim)
    sched: Sched = field(default_factory=Sched)
    ema: Ema = field(default_factory=Ema)
    run: Run = field(default_factory=Run)

    @property
    def kd(self) -> bool:
        return bool(self.teacher.name)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: Path) -> None:
        Path(path).write_text(self.to_yaml())

    def run_dir(self) -> Path:
        try:
            return Path(self.run.dir.format(**{name: getattr(self, name) for name in SECTIONS}))
        except (KeyError, AttributeError, IndexError) as e:
            raise UsageError(f"run.dir {self.run.dir!r}: unknown field {e}; use e.g. {{model.name}}") from None


# ---------------------------------------------------------------- loading


def load(path: str | Path | None, overrides: list[str] = ()) -> Recipe:
    """A recipe from a YAML file (or the defaults) plus `section.key=value` overrides, validated."""
    return from_raw(read_yaml(Path(path)) if path is not None else {}, overrides)


def from_raw(raw: dict, overrides: list[str] = ()) -> Recipe:
    """A validated recipe from parsed YAML (e.g. one stored in a checkpoint) plus overrides."""
    raw = copy.deepcopy(raw)
    for item in overrides:
        key, value = parse_override(item)
        set_dotted(raw, key, value)
    recipe = from_dict(raw)
    validate(recipe)
    return recipe


def read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise UsageError(f"recipe file {path} does not exist")
    try:
        # safe_load refuses Python object tags (!!python/object...): a recipe cannot run code.
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        first = str(e).strip().splitlines()[0]
        raise UsageError(f"recipe {path} is not valid YAML: {first}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"recipe {path} must be a mapping of sections, got {type(data).__name__}")
    return data


def parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise UsageError(f"override {item!r} must look like section.key=value (e.g. optim.lr=1e-3)")
    key, text = item.split("=", 1)
    try:
        value = yaml.safe_load(text) if text != "" else None
    except yaml.YAMLError:
        value = text
    return key.strip(), value


def set_dotted(raw: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    if len(parts) < 2:
        raise UsageError(f"override key {key!r} must name a section and a key, e.g. optim.lr")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise UsageError(f"override {key!r}: {part!r} is not a section")
    node[parts[-1]] = value


def from_dict(raw: dict) -> Recipe:
    sections = {}
    for name, values in raw.items():
        if name not in SECTIONS:
            raise UsageError(f"unknown recipe section {name!r}{suggest(name, SECTIONS)}")
        if values is None:
            values = {}
        if not isinstance(values, dict):
            raise UsageError(f"recipe section {name!r} must be a mapping, got {values!r}")
        sections[name] = build_section(name, SECTIONS[name], values)
    return Recipe(**sections)


def build_section(section: str, cls: type, values: dict):
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in hints:
            raise UsageError(f"unknown key {section}.{key}{suggest(key, hints)}")
        kwargs[key] = coerce(f"{section}.{key}", value, hints[key])
    return cls(**kwargs)


def coerce(key: str, value: Any, hint: Any) -> Any:
    """Check `value` against the field's type; accept the harmless conversions YAML needs."""
    args = typing.get_args(hint)
    optional = typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args
    if optional:
        if value is None or value == "null":
            return None
        hint = next(a for a in args if a is not type(None))
    base = typing.get_origin(hint) or hint
    if base is bool:
        if isinstance(value, bool):
            return value
    elif base is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif base is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif base is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    elif base is list:
        if isinstance(value, (list, tuple)):
            return list(value)
    elif base is dict:
        if isinstance(value, dict):
            return value
    want = getattr(base, "__name__", str(base)) + (" or null" if optional else "")
    raise UsageError(f"{key} must be {want}, got {value!r}")


def suggest(word: str, choices) -> str:
    close = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


# ---------------------------------------------------------------- validation

CHOICES = {
    ("data", "format"): ("folder", "shards"),
    ("optim", "batch_rule"): ("accumulate", "linear", "sqrt", "none"),
    ("run", "amp"): ("bf16", "fp16", "none"),
    ("run", "device"): ("auto", "cpu", "cuda"),
    ("run", "best_metric"): ("top1", "top5", "nll", "ece", "agreement", "kl"),
    ("aug", "mixup_mode"): ("batch", "pair", "elem"),
    ("aug", "interpolation"): ("bicubic", "bilinear", "nearest", "random"),
    ("aug", "eval_interpolation"): ("bicubic", "bilinear", "nearest"),
    ("sched", "name"): ("cosine", "step", "multistep", "plateau", "tanh", "poly", "wsd"),
}

# (section, key): (low, high, include_low); high is inclusive; None is unbounded.
RANGES = {
    ("optim", "lr"): (0.0, None, False),
    ("optim", "weight_decay"): (0.0, None, True),
    ("optim", "eps"): (0.0, None, False),
    ("optim", "global_batch"): (1, None, True),
    ("optim", "clip_grad"): (0.0, None, False),
    ("sched", "epochs"): (1, None, True),
    ("sched", "warmup_epochs"): (0, None, True),
    ("sched", "warmup_lr"): (0.0, None, True),
    ("sched", "min_lr"): (0.0, None, True),
    ("sched", "cooldown_epochs"): (0, None, True),
    ("data", "batch_size"): (1, None, True),
    ("data", "eval_batch_size"): (1, None, True),
    ("data", "workers"): (0, None, True),
    ("data", "input_size"): (8, None, True),
    ("data", "max_bad_samples"): (0, None, True),
    ("teacher", "input_size"): (8, None, True),
    ("aug", "hflip"): (0.0, 1.0, True),
    ("aug", "color_jitter"): (0.0, None, True),
    ("aug", "re_prob"): (0.0, 1.0, True),
    ("aug", "mixup_alpha"): (0.0, None, True),
    ("aug", "cutmix_alpha"): (0.0, None, True),
    ("aug", "mixup_prob"): (0.0, 1.0, True),
    ("aug", "mixup_switch_prob"): (0.0, 1.0, True),
    ("aug", "label_smoothing"): (0.0, 1.0, True),
    ("aug", "repeats"): (1, None, True),
    ("aug", "eval_crop_pct"): (0.0, 1.0, False),
    ("loss", "kd_weight"): (0.0, None, True),
    ("loss", "temperature"): (0.0, None, False),
    ("ema", "decay"): (0.0, 1.0, True),
    ("run", "log_interval"): (1, None, True),
    ("run", "ckpt_every_steps"): (0, None, True),
    ("run", "eval_every"): (1, None, True),
    ("run", "ece_bins"): (1, None, True),
    ("run", "max_nonfinite"): (1, None, True),
    ("run", "max_steps"): (0, None, True),
    ("run", "stop_after"): (0, None, True),
}


def validate(recipe: Recipe) -> None:
    for (section, key), allowed in CHOICES.items():
        value = getattr(getattr(recipe, section), key)
        if value not in allowed:
            raise UsageError(f"{section}.{key}={value!r} is not one of {', '.join(allowed)}"
                             f"{suggest(value, allowed)}")
    for (section, key), (low, high, include_low) in RANGES.items():
        value = getattr(getattr(recipe, section), key)
        if value is None:
            continue
        too_low = value < low if include_low else value <= low
        if too_low or (high is not None and value > high):
            bound = f"{'>=' if include_low else '>'} {low}" + (f" and <= {high}" if high is not None else "")
            raise UsageError(f"{section}.{key}={value} is out of range: must be {bound}")
    for key in ("scale", "ratio"):
        pair = getattr(recipe.aug, key)
        if len(pair) != 2 or not all(isinstance(v, (int, float)) for v in pair) or not 0 < pair[0] <= pair[1]:
            raise UsageError(f"aug.{key}={pair} must be two numbers 0 < low <= high")
    if recipe.sched.warmup_epochs >= recipe.sched.epochs + recipe.sched.cooldown_epochs:
        raise UsageError(f"sched.warmup_epochs={recipe.sched.warmup_epochs} must be less than "
                         f"sched.epochs={recipe.sched.epochs}")
    if recipe.run.amp == "fp16" and recipe.run.device == "cpu":
        raise UsageError("run.amp=fp16 needs a GPU; use run.amp=none or bf16 on CPU (CPU runs fp32 anyway)")
    resume = recipe.run.resume
    if resume not in ("never", "auto") and not Path(resume).is_file():
        raise UsageError(f"run.resume={resume!r} must be never, auto or an existing checkpoint file")
    check_model_name("model.name", recipe.model.name)
    if recipe.kd:
        check_model_name("teacher.name", recipe.teacher.name)
        if recipe.teacher.weights and not Path(recipe.teacher.weights).is_file():
            raise UsageError(f"teacher.weights={recipe.teacher.weights!r} does not exist")
    recipe.run_dir()  # fails early on a bad template


def check_model_name(key: str, name: str) -> None:
    import timm  # deferred: listing models imports torch, and the recipe is otherwise pure data

    if timm.is_model(name.split(".")[0]):
        return
    names = timm.list_models() + timm.list_models(pretrained=True)
    raise UsageError(f"{key}={name!r} is not a timm model{suggest(name, names)}")

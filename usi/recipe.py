"""The Recipe: typed sections, YAML load, dotted overrides, validation, save.

Every fact about a recipe field lives next to the field, in `setting(...)`: its default, its
meaning, its choices or range, and whether it may differ when a run is resumed. Validation, the
resume check and the key listing all read those facts from the dataclasses.

The recipe is data: it uses no torch. Model names are checked against timm's registry (a name
lookup, no model is built) so a typo fails before any heavy work starts.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import re
import string
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from usi.errors import UsageError
from usi.metrics import METRICS


def setting(default=None, *, help: str, choices: tuple | None = None, low: float | None = None,
            high: float | None = None, low_open: bool = False, high_open: bool = False, resume_free: bool = False,
            factory=None):
    """A recipe field and its facts.

    choices: the allowed values. low/high: the inclusive range (exclusive with low_open/high_open).
    resume_free: the value may differ when a run is resumed (it does not change what is trained).
    """
    meta = {"help": help, "choices": choices, "low": low, "high": high, "low_open": low_open,
            "high_open": high_open, "resume_free": resume_free}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelSection:
    name: str = setting("resnet50", help="the student: any timm model name")
    pretrained: bool = setting(False, help="start from timm's pretrained weights (its hub); the classifier is "
                                           "re-initialized when the class count differs")
    weights: Optional[str] = setting(None, resume_free=True,  # read at a fresh start only
                                     help="start from a local .safetensors/.pth (weights_only); the classifier "
                                          "is re-initialized when the class count differs")
    drop_path_rate: Optional[float] = setting(None, low=0.0, high=1.0, high_open=True,
                                              help="stochastic depth; null keeps the model's own")
    kwargs: dict = setting(factory=dict, help="extra timm.create_model arguments, e.g. {img_size: 384}")


@dataclass
class TeacherSection:
    name: Optional[str] = setting("tresnet_v2_l.miil_in21k_ft_in1k",
                                  help="the frozen teacher (timm name); null trains without distillation")
    weights: Optional[str] = setting(None, help="a local .pth/.pt/.safetensors; null asks timm's pretrained source")
    input_size: Optional[int] = setting(None, low=8, high=4096,
                                        help="resize the student's batch for the teacher; null: as is")
    fold_bn: bool = setting(True, help="fold BatchNorm into the preceding convolutions")
    kwargs: dict = setting(factory=dict, help="extra timm.create_model arguments for the teacher")
    extra: list = setting(factory=list, help="more teachers, an ensemble: a list of {name, weights, input_size, "
                                             "fold_bn, kwargs}, each with its own normalization")
    combine: str = setting("probs", choices=("probs", "logits"),
                           help="an ensemble's soft labels: the mean of its teachers' probabilities, or of "
                                "their logits")


# The keys a member of teacher.extra may have: a teacher's own settings, not the ensemble's.
MEMBER_KEYS = ("name", "weights", "input_size", "fold_bn", "kwargs")


@dataclass
class FeaturesSection:
    student: Optional[str] = setting(None, help="feature KD: the student module whose output is matched to the "
                                                "teacher's (e.g. layer4, blocks.5, global_pool); null: off")
    teacher: Optional[str] = setting(None, help="the teacher module it is matched to (the first teacher's)")
    weight: float = setting(1.0, low=0.0, help="weight of the feature term, added to the task and KD terms")
    loss: str = setting("mse", choices=("mse", "cosine"),
                        help="mse, or cosine (1 - cosine similarity per position)")


@dataclass
class DataSection:
    root: str = setting("data/imagenet", resume_free=True,
                        help="holds the train and val splits: class folders, or shards with index.json")
    format: str = setting("folder", choices=("folder", "shards"),
                          help="folder: root/<split>/<class>/<image>; shards: usi shards output")
    train_shards: Optional[str] = setting(None, resume_free=True,
                                          help="shards: a brace pattern or pipe: URL; null: the index's own files")
    val_shards: Optional[str] = setting(None, resume_free=True, help="the same for the val split")
    train_split: str = setting("train", help="the training split's folder under root")
    val_split: str = setting("val", help="the validation split's folder under root")
    batch_size: int = setting(128, low=1, help="per process (per GPU)")
    eval_batch_size: Optional[int] = setting(None, low=1, resume_free=True, help="per process; null: 2 x batch_size")
    workers: int = setting(8, low=0, resume_free=True, help="loader processes per GPU")
    input_size: Optional[int] = setting(None, low=8, high=4096, help="null: the student's default input size")
    max_bad_samples: int = setting(1000, low=0, resume_free=True,
                                   help="unreadable images skipped per run before it stops")


@dataclass
class AugSection:
    scale: list = setting(factory=lambda: [0.08, 1.0], help="RandomResizedCrop area range")
    ratio: list = setting(factory=lambda: [0.75, 1.3333333333333333], help="RandomResizedCrop aspect range")
    interpolation: str = setting("bicubic", choices=("bicubic", "bilinear", "nearest", "random"),
                                 help="resize interpolation for training crops")
    hflip: float = setting(0.5, low=0.0, high=1.0, help="horizontal flip probability")
    auto_augment: Optional[str] = setting("rand-m7-mstd0.5-inc1", help="timm RandAugment string; null: none")
    randaugment_on: str = setting("auto", choices=("auto", "workers", "device"), resume_free=True,
                                  help="where RandAugment runs: in the loader workers (timm's PIL ops) or "
                                       "batched on the device after the copy; auto: on the device with CUDA")
    color_jitter: float = setting(0.0, low=0.0, help="color jitter strength; 0: none")
    re_prob: float = setting(0.0, low=0.0, high=1.0, help="random erasing probability")
    mixup_alpha: float = setting(0.8, low=0.0, help="mixup Beta(alpha, alpha); 0: off")
    cutmix_alpha: float = setting(1.0, low=0.0, help="cutmix Beta(alpha, alpha); 0: off")
    mixup_prob: float = setting(1.0, low=0.0, high=1.0, help="probability that a batch is mixed")
    mixup_switch_prob: float = setting(0.5, low=0.0, high=1.0, help="probability of cutmix instead of mixup")
    mixup_mode: str = setting("batch", choices=("batch", "pair", "elem"), help="one mix per batch, pair or element")
    label_smoothing: float = setting(0.0, low=0.0, high=1.0, help="label smoothing of the mixed targets")
    repeats: int = setting(3, low=1, help="repeated augmentation: each image augmented this often per epoch")
    eval_crop_pct: float = setting(0.95, low=0.0, high=1.0, low_open=True, help="center crop fraction at eval")
    eval_interpolation: str = setting("bicubic", choices=("bicubic", "bilinear", "nearest"),
                                      help="resize interpolation at eval")


@dataclass
class LossSection:
    kd_weight: float = setting(5.0, low=0.0, help="weight of KL(teacher || student)")
    # below ~0.1 the T^2-scaled KD term vanishes in float32; Hinton et al. use up to 20
    temperature: float = setting(1.0, low=0.1, high=100.0, help="softmax temperature of the KD term")
    hard_label: bool = setting(True, help="false: KD term only, no cross-entropy on the mixed targets")
    weighting: str = setting("usi", choices=("usi", "hinton"),
                             help="usi: CE + kd_weight x KL (the published recipe); hinton: alpha x CE + "
                                  "(1 - alpha) x T^2 x KL (Hinton et al. 2015; kd_weight is not used)")
    alpha: float = setting(0.5, low=0.0, high=1.0, help="hinton weighting: the CE term's share")


@dataclass
class OptimSection:
    name: str = setting("adamw", help="timm optimizer name")
    lr: float = setting(2e-3, low=0.0, low_open=True, help="peak learning rate (not scaled with batch)")
    weight_decay: float = setting(0.02, low=0.0, help="none on biases and 1-D (norm) parameters")
    eps: float = setting(1e-8, low=0.0, low_open=True, help="optimizer epsilon")
    global_batch: int = setting(1024, low=1, help="the batch the lr was tuned for (128 x 8 GPUs)")
    batch_rule: str = setting("accumulate", choices=("accumulate", "linear", "sqrt", "none"),
                              help="how another processes x batch_size meets global_batch: accumulate "
                                   "gradients, scale lr linearly or by sqrt, or none")
    clip_grad: Optional[float] = setting(None, low=0.0, low_open=True, help="gradient norm clip; null: none")
    layer_decay: Optional[float] = setting(None, low=0.0, high=1.0, low_open=True,
                                           help="layer-wise lr decay for fine-tuning (timm's); null: none")


@dataclass
class SchedSection:
    # timm's plateau scheduler needs a metric per epoch; usi steps the schedule per optimizer update.
    name: str = setting("cosine", choices=("cosine", "step", "multistep", "tanh", "poly"),
                        help="timm scheduler, stepped per optimizer update")
    epochs: int = setting(300, low=1, help="training epochs (cool-down epochs come on top)")
    warmup_epochs: int = setting(5, low=0, help="linear warm-up from warmup_lr")
    warmup_lr: float = setting(1e-4, low=0.0, help="learning rate at the start of warm-up")
    min_lr: float = setting(1e-6, low=0.0, help="learning rate at the end of the schedule")
    cooldown_epochs: int = setting(0, low=0, help="epochs at min_lr after the schedule")


@dataclass
class EmaSection:
    enabled: bool = setting(True, help="keep an exponential moving average of the weights")
    decay: float = setting(0.99996, low=0.0, high=1.0, help="EMA decay per optimizer update")


@dataclass
class RunSection:
    dir: str = setting("runs/{model.name}", resume_free=True,
                       help="run directory; {section.key} fields are filled from the recipe")
    seed: int = setting(42, low=0, high=2**31 - 1, help="all randomness derives from (seed, epoch, rank, step)")
    device: str = setting("auto", choices=("auto", "cpu", "cuda"), resume_free=True, help="auto: cuda if available")
    amp: str = setting("bf16", choices=("bf16", "fp16", "none"),
                       help="mixed precision on GPU; CPU runs fp32 unless amp_on_cpu")
    amp_on_cpu: bool = setting(False, help="bf16 autocast on CPU too (slow on most CPUs; tests the bf16 path)")
    channels_last: str = setting("auto", choices=("auto", "true", "false"),
                                 help="channels_last memory format; auto: on CUDA only (some CPU kernels crash in it)")
    compile: bool = setting(False, help="torch.compile the student and the teacher")
    cudnn_benchmark: bool = setting(True, resume_free=True,
                                    help="GPU: let cuDNN pick the fastest kernels (not bit-exact across runs)")
    tf32: bool = setting(True, resume_free=True, help="GPU: TF32 matmuls and convolutions (not bit-exact vs fp32)")
    resume: str = setting("never", resume_free=True, help="never | auto | a checkpoint path")
    log_interval: int = setting(50, low=1, resume_free=True, help="steps between progress lines (host syncs)")
    ckpt_every_steps: int = setting(0, low=0, resume_free=True,
                                    help="extra mid-epoch checkpoints every N updates; 0: epoch ends only")
    eval_every: int = setting(1, low=1, help="evaluate every N epochs (and after the last)")
    best_metric: str = setting("top1", choices=tuple(METRICS),
                               help="what best.safetensors is ranked by, over raw and EMA weights")
    ece_bins: int = setting(15, low=1, high=10000, help="equal-width confidence bins of the ECE")
    max_nonfinite: int = setting(20, low=1, resume_free=True,
                                 help="non-finite updates in a row before the run stops")
    max_steps: int = setting(0, low=0, help="stop each epoch after this many steps (smoke tests); 0: full epochs")
    stop_after: int = setting(0, low=0, resume_free=True,
                              help="train this many epochs in this invocation, then exit (time-limited jobs)")
    loggers: list = setting(factory=list, resume_free=True,
                            help="trackers beside metrics.jsonl, rank 0 only: tensorboard, wandb")


@dataclass
class Recipe:
    model: ModelSection = field(default_factory=ModelSection)
    teacher: TeacherSection = field(default_factory=TeacherSection)
    data: DataSection = field(default_factory=DataSection)
    aug: AugSection = field(default_factory=AugSection)
    loss: LossSection = field(default_factory=LossSection)
    features: FeaturesSection = field(default_factory=FeaturesSection)
    optim: OptimSection = field(default_factory=OptimSection)
    sched: SchedSection = field(default_factory=SchedSection)
    ema: EmaSection = field(default_factory=EmaSection)
    run: RunSection = field(default_factory=RunSection)

    @property
    def kd(self) -> bool:
        return bool(self.teacher.name)

    def teachers(self) -> list[TeacherSection]:
        """Every teacher: teacher itself, then the members of teacher.extra (validated by `validate`)."""
        if not self.kd:
            return []
        return [self.teacher] + [member_section(i, m) for i, m in enumerate(self.teacher.extra)]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: Path) -> None:
        Path(path).write_text(self.to_yaml())

    def run_dir(self) -> Path:
        # only plain {section.key} fields: a format spec such as {model.name:>5000000000} would build a
        # path of gigabytes before anything could refuse it
        try:
            fields = [f[1:] for f in string.Formatter().parse(self.run.dir) if f[1] is not None]
        except ValueError as e:  # a lone brace
            raise UsageError(f"run.dir {self.run.dir!r} is not a valid template ({e}); write a literal brace as "
                             f"{{{{ or }}}}") from None
        for field_name, spec, conversion in fields:
            if spec or conversion or not re.fullmatch(r"\w+\.\w+", field_name):
                raise UsageError(f"run.dir {self.run.dir!r}: fields are plain {{section.key}}, e.g. {{model.name}}; "
                                 f"got {{{field_name}{'!' + conversion if conversion else ''}"
                                 f"{':' + spec if spec else ''}}}")
        try:
            path = Path(self.run.dir.format(**{name: getattr(self, name) for name in SECTIONS}))
        except (KeyError, AttributeError, IndexError) as e:
            raise UsageError(f"run.dir {self.run.dir!r}: unknown field {e}; use e.g. {{model.name}}") from None
        except ValueError as e:  # a lone brace
            raise UsageError(f"run.dir {self.run.dir!r} is not a valid template ({e}); write a literal brace as "
                             f"{{{{ or }}}}") from None
        longest = max((len(part.encode()) for part in path.parts), default=0)
        if longest > 255 or len(str(path).encode()) > 4000:
            raise UsageError(f"run.dir {str(path)[:60]!r}...: a folder name of {longest} bytes; file systems allow "
                             f"255 per name")
        return path


SECTIONS: dict[str, type] = {f.name: f.default_factory for f in dataclasses.fields(Recipe)}


def fields_of(section: str) -> tuple[dataclasses.Field, ...]:
    return dataclasses.fields(SECTIONS[section])


def resume_free_keys() -> set[tuple[str, str]]:
    """(section, key) of every field that may differ when a run is resumed."""
    return {(s, f.name) for s in SECTIONS for f in fields_of(s) if f.metadata["resume_free"]}


def describe(section: str | None = None) -> str:
    """Every key (of one section) with its type, default, allowed values and meaning: `usi keys`."""
    if section is not None and section not in SECTIONS:
        raise UsageError(f"unknown recipe section {section!r}{suggest(section, SECTIONS)}")
    lines = []
    for name in [section] if section else SECTIONS:
        lines.append(f"{name}:")
        defaults = SECTIONS[name]()
        for f in fields_of(name):
            meta = f.metadata
            allowed = f" (one of {', '.join(meta['choices'])})" if meta["choices"] else ""
            if meta["low"] is not None or meta["high"] is not None:
                low = "" if meta["low"] is None else f"{'>' if meta['low_open'] else '>='} {meta['low']}"
                high = "" if meta["high"] is None else f"{'<' if meta['high_open'] else '<='} {meta['high']}"
                allowed = f" ({' and '.join(part for part in (low, high) if part)})"
            resume = "; may change on resume" if meta["resume_free"] else ""
            lines.append(f"  {name}.{f.name} = {getattr(defaults, f.name)!r}{allowed}: {meta['help']}{resume}")
    return "\n".join(lines)


# ---------------------------------------------------------------- loading


def load(path: str | Path | None, overrides: list[str] = ()) -> Recipe:
    """A recipe from a YAML file (or the defaults) plus `section.key=value` overrides, validated."""
    return from_tree(read_yaml(Path(path)) if path is not None else {}, overrides)


def from_tree(tree: dict, overrides: list[str] = ()) -> Recipe:
    """A validated recipe from parsed YAML (e.g. one stored in a checkpoint) plus overrides."""
    tree = copy.deepcopy(tree)
    for item in overrides:
        key, value = parse_override(item)
        set_dotted(tree, key, value)
    recipe = from_dict(tree)
    validate(recipe)
    return recipe


class UniqueKeyLoader(yaml.SafeLoader):
    """safe_load, refusing a key given twice: plain YAML keeps the last one and silently drops the first
    (a second `optim:` section would replace the whole first one). Aliases are refused too: a recipe has
    no use for them, and nested aliases ("billion laughs") expand a few lines into gigabytes, which a
    checkpoint's stored recipe could carry."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.events.AliasEvent):
            mark = self.peek_event().start_mark
            raise UsageError(f"YAML aliases (*name) are not allowed in a recipe (line {mark.line + 1})")
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise UsageError(f"duplicate key {key!r} at line {key_node.start_mark.line + 1}; "
                                 f"a second one would silently replace the first")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise UsageError(f"recipe file {path} {'is a directory, not a file' if path.is_dir() else 'does not exist'}")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise UsageError(f"recipe {path} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); "
                         f"save it as UTF-8") from None
    except OSError as e:
        raise UsageError(f"recipe {path} cannot be read ({e.strerror})") from None
    return parse_yaml(text, f"recipe {path}")


MAX_RECIPE_BYTES = 1 << 20  # a recipe is a few kB; a checkpoint's metadata could hold anything


def parse_yaml(text: str, what: str) -> dict:
    """A recipe's text (a file, or the copy stored in a checkpoint) as its tree of sections."""
    if len(text) > MAX_RECIPE_BYTES:
        raise UsageError(f"{what} is {len(text)} bytes; a recipe is a few kB")
    try:
        # SafeLoader refuses Python object tags (!!python/object...): a recipe cannot run code.
        tree = yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except UsageError as e:
        raise UsageError(f"{what}: {e}") from None
    except yaml.YAMLError as e:
        first = str(e).strip().splitlines()[0]
        raise UsageError(f"{what} is not valid YAML: {first}") from None
    except RecursionError:
        raise UsageError(f"{what} is nested too deeply to be a recipe") from None
    except TypeError as e:  # a complex key: `? [a, b]`
        raise UsageError(f"{what}: keys must be plain names ({e})") from None
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise UsageError(f"{what} must be a mapping of sections, got {type(tree).__name__}")
    return tree


def parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise UsageError(f"override {item!r} must look like section.key=value (e.g. optim.lr=1e-3)")
    key, text = item.split("=", 1)
    try:
        value = yaml.safe_load(text) if text != "" else None
    except yaml.YAMLError:
        value = text
    return key.strip(), value


def set_dotted(tree: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    if len(parts) < 2:
        raise UsageError(f"override key {key!r} must name a section and a key, e.g. optim.lr")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise UsageError(f"override {key!r}: {part!r} is not a section")
    node[parts[-1]] = value


def from_dict(tree: dict) -> Recipe:
    sections = {}
    for name, values in tree.items():
        if name not in SECTIONS:
            raise UsageError(f"unknown recipe section {name!r}{suggest(name, SECTIONS)}")
        if values is None:
            values = {}
        if not isinstance(values, dict):
            raise UsageError(f"recipe section {name!r} must be a mapping, got {values!r}")
        sections[name] = build_section(name, values)
    recipe = Recipe(**sections)
    # Each member in full (every key, defaults filled in): a member written with its defaults spelled
    # out is the same ensemble, and a resume must see it so.
    recipe.teacher.extra = [{k: getattr(member_section(i, m), k) for k in MEMBER_KEYS}
                            for i, m in enumerate(recipe.teacher.extra)]
    return recipe


def build_section(section: str, values: dict):
    cls = SECTIONS[section]
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
        number = value
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if isinstance(number, (int, float)) and not isinstance(number, bool):
            if not math.isfinite(number):
                raise UsageError(f"{key} must be a finite number, got {value!r}")
            return float(number)
    elif base is str:
        if isinstance(value, str):
            return value
        if isinstance(value, bool):  # YAML reads true/yes/on as a bool: "true"/"false" for str choices
            return str(value).lower()
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    elif base is list:
        if isinstance(value, (list, tuple)):
            check_finite(key, value)
            return list(value)
    elif base is dict:
        if isinstance(value, dict):
            check_finite(key, value)
            return value
    want = getattr(base, "__name__", str(base)) + (" or null" if optional else "")
    raise UsageError(f"{key} must be {want}, got {value!r}")


def check_finite(key: str, value: Any) -> None:
    """NaN and infinity anywhere in a list or mapping (e.g. model.kwargs) are refused too."""
    items = ((f"{key}.{k}", v) for k, v in value.items()) if isinstance(value, dict) else (
        (f"{key}[{i}]", v) for i, v in enumerate(value))
    for name, item in items:
        if isinstance(item, float) and not math.isfinite(item):
            raise UsageError(f"{name} must be a finite number, got {item!r}")
        if isinstance(item, (dict, list, tuple)):
            check_finite(name, item)


def suggest(word: str, choices) -> str:
    close = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


# ---------------------------------------------------------------- validation


def validate(recipe: Recipe) -> None:
    """Every error the recipe alone can reveal, before any model or data is touched."""
    for section in SECTIONS:
        for f in fields_of(section):
            check_field(f"{section}.{f.name}", getattr(getattr(recipe, section), f.name), f.metadata)
    for key in ("scale", "ratio"):
        pair = getattr(recipe.aug, key)
        if (len(pair) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in pair)
                or not 0 < pair[0] <= pair[1]):
            raise UsageError(f"aug.{key}={pair} must be two numbers 0 < low <= high")
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
            raise UsageError(f"run.loggers: {logger!r} is not one of tensorboard, wandb"
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
    if resume not in ("never", "auto") and not Path(resume).is_file():
        raise UsageError(f"run.resume={resume!r} must be never, auto or an existing checkpoint file")
    check_optimizer(recipe.optim.name)
    reserved = {"pretrained": "model.pretrained", "num_classes": "the data (its class folders)",
                "pretrained_cfg_overlay": "model.weights", "checkpoint_path": "model.weights"}
    for key in reserved.keys() & recipe.model.kwargs.keys():
        raise UsageError(f"model.kwargs sets {key}, which usi sets from {reserved[key]}; remove it from model.kwargs")
    if recipe.model.pretrained and recipe.model.weights:
        raise UsageError("model.pretrained=true and model.weights both choose starting weights; keep one")
    if recipe.model.weights and not Path(recipe.model.weights).is_file():
        raise UsageError(f"model.weights={recipe.model.weights!r} does not exist")
    check_model_name("model.name", recipe.model.name)
    check_teachers(recipe)
    check_features(recipe)
    recipe.run_dir()  # fails early on a bad template


def member_section(index: int, member: Any) -> TeacherSection:
    """teacher.extra[index] as a TeacherSection, its keys and values checked like the teacher's own."""
    where = f"teacher.extra[{index}]"
    if not isinstance(member, dict):
        raise UsageError(f"{where} must be a mapping such as {{name: resnet50, weights: w.safetensors}}, "
                         f"got {member!r}")
    for key in member:
        if key not in MEMBER_KEYS:
            hint = " (YAML needs a space after each colon: {name: resnet50})" if ":" in str(key) else ""
            raise UsageError(f"unknown key {where}.{key}{suggest(key, MEMBER_KEYS)} (a member takes "
                             f"{', '.join(MEMBER_KEYS)}){hint}")
    if not member.get("name"):
        raise UsageError(f"{where} needs a name (a timm model name)")
    hints = typing.get_type_hints(TeacherSection)
    section = TeacherSection(**{k: coerce(f"{where}.{k}", v, hints[k]) for k, v in member.items()})
    for f in fields_of("teacher"):
        if f.name in MEMBER_KEYS:
            check_field(f"{where}.{f.name}", getattr(section, f.name), f.metadata)
    return section


def check_teachers(recipe: Recipe) -> None:
    if recipe.teacher.extra and not recipe.kd:
        raise UsageError("teacher.extra lists ensemble members but teacher.name is null; name the first teacher")
    for i, t in enumerate(recipe.teachers()):
        key = "teacher" if i == 0 else f"teacher.extra[{i - 1}]"
        check_model_name(f"{key}.name", t.name)
        if t.weights and not Path(t.weights).is_file():
            raise UsageError(f"{key}.weights={t.weights!r} does not exist")


def check_features(recipe: Recipe) -> None:
    f = recipe.features
    if bool(f.student) != bool(f.teacher):
        given, missing = ("student", "teacher") if f.student else ("teacher", "student")
        raise UsageError(f"features.{given} is set but features.{missing} is not: feature KD matches a student "
                         f"module to a teacher module")
    if f.student and not recipe.kd:
        raise UsageError("features.student needs a teacher (teacher.name is null)")


def check_field(key: str, value: Any, meta) -> None:
    if value is None:
        return
    allowed = meta["choices"]
    if allowed is not None and value not in allowed:
        raise UsageError(f"{key}={value!r} is not one of {', '.join(allowed)}{suggest(value, allowed)}")
    low, high = meta["low"], meta["high"]
    if low is None and high is None:
        return
    too_low = low is not None and (value <= low if meta["low_open"] else value < low)
    too_high = high is not None and (value >= high if meta["high_open"] else value > high)
    if too_low or too_high:
        bound = " and ".join(part for part in (
            f"{'>' if meta['low_open'] else '>='} {low}" if low is not None else "",
            f"{'<' if meta['high_open'] else '<='} {high}" if high is not None else "") if part)
        raise UsageError(f"{key}={value} is out of range: must be {bound}")


def mixes(aug: AugSection) -> bool:
    """Whether batches are mixed (mixup or cutmix), which pairs samples within a batch."""
    return (aug.mixup_alpha > 0 or aug.cutmix_alpha > 0) and aug.mixup_prob > 0


def check_optimizer(name: str) -> None:
    from timm.optim import list_optimizers  # deferred, as for model names

    names = list_optimizers()
    parts = name.lower().split("_")  # timm's own parsing: an optional lookahead_ prefix, then the name
    if parts[-1] not in names or (len(parts) > 1 and parts[0] != "lookahead"):
        raise UsageError(f"optim.name={name!r} is not a timm optimizer{suggest(name, names)}")


def check_model_name(key: str, name: str) -> None:
    import timm  # deferred: listing models imports torch, and the recipe is otherwise pure data

    arch, _, tag = name.partition(".")
    if not timm.is_model(arch):
        names = timm.list_models() + timm.list_models(pretrained=True)
        raise UsageError(f"{key}={name!r} is not a timm model{suggest(name, names)}")
    if tag and name not in timm.list_pretrained(f"{arch}.*"):
        tags = [n.partition(".")[2] for n in timm.list_pretrained(f"{arch}.*")]
        raise UsageError(f"{key}={name!r}: {arch} has no pretrained tag {tag!r} "
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
        raise UsageError(f"aug.auto_augment={config!r} is not a timm augmentation string ({e or type(e).__name__}); "
                         f"e.g. rand-m7-mstd0.5-inc1, augmix-m5, v0, or null") from None

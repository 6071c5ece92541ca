"""The recipe's schema: its sections and fields, and every fact about a field next to it.

`setting(...)` holds a field's default, its meaning, its choices or range, and whether it may differ when
a run is resumed; the checks (usi/recipe/checking.py), the resume check and `usi keys` all read those
facts from the dataclasses. The recipe is data: nothing here imports torch.
"""
from __future__ import annotations

import dataclasses
import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from usi.errors import UsageError, quote, suggest

# The metrics every evaluation reports, and which way is better: run.best_metric's choices.
METRICS = {"top1": "higher", "top5": "higher", "nll": "lower", "ece": "lower", "agreement": "higher", "kl": "lower"}


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
    grad_checkpointing: bool = setting(False, resume_free=True,  # the same gradients: only memory and time differ
                                       help="recompute activations in the backward pass (timm's "
                                            "set_grad_checkpointing): less memory, slower steps")


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
    soft_labels: Optional[str] = setting(None, help="a store written by usi soft-labels: training steps read the "
                                                    "teacher's stored logits instead of running it; null: live")


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
    minival: float = setting(0.0, low=0.0, help="train images held out to select best.safetensors on: a "
                             "fraction < 1 or a total count (spread over the classes in proportion), the same for "
                             "every seed; 0: select on val")
    # may change on resume: a resume refuses other class names anyway (the checkpoint stores them)
    class_map: Optional[str | list] = setting(None, resume_free=True,
                                              help="train on these classes in this order: a list of class folder "
                                                   "names, or a file of them, one per line (timm's class map); "
                                                   "other folders are left out of train and val; null: all")


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
    randaugment_fill: Optional[list] = setting(None, help="the fill colour of RandAugment's geometric ops, 3 "
                                                          "values 0..255; null: the student's mean (timm's)")
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
    task: str = setting("ce", choices=("ce", "bce"), help="the task term on the mixed targets: softmax CE, or "
                        "binary CE per class (timm's --bce-loss, as in ResNet strikes back)")
    bce_target_thresh: Optional[float] = setting(None, low=0.0, high=1.0, high_open=True,
                                                 help="bce: mixed targets above it become 1, the rest 0 (timm's "
                                                      "--bce-target-thresh); null: the soft targets")
    distill_token: Optional[str] = setting(None, choices=("soft", "hard"),
                                           help="DeiT distilled ViTs: the distillation token learns the teacher's "
                                                "soft label (the KD term's KL) or hard one (CE on its argmax), the "
                                                "class token the mixed targets; eval averages both heads; null: off")


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
    betas: Optional[list] = setting(None, help="the optimizer's betas, e.g. [0.9, 0.999]; null: its own")
    momentum: Optional[float] = setting(None, low=0.0, high=1.0, high_open=True,
                                        help="momentum (sgd, momentum, rmsprop, ...); null: timm's 0.9")
    kwargs: dict = setting(factory=dict, help="more arguments of the optimizer class or of timm's "
                                              "create_optimizer_v2, e.g. {nesterov: false, amsgrad: true}")


@dataclass
class SchedSection:
    # timm's plateau scheduler needs a metric per epoch; usi steps the schedule per optimizer update.
    name: str = setting("cosine", choices=("cosine", "step", "multistep", "tanh", "poly"),
                        help="timm scheduler, stepped per optimizer update")
    epochs: int = setting(300, low=1, help="training epochs (cool-down epochs come on top); a resume may change "
                                           "it (not below the epochs done): the schedule follows the new total")
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
    sync_bn: bool = setting(False, help="DDP: BatchNorm statistics over all processes (timm's --sync-bn); "
                                        "GPUs only; one process: no change")
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
    keep_best: int = setting(1, low=1, high=100, resume_free=True,
                             help="keep the top-k weights by run.best_metric: best.safetensors, best-2..k")
    ece_bins: int = setting(15, low=1, high=10000, help="equal-width confidence bins of the ECE")
    max_nonfinite: int = setting(20, low=1, resume_free=True,
                                 help="non-finite updates in a row before the run stops")
    max_steps: int = setting(0, low=0, help="stop each epoch after this many steps (smoke tests); 0: full epochs")
    stop_after: int = setting(0, low=0, resume_free=True,
                              help="train this many epochs in this invocation, then exit (time-limited jobs)")
    loggers: list = setting(factory=list, resume_free=True,
                            help="trackers beside metrics.jsonl, rank 0 only: tensorboard, wandb")
    wandb_project: str = setting("usi", resume_free=True, help="the W&B project")
    wandb_entity: Optional[str] = setting(None, resume_free=True, help="the W&B team or user; null: your default")
    wandb_name: Optional[str] = setting(None, resume_free=True, help="the W&B run name; null: the run directory's")
    wandb_tags: list = setting(factory=list, resume_free=True, help="the W&B run's tags, e.g. [kd, resnet]")


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
        """Every teacher: teacher itself, then the members of teacher.extra (stored in full form by loading)."""
        if not self.kd:
            return []
        return [self.teacher] + [TeacherSection(**m) for m in self.teacher.extra]

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
            raise UsageError(f"run.dir {quote(self.run.dir)} is not a valid template ({e}); write a literal brace as "
                             f"{{{{ or }}}}") from None
        for field_name, spec, conversion in fields:
            if spec or conversion or not re.fullmatch(r"\w+\.\w+", field_name):
                raise UsageError(f"run.dir {quote(self.run.dir)}: fields are plain {{section.key}}, e.g. "
                                 f"{{model.name}}; got {{{field_name}{'!' + conversion if conversion else ''}"
                                 f"{':' + spec if spec else ''}}}")
        try:
            path = Path(self.run.dir.format(**{name: getattr(self, name) for name in SECTIONS}))
        except (KeyError, AttributeError, IndexError) as e:
            raise UsageError(f"run.dir {quote(self.run.dir)}: unknown field {e}; use e.g. {{model.name}}") from None
        except ValueError as e:  # a lone brace
            raise UsageError(f"run.dir {quote(self.run.dir)} is not a valid template ({e}); write a literal brace as "
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
        raise UsageError(f"unknown recipe section {quote(section)}{suggest(section, SECTIONS)}")
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


def check_field(key: str, value: Any, meta) -> None:
    if value is None:
        return
    allowed = meta["choices"]
    if allowed is not None and value not in allowed:
        raise UsageError(f"{key}={quote(value)} is not one of {', '.join(allowed)}{suggest(value, allowed)}")
    low, high = meta["low"], meta["high"]
    if low is None and high is None:
        return
    too_low = low is not None and (value <= low if meta["low_open"] else value < low)
    too_high = high is not None and (value >= high if meta["high_open"] else value > high)
    if too_low or too_high:
        bound = " and ".join(part for part in (
            f"{'>' if meta['low_open'] else '>='} {low}" if low is not None else "",
            f"{'<' if meta['high_open'] else '<='} {high}" if high is not None else "") if part)
        raise UsageError(f"{key}={quote(value)} is out of range: must be {bound}")


def mixes(aug: AugSection) -> bool:
    """Whether batches are mixed (mixup or cutmix), which pairs samples within a batch."""
    return (aug.mixup_alpha > 0 or aug.cutmix_alpha > 0) and aug.mixup_prob > 0


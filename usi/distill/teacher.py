"""The frozen teacher: a timm model by name, its weights, its own normalization, BN folded.

Why not timm.task.DistillationTeacher (timm >= 1.0.25, which loads a local file too, via
pretrained_path): it does not fold BatchNorm, does not resize the batch for a teacher that needs its own
resolution, does not pin eval mode against a caller's .train(), and re-normalizes with a division per
call. This module keeps its formula (x * std_s + mean_s - mean_t) / std_t, precomputed as one
multiply-add per element.
"""
from __future__ import annotations

import collections
import copy
import json
import logging
import math
import re
from pathlib import Path

import timm
import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import BatchNormAct2d
from timm.layers._fx import get_notrace_functions, get_notrace_modules
from torch.nn.utils.fusion import fuse_conv_bn_weights

from usi.errors import UsageError
from usi.runtime.files import class_difference, file_kind, load_state_file, mismatch, non_finite, read_metadata

log = logging.getLogger("usi")


class Teacher(nn.Module):
    """Takes the student's normalized (and mixed) batch, returns the teacher's logits. Never trains."""

    def __init__(self, model: nn.Module, *, student_mean, student_std, teacher_mean, teacher_std,
                 input_size: int | None = None):
        super().__init__()
        self.model = model
        s_mean, s_std, t_mean, t_std = (torch.tensor(v, dtype=torch.float32).view(1, -1, 1, 1)
                                        for v in (student_mean, student_std, teacher_mean, teacher_std))
        # x_t = (x_s * std_s + mean_s - mean_t) / std_t  ==  x_s * scale + shift
        self.register_buffer("scale", s_std / t_std, persistent=False)
        self.register_buffer("shift", (s_mean - t_mean) / t_std, persistent=False)
        self.identity = bool(torch.equal(self.scale, torch.ones_like(self.scale))
                             and torch.equal(self.shift, torch.zeros_like(self.shift)))
        self.input_size = input_size
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> "Teacher":
        return super().train(False)  # frozen: BN statistics and dropout stay in inference mode

    def compile(self, **kwargs) -> "Teacher":
        """Compile the teacher's network (not the bridge), as timm's DistillationTeacher.compile does."""
        self.model = torch.compile(self.model, **kwargs)
        return self

    def renormalize(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.identity else torch.addcmul(self.shift.to(x.dtype), x, self.scale.to(x.dtype))

    def teacher_input(self, x: torch.Tensor) -> torch.Tensor:
        """The student's batch as the teacher expects it: its normalization, its resolution."""
        x = self.renormalize(x)
        if self.input_size and x.shape[-1] != self.input_size:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear",
                              align_corners=False, antialias=True)
        return x

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.teacher_input(x))

    # Body and head apart, as timm models offer them: evaluation runs the head in fp32.
    @torch.no_grad()
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(self.teacher_input(x))

    @torch.no_grad()
    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(features)


class Ensemble(nn.Module):
    """Several frozen teachers on the same batch, each with its own weights, normalization and resolution.

    Its logits are log(mean of the members' probabilities) (combine="probs", which softmax maps back to
    that mean) or the mean of their logits (combine="logits"); either way they stand wherever one
    teacher's logits do: the KD term, agreement, KL, the val logit cache.
    """

    def __init__(self, members: list[Teacher], combine: str = "probs", temperature: float = 1.0):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.combine, self.temperature = combine, temperature
        super().train(False)

    def train(self, mode: bool = True) -> "Ensemble":
        return super().train(False)

    def compile(self, **kwargs) -> "Ensemble":
        for member in self.members:
            member.compile(**kwargs)
        return self

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The KD term's teacher logits: at loss.temperature T, softmax(these / T) is the mean of the members'
        softmax(z / T) (combine=probs), not a softened mean of their plain probabilities."""
        t = self.temperature  # (for combine=logits the mean logit, whatever T)
        return combine_logits([member(x).float() / t for member in self.members], self.combine) * t


def combine_logits(logits: list[torch.Tensor], how: str) -> torch.Tensor:
    """The ensemble's logits from its members', in fp32: log of the mean probability, or the mean logit."""
    stacked = torch.stack([v.float() for v in logits])
    if how == "logits":
        return stacked.mean(0)
    return torch.logsumexp(stacked.log_softmax(dim=-1), dim=0) - math.log(len(logits))


def build_teachers(cfgs: list, combine: str, classes: list[str], temperature: float = 1.0,
                   **kwargs) -> Teacher | Ensemble:
    """The recipe's teacher, or an Ensemble when teacher.extra names more (each built as build_teacher)."""
    teachers = []
    for i, cfg in enumerate(cfgs):
        try:
            teachers.append(build_teacher(cfg, classes, **kwargs))
        except UsageError as e:
            raise UsageError(member_message(str(e), i)) from None
    return teachers[0] if len(teachers) == 1 else Ensemble(teachers, combine, temperature)


def member_message(message: str, index: int) -> str:
    """build_teacher's message about teacher.<key> as one about teacher.extra[index - 1].<key>."""
    if index == 0:
        return message
    member = f"teacher.extra[{index - 1}]"
    named = re.sub(r"\bteacher\.(?=[a-z])", member + ".", message)
    return named if named != message else f"{member}: {message}"


def primary(teacher: Teacher | Ensemble) -> Teacher:
    """The first teacher (the one feature KD reads)."""
    return teacher.members[0] if isinstance(teacher, Ensemble) else teacher


def build_teacher(cfg, classes: list[str], *, student_mean, student_std, student_size: int, device: torch.device,
                  channels_last: bool = False) -> Teacher:
    """cfg is the recipe's teacher section; `classes` the dataset's, in label order (weights that carry
    their own list, a usi run's, must have the same); the teacher sees the student's batches
    (student_size px) or, with teacher.input_size, those batches resized."""
    model = create_teacher_model(cfg, classes)
    teacher_classes = getattr(model, "num_classes", None)
    if teacher_classes != len(classes):
        raise class_count_error(cfg.name, teacher_classes, len(classes))
    model.eval().requires_grad_(False)
    timm_cfg = timm.data.resolve_model_data_config(model)
    size = cfg.input_size
    seen = size or student_size  # the size of the batches the teacher will see
    check_input(model, cfg.name, seen)
    if cfg.fold_bn:
        model, n = fold_batchnorm(model, torch.randn(2, 3, seen, seen))
        if n:
            log.info(f"teacher {cfg.name}: folded {n} BatchNorm layers into their convolutions")
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return Teacher(model, student_mean=student_mean, student_std=student_std, teacher_mean=timm_cfg["mean"],
                   teacher_std=timm_cfg["std"], input_size=size).to(device)


def check_input(model: nn.Module, name: str, size: int) -> None:
    """One forward of one image: a teacher that cannot take the batches' size fails here, in one line."""
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, size, size))
    except (AssertionError, RuntimeError, ValueError) as e:
        raise UsageError(f"teacher {name} cannot take {size} px inputs (set teacher.input_size to a size it takes): "
                         f"{str(e).strip().splitlines()[0][:160]}") from None


def class_count_error(name: str, teacher_classes, num_classes: int) -> UsageError:
    return UsageError(f"teacher {name} predicts {teacher_classes} classes but the dataset has {num_classes}; "
                      f"give teacher.weights trained on this dataset's classes")


def create_teacher_model(cfg, classes: list[str]) -> nn.Module:
    if not cfg.weights:
        try:
            return timm.create_model(cfg.name, pretrained=True, **cfg.kwargs)
        except (TypeError, KeyError) as e:  # an argument the architecture does not take, act_layer: nosuch
            raise UsageError(f"teacher.kwargs {cfg.kwargs} do not fit {cfg.name}: {type(e).__name__}: {e}") from None
        except Exception as e:  # no hub access, unknown tag, ...
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UsageError(f"could not get pretrained weights for teacher {cfg.name} from timm ({first}); "
                             f"set teacher.weights to a local .pth or .safetensors file") from None
    state = read_weights(Path(cfg.weights), classes, key="teacher.weights")
    found = classifier_classes(cfg.name, state)
    if found is not None and found != len(classes):  # before a model of that many classes is allocated
        raise class_count_error(cfg.name, found, len(classes))
    try:
        model = timm.create_model(cfg.name, pretrained=False, num_classes=found, **cfg.kwargs)
    except Exception as e:  # TypeError, ValueError, KeyError (act_layer: nosuch), AssertionError, ...
        raise UsageError(f"teacher.kwargs {cfg.kwargs} do not fit {cfg.name}: {type(e).__name__}: "
                         f"{str(e)[:200]}") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError:
        raise UsageError(f"teacher.weights={cfg.weights} do not fit {cfg.name}: {mismatch(model, state)}") from None
    return model


def read_weights(path: Path, classes: list[str] | None = None, key: str = "teacher.weights") -> dict[str, torch.Tensor]:
    """A state dict from .safetensors, or .pth/.pt loaded with weights_only (no code can run). Weights
    that carry their class list (a usi run's best.safetensors or last.pt, a usi export) must carry
    `classes`, in the same order: refused otherwise, in one line naming `key`."""
    tensors, stored = weights_and_classes(path)
    problem = class_difference(stored, classes) if stored is not None and classes is not None else None
    if problem:
        raise UsageError(f"{key}={path} {problem}: label i must mean the same class for the weights and the data")
    return tensors


def weights_and_classes(path: Path) -> tuple[dict[str, torch.Tensor], list[str] | None]:
    """The tensors of a weights file (checked: some, all finite) and the class list it carries, if any."""
    state = load_state_file(path)
    stored = stored_classes(path, state)
    for key in ("model", "state_dict", "student"):  # usi / common checkpoint layouts
        if key in state and isinstance(state[key], dict):
            state = state[key]
            break
    tensors = {k.removeprefix("module."): v for k, v in state.items()
               if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise UsageError(f"{path} holds no weights (no tensors under names)")
    broken = non_finite(tensors)
    if broken:
        raise UsageError(f"{path} holds non-finite (NaN or infinite) weights in {len(broken)} tensors, e.g. "
                         f"{broken[0]}: weights of a diverged run")
    return tensors, stored


def stored_classes(path: Path, state: dict) -> list[str] | None:
    """The class names, in label order, that weights carry: the metadata of a usi best.safetensors, the
    `classes` of a usi last.pt, the label_names of a usi export's config.json; None for other weights."""
    config = path.parent / "config.json"
    try:
        if (path.parent / "usi-export.json").is_file() and config.is_file() and config.stat().st_size < 1 << 24:
            found = json.loads(config.read_text()).get("label_names")
        elif file_kind(path) == "safetensors":
            found = json.loads(read_metadata(path).get("classes", "null"))
        else:
            found = state.get("classes")
    except (ValueError, AttributeError):  # not JSON, or JSON that is not a mapping: no list to compare
        return None
    return found if isinstance(found, list) and found and all(isinstance(c, str) for c in found) else None


def classifier_classes(name: str, state: dict) -> int | None:
    """The class count the weights were trained for, read off the classifier's weight."""
    with torch.device("meta"):  # no memory, no init: only the classifier's name is wanted
        classifier = timm.create_model(name, pretrained=False).pretrained_cfg.get("classifier")
    weight = state.get(f"{classifier}.weight") if isinstance(classifier, str) else None
    return int(weight.shape[0]) if weight is not None and weight.ndim >= 1 else None


# ---------------------------------------------------------------- BatchNorm folding


class _Tracer(torch.fx.Tracer):
    """Traces module calls only as far as conv and BN leaves; timm's no-trace modules stay whole."""

    def __init__(self):
        super().__init__(autowrap_functions=tuple(f for f in get_notrace_functions() if callable(f)))
        self.leaves = tuple(get_notrace_modules())

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (nn.Conv2d, nn.BatchNorm2d) + self.leaves) or super().is_leaf_module(m, qualname)


def fold_batchnorm(model: nn.Module, example: torch.Tensor, rtol: float = 1e-2) -> tuple[nn.Module, int]:
    """Fold each eval-mode BatchNorm2d whose only input is a Conv2d used nowhere else into that conv.

    Returns (model, number folded). The folding happens on a copy that stays an ordinary module
    (the trace is only read, never run) and is checked against the original on `example`; on a
    mismatch, an untraceable model or any failure while folding, the original comes back unchanged.
    """
    try:
        return fold_checked(model, example, rtol)
    except Exception as e:  # an unusual graph must never stop a run: the teacher just runs unfolded
        log.warning(f"teacher: BatchNorm folding failed ({type(e).__name__}: {str(e)[:100]}); running unfolded")
        return model, 0


def fold_checked(model: nn.Module, example: torch.Tensor, rtol: float) -> tuple[nn.Module, int]:
    pairs = conv_bn_pairs(model)
    if not pairs:
        return model, 0
    folded = copy.deepcopy(model)
    with torch.no_grad():
        for conv_name, bn_name in pairs:
            conv, bn = folded.get_submodule(conv_name), folded.get_submodule(bn_name)
            conv.weight, conv.bias = fuse_conv_bn_weights(
                conv_w=conv.weight, conv_b=conv.bias, bn_rm=bn.running_mean, bn_rv=bn.running_var, bn_eps=bn.eps,
                bn_w=bn.weight, bn_b=bn.bias)
            set_submodule(folded, bn_name, bn_replacement(bn))
        before, after = model(example).float(), folded(example).float()
        # A relative norm: elementwise tolerances fail on logits near zero after deep networks, and
        # fp32 rounding through 100+ folded layers reaches 1e-3 on extreme weights; a wrong fold is O(1).
        if not (after - before).norm() <= rtol * before.norm():
            log.warning("teacher: BatchNorm folding changed the outputs; keeping the model unfolded")
            return model, 0
    return folded, len(pairs)


def conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    try:
        graph = _Tracer().trace(model)
    except Exception as e:  # dynamic control flow: fine, the teacher just runs unfolded
        log.info(f"teacher: not traceable for BatchNorm folding ({type(e).__name__}); running unfolded")
        return []
    modules = dict(model.named_modules())
    calls = collections.Counter(n.target for n in graph.nodes if n.op == "call_module")
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or type(modules.get(node.target)) not in (nn.BatchNorm2d, BatchNormAct2d):
            continue
        bn = modules[node.target]
        src = node.args[0] if node.args else None
        # A conv or BN called more than once (shared weights) cannot be folded for one of its uses.
        if (isinstance(src, torch.fx.Node) and src.op == "call_module" and len(src.users) == 1
                and type(modules.get(src.target)) is nn.Conv2d and bn.track_running_stats
                and bn.running_mean is not None and calls[src.target] == 1 and calls[node.target] == 1):
            pairs.append((src.target, node.target))
    return pairs


class FoldedNormAct(nn.Module):
    """What is left of a BatchNormAct2d once its norm is folded: its drop and activation, under their own
    names (bn1.act stays bn1.act, so feature KD finds the module names timm documents)."""

    def __init__(self, drop: nn.Module, act: nn.Module):
        super().__init__()
        self.drop, self.act = drop, act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(x))


def bn_replacement(bn: nn.Module) -> nn.Module:
    if isinstance(bn, BatchNormAct2d):  # keeps its activation (and drop) after the folded norm
        return FoldedNormAct(bn.drop, bn.act)
    return nn.Identity()


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)

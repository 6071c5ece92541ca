"""Feature (internal-representation) distillation: a student module's output matched to a teacher module's.

FitNets (Romero et al. 2015) and Aguilar et al. 2019 match hidden representations through a learned
projection. Here a forward hook on each named module keeps its latest output; both are brought to a
common form, then a projection maps the student's into the teacher's space:

- feature maps [B, C, H, W] stay maps; tokens [B, N, D] (ViTs, MLP-Mixers) become maps [B, D, h, w] once
  the model's prefix (class, distillation) tokens are dropped, when h * w = N is a square grid;
- when either side is a vector [B, D] (pooled pre-logits), the other is average-pooled to one too;
- the projection is a 1x1 convolution (maps) or a linear layer (vectors), only where the widths differ;
  a student map of another resolution is resized to the teacher's (averaged down, bilinear up).

usi's inputs are square, so maps are square: [B, C, S, S] is read as channels-first, [B, S, S, C] as
channels-last (Swin's stages, a dynamic-size patch embedding); other 4-D outputs (attention internals,
[B, heads, N, d]) are refused at start, in one line.

torchdistill's FitNet and timm have no equivalent that works on any timm student and teacher by module
name, keeps the projection in the student's optimizer and checkpoint, and leaves it out of the export.
"""
from __future__ import annotations

import difflib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from usi.errors import UsageError, quote
from usi.runtime.files import mismatch


class Tap:
    """The latest output of one named submodule, kept by a forward hook."""

    def __init__(self, model: nn.Module, name: str, key: str):
        modules = dict(model.named_modules())
        if name not in modules or not name:
            close = difflib.get_close_matches(name, [n for n in modules if n], n=1, cutoff=0.5)
            top = ", ".join(n for n, _ in model.named_children())
            raise UsageError(f"{key}={quote(name)} is not a module of {type(model).__name__}"
                             + (f"; did you mean {close[0]!r}?" if close else f" (its top-level modules: {top})"))
        self.name, self.value = name, None
        self.handle = modules[name].register_forward_hook(self.hook)

    def hook(self, module, args, output):
        self.value = output[0] if isinstance(output, (tuple, list)) else output

    def clear(self) -> None:
        self.value = None

    def take(self) -> torch.Tensor:
        """The output recorded since the last clear(); never an earlier forward's (e.g. evaluation's)."""
        value, self.value = self.value, None
        if value is None:
            raise RuntimeError(f"feature KD: module {self.name} did not run in this forward pass")
        return value


def layout(shape: tuple, prefix_tokens: int) -> str | None:
    """How a module's output is read: "nchw", "nhwc", "tokens" (prefix tokens dropped), "grid" (all tokens a
    square grid), "row" (tokens, not a grid), "vector"; None if none fits. usi's inputs are square, so a
    map is square: [B, C, S, S] channels-first, [B, S, S, C] channels-last (Swin, a dynamic-size patch
    embedding); anything else 4-D (attention internals [B, heads, N, d]) is refused."""
    if len(shape) == 2:
        return "vector"
    if len(shape) == 3:
        n = shape[1]
        if prefix_tokens and n > prefix_tokens and math.isqrt(n - prefix_tokens) ** 2 == n - prefix_tokens:
            return "tokens"
        return "grid" if math.isqrt(n) ** 2 == n else "row"
    if len(shape) == 4:
        if shape[2] == shape[3]:
            return "nchw"
        if shape[1] == shape[2]:
            return "nhwc"
    return None


def common_form(x: torch.Tensor, prefix_tokens: int, pool: bool = False) -> torch.Tensor:
    """[B, C, H, W] or [B, D] (see the module docstring); `pool`: a map averaged to a vector (the other side
    is one)."""
    how = layout(tuple(x.shape), prefix_tokens)
    if how == "tokens":
        x = x[:, prefix_tokens:]
    if how in ("tokens", "grid"):
        side = math.isqrt(x.shape[1])
        x = x.transpose(1, 2).reshape(x.shape[0], x.shape[2], side, side)
    elif how == "row":  # not a square grid: the tokens as a 1-row map
        x = x.transpose(1, 2).unsqueeze(2)
    elif how == "nhwc":
        x = x.permute(0, 3, 1, 2)
    elif how is None:
        raise ValueError(f"a feature of shape {tuple(x.shape)}")
    if pool and x.ndim == 4:
        x = x.mean(dim=(2, 3))
    return x


class Projector(nn.Module):
    """Student features -> the teacher's: 1x1 convolution or linear where the widths differ, then resize."""

    def __init__(self, student_shape: tuple, teacher_shape: tuple):
        super().__init__()
        s_width, t_width = student_shape[1], teacher_shape[1]
        self.size = tuple(teacher_shape[2:]) if len(teacher_shape) == 4 else None
        self.resizes = self.size is not None and tuple(student_shape[2:]) != self.size
        # down: the mean of each cell; up: bilinear
        self.shrinks = self.resizes and all(s >= t for s, t in zip(student_shape[2:], self.size))
        if s_width == t_width:
            self.proj = nn.Identity()
        elif len(teacher_shape) == 4:
            self.proj = nn.Conv2d(s_width, t_width, kernel_size=1)
        else:
            self.proj = nn.Linear(s_width, t_width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)
        if not self.resizes:
            return x
        if self.shrinks:
            return F.adaptive_avg_pool2d(x, self.size)
        return F.interpolate(x, size=self.size, mode="bilinear", align_corners=False)


def feature_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str) -> torch.Tensor:
    """MSE, or 1 - cosine similarity along the channels at each position; in fp32."""
    s, t = student.float(), teacher.float()
    if kind == "cosine":
        return (1.0 - F.cosine_similarity(s, t, dim=1)).mean()
    return F.mse_loss(s, t)


class StudentWithProjector(nn.Module):
    """What DDP wraps under feature KD: the student and its projection, so both are all-reduced.
    Returns (logits, projected student features)."""

    def __init__(self, student: nn.Module, projector: Projector, *, tap: Tap, prefix: int, pool: bool):
        super().__init__()
        self.student, self.projector = student, projector
        self.tap, self.prefix, self.pool = tap, prefix, pool

    def forward(self, x: torch.Tensor):
        self.tap.clear()
        logits = self.student(x)
        return logits, self.projector(common_form(self.tap.take(), self.prefix, self.pool))


class FeatureKD:
    """The teacher side of feature KD and its loss: the teacher's tapped output in common form. Also holds
    the student's projection, which saves and restores its own state (timm tasks' get_task_state /
    load_task_state): it is trained and checkpointed, but never exported."""

    def __init__(self, tap: Tap, projector: Projector, *, prefix: int, pool: bool, weight: float, kind: str):
        self.tap, self.prefix, self.pool = tap, prefix, pool
        self.weight, self.kind, self.projector = weight, kind, projector

    def loss(self, projected: torch.Tensor) -> torch.Tensor:
        target = common_form(self.tap.take(), self.prefix, self.pool)
        return self.weight * feature_loss(projected, target.detach(), self.kind)

    def get_task_state(self) -> dict:
        """Beside the student's weights in a checkpoint: the projection's, under "projector"."""
        return {STATE_KEY: self.projector.state_dict()}

    def load_task_state(self, saved: dict, where: str) -> None:
        """From a checkpoint's entries (`where` names it in errors)."""
        if not self.projector.state_dict():  # an identity projection holds nothing
            return
        if not saved.get(STATE_KEY):
            raise UsageError(f"{where} was trained without feature KD (features.student); it cannot resume a run "
                             f"with it")
        try:
            self.projector.load_state_dict(saved[STATE_KEY])
        except RuntimeError:
            raise UsageError(f"{where} does not fit this recipe's model ({STATE_KEY}): "
                             f"{mismatch(self.projector, saved[STATE_KEY])}") from None


STATE_KEY = "projector"  # the checkpoint entry (last.pt files of earlier versions use it too)


def refuse_task_state(saved: dict, where: str) -> None:
    """A run without feature KD cannot resume a checkpoint trained with it."""
    if saved.get(STATE_KEY):
        raise UsageError(f"{where} was trained with feature KD (features.student); resume it with the same "
                         f"features settings")


def prefix_tokens(model: nn.Module) -> int:
    return int(getattr(model, "num_prefix_tokens", 0) or 0)


def build(cfg, student: nn.Module, teacher_model: nn.Module, size: int, teacher_size: int | None,
          device: torch.device) -> tuple[StudentWithProjector, FeatureKD]:
    """Taps both modules, reads their shapes from one forward of one image each, sizes the projection.

    cfg: the recipe's features section. Call after the EMA copy of the student is made (a deepcopy
    would copy the student's hook too).
    """
    s_tap = Tap(student, cfg.student, "features.student")
    t_tap = Tap(teacher_model, cfg.teacher, "features.teacher")
    s_prefix, t_prefix = prefix_tokens(student), prefix_tokens(teacher_model)
    was_training = student.training
    with torch.no_grad():
        student.eval()
        student(torch.zeros(1, 3, size, size, device=device))
        teacher_model(torch.zeros(1, 3, teacher_size or size, teacher_size or size, device=device))
    student.train(was_training)
    for key, name, tap, prefix in (("student", cfg.student, s_tap, s_prefix),
                                   ("teacher", cfg.teacher, t_tap, t_prefix)):
        value = tap.value
        if value is None:
            raise UsageError(f"features.{key}={quote(name)} does not run in the model's forward pass; choose a module "
                             f"that does")
        if not isinstance(value, torch.Tensor) or layout(tuple(value.shape), prefix) is None:
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise UsageError(f"features.{key}={quote(name)} gives {got}; feature KD matches square maps [B, C, S, S] "
                             f"(or [B, S, S, C]), tokens [B, N, D] or vectors [B, D]")
    s_raw, t_raw = s_tap.take(), t_tap.take()
    pool = s_raw.ndim == 2 or t_raw.ndim == 2  # one side is a vector: both are
    s_form, t_form = common_form(s_raw, s_prefix, pool), common_form(t_raw, t_prefix, pool)
    projector = Projector(tuple(s_form.shape), tuple(t_form.shape)).to(device)
    return (StudentWithProjector(student, projector, tap=s_tap, prefix=s_prefix, pool=pool),
            FeatureKD(t_tap, projector, prefix=t_prefix, pool=pool, weight=cfg.weight, kind=cfg.loss))


def describe(wrapper: StudentWithProjector, cfg) -> str:
    p = wrapper.projector
    what = "none (same width)" if isinstance(p.proj, nn.Identity) else type(p.proj).__name__
    params = sum(q.numel() for q in p.parameters())
    return (f"feature KD: student {cfg.student} -> teacher {cfg.teacher}, {cfg.loss} x {cfg.weight:g}, "
            f"{'pooled vectors' if wrapper.pool else 'maps'}, projection {what} ({params} params)"
            + (f", resized to {p.size[0]}x{p.size[1]}" if p.resizes else ""))

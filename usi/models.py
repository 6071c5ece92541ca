"""The networks a recipe names, as torch modules: the student (timm), its input, the precision and memory
layout they run in (Compute), and the frozen teacher. Shared by training, evaluation and export; nothing
here touches the run directory or the data.
"""
from __future__ import annotations

import contextlib
import logging
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from timm.data import resolve_model_data_config

from usi.data import InputSpec
from usi.distill.teacher import Ensemble, Teacher, build_teachers, weights_and_classes
from usi.errors import UsageError
from usi.recipe import Recipe
from usi.runtime import files
from usi.runtime.files import class_difference

log = logging.getLogger("usi")


@dataclass(frozen=True)
class Compute:
    """How tensors are computed: the device, the autocast dtype (None: fp32) and the memory format."""
    device: torch.device
    amp_dtype: torch.dtype | None = None
    channels_last: bool = False

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def layout(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


def timm_model(name: str, **kwargs) -> torch.nn.Module:
    """timm.create_model, where kwargs may also replace an argument that the model's own entrypoint fixes.
    timm's MLP entrypoints pass e.g. patch_size=16 themselves (`dict(patch_size=16, **kwargs)`), so
    create_model refuses patch_size=4, and a Mixer or ResMLP could not take 32-64 px inputs with enough
    tokens. The clashing arguments are handed to the entrypoint's builder (build_model_with_cfg), where
    they replace the entrypoint's own value; every other argument goes the usual way."""
    replace = {}
    while True:
        try:
            if not replace:
                return timm.create_model(name, **kwargs)
            with replaced_arguments(name, replace):
                return timm.create_model(name, **kwargs)
        except TypeError as e:
            clash = re.search(r"multiple values for (?:keyword )?argument '(\w+)'", str(e))
            if not clash or clash.group(1) not in kwargs:
                raise
            replace[clash.group(1)] = kwargs.pop(clash.group(1))


@contextlib.contextmanager
def replaced_arguments(name: str, replace: dict):
    module = sys.modules[timm.models.model_entrypoint(name).__module__]
    original = getattr(module, "build_model_with_cfg", None)
    if original is None:  # an entrypoint that builds otherwise: the TypeError stands
        raise TypeError(f"{name} fixes {', '.join(replace)} itself")
    module.build_model_with_cfg = lambda *args, **kw: original(*args, **{**kw, **replace})
    try:
        yield
    finally:
        module.build_model_with_cfg = original


def create_student(model_cfg, num_classes: int, input_size: int | None, starting_weights: bool = False,
                   classes: list[str] | None = None) -> torch.nn.Module:
    """The student, built for `input_size` when its constructor takes img_size (ViTs, MLP-Mixers); from
    model.pretrained or model.weights when `starting_weights` (training, on `classes`; evaluation loads its own)."""
    pretrained = starting_weights and model_cfg.pretrained
    kwargs = dict(model_cfg.kwargs)
    if model_cfg.drop_path_rate is not None:
        kwargs["drop_path_rate"] = model_cfg.drop_path_rate
    try:
        model = None
        if input_size and "img_size" not in kwargs:
            try:
                model = timm_model(model_cfg.name, pretrained=pretrained, num_classes=num_classes,
                                   img_size=input_size, **kwargs)
            except TypeError:
                pass  # a CNN: any input size works without telling it
        # timm re-initializes a pretrained classifier for another class count
        model = model or timm_model(model_cfg.name, pretrained=pretrained, num_classes=num_classes, **kwargs)
    except Exception as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        if pretrained and not isinstance(e, TypeError):  # no hub access, no weights for this name, ...
            raise UsageError(f"could not get pretrained weights for {model_cfg.name} from timm ({first}); "
                             f"set model.weights to a local .safetensors or .pth file instead") from None
        # e.g. a dropout rate of 2 (ValueError), act_layer: nosuch (KeyError), an unknown argument (TypeError)
        raise UsageError(f"model.kwargs {kwargs} do not fit {model_cfg.name}: {type(e).__name__}: {first}") from None
    if starting_weights and model_cfg.weights:
        log.info(load_starting_weights(model, Path(model_cfg.weights), classes))
    return model


def load_starting_weights(model: torch.nn.Module, path: Path, classes: list[str] | None = None) -> str:
    """Weights from a local file (checked, weights_only); a classifier of another shape, or one trained
    on other classes (weights that carry their class list), is left freshly initialized, as timm does for
    pretrained weights; one trained on the same classes in another order is refused. Returns a line
    saying what was loaded."""
    state, stored = weights_and_classes(path)
    other = bool(stored) and classes is not None and len(stored) == len(classes) and stored != classes
    if other and sorted(stored) == sorted(classes):
        raise UsageError(f"model.weights={path} {class_difference(stored, classes)}: its classifier would "
                         f"predict the wrong labels")
    own = model.state_dict()
    classifier = model.pretrained_cfg.get("classifier")
    heads = [classifier] if isinstance(classifier, str) else list(classifier or [])
    dropped = [k for k in list(state) if any(k.startswith(h + ".") for h in heads)
               and k in own and (other or state[k].shape != own[k].shape)]
    for key in dropped:
        del state[key]
    try:  # strict=False still raises on a shape mismatch (another architecture's file)
        result = model.load_state_dict(state, strict=False)
    except RuntimeError:
        result = None
    if result is None or result.unexpected_keys or set(result.missing_keys) - set(dropped):
        raise UsageError(f"model.weights={path} do not fit {type(model).__name__}: "
                         f"{files.mismatch(model, state)}")
    why = "trained on other classes" if other else "of another class count"
    reinit = f"; classifier re-initialized ({len(dropped)} tensors {why})" if dropped else ""
    return f"student weights from {path}{reinit}"


def student_with_weights(model_cfg, classes: list[str], input_size: int | None, *, state: dict, path: Path
                         ) -> torch.nn.Module:
    """The student of a checkpoint, with its weights: every shape is compared on the meta device first, so
    weights (or a class list) of another size are refused before a model of their size is allocated."""
    with torch.device("meta"):
        probe = create_student(model_cfg, len(classes), input_size)
    problem = files.mismatch(probe, state) if not fits(probe, state) else None
    if problem:
        raise UsageError(f"{path} does not fit {model_cfg.name}: {problem}")
    model = create_student(model_cfg, len(classes), input_size)
    model.load_state_dict(state)
    return model


def fits(model: torch.nn.Module, state: dict) -> bool:
    own = model.state_dict()
    return own.keys() == state.keys() and all(tuple(own[k].shape) == tuple(state[k].shape) for k in own)


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


def forward_macs(model: torch.nn.Module, input_size: int) -> float:
    """Multiply-accumulates of one image's forward pass at input_size, in eval mode (torch's own counter);
    the model's mode is left as it was."""
    from torch.utils.flop_counter import FlopCounterMode

    training = model.training
    x = torch.zeros(1, 3, input_size, input_size, device=next(model.parameters()).device)
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model.eval()(x)
    finally:
        model.train(training)
    return counter.get_total_flops() / 2


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


def teacher_for(recipe: Recipe, classes: list[str], spec: InputSpec, compute: Compute) -> Teacher | Ensemble | None:
    """The frozen teacher, or the ensemble of teacher and teacher.extra, for data labelled by `classes`;
    None without distillation."""
    if not recipe.kd:
        return None
    return build_teachers(recipe.teachers(), recipe.teacher.combine, classes,
                          temperature=recipe.loss.temperature, student_mean=spec.mean,
                          student_std=spec.std, student_size=spec.size, device=compute.device,
                          channels_last=compute.channels_last)


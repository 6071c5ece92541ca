"""`usi export CHECKPOINT OUT`: the distilled student, as timm itself loads it, and as ONNX.

OUT becomes a timm "local-dir" model folder, written by timm's own save_for_hf: model.safetensors
and config.json (architecture, model arguments, class names, and the evaluation preprocessing: input
size, crop_pct, interpolation, mean, std). Without usi:

    model = timm.create_model("local-dir:OUT", pretrained=True)

With --onnx, OUT/model.onnx too (dynamic batch), through torch's exporter. Each export is loaded back
and run on a random batch; the largest difference from the student's own logits is reported.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import timm
import torch

from usi import models
from usi import recipe as recipe_mod
from usi.errors import UsageError
from usi.evaluation.report import read_checkpoint
from usi.runtime import files


def export(path: Path, out: Path, weights: str | None = None, onnx: bool = False) -> dict:
    """Returns what was written and how closely each export reproduces the student's logits."""
    if out.is_symlink() or (out.exists() and (not out.is_dir() or any(out.iterdir()))):
        raise UsageError(f"{out} exists (or is a link) and is not an empty folder; choose another --out")
    saved = read_checkpoint(path)
    name = weights or ("ema" if "ema" in saved.variants else next(iter(saved.variants)))
    if name not in saved.variants:
        raise UsageError(f"{path} holds {', '.join(saved.variants)} weights, not {name!r}")
    recipe = recipe_mod.from_dict(recipe_mod.parse_yaml(saved.recipe_yaml, f"{path}'s stored recipe"))
    state = saved.variants[name]
    broken = files.non_finite(state)
    if broken:
        raise UsageError(f"{path}: the {name} weights hold NaN or infinite values ({len(broken)} tensors, e.g. "
                         f"{broken[0]}): a diverged run; nothing worth exporting")
    model = models.student_with_weights(recipe.model, saved.classes, recipe.data.input_size, state=state,
                                        path=path).eval()
    spec = models.input_spec(model, recipe.data.input_size)
    x = torch.randn(2, 3, spec.size, spec.size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(x)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))  # renamed into place when complete
    except OSError as e:
        raise UsageError(f"the export folder {out} cannot be created ({e.strerror})") from None
    try:
        data_config = {"input_size": (3, spec.size, spec.size), "crop_pct": recipe.aug.eval_crop_pct,
                       "interpolation": recipe.aug.eval_interpolation, "mean": spec.mean, "std": spec.std}
        timm.models.save_for_hf(model, str(tmp), model_config={"label_names": list(saved.classes)},
                                safe_serialization=True, data_config=data_config)
        report = {"checkpoint": str(path), "weights": name, "model": recipe.model.name, "out": str(out),
                  "timm_max_abs_diff": timm_difference(tmp, x, expected)}
        if onnx:
            report["onnx_max_abs_diff"] = onnx_difference(model, tmp / "model.onnx", x, expected)
        (tmp / "usi-export.json").write_text(json.dumps(report, indent=1))
        readable_by_others(tmp, files.current_umask())
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return report


def readable_by_others(folder: Path, umask: int) -> None:
    """mkdtemp makes a private folder (0700) and safetensors private files (0600): give them the
    permissions of anything else this user writes, so colleagues can load the export."""
    folder.chmod(0o777 & ~umask)
    for path in folder.iterdir():
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def timm_difference(folder: Path, x: torch.Tensor, expected: torch.Tensor) -> float:
    """timm alone (its local-dir loader) rebuilds the model from the folder: how far its logits are."""
    reloaded = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    with torch.no_grad():
        return float((reloaded(x) - expected).abs().max())


def onnx_difference(model: torch.nn.Module, path: Path, x: torch.Tensor, expected: torch.Tensor) -> float:
    try:
        import onnxruntime
    except ImportError:
        raise UsageError("--onnx needs onnx, onnxscript and onnxruntime: pip install 'usi[onnx]'") from None
    batch = torch.export.Dim("batch", min=1)
    torch.onnx.export(model, (x,), str(path), input_names=["image"], output_names=["logits"], dynamo=True,
                      dynamic_shapes=({0: batch},), verbose=False)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    return float((torch.from_numpy(got) - expected).abs().max())

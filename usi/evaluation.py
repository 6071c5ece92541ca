"""`usi eval CHECKPOINT [overrides]`: accuracy, calibration and fidelity to the teacher of saved weights.

The checkpoint carries its recipe and class list, so the val folder alone is needed. Overrides
change evaluation only: data.root, data.input_size (test-time resolution), aug.eval_crop_pct,
teacher.*, run.device. Runs under torchrun too; the metrics are exact either way.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from usi import build as make
from usi import checkpoint, data, distributed
from usi import recipe as recipe_mod
from usi.engine import evaluate
from usi.errors import UsageError
from usi.logit_cache import teacher_val_logits
from usi.metrics import METRICS


@dataclass
class Saved:
    """What a checkpoint holds for evaluation: {variant: state_dict}, its recipe and its classes."""
    path: Path
    variants: dict[str, dict]
    recipe_yaml: str
    classes: list[str]


def read_checkpoint(path: Path) -> Saved:
    """The weights (raw, and EMA from a full last.pt), recipe and classes of best.safetensors or last.pt."""
    if path.suffix == ".safetensors":
        meta = checkpoint.read_metadata(path) if path.is_file() else {}
        state = checkpoint.load_state_file(path)
        if "recipe" not in meta or "classes" not in meta:
            raise UsageError(f"{path} has no usi metadata (recipe, classes); evaluate a usi run's best.safetensors")
        return Saved(path, {meta.get("weights", "raw"): state}, meta["recipe"], json.loads(meta["classes"]))
    state = checkpoint.load(path)
    variants = {"raw": state["student"]} | ({"ema": state["ema"]} if state.get("ema") else {})
    return Saved(path, variants, state["recipe"], state["classes"])


def evaluate_checkpoint(path: Path, overrides: list[str]) -> dict | None:
    saved = read_checkpoint(path)
    stored = yaml.safe_load(saved.recipe_yaml)
    trained_size = recipe_mod.from_dict(stored).data.input_size
    recipe = recipe_mod.from_tree(stored, [*overrides, "run.resume=never"])
    dist = distributed.setup(recipe.run.device)
    try:
        return run_eval(recipe, saved, trained_size, dist)
    finally:
        distributed.cleanup()


def load_students(recipe, saved: Saved, trained_size: int | None, dist) -> dict:
    """{variant: student with its weights, at recipe.data.input_size}."""
    models = {}
    for name, state in saved.variants.items():
        model = make.create_student(recipe.model, len(saved.classes), trained_size)
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise UsageError(f"{saved.path} does not fit {recipe.model.name}: "
                             f"{str(e).splitlines()[0][:200]}") from None
        size = recipe.data.input_size
        if size and size != trained_size and hasattr(model, "set_input_size"):
            model.set_input_size(img_size=size)  # ViTs: resample position embeddings
        models[name] = model.to(dist.device).eval()
    return models


def run_eval(recipe, saved: Saved, trained_size: int | None, dist) -> dict | None:
    classes, path = saved.classes, saved.path
    models = load_students(recipe, saved, trained_size, dist)
    spec = make.input_spec(next(iter(models.values())), recipe.data.input_size)
    compute = make.compute_for(recipe, dist.device)
    val = data.open_val_split(recipe.data, classes)
    loader = data.val_loader(val, recipe.data, recipe.aug, spec, dist=dist)
    report = {"checkpoint": str(path), "model": recipe.model.name, "input_size": spec.size,
              "crop_pct": recipe.aug.eval_crop_pct, "images": len(val)}
    logits = None
    teacher = make.teacher_for(recipe, len(classes), spec, compute)
    if teacher is not None:
        t0 = time.time()
        report["teacher"], logits, hit = teacher_val_logits(teacher, recipe.teacher, val, loader, compute=compute,
                                                            n_bins=recipe.run.ece_bins, dist=dist)
        report["teacher"]["name"] = recipe.teacher.name
        report["teacher_time_s"], report["teacher_cached"] = time.time() - t0, hit
    t0 = time.time()
    results, _ = evaluate(models, loader, compute, n_bins=recipe.run.ece_bins, teacher_logits=logits)
    report["eval_time_s"] = time.time() - t0
    report["students"] = results
    return report if dist.main else None


COLUMNS = {"top1": ("top-1", "7.2f"), "top5": ("top-5", "7.2f"), "nll": ("NLL", "7.4f"), "ece": ("ECE", "6.2f"),
           "agreement": ("agree", "7.2f"), "kl": ("KL(t||s)", "9.4f")}
assert COLUMNS.keys() == METRICS.keys()  # one column per metric


def format_report(report: dict, as_json: bool = False) -> str:
    if as_json:
        return json.dumps(report, indent=2)
    lines = [f"{report['model']} from {report['checkpoint']}",
             f"{report['images']} val images at {report['input_size']} px, crop_pct {report['crop_pct']}"]
    widths = {key: int(fmt.split(".")[0]) for key, (_, fmt) in COLUMNS.items()}
    header = f"{'weights':10s} " + " ".join(f"{title:>{widths[key]}s}" for key, (title, _) in COLUMNS.items())
    lines += ["", header, "-" * len(header)]
    rows = dict(report["students"])
    if "teacher" in report:
        rows["teacher"] = report["teacher"]
    for name, m in rows.items():
        cells = [format(m[key], fmt) if key in m else f"{'-':>{widths[key]}s}" for key, (_, fmt) in COLUMNS.items()]
        lines.append(f"{name:10s} " + " ".join(cells))
    if "teacher" in report:
        lines += ["", f"teacher {report['teacher']['name']}: logits "
                      f"{'from cache' if report['teacher_cached'] else 'computed and cached'} "
                      f"in {report['teacher_time_s']:.1f} s; students evaluated in {report['eval_time_s']:.1f} s"]
    return "\n".join(lines)

"""`usi eval CHECKPOINT [overrides]`: accuracy, calibration and fidelity to the teacher of saved weights.

The checkpoint carries its recipe and class list, so the val folder alone is needed. Overrides
change evaluation only: data.root, data.input_size (test-time resolution), aug.eval_crop_pct,
teacher.*, run.device. Runs under torchrun too; the metrics are exact either way.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import yaml
from timm.data import resolve_model_data_config

from usi import checkpoint, distributed
from usi import recipe as recipe_mod
from usi.data import ImageFolder, eval_transform
from usi.engine import Parts, evaluate
from usi.errors import UsageError
from usi.logit_cache import teacher_val_logits
from usi.teacher import build_teacher
from usi.data.shards import ShardSplit, read_index
from usi.train import amp_dtype, create_student, make_val_loader


def read_checkpoint(path: Path) -> tuple[dict[str, dict], str, list[str]]:
    """({variant: state_dict}, recipe YAML, classes) from best.safetensors or a full last.pt."""
    if path.suffix == ".safetensors":
        meta = checkpoint.read_metadata(path) if path.is_file() else {}
        state = checkpoint.load_state_file(path)
        if "recipe" not in meta or "classes" not in meta:
            raise UsageError(f"{path} has no usi metadata (recipe, classes); evaluate a usi run's best.safetensors")
        return {meta.get("weights", "raw"): state}, meta["recipe"], json.loads(meta["classes"])
    state = checkpoint.load(path)
    variants = {"raw": state["student"]} | ({"ema": state["ema"]} if state.get("ema") else {})
    return variants, state["recipe"], state["classes"]


def evaluate_checkpoint(path: Path, overrides: list[str]) -> dict | None:
    variants, recipe_yaml, classes = read_checkpoint(path)
    stored = yaml.safe_load(recipe_yaml)
    trained_size = recipe_mod.from_dict(stored).data.input_size
    recipe = recipe_mod.from_raw(stored, [*overrides, "run.resume=never"])
    dist = distributed.setup(recipe.run.device)
    try:
        return run_eval(recipe, variants, classes, trained_size, dist, path)
    finally:
        distributed.cleanup()


def run_eval(recipe, variants, classes, trained_size, dist, path) -> dict | None:
    models = {}
    for name, state in variants.items():
        model = create_student(recipe.model, len(classes), trained_size)
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise UsageError(f"{path} does not fit {recipe.model.name}: {str(e).splitlines()[0][:200]}") from None
        size = recipe.data.input_size
        if size and size != trained_size and hasattr(model, "set_input_size"):
            model.set_input_size(img_size=size)  # ViTs: resample position embeddings
        models[name] = model.to(dist.device).eval()
    first = next(iter(models.values()))
    data_cfg = resolve_model_data_config(first)
    size = recipe.data.input_size or data_cfg["input_size"][-1]
    mean, std = data_cfg["mean"], data_cfg["std"]
    split_dir = Path(recipe.data.root) / recipe.data.val_split
    if recipe.data.format == "shards":
        val = ShardSplit(*read_index(split_dir, recipe.data.val_shards))
        if val.classes != classes:
            raise UsageError(f"the val shards' classes differ from the {len(classes)} classes {path} was trained on")
    else:
        val = ImageFolder(split_dir, classes=classes)
    loader = make_val_loader(recipe.data, val, eval_transform(recipe.aug, size, mean, std), dist, mean, std)
    parts = Parts(student=first, raw=first, teacher=None, ema=None, optimizer=None, scheduler=None, scaler=None,
                  mixup=None, num_classes=len(classes), device=dist.device,
                  amp_dtype=amp_dtype(recipe.run.amp, dist.device))
    report = {"checkpoint": str(path), "model": recipe.model.name, "input_size": size,
              "crop_pct": recipe.aug.eval_crop_pct, "images": len(val)}
    logits = None
    if recipe.kd:
        teacher = build_teacher(recipe.teacher, len(classes), mean, std, dist.device)
        t0 = time.time()
        report["teacher"], logits, hit = teacher_val_logits(teacher, recipe.teacher, val, loader, parts,
                                                            recipe.run.ece_bins, dist)
        report["teacher"]["name"] = recipe.teacher.name
        report["teacher_time_s"], report["teacher_cached"] = time.time() - t0, hit
    t0 = time.time()
    results, _ = evaluate(models, loader, parts, recipe.run.ece_bins, teacher_logits=logits)
    report["eval_time_s"] = time.time() - t0
    report["students"] = results
    return report if dist.main else None


def format_report(report: dict, as_json: bool = False) -> str:
    if as_json:
        return json.dumps(report, indent=2)
    lines = [f"{report['model']} from {report['checkpoint']}",
             f"{report['images']} val images at {report['input_size']} px, crop_pct {report['crop_pct']}"]
    header = f"{'weights':10s} {'top-1':>7s} {'top-5':>7s} {'NLL':>7s} {'ECE':>6s} {'agree':>7s} {'KL(t||s)':>9s}"
    lines += ["", header, "-" * len(header)]
    rows = dict(report["students"])
    if "teacher" in report:
        rows["teacher"] = report["teacher"]
    for name, m in rows.items():
        agree = f"{m['agreement']:7.2f}" if "agreement" in m else f"{'-':>7s}"
        kl = f"{m['kl']:9.4f}" if "kl" in m else f"{'-':>9s}"
        lines.append(f"{name:10s} {m['top1']:7.2f} {m['top5']:7.2f} {m['nll']:7.4f} {m['ece']:6.2f} {agree} {kl}")
    if "teacher" in report:
        lines += ["", f"teacher {report['teacher']['name']}: logits "
                      f"{'from cache' if report['teacher_cached'] else 'computed and cached'} "
                      f"in {report['teacher_time_s']:.1f} s; students evaluated in {report['eval_time_s']:.1f} s"]
    return "\n".join(lines)

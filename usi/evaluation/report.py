"""`usi eval CHECKPOINT [overrides]`: accuracy, calibration and fidelity to the teacher of saved weights.

The checkpoint carries its recipe and class list, so the val folder alone is needed. Overrides
change evaluation only: data.root, data.input_size (test-time resolution), aug.eval_crop_pct,
teacher.*, run.device. Paths and commands (data.root, shard URLs, teacher.weights) come from the
command line only, never from the checkpoint. Runs under torchrun too; the metrics are exact.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from usi import data, models
from usi import recipe as recipe_mod
from usi.errors import UsageError, printable
from usi.evaluation.evaluate import evaluate
from usi.evaluation.metrics import METRICS
from usi.evaluation.teacher_logits import teacher_val_logits
from usi.runtime import distributed, files
from usi.runtime.progress import setup_logging
from usi.training import checkpoint

log = logging.getLogger("usi")


@dataclass
class Saved:
    """What a checkpoint holds for evaluation: {variant: state_dict}, its recipe and its classes."""
    path: Path
    variants: dict[str, dict]
    recipe_yaml: str
    classes: list[str]


def read_checkpoint(path: Path) -> Saved:
    """The weights (raw, and EMA from a full last.pt), recipe and classes of best.safetensors or last.pt."""
    if path.is_file() and files.file_kind(path) == "safetensors":
        state = files.load_state_file(path)  # checks the file before its metadata is read
        meta = files.read_metadata(path)
        if "recipe" not in meta or "classes" not in meta:
            raise UsageError(f"{path} has no usi metadata (recipe, classes); evaluate a usi run's best.safetensors")
        try:
            classes = json.loads(meta["classes"])
        except ValueError:
            classes = None
        return checked(Saved(path, {meta.get("weights", "raw"): state}, meta["recipe"], classes))
    state = checkpoint.load(path)
    variants = {"raw": state["student"]} | ({"ema": state["ema"]} if state.get("ema") else {})
    return checked(Saved(path, variants, state.get("recipe"), state.get("classes")))


def checked(saved: Saved) -> Saved:
    """The metadata must be what usi writes: a recipe (a YAML mapping) and a list of class names; the
    weights, mappings of names to tensors."""
    for name, state in saved.variants.items():
        if not (isinstance(state, dict) and state and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                           for k, v in state.items())):
            raise UsageError(f"{saved.path}: its {name} weights are not a mapping of names to tensors (a damaged "
                             f"checkpoint)")
    problem = files.metadata_problem(saved.recipe_yaml, saved.classes)
    if problem:
        raise UsageError(f"{saved.path}: {problem} (damaged or edited metadata)")
    return saved


# Recipe fields that name files or run commands (a pipe: URL): a checkpoint may come from anyone, so
# these come from the user's command line only, never from the recipe stored in the checkpoint.
LOCATIONS = {"data": ("root", "train_shards", "val_shards", "train_split", "val_split"), "teacher": ("weights",),
             "model": ("weights",), "run": ("dir", "resume")}


def eval_recipe(stored: dict, overrides: list[str]):
    """The checkpoint's recipe without its locations, plus the user's overrides."""
    given = dict(recipe_mod.parse_override(item) for item in overrides)
    if "data.root" not in given:
        raise UsageError("usi eval needs data.root=<folder with the val split> on the command line: paths and "
                         "commands stored in a checkpoint are never used")
    tree = {section: dict(values or {}) for section, values in stored.items()}
    tree.pop("features", None)  # feature KD shapes training only; evaluation compares logits
    overrides = [item for item in overrides if not item.startswith("features.")]
    tree["teacher"] = eval_teacher(tree.get("teacher") or {}, given)
    for section, keys in LOCATIONS.items():
        for key in keys:
            (tree.get(section) or {}).pop(key, None)
    return recipe_mod.from_tree(tree, [*overrides, "run.resume=never"])


def eval_teacher(stored: dict, given: dict) -> dict:
    """The stored teacher section as evaluation uses it. Files it names are never opened: a teacher (or
    ensemble) named by a file is measured only when the command line names its files again."""
    teacher = dict(stored)
    members = teacher.get("extra") if isinstance(teacher.get("extra"), list) else []
    member_files = any(isinstance(m, dict) and m.get("weights") for m in members)
    if member_files:
        teacher.pop("extra")  # the command line names the ensemble again
    named = given.keys() & {"teacher.weights", "teacher.name", "teacher.extra"}
    if teacher.get("weights") and "teacher.extra" in named and not named - {"teacher.extra"}:
        raise UsageError("teacher.extra names the other members only: pass teacher.weights=... for the first "
                         "teacher too (files named in a checkpoint are never opened)")
    if (teacher.get("weights") or member_files) and not named:
        log.warning("teacher not evaluated: the checkpoint names a teacher file, and files named in a checkpoint "
                    "are never opened; pass teacher.weights=... (and teacher.extra=[...] for an ensemble) to "
                    "measure agreement")
        teacher["name"] = None
    if teacher.get("name", "") is None or given.get("teacher.name", "") is None:
        teacher.pop("extra", None)  # no teacher: no ensemble members either
    return teacher


def evaluate_checkpoint(path: Path, overrides: list[str], verbose: bool = True) -> dict | None:
    setup_logging(None, distributed.env_rank() == 0 and verbose)  # not verbose: warnings only
    saved = read_checkpoint(path)
    stored = recipe_mod.parse_yaml(saved.recipe_yaml, f"{path}'s stored recipe")
    trained_size = recipe_mod.from_dict(stored).data.input_size
    recipe = eval_recipe(stored, overrides)
    dist = distributed.setup(recipe.run.device)
    try:
        return run_eval(recipe, saved, trained_size, dist)
    finally:
        distributed.cleanup()


def load_students(recipe, saved: Saved, trained_size: int | None, dist) -> dict:
    """{variant: student with its weights, at recipe.data.input_size}."""
    students = {}
    for name, state in saved.variants.items():
        model = models.student_with_weights(recipe.model, saved.classes, trained_size, state=state, path=saved.path)
        size = recipe.data.input_size
        if size and size != trained_size and hasattr(model, "set_input_size"):
            model.set_input_size(img_size=size)  # ViTs: resample position embeddings
        students[name] = model.to(dist.device).eval()
    return students


def run_eval(recipe, saved: Saved, trained_size: int | None, dist) -> dict | None:
    classes, path = saved.classes, saved.path
    students = load_students(recipe, saved, trained_size, dist)
    spec = models.input_spec(next(iter(students.values())), recipe.data.input_size)
    models.check_input_size(recipe.model, len(classes), spec.size)
    compute = models.compute_for(recipe, dist.device)
    val = data.open_val_split(recipe.data, classes)
    loader = data.val_loader(val, recipe.data, recipe.aug, spec, dist=dist)
    report = {"checkpoint": str(path), "model": recipe.model.name, "input_size": spec.size,
              "crop_pct": recipe.aug.eval_crop_pct}
    logits = None
    teacher = models.teacher_for(recipe, classes, spec, compute)  # trained on these classes, in this order
    if teacher is not None:
        t0 = time.time()
        report["teacher"], logits, cached = teacher_val_logits(teacher, recipe, val, loader, compute=compute,
                                                               n_bins=recipe.run.ece_bins, dist=dist)
        report["teacher_time_s"], report["teacher_cached"] = time.time() - t0, cached.hit
        report["teacher_cacheable"] = val.cache_identity() is not None
        report["teacher_cache"] = cached.note  # what the cache did: hit, stored, or not stored and why
    t0 = time.time()
    results, _ = evaluate(students, loader, compute, n_bins=recipe.run.ece_bins, teacher_logits=logits)
    report["eval_time_s"] = time.time() - t0
    report["students"] = results
    # every val image counted once: evaluated, or reported unreadable (and left out)
    report["unreadable"] = val.bad_count(dist.device)
    report["images"] = next(iter(results.values()))["count"]
    if report["images"] == 0:
        raise UsageError(f"no val image could be read ({report['unreadable']} unreadable; see the warnings above)")
    nonfinite = max(m.get("nonfinite", 0) for m in results.values())
    if nonfinite:
        log.warning(f"the weights give NaN or infinite logits for {nonfinite} of {report['images']} val images "
                    f"(counted as wrong): a diverged run")
    return report if dist.main else None


COLUMNS = {"top1": ("top-1", "7.2f"), "top5": ("top-5", "7.2f"), "nll": ("NLL", "7.4f"), "ece": ("ECE", "6.2f"),
           "agreement": ("agree", "7.2f"), "kl": ("KL(t||s)", "9.4f")}
assert COLUMNS.keys() == METRICS.keys()  # one column per metric


def format_report(report: dict, as_json: bool = False) -> str:
    if as_json:
        return json.dumps(files.json_safe(report), indent=2)
    unreadable = f" ({report['unreadable']} unreadable, left out)" if report["unreadable"] else ""
    lines = [f"{report['model']} from {report['checkpoint']}",
             f"{report['images']} val images{unreadable} at {report['input_size']} px, crop_pct {report['crop_pct']}"]
    widths = {key: int(fmt.split(".")[0]) for key, (_, fmt) in COLUMNS.items()}
    header = f"{'weights':10s} " + " ".join(f"{title:>{widths[key]}s}" for key, (title, _) in COLUMNS.items())
    lines += ["", header, "-" * len(header)]
    rows = dict(report["students"])
    if "teacher" in report:
        rows["teacher"] = report["teacher"]
    for name, m in rows.items():
        cells = [format(m[key], fmt) if key in m else f"{'-':>{widths[key]}s}" for key, (_, fmt) in COLUMNS.items()]
        lines.append(f"{name:10s} " + " ".join(cells))
    lines += member_lines(report)
    if "teacher" in report:
        lines += ["", f"teacher {report['teacher']['name']}: logits {report['teacher_cache']} "
                      f"({report['teacher_time_s']:.1f} s); students evaluated in {report['eval_time_s']:.1f} s"]
    return "\n".join(printable(line) for line in lines)  # a path's line break stays in its line


def member_lines(report: dict) -> list[str]:
    """An ensemble's members: each one's top-1, and each student's agreement and KL against each."""
    members = report.get("teacher", {}).get("members")
    if not members:
        return []
    lines = ["", f"{'against':10s} {'member':28s} {'top-1':>7s} {'agree':>7s} {'KL(t||s)':>9s}"]
    for name, m in report["students"].items():
        for i, (own, vs) in enumerate(zip(members, m.get("members", []))):
            nan = float("nan")
            member = f"{i + 1}: {own.get('name', '?')}"
            lines.append(f"{name:10s} {member:28.28s} {own.get('top1', nan):7.2f} {vs.get('agreement', nan):7.2f} "
                         f"{vs.get('kl', nan):9.4f}")
    return lines

"""`share_teacher: true` in a table file: one soft-label store per seed, read by every KD row that can.

Per seed, the store job `seed<S>/soft-labels` runs `usi soft-labels` (usi/training/soft_label_pass.py) with
the recipe of one of that seed's KD rows, into <out>/seed<S>/soft-labels; every KD row of the seed whose
facts equal the store's reads it (teacher.soft_labels) and waits for it. "Facts" are usi/distill/
soft_labels.py's, computed here from each row's recipe before anything runs: the student's input size and
normalization from the model built on the meta device (no weights, no memory), and stand-ins, equal for
equal recipe keys, for what only a run can know (the training files' digest, the steps per epoch, the
teacher file's sha256). The store's row is the one whose facts most rows share (the first on a tie); a row
whose facts differ runs with the live teacher, and its `note` names the first differing key.
"""
from __future__ import annotations

import json

import torch

from usi import recipe as recipe_mod
from usi.data.loader import fill_mean, randaugment_on_device
from usi.distill import soft_labels as store
from usi.errors import shorten
from usi.models import compute_for, create_student, input_spec
from usi.studies.jobs import Job, settings

STORE = "soft-labels"  # the store job's name under seed<S>/, and its folder
# The data keys that decide which files train (steps per epoch follow from them, the batch keys and
# run.max_steps); data.input_size, workers and batch_size are facts of their own.
FILES = ("root", "format", "train_split", "train_shards", "class_map", "minival")


def device_of(recipe) -> torch.device:
    """The device the run will pick (usi.runtime.distributed.setup), for where RandAugment runs and the precision."""
    pref = recipe.run.device
    cuda = torch.cuda.is_available() if pref == "auto" else pref == "cuda"
    return torch.device("cuda" if cuda else "cpu")


def student_spec(recipe):
    """The student's input size and normalization, as the run will resolve them, without its weights."""
    try:
        with torch.device("meta"):
            student = create_student(recipe.model, 1000, recipe.data.input_size)
    except Exception:  # noqa: BLE001 - a model that cannot be built on meta: on the CPU (its error, if any, is the run's)
        student = create_student(recipe.model, 1000, recipe.data.input_size)
    return input_spec(student, recipe.data.input_size)


def plan_facts(tree: dict, nproc: int) -> dict:
    """store.facts of the run this recipe tree will be, from the recipe alone (the module's docstring)."""
    weights = (tree.get("teacher") or {}).get("weights")  # the table's teacher has not written them yet
    recipe = recipe_mod.from_tree(settings(tree, {"teacher.weights": None}))
    spec, device = student_spec(recipe), device_of(recipe)
    files = {f"data.{k}": getattr(recipe.data, k) for k in FILES}

    def identity(cfg) -> dict:  # the weights by their path
        path = weights if cfg is recipe.teacher else cfg.weights
        return {"name": cfg.name, "weights": path or "timm-pretrained", "input_size": cfg.input_size,
                "fold_bn": cfg.fold_bn, "kwargs": dict(cfg.kwargs)}

    return store.facts(recipe, files=json.dumps(files, sort_keys=True), spec=spec, fill=fill_mean(recipe.aug, spec),
                       on_device=randaugment_on_device(recipe.aug, device), world=nproc,
                       steps={"run.max_steps": recipe.run.max_steps},
                       epochs=recipe.sched.epochs + recipe.sched.cooldown_epochs,
                       compute=compute_for(recipe, device), identity=identity)


def difference(store_facts: dict, row_facts: dict, row_tree: dict) -> str | None:
    """Why a row cannot read the store (the first differing fact), None when it can; as the run will check."""
    fill_fixed = (row_tree.get("aug") or {}).get("randaugment_fill") is not None
    return store.first_difference(store_facts, row_facts, fill_fixed=fill_fixed)


def share(kd_jobs: list[Job], *, seed: int, nproc: int, folder, top_k: int | None) -> Job | None:
    """The seed's store job, or None when no KD row can share it; sets teacher.soft_labels, the need and a
    note on each KD job (in place)."""
    if not kd_jobs:
        return None
    facts = {}
    for job in kd_jobs:
        try:
            facts[job.name] = plan_facts(job.tree, nproc)
        except Exception as e:  # noqa: BLE001 - e.g. not a timm model: the run fails on its own, with its own line
            job.note = f"live teacher: its facts are unknown ({type(e).__name__}: {shorten(str(e), 120)})"
    known = [j for j in kd_jobs if j.name in facts]
    if not known:
        return None
    readers = {j.name: [k for k in known if difference(facts[j.name], facts[k.name], k.tree) is None] for j in known}
    source = max(known, key=lambda j: len(readers[j.name]))  # max keeps the first of equals
    name = f"seed{seed}/{STORE}"
    args = ("--top-k", str(top_k)) if top_k else ()
    store_job = Job(name, source.tree, needs=source.needs, command=STORE, args=args)
    for job in known:
        why = difference(facts[source.name], facts[job.name], job.tree)
        if why is not None:
            job.note = f"live teacher, not the seed's store: {why}"
            continue
        job.tree = settings(job.tree, {"teacher.soft_labels": str(folder)})
        job.needs = tuple(job.needs) + (name,)
    return store_job

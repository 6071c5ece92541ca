"""`usi quickstart`: generate data, train a teacher, distill students of three families with the identical
recipe, train the same students alone, and print the table.

The seven runs go through two worker processes, one thread each (the machine's two cores): the teacher
in one while the students without a teacher train in the other, then the distilled students. Where the
runs go, which are reused, and what the console says is the studies' shared policy (usi/studies/jobs.py).
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from usi import recipe as recipe_mod
from usi.data.synthetic import digest
from usi.evaluation.report import evaluate_checkpoint
from usi.runtime.environment import reproduction_key
from usi.studies import jobs, table
from usi.studies.jobs import ONE_THREAD, Job, settings
from usi.studies.table import model_cost
from usi.training.checkpoint import BEST

TEACHER = "test_resnet"
TEACHER_EPOCHS = 24  # a teacher worth distilling: 3x the students' epochs, the same recipe otherwise
# Three families at 24 px. The ViT's patches are 4 px (36 tokens): timm's default 16 px patch would
# leave it one token.
STUDENTS = (("test_resnet", {}), ("test_efficientnet", {}), ("test_vit", {"model.kwargs": {"patch_size": 4}}))
SIZE = 24  # recipes/quickstart.yaml's data.input_size
QUICKSTART_COLUMNS = ["model", "kind", "params_m", "top1_nokd", "top1_kd", "gain", "agreement_nokd",
                      "agreement_kd", "ece_nokd", "ece_kd", "train_img_s", "infer_img_s"]


def teacher_of(runs: Path) -> dict:
    return {"teacher.name": TEACHER, "teacher.weights": str(runs / "teacher" / BEST)}


def plan(data: Path, runs: Path, seed: int, extra: list[str]) -> list[Job]:
    """The teacher and the students without one first; the distilled ones once the teacher is done."""
    base = recipe_mod.read_yaml(recipe_mod.recipe_path("quickstart"))
    common = {"data.root": str(data), "run.seed": seed}
    # The teacher's epochs come first so that `extra` (tests) can still shorten them.
    first = [Job("teacher", settings(base, {"sched.epochs": TEACHER_EPOCHS, **common}, extra,
                                     {"model.name": TEACHER, "teacher.name": None}))]
    distilled = []
    for name, student in STUDENTS:
        model = {"model.name": name, **student}
        first.append(Job(f"{name}-nokd", settings(base, common, extra, {**model, "teacher.name": None})))
        distilled.append(Job(f"{name}-kd", settings(base, common, extra, {**model, **teacher_of(runs)}),
                             needs=("teacher",)))
    return first + distilled


def against_teacher(run_dir: Path, data: Path) -> dict:
    """The run's best weights evaluated with the teacher: top-1, ECE and agreement, for KD and no-KD alike."""
    overrides = jobs.as_overrides({"data.root": str(data), **teacher_of(run_dir.parent)})
    report = evaluate_checkpoint(run_dir / BEST, overrides, verbose=False)
    (metrics,) = report["students"].values()
    return metrics


def quickstart(out: Path, seed: int = 42, rerun: bool = False, per_class: tuple[int, int] = (200, 50),
               extra: list[str] = ()) -> list[dict]:
    """per_class: train and val images per class; extra: overrides for every run (tests shrink it)."""
    start = time.time()
    data, runs = jobs.prepare(out, seed, per_class, "the quickstart's")
    # two runs at a time, one thread each: the README's figures are one-thread figures on any machine
    outcomes = jobs.run_children(plan(data, runs, seed, list(extra)), runs, envs=[ONE_THREAD] * 2, rerun=rerun,
                                 tag="quickstart", start=start)
    summaries = jobs.summaries(outcomes)
    rows = []
    for name, student in STUDENTS:
        nokd, kd = (against_teacher(runs / f"{name}-{kind}", data) for kind in ("nokd", "kd"))
        kd["train_img_s"] = summaries[f"{name}-kd"].get("train_img_per_s")
        kwargs = student.get("model.kwargs", {})
        cost = model_cost(name, 10, SIZE, torch.device("cpu"), **({"img_size": SIZE, **kwargs} if kwargs else {}))
        rows.append(table.row(name, nokd=nokd, kd=kd, cost=cost))
    title = (f"USI quickstart: seed {seed}, teacher {TEACHER} (top-1 {summaries['teacher']['best']['value']:.2f}), "
             f"{time.time() - start:.0f} s")
    # the same seed gives the same table to the last digit only where this line is the same (README)
    title += f"\nreproduces with: {reproduction_key()}, generated data {digest(data)}"
    paths = table.write(rows, out, f"table-seed{seed}", title)
    table.show(title, table.markdown(QUICKSTART_COLUMNS, rows), paths)
    return rows

"""`usi quickstart`: generate data, train a teacher, distill two students of different families with
the identical recipe, train the same students alone, and print the table."""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from usi import recipe as recipe_mod
from usi import table
from usi.cli import recipe_path
from usi.data.synthetic import make_dataset
from usi.evaluation import evaluate_checkpoint
from usi.rundir import check_writable, read_summary
from usi.table import model_cost
from usi.train import train

log = logging.getLogger("usi")

TEACHER = "resnet10t"
TEACHER_EPOCHS = 30  # a teacher worth distilling: longer than the students, the same recipe otherwise
# Two families at 32 px on a CPU budget. A from-scratch ViT does not learn this data in minutes
# (test_vit stays near chance for 15 epochs with or without KD), so the second student is mobile.
STUDENTS = (("test_resnet", "CNN"), ("test_efficientnet", "mobile"))
QUICKSTART_COLUMNS = ["model", "family", "params_m", "top1_nokd", "top1_kd", "gain", "agreement_nokd",
                      "agreement_kd", "ece_nokd", "ece_kd", "train_img_s", "infer_img_s"]


def run_once(overrides: list[str], run_dir: Path, rerun: bool) -> dict:
    """Train one recipe unless a finished run is already there; an unfinished one is resumed."""
    summary = read_summary(run_dir)
    if summary is not None and not rerun:
        print(f"[quickstart] {run_dir} already finished; reusing it")
        return summary
    resume = "never" if rerun or not run_dir.exists() else "auto"
    if rerun and run_dir.exists():
        import shutil
        shutil.rmtree(run_dir)
    recipe = recipe_mod.load(recipe_path("quickstart"), overrides + [f"run.dir={run_dir}", f"run.resume={resume}"])
    print(f"[quickstart] training {recipe.model.name} ({'KD from ' + recipe.teacher.name if recipe.kd else 'no KD'})")
    return train(recipe)


def against_teacher(run_dir: Path, overrides: list[str]) -> dict:
    """The run's best weights evaluated with the teacher: top-1, ECE and agreement, for KD and no-KD alike."""
    report = evaluate_checkpoint(run_dir / "best.safetensors", overrides)
    (metrics,) = report["students"].values()
    return metrics


def quickstart(out: Path, seed: int = 42, rerun: bool = False, per_class: tuple[int, int] = (200, 50),
               extra: list[str] = ()) -> list[dict]:
    """per_class: train and val images per class; extra: overrides for every run (tests shrink it)."""
    start = time.time()
    check_writable(out, "--out")
    data = make_dataset(out / "data", *per_class)
    common = [f"data.root={data}", f"run.seed={seed}", *extra]
    runs = out / f"seed{seed}"
    # The teacher's epochs come first so that `extra` (tests) can still shorten them.
    teacher = run_once([f"sched.epochs={TEACHER_EPOCHS}", *common, f"model.name={TEACHER}", "teacher.name=null"],
                       runs / "teacher", rerun)
    with_teacher = [f"teacher.name={TEACHER}", f"teacher.weights={runs / 'teacher' / 'best.safetensors'}"]
    rows = []
    for name, family in STUDENTS:
        run_once(common + [f"model.name={name}", "teacher.name=null"], runs / f"{name}-nokd", rerun)
        kd_summary = run_once(common + [f"model.name={name}", *with_teacher], runs / f"{name}-kd", rerun)
        nokd, kd = (against_teacher(runs / f"{name}-{kind}", [f"data.root={data}", *with_teacher])
                    for kind in ("nokd", "kd"))
        kd["train_img_s"] = kd_summary.get("train_img_per_s")
        cost = model_cost(name, 10, 32, torch.device("cpu"))
        rows.append(table.row(name, nokd=nokd, kd=kd, cost=cost, family=family))
    title = (f"USI quickstart: seed {seed}, teacher {TEACHER} (top-1 {teacher['best']['value']:.2f}), "
             f"{time.time() - start:.0f} s")
    paths = table.write(rows, out, f"table-seed{seed}", title)
    print(f"\n{title}\n\n{table.markdown(QUICKSTART_COLUMNS, rows)}\n\nwritten: "
          f"{', '.join(str(p) for p in paths.values())}")
    return rows

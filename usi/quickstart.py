"""`usi quickstart`: generate data, train a teacher, distill two students of different families with
the identical recipe, train the same students alone, and print the table."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from usi import recipe as recipe_mod
from usi.cli import recipe_path
from usi.data.synthetic import make_dataset
from usi.evaluation import evaluate_checkpoint
from usi.table import markdown, read_summary
from usi.train import train

log = logging.getLogger("usi")

TEACHER = "resnet10t"
TEACHER_EPOCHS = 30  # a teacher worth distilling: longer than the students, the same recipe otherwise
# Two families at 32 px on a CPU budget. A from-scratch ViT does not learn this data in minutes
# (test_vit stays near chance for 15 epochs with or without KD), so the second student is mobile.
STUDENTS = (("test_resnet", "CNN"), ("test_efficientnet", "mobile"))
COLUMNS = ["student", "family", "params (M)", "top-1 no KD", "top-1 KD", "gain", "agree no KD", "agree KD",
           "ECE no KD", "ECE KD", "teacher top-1"]


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


def against_teacher(run_dir: Path, teacher_overrides: list[str]) -> dict:
    """The run's best weights evaluated with the teacher: top-1, ECE and agreement, for KD and no-KD alike."""
    report = evaluate_checkpoint(run_dir / "best.safetensors", teacher_overrides)
    (metrics,) = report["students"].values()
    return metrics


def quickstart(out: Path, seed: int = 42, rerun: bool = False) -> list[list]:
    start = time.time()
    data = make_dataset(out / "data")
    common = [f"data.root={data}", f"run.seed={seed}"]
    runs = out / f"seed{seed}"
    teacher = run_once(common + [f"model.name={TEACHER}", "teacher.name=null", f"sched.epochs={TEACHER_EPOCHS}"], runs / "teacher", rerun)
    with_teacher = [f"teacher.name={TEACHER}", f"teacher.weights={runs / 'teacher' / 'best.safetensors'}"]
    rows = []
    for name, family in STUDENTS:
        alone = run_once(common + [f"model.name={name}", "teacher.name=null"], runs / f"{name}-nokd", rerun)
        run_once(common + [f"model.name={name}", *with_teacher], runs / f"{name}-kd", rerun)
        a, k = (against_teacher(runs / f"{name}-{kind}", with_teacher) for kind in ("nokd", "kd"))
        rows.append([name, family, alone["params"] / 1e6, a["top1"], k["top1"], k["top1"] - a["top1"],
                     a["agreement"], k["agreement"], a["ece"], k["ece"], teacher["best"]["value"]])
    table = markdown(COLUMNS, rows)
    (out / f"table-seed{seed}.md").write_text(table + "\n")
    (out / f"table-seed{seed}.json").write_text(json.dumps({"columns": COLUMNS, "rows": rows}, indent=2))
    print(f"\nUSI quickstart (seed {seed}, teacher {TEACHER}, {time.time() - start:.0f} s):\n\n{table}\n")
    return rows

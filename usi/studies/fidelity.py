"""`usi fidelity`: the seed paper's central observations at small scale, in one command.

Stanton et al. 2021, "Does Knowledge Distillation Really Work?": a student often fails to match its
teacher's predictions even when it could (self-distillation: the same architecture); fidelity and
generalization behave differently; augmentation raises fidelity on held-out data. This study, on the
generated dataset of `usi quickstart` and its CPU-sized recipe:

1. trains three teachers (test_resnet, the recipe without a teacher, three seeds);
2. distills students of the same architecture from the first teacher: with augmentation off (no
   mixup/cutmix, no RandAugment, no repeats: crop and flip only) and on (the recipe's), and on with
   the student initialized from the teacher's weights;
3. distills a student from the ensemble of all three (mean probabilities), augmentation on;
4. measures each student's top-1 and its top-1 agreement and KL with its teacher on train (the eval
   transform) and on val, and prints a table and writes a plot.

The runs go two at a time (one per core), as in the quickstart; finished runs of the same recipe are
reused (usi/studies/jobs.py: the studies' shared policy).
"""
from __future__ import annotations

import argparse
import sys
import textwrap
import time
from pathlib import Path

from usi import recipe as recipe_mod
from usi.evaluation.report import evaluate_checkpoint
from usi.studies import jobs, table
from usi.studies.jobs import ONE_THREAD, Job, settings
from usi.training.checkpoint import BEST

ARCH = "test_resnet"
AUG_OFF = {"aug.mixup_alpha": 0, "aug.cutmix_alpha": 0, "aug.auto_augment": None, "aug.repeats": 1}
COLUMNS = ["student", "teacher", "augmentation", "init", "student_top1", "teacher_top1", "agree_train",
           "agree_val", "kl_train", "kl_val"]


def plan(data: Path, runs: Path, *, seed: int, teacher_epochs: int, student_epochs: int, extra: list[str]):
    """(jobs, students: {name: (its teacher's settings, its row's labels)})."""
    base = recipe_mod.read_yaml(recipe_mod.recipe_path("quickstart"))
    root = {"data.root": str(data)}
    weights = {t: str(runs / t / BEST) for t in ("teacher-a", "teacher-b", "teacher-c")}
    todo = [Job(t, settings(base, {"sched.epochs": teacher_epochs, **root}, extra,
                            {"run.seed": seed + i, "model.name": ARCH, "teacher.name": None}))
            for i, t in enumerate(weights)]
    single = {"teacher.name": ARCH, "teacher.weights": weights["teacher-a"]}
    ensemble = {**single, "teacher.extra": [{"name": ARCH, "weights": weights[t]} for t in ("teacher-b", "teacher-c")]}
    students = {
        "self-aug-off": (single, AUG_OFF, {}, ("self", "off", "scratch")),
        "self-aug-on": (single, {}, {}, ("self", "on", "scratch")),
        "self-aug-on-teacher-init": (single, {}, {"model.weights": weights["teacher-a"]}, ("self", "on", "teacher")),
        "ensemble-aug-on": (ensemble, {}, {}, ("3-teacher ensemble", "on", "scratch")),
    }
    for name, (teacher, aug, init, _) in students.items():
        todo.append(Job(name, settings(base, {"sched.epochs": student_epochs, **root}, extra,
                                       {"run.seed": seed, "model.name": ARCH, **aug, **init, **teacher}),
                        needs=("teacher-a", *(("teacher-b", "teacher-c") if teacher is ensemble else ()))))
    return todo, {name: (teacher, row) for name, (teacher, _, _, row) in students.items()}


def measure(run_dir: Path, data: Path, teacher: dict) -> dict:
    """Top-1 of student and teacher, and the student's agreement and KL with it, on train and on val."""
    out = {}
    for split in ("train", "val"):
        overrides = jobs.as_overrides({"data.root": str(data), "data.val_split": split, **teacher})
        report = evaluate_checkpoint(run_dir / BEST, overrides, verbose=False)
        (student,) = report["students"].values()
        out[split] = {"student_top1": student["top1"], "teacher_top1": report["teacher"]["top1"],
                      "agreement": student["agreement"], "kl": student["kl"]}
    return out


def row(name: str, labels: tuple, m: dict) -> dict:
    teacher, aug, init = labels
    return {"student": f"{ARCH} ({name})", "teacher": teacher, "augmentation": aug, "init": init,
            "student_top1": m["val"]["student_top1"], "teacher_top1": m["val"]["teacher_top1"],
            "agree_train": m["train"]["agreement"], "agree_val": m["val"]["agreement"],
            "kl_train": m["train"]["kl"], "kl_val": m["val"]["kl"]}


def cell(value, column: str) -> str:
    """KL to three decimals, percentages to one."""
    if isinstance(value, float):
        return f"{value:.3f}" if column.startswith("kl") else f"{value:.1f}"
    return str(value)


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Agreement with the teacher on train (gray) and val (red) per student, beside the student's top-1 (blue)."""
    from PIL import Image, ImageDraw

    w, h, m = 760, 460, 60
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    d.text((m, 15), title.splitlines()[0][:110], fill="black")
    d.rectangle([m, m, w - m, h - m - 40], outline="black")
    bottom, top = h - m - 40, m
    y = lambda v: bottom - v / 100 * (bottom - top)  # noqa: E731
    for v in (0, 25, 50, 75, 100):
        d.text((m - 30, y(v) - 6), f"{v}", fill="black")
    slot = (w - 2 * m) / max(len(rows), 1)
    for i, r in enumerate(rows):
        x0 = m + i * slot + slot * 0.15
        bar = slot * 0.7 / 3
        for j, (key, color) in enumerate((("agree_train", "gray"), ("agree_val", "red"), ("student_top1", "blue"))):
            d.rectangle([x0 + j * bar, y(r[key]), x0 + (j + 1) * bar - 2, bottom], fill=color)
            d.text((x0 + j * bar, y(r[key]) - 12), f"{r[key]:.0f}", fill="black")
        label = r["student"].split("(")[-1].rstrip(")")
        for k, text in enumerate(textwrap.wrap(label.replace("-", " "), 18)[:2]):  # whole words per line
            d.text((x0, bottom + 6 + 14 * k), text, fill="black")
    d.text((m, h - 30), "gray: agreement on train   red: agreement on val   blue: student top-1 (val)   (%)",
           fill="black")
    img.save(path)


def study(out: Path, seed: int = 42, teacher_epochs: int = 24, student_epochs: int = 24, rerun: bool = False,
          per_class: tuple[int, int] = (200, 50), extra: list[str] = ()) -> list[dict]:
    start = time.time()
    data, runs = jobs.prepare(out, seed, per_class, "the study's")
    todo, students = plan(data, runs, seed=seed, teacher_epochs=teacher_epochs, student_epochs=student_epochs,
                          extra=list(extra))
    # two runs at a time, one thread each: the README's figures are one-thread figures on any machine
    outcomes = jobs.run_children(todo, runs, envs=[ONE_THREAD] * 2, rerun=rerun, tag="fidelity", start=start)
    rows = [row(name, labels, measure(runs / name, data, teacher)) for name, (teacher, labels) in students.items()]
    reused = jobs.reused(outcomes)
    note = f" ({reused} of {len(todo)} runs reused)" if reused else ""
    title = f"usi fidelity: seed {seed}, {ARCH} students and teachers, {time.time() - start:.0f} s{note}"
    paths = table.write(rows, out, f"fidelity-seed{seed}", title, columns=COLUMNS, cell=cell, draw=plot)
    table.show(title, table.markdown(COLUMNS, rows, cell), paths)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="usi fidelity", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/fidelity"))
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--teacher-epochs", type=int, default=24)
    p.add_argument("--student-epochs", type=int, default=24)
    p.add_argument("--rerun", action="store_true", help="train again even where a finished run exists")
    args = p.parse_args(argv)
    for flag in ("teacher_epochs", "student_epochs"):
        if getattr(args, flag) < 2:
            p.error(f"--{flag.replace('_', '-')} must be at least 2 (one warm-up epoch, then training)")
    study(args.out, seed=args.seed, teacher_epochs=args.teacher_epochs, student_epochs=args.student_epochs,
          rerun=args.rerun)
    return 0


if __name__ == "__main__":
    sys.exit(main())

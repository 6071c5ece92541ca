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

The runs go two at a time (one per core), as in the quickstart; finished runs are reused.
"""
from __future__ import annotations

import argparse
import csv
import sys
import textwrap
import time
from pathlib import Path

from usi.evaluation.report import evaluate_checkpoint
from usi.studies.quickstart import prepare, train_all
from usi.training.rundir import read_summary

ARCH = "test_resnet"
AUG_OFF = ["aug.mixup_alpha=0", "aug.cutmix_alpha=0", "aug.auto_augment=null", "aug.repeats=1"]
COLUMNS = ["student", "teacher", "augmentation", "init", "student_top1", "teacher_top1", "agree_train",
           "agree_val", "kl_train", "kl_val"]


def plan(data: Path, runs: Path, seed: int, teacher_epochs: int, student_epochs: int, extra: list[str]):
    """(jobs: {name: overrides}, needs: {name: [jobs it needs]}, students: {name: (teacher overrides, row)})."""
    common = [f"data.root={data}", *extra]
    weights = {t: runs / t / "best.safetensors" for t in ("teacher-a", "teacher-b", "teacher-c")}
    jobs = {t: [f"sched.epochs={teacher_epochs}", *common, f"run.seed={seed + i}", f"model.name={ARCH}",
                "teacher.name=null"] for i, t in enumerate(weights)}
    single = [f"teacher.name={ARCH}", f"teacher.weights={weights['teacher-a']}"]
    ensemble = [*single, "teacher.extra=[" + ", ".join(
        f"{{name: {ARCH}, weights: {weights[t]}}}" for t in ("teacher-b", "teacher-c")) + "]"]
    students = {
        "self-aug-off": (single, AUG_OFF, [], ("self", "off", "scratch")),
        "self-aug-on": (single, [], [], ("self", "on", "scratch")),
        "self-aug-on-teacher-init": (single, [], [f"model.weights={weights['teacher-a']}"], ("self", "on", "teacher")),
        "ensemble-aug-on": (ensemble, [], [], ("3-teacher ensemble", "on", "scratch")),
    }
    needs = {}
    for name, (teacher, aug, init, _) in students.items():
        jobs[name] = [f"sched.epochs={student_epochs}", *common, f"run.seed={seed}", f"model.name={ARCH}",
                      *aug, *init, *teacher]
        needs[name] = ["teacher-a"] + (["teacher-b", "teacher-c"] if teacher is ensemble else [])
    return jobs, needs, {name: (teacher, row) for name, (teacher, _, _, row) in students.items()}


def measure(run_dir: Path, data: Path, teacher: list[str]) -> dict:
    """Top-1 of student and teacher, and the student's agreement and KL with it, on train and on val."""
    out = {}
    for split in ("train", "val"):
        report = evaluate_checkpoint(run_dir / "best.safetensors",
                                     [f"data.root={data}", f"data.val_split={split}", *teacher], verbose=False)
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


def markdown(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        lines.append("| " + " | ".join(f"{r[c]:.3f}" if c.startswith("kl") else f"{r[c]:.1f}"
                                       if isinstance(r[c], float) else str(r[c]) for c in COLUMNS) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Agreement with the teacher on train (gray) and val (red) per student, beside the student's top-1 (blue)."""
    from PIL import Image, ImageDraw

    w, h, m = 760, 460, 60
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    d.text((m, 15), title[:110], fill="black")
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
    data, runs = prepare(out, seed, per_class, "the study's")
    jobs, needs, students = plan(data, runs, seed, teacher_epochs, student_epochs, list(extra))
    reused = [name for name in jobs if not rerun and read_summary(runs / name) is not None]
    train_all(jobs, runs, rerun, start, needs=needs, tag="fidelity")
    rows = [row(name, labels, measure(runs / name, data, teacher)) for name, (teacher, labels) in students.items()]
    wall = time.time() - start
    note = f" ({len(reused)} of {len(jobs)} runs reused)" if reused else ""
    title = f"usi fidelity: seed {seed}, {ARCH} students and teachers, {wall:.0f} s{note}"
    (out / f"fidelity-seed{seed}.md").write_text(f"{title}\n\n{markdown(rows)}\n")
    with open(out / f"fidelity-seed{seed}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, out / f"fidelity-seed{seed}.png", title)
    print(f"\n{title}\n\n{markdown(rows)}\n\nwritten: {out / f'fidelity-seed{seed}'}.{{md,csv,png}}")
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

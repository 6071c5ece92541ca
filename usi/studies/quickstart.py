"""`usi quickstart`: generate data, train a teacher, distill students of three families with the identical
recipe, train the same students alone, and print the table.

The seven runs go through two worker processes, one thread each (the machine's two cores): the teacher
in one while the students without a teacher train in the other, then the distilled students. Each
run's own log goes to <out>/seed<N>/<run>.log; the console gets one line per run.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path

import torch

from usi import recipe as recipe_mod
from usi.data.synthetic import make_dataset
from usi.errors import UsageError
from usi.evaluation.report import evaluate_checkpoint
from usi.studies import table
from usi.studies.table import model_cost
from usi.training.rundir import (
    RECIPE_FILE,
    check_same_recipe,
    check_writable,
    read_summary,
)

log = logging.getLogger("usi")

TEACHER = "test_resnet"
TEACHER_EPOCHS = 24  # a teacher worth distilling: 3x the students' epochs, the same recipe otherwise
# Three families at 24 px. The ViT's patches are 4 px (36 tokens): timm's default 16 px patch would
# leave it one token.
STUDENTS = (("test_resnet", "CNN", []), ("test_efficientnet", "mobile", []),
            ("test_vit", "ViT", ["model.kwargs={patch_size: 4}"]))
SIZE = 24  # recipes/quickstart.yaml's data.input_size
QUICKSTART_COLUMNS = ["model", "family", "params_m", "top1_nokd", "top1_kd", "gain", "agreement_nokd",
                      "agreement_kd", "ece_nokd", "ece_kd", "train_img_s", "infer_img_s"]


def run_once(overrides: list[str], run_dir: Path, rerun: bool) -> dict:
    """Train one recipe unless a finished run of it is already there; an unfinished one is resumed, a
    finished one of another recipe (other epochs, say) is refused."""
    resume = "never" if rerun or not run_dir.exists() else "auto"
    recipe = recipe_mod.load(recipe_mod.recipe_path("quickstart"), overrides + [f"run.dir={run_dir}", f"run.resume={resume}"])
    summary = read_summary(run_dir)
    if summary is not None and not rerun:
        check_same_recipe(recipe, recipe_mod.read_yaml(run_dir / RECIPE_FILE),
                          f"{run_dir} is a finished run of another recipe (pass --rerun, or another --out)")
        return summary
    if rerun and run_dir.exists():
        shutil.rmtree(run_dir)
    from usi.training.loop import train  # in the worker process

    return train(recipe)


def in_worker(overrides: list[str], run_dir: Path, rerun: bool) -> dict:
    """One run in a pool worker: one thread, its output in <run_dir>.log."""
    torch.set_num_threads(1)
    with open(run_dir.with_suffix(".log"), "a") as out:
        os.dup2(out.fileno(), sys.stderr.fileno())
        os.dup2(out.fileno(), sys.stdout.fileno())
        return run_once(overrides, run_dir, rerun)


def against_teacher(run_dir: Path, overrides: list[str]) -> dict:
    """The run's best weights evaluated with the teacher: top-1, ECE and agreement, for KD and no-KD alike."""
    report = evaluate_checkpoint(run_dir / "best.safetensors", overrides, verbose=False)
    (metrics,) = report["students"].values()
    return metrics


def train_all(jobs: dict[str, list[str]], runs: Path, rerun: bool, start: float,
              needs: dict[str, list[str]] | None = None, tag: str = "quickstart") -> dict[str, dict]:
    """{name: summary} of every job, two at a time (one per core), each as soon as the jobs it needs
    (e.g. its teacher) are done; in the order given otherwise."""
    needs = needs or {}
    summaries, waiting, queued = {}, {}, list(jobs)
    with ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("spawn")) as pool:
        def submit_ready():
            for name in [n for n in queued if all(d in summaries for d in needs.get(n, []))][:2 - len(waiting)]:
                queued.remove(name)
                verb = "reusing" if read_summary(runs / name) is not None and not rerun else "training"
                print(f"[{tag}] {time.time() - start:4.0f} s  {verb} {name}", flush=True)
                waiting[pool.submit(in_worker, jobs[name], runs / name, rerun)] = name

        submit_ready()
        while waiting:
            done, _ = wait(waiting, return_when=FIRST_COMPLETED)
            for future in done:
                name = waiting.pop(future)
                summaries[name] = future.result()
                best = summaries[name]["best"]
                print(f"[{tag}] {time.time() - start:4.0f} s  {name} done: best top-1 {best['value']:.1f} "
                      f"(log: {runs / name}.log)", flush=True)
            submit_ready()
    return summaries


def prepare(out: Path, seed: int, per_class: tuple[int, int], whose: str) -> tuple[Path, Path]:
    """(the generated dataset, the folder for this seed's runs) under --out."""
    check_writable(out, "--out")
    runs = out / f"seed{seed}"
    try:
        data = make_dataset(out / "data", *per_class)
        runs.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--out {out} cannot hold {whose} files ({e.strerror})") from None
    return data, runs


def quickstart(out: Path, seed: int = 42, rerun: bool = False, per_class: tuple[int, int] = (200, 50),
               extra: list[str] = ()) -> list[dict]:
    """per_class: train and val images per class; extra: overrides for every run (tests shrink it)."""
    start = time.time()
    data, runs = prepare(out, seed, per_class, "the quickstart's")
    common = [f"data.root={data}", f"run.seed={seed}"]
    teacher_weights = runs / "teacher" / "best.safetensors"
    with_teacher = [f"teacher.name={TEACHER}", f"teacher.weights={teacher_weights}"]
    # The teacher's epochs come first so that `extra` (tests) can still shorten them.
    jobs = {"teacher": [f"sched.epochs={TEACHER_EPOCHS}", *common, *extra, f"model.name={TEACHER}",
                        "teacher.name=null"]}
    for name, _, student in STUDENTS:
        jobs[f"{name}-nokd"] = [*common, *extra, f"model.name={name}", *student, "teacher.name=null"]
        jobs[f"{name}-kd"] = [*common, *extra, f"model.name={name}", *student, *with_teacher]
    # the teacher and the students without one first; the distilled ones once the teacher is done
    order = [n for n in jobs if not n.endswith("-kd")] + [n for n in jobs if n.endswith("-kd")]
    summaries = train_all({n: jobs[n] for n in order}, runs, rerun, start,
                          needs={n: ["teacher"] for n in jobs if n.endswith("-kd")})
    rows = []
    for name, family, student in STUDENTS:
        nokd, kd = (against_teacher(runs / f"{name}-{kind}", [f"data.root={data}", *with_teacher])
                    for kind in ("nokd", "kd"))
        kd["train_img_s"] = summaries[f"{name}-kd"].get("train_img_per_s")
        kwargs = recipe_mod.load(None, [f"model.name={name}", *student]).model.kwargs
        cost = model_cost(name, 10, SIZE, torch.device("cpu"), **({"img_size": SIZE, **kwargs} if kwargs else {}))
        rows.append(table.row(name, nokd=nokd, kd=kd, cost=cost, family=family))
    title = (f"USI quickstart: seed {seed}, teacher {TEACHER} (top-1 {summaries['teacher']['best']['value']:.2f}), "
             f"{time.time() - start:.0f} s")
    paths = table.write(rows, out, f"table-seed{seed}", title)
    print(f"\n{title}\n\n{table.markdown(QUICKSTART_COLUMNS, rows)}\n\nwritten: "
          f"{', '.join(str(p) for p in paths.values())}")
    return rows

"""The architecture-agnostic table: one recipe, many backbones, with and without the teacher.

For each model it runs the identical recipe through torchrun (only model.name and run.dir change),
reuses runs that already finished with that recipe, resumes unfinished ones (usi/studies/jobs.py: the
studies' shared policy; a finished run of another recipe is refused, --rerun trains it again), survives
a failing model (its row says why), evaluates every student's best weights against the teacher (agreement,
KL, ECE; the teacher's val logits are cached, so each costs one student forward), and writes
<out>/table.md, table.csv and table.png (top-1 against inference throughput).

  usi table recipes/usi.yaml --nproc 8 --out runs/table data.root=/data/imagenet
  usi table recipes/usi.yaml --models resnet50 vit_small_patch16_224 --kd on ...
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import torch

from usi import recipe as recipe_mod
from usi.recipe import Recipe
from usi.runtime import files
from usi.studies import jobs, table
from usi.studies.jobs import Job, RunFailed, settings
from usi.training.checkpoint import BEST
from usi.training.rundir import read_summary

DEFAULT_MODELS = ["resnet50", "mobilenetv3_large_100", "efficientnet_b0", "vit_small_patch16_224", "levit_384",
                  "convnext_small", "mixer_b16_224"]
KINDS = {"both": (False, True), "on": (True,), "off": (False,)}
BASELINE = {"teacher.name": None, "teacher.extra": [], "features.student": None, "features.teacher": None}


def launcher(nproc: int) -> list[str]:
    if nproc <= 1:
        return [sys.executable, "-m", "usi"]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "usi"]


def last_error(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    errors = [line for line in lines if "usi: error" in line or "Error" in line]
    return (errors or lines or ["no output"])[-1].strip()[:200]


def train_with(nproc: int, recipe: Recipe, log: Path) -> dict:
    """One run through `usi train` (under torchrun for nproc > 1) given the job's recipe, its output in
    its log; its summary, or RunFailed with the error's last line."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "recipe.yaml"
        recipe.save(path)
        out = subprocess.run(launcher(nproc) + ["train", str(path)], check=False, capture_output=True, text=True)
    log.parent.mkdir(parents=True, exist_ok=True)  # a run that failed at start made no folder
    files.atomic_write(log, lambda tmp: Path(tmp).write_text(out.stdout + out.stderr))  # a link is replaced
    if out.returncode != 0:
        raise RunFailed(last_error(out.stderr))
    return read_summary(Path(recipe.run.dir)) or {}


def plan(args: argparse.Namespace) -> list[Job]:
    """<model>-nokd and <model>-kd per model, as --kd asks: the identical recipe, only model.name and run.dir
    change (and the baseline drops the teacher, the ensemble and feature KD)."""
    base = recipe_mod.read_yaml(recipe_mod.recipe_path(args.recipe))
    todo = []
    for model in args.models:
        for kd in KINDS[args.kd]:
            tree = settings(base, args.overrides, {"model.name": model}, {} if kd else BASELINE)
            todo.append(Job(f"{model}-{'kd' if kd else 'nokd'}", tree))
    return todo


def evaluate(run_dir: Path, eval_overrides: list[str], overrides: list[str], nproc: int) -> dict | None:
    """The run's best weights against the teacher; kept beside the run, and reused while the weights
    and the evaluation's arguments are the same (re-running the table re-evaluates nothing)."""
    ckpt = run_dir / BEST
    if not ckpt.is_file():
        return None
    data = [o for o in overrides if o.startswith(("data.", "run.device", "run.amp"))]
    args = ["eval", str(ckpt), *data, *eval_overrides, "--json"]
    key = {"args": args, "weights": [ckpt.stat().st_size, ckpt.stat().st_mtime_ns]}
    saved = run_dir.parent / f"{run_dir.name}.eval.json"
    if saved.is_file():
        cached = json.loads(saved.read_text())
        if cached.get("key") == key:
            return cached["metrics"]
    out = subprocess.run(launcher(nproc) + args, capture_output=True, text=True)
    if out.returncode != 0:
        return None
    (metrics,) = json.loads(out.stdout)["students"].values()
    files.atomic_write(saved, lambda tmp: Path(tmp).write_text(json.dumps({"key": key, "metrics": metrics})))
    return metrics


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="usi table", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="section.key=value for every run (not model.name / run.dir)")
    p.add_argument("--models", nargs="+", default=DEFAULT_MODELS)
    p.add_argument("--kd", choices=["both", "on", "off"], default="both")
    p.add_argument("--nproc", type=int, default=torch.cuda.device_count() or 1)
    p.add_argument("--out", type=Path, default=Path("runs/table"))
    p.add_argument("--rerun", action="store_true", help="train again even where a finished run exists")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where inference throughput and GMACs are measured")
    # overrides may come before or after the flags, as in `usi train` (and after --models' names)
    args, extra = p.parse_known_args(argv)
    if any("=" not in e or e.startswith("-") for e in extra):
        p.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides += [m for m in args.models if "=" in m] + extra
    args.models = [m for m in args.models if "=" not in m] or DEFAULT_MODELS
    return args


def main(argv=None) -> int:
    args = parse(argv)
    start = time.time()
    base = recipe_mod.load(recipe_mod.recipe_path(args.recipe), args.overrides)  # a bad recipe fails here, once
    # usi eval takes paths from its command line only (never from a checkpoint): name them all
    locations = ([f"data.root={base.data.root}", f"data.val_split={base.data.val_split}"]
                 + ([f"data.val_shards={base.data.val_shards}"] if base.data.val_shards else []))
    teacher = ([f"teacher.name={base.teacher.name}"]
               + ([f"teacher.weights={base.teacher.weights}"] if base.teacher.weights else [])
               + ([f"teacher.extra={json.dumps(base.teacher.extra)}", f"teacher.combine={base.teacher.combine}"]
                  if base.teacher.extra else []))  # an ensemble: agreement against all of it
    # one run at a time, each on every GPU (torchrun); a model that fails leaves its row a note
    with ThreadPoolExecutor(1) as pool:
        outcomes = jobs.run_all(plan(args), args.out, pool=pool, workers=1, rerun=args.rerun, tag="table",
                                start=start, work=partial(train_with, args.nproc), keep_going=True)
    rows = []
    for model in args.models:
        notes, metrics = [], {}
        for kd in KINDS[args.kd]:
            run_dir = args.out / f"{model}-{'kd' if kd else 'nokd'}"
            outcome = outcomes[run_dir.name]
            if outcome.failure:
                notes.append(f"{'KD' if kd else 'no KD'} failed: {outcome.failure}")
                continue
            m = evaluate(run_dir, locations + (teacher if base.kd else []), args.overrides, args.nproc) or {}
            m["train_img_s"] = (outcome.summary or {}).get("train_img_per_s")
            metrics["kd" if kd else "nokd"] = m
        try:
            size = base.data.input_size or 224
            cost = table.model_cost(model, 1000, size, torch.device(args.device), **base.model.kwargs)
        except Exception as e:  # an unknown name: the row still says what happened
            cost, notes = None, notes + [f"cost: {type(e).__name__}: {str(e)[:120]}"]
        rows.append(table.row(model, nokd=metrics.get("nokd"), kd=metrics.get("kd"), cost=cost, note="; ".join(notes)))
    title = f"USI recipe {args.recipe}, teacher {base.teacher.name}"
    paths = table.write(rows, args.out, "table", title)
    table.show(title, table.markdown(table.filled(table.COLUMNS, rows), rows), paths)
    return 0


if __name__ == "__main__":
    sys.exit(main())

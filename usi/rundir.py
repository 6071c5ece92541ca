"""The run directory's policy: where a run writes, what it resumes from, and what it refuses.

Deciding how a run starts; the order is important:
  1. run.resume=never: the directory must hold no run (it is refused, never overwritten); a fresh start.
  2. run.resume=auto: if the directory holds a recipe.yaml, the recipe must be the same one, except for
     the fields marked resume_free in usi/recipe.py; then it resumes from last.pt if there is one, else
     starts afresh (a run killed before its first checkpoint).
  3. run.resume=<path>: resume from that checkpoint, writing to run.dir.
  4. In every case the nearest existing ancestor of the directory must be writable.
Nothing is written while deciding: the directory is created only after everything is built
(`create`), so a failed start leaves nothing behind.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from usi import checkpoint, distributed
from usi import recipe as recipe_mod
from usi.errors import UsageError
from usi.recipe import Recipe

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
RECIPE_FILE = "recipe.yaml"


def plan(recipe: Recipe) -> tuple[Path, Path | None]:
    """(the run directory, the checkpoint to resume from or None). Writes nothing."""
    run_dir = recipe.run_dir()
    existing = run_dir.is_dir() and any(run_dir.iterdir())
    resume_from = None
    if recipe.run.resume == "never":
        if existing:
            raise UsageError(f"run directory {run_dir} already holds a run; pass run.resume=auto to continue it "
                             f"or choose another run.dir")
    elif recipe.run.resume == "auto":
        if existing and (run_dir / RECIPE_FILE).is_file():
            check_same_recipe(recipe, run_dir / RECIPE_FILE)
        last = run_dir / checkpoint.LAST
        resume_from = last if last.is_file() else None
    else:
        resume_from = Path(recipe.run.resume)
    check_writable(run_dir)
    return run_dir, resume_from


def check_writable(run_dir: Path) -> None:
    """The nearest existing ancestor must be a writable directory (checked before any heavy work)."""
    parent = run_dir
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"run directory {run_dir} cannot be created: {parent} is not a writable directory")


def check_same_recipe(recipe: Recipe, saved_path: Path) -> None:
    saved = recipe_mod.from_dict(recipe_mod.read_yaml(saved_path)).to_dict()
    free = recipe_mod.resume_free_keys()
    for section, values in recipe.to_dict().items():
        for key, value in values.items():
            if (section, key) not in free and saved.get(section, {}).get(key) != value:
                raise UsageError(f"cannot resume {saved_path.parent}: {section}.{key} was "
                                 f"{saved[section][key]!r}, now {value!r}; use another run.dir")


def create(recipe: Recipe, run_dir: Path, dist: distributed.Dist) -> None:
    """Only once everything is built and checked: a failed start leaves nothing behind."""
    distributed.barrier()  # every rank has looked at the directory before rank 0 writes to it
    if dist.main:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            probe = run_dir / ".write-test"
            probe.write_text("ok")
            probe.unlink()
        except OSError as e:
            raise UsageError(f"run directory {run_dir} is not writable ({e.strerror})") from None
        recipe.save(run_dir / RECIPE_FILE)
    distributed.barrier()


def append_metrics(run_dir: Path, record: dict) -> None:
    with open(run_dir / METRICS_FILE, "a") as f:
        f.write(json.dumps(record) + "\n")


def keep_metrics_until(run_dir: Path, epochs_done: int) -> None:
    """Drop metrics lines of epochs the checkpoint does not cover (written just before a crash)."""
    path = run_dir / METRICS_FILE
    if not path.is_file():
        return
    lines = [line for line in path.read_text().splitlines()
             if line.strip() and json.loads(line)["epoch"] <= epochs_done]
    checkpoint.atomic_write(path, lambda tmp: Path(tmp).write_text("".join(line + "\n" for line in lines)))


def read_summary(run_dir: Path) -> dict | None:
    path = Path(run_dir) / SUMMARY_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def write_summary(run_dir: Path, summary: dict) -> None:
    checkpoint.atomic_write(run_dir / SUMMARY_FILE, lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=2)))

"""The run directory's policy: where a run writes, what it resumes from, and what it refuses.

Deciding how a run starts; the order is important:
  1. The directory is locked for this run (rank 0 holds an flock on a lock file inside it until it
     exits): a second usi process aimed at the same directory is refused while the first runs, so two
     runs never mix their files. If the start fails, the folders made only to hold the lock are removed.
  2. No name usi writes in the directory (OWN) may be a link, or a folder where a file goes: usi writes
     only plain files of its own, never through a link into someone else's file. (The directory itself,
     or a folder above it, may be a link: a user's choice of disk.)
  3. run.resume=never: the directory must hold no run (it is refused, never overwritten); a fresh start.
  4. run.resume=auto: a directory that holds files but no recipe.yaml is no usi run and is refused (a
     run writes recipe.yaml first). If it holds a recipe.yaml, the recipe must be the same one, except
     for the fields marked resume_free in usi/recipe/schema.py and sched.epochs (a longer schedule); then it
     resumes from last.pt if there is one, else starts afresh (a run killed before its first checkpoint).
  5. run.resume=<path>: the same checks as auto against the directory; then it resumes from that
     checkpoint, writing to run.dir.
  6. The nearest existing ancestor of the directory must be writable.
Later, before anything is written (usi/training/loop.py), the checkpoint itself must hold the same recipe and
the same class names as this run. The directory's files appear only after everything is built
(`create`); a start that fails before its first checkpoint removes what it wrote into a directory that held
no run, so the corrected command starts there as if nothing had happened.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from usi import recipe as recipe_mod
from usi.errors import UsageError, quote
from usi.recipe import Recipe
from usi.runtime import distributed, files
from usi.runtime.progress import LOG_FILE
from usi.training import checkpoint

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
RECIPE_FILE = "recipe.yaml"
VERSIONS_FILE = "versions.json"  # one entry per start: what each invocation ran on
LOCK_FILE = ".lock"
# every name usi writes in a run directory (the trackers' too: usi/training/tracking.py), and how: a link
# there is refused; "in place": appended or rewritten, not replaced (a hard link is refused too)
OWN = {LOCK_FILE: "in place", LOG_FILE: "in place", RECIPE_FILE: "file", VERSIONS_FILE: "file",
       METRICS_FILE: "file", SUMMARY_FILE: "file", checkpoint.LAST: "file", checkpoint.BEST: "file",
       "wandb-id": "file", "tensorboard": "folder", "wandb": "folder"}


class RunLock:
    """An exclusive flock on run_dir/.lock, held until released or the process ends (even by kill -9)."""

    def __init__(self, run_dir: Path):
        self.run_dir, self.file, self.made = run_dir, None, []
        self.fresh = False  # the directory held no run when locked: what a failed start wrote there goes

    def acquire(self) -> "RunLock":
        if not self.run_dir.exists():
            check_writable(self.run_dir)
            # every folder made here, deepest first: a failed start removes them all again
            self.made = [p for p in (self.run_dir, *self.run_dir.parents) if not p.exists()]
            try:
                self.run_dir.mkdir(parents=True)
            except OSError as e:
                self.made = [p for p in self.made if p.exists()]
                self.release(failed=True)
                raise UsageError(f"run directory {self.run_dir} cannot be created ({e.strerror})") from None
        elif not self.run_dir.is_dir():
            raise UsageError(f"run.dir {self.run_dir} is a file, not a directory")
        path = self.run_dir / LOCK_FILE
        try:
            check_own_names(self.run_dir, [LOCK_FILE])
            self.file = files.open_own(path, "a+")  # never through a link: the lock line would overwrite its target
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            holder = self.file.read().strip() or "another process"
            self.file.close()
            self.file = None
            raise UsageError(f"run directory {self.run_dir} is in use by {holder}; wait for it to end or choose "
                             f"another run.dir") from None
        except UsageError:
            self.release(failed=True)
            raise
        except OSError as e:
            self.release(failed=True)
            raise UsageError(f"run directory {self.run_dir} cannot be locked ({e.strerror})") from None
        self.file.truncate(0)
        self.file.write(f"usi pid {os.getpid()}\n")
        self.file.flush()
        self.fresh = not holds_run(self.run_dir)
        return self

    def release(self, failed: bool = False) -> bool:
        """Unlock. After a failed start: if the directory held no run before it and nothing is recorded yet
        (no checkpoint, no best weights), remove what the start wrote, then the folders made for the lock.
        Whether files were removed."""
        removed = failed and self.fresh and not any((self.run_dir / n).exists() for n in (checkpoint.LAST,
                                                                                          checkpoint.BEST))
        if removed:
            remove_own(self.run_dir)
        if self.file is not None:
            (self.run_dir / LOCK_FILE).unlink(missing_ok=True)
            self.file.close()
            self.file = None
        if failed:
            for folder in self.made:  # deepest first; one that something else wrote into stays
                try:
                    folder.rmdir()
                except OSError:
                    break
        return removed


def remove_own(run_dir: Path) -> None:
    """usi's own files and folders (never a link's target: links were refused), and temporaries."""
    for name, kind in OWN.items():
        path = run_dir / name
        if name == LOCK_FILE or files.not_own(path, folder=kind == "folder"):
            continue  # the lock goes with release; anything else stays as found
        if kind == "folder" and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    files.remove_stale_temporaries(run_dir)


def check_own_names(run_dir: Path, names=OWN) -> None:
    """No name usi writes in the run directory may be a link (or a folder where a file goes, ...)."""
    for name in names:
        kind = OWN[name]
        problem = files.not_own(run_dir / name, folder=kind == "folder", in_place=kind == "in place")
        if problem:
            raise UsageError(f"run directory {run_dir}: {name} {problem}; usi writes only its own plain files "
                             f"there, never through a link: remove it or choose another run.dir")


def holds_run(run_dir: Path) -> bool:
    return run_dir.is_dir() and any(p.name != LOCK_FILE for p in run_dir.iterdir())


def plan(recipe: Recipe, lock: bool = True) -> tuple[Path, Path | None, RunLock | None]:
    """(the run directory, the checkpoint to resume from or None, the held lock). Writes nothing but the
    lock; `lock`: take it (rank 0 does, for the whole run)."""
    run_dir = recipe.run_dir()
    held = RunLock(run_dir).acquire() if lock else None
    try:
        return run_dir, resume_source(recipe, run_dir), held
    except BaseException:
        if held is not None:
            held.release(failed=True)
        raise


def resume_source(recipe: Recipe, run_dir: Path) -> Path | None:
    check_own_names(run_dir)  # before anything in it is read
    existing = holds_run(run_dir)
    if recipe.run.resume == "never":
        if existing:
            raise UsageError(f"run directory {run_dir} already holds a run; pass run.resume=auto to continue it "
                             f"or choose another run.dir")
        resume_from = None
    else:
        if existing and not (run_dir / RECIPE_FILE).is_file():  # a run writes recipe.yaml before anything else
            raise UsageError(f"run directory {run_dir} holds files but no usi run (no {RECIPE_FILE}); it is never "
                             f"written into: choose another run.dir")
        if existing:
            check_same_recipe(recipe, recipe_mod.read_yaml(run_dir / RECIPE_FILE), f"cannot resume {run_dir}",
                              resuming=True)
        last = run_dir / checkpoint.LAST
        resume_from = (last if last.is_file() else None) if recipe.run.resume == "auto" else Path(recipe.run.resume)
    check_writable(run_dir)
    return resume_from


def check_writable(run_dir: Path, what: str = "run directory") -> None:
    """The nearest existing ancestor must be a writable directory (checked before any heavy work)."""
    parent = run_dir
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{what} {run_dir} cannot be created: {parent} is not a writable directory")


def check_out(out: Path, what: str = "--out") -> None:
    """A folder a command writes into (a tool's --out): one line for what can never be one."""
    if not str(out) or str(out) == ".":
        raise UsageError(f"{what} must name a folder")
    if out.is_symlink() and not out.exists():
        raise UsageError(f"{what} {out} is a symbolic link to nothing ({os.readlink(out)})")
    if out.exists() and not out.is_dir():
        raise UsageError(f"{what} {out} is a file, not a folder")
    check_writable(out, what)


def check_same_recipe(recipe: Recipe, saved_tree: dict, what: str, remedy: str = "use another run.dir",
                      resuming: bool = False) -> None:
    """The saved recipe (parsed YAML) must equal this one, except for the resume_free fields; `remedy` ends
    the line (what the command that asked lets a user do about it). `resuming` (usi train continuing the
    run): sched.epochs may differ too, as timm's train.py allows (the ledger checks it against the epochs
    done), and teacher.soft_labels (a store moved, copied to a node's disk, or the live teacher instead: the
    store's facts are checked against the run's at start)."""
    saved = recipe_mod.from_dict(saved_tree).to_dict()
    free = recipe_mod.resume_free_keys() | ({("sched", "epochs"), ("teacher", "soft_labels")} if resuming else set())
    for section, values in recipe.to_dict().items():
        for key, value in values.items():
            if (section, key) not in free and saved.get(section, {}).get(key) != value:
                raise UsageError(f"{what}: {section}.{key} was {quote(saved[section][key])}, now {quote(value)}; "
                                 f"{remedy}")


def create(recipe: Recipe, run_dir: Path, dist: distributed.Dist, versions: dict) -> None:
    """Only once everything is built and checked: a failed start leaves nothing behind."""
    distributed.barrier()  # every rank has looked at the directory before rank 0 writes to it
    if dist.main:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=run_dir):  # a new file of no name a link could stand at
                pass
        except OSError as e:
            raise UsageError(f"run directory {run_dir} is not writable ({e.strerror})") from None
        files.remove_stale_temporaries(run_dir)  # a writer killed mid-write; we hold the lock
        files.atomic_write(run_dir / RECIPE_FILE, lambda tmp: recipe.save(tmp))
        path = run_dir / VERSIONS_FILE
        try:
            starts = json.loads(path.read_text()) if path.is_file() else []
        except (OSError, ValueError):
            starts = []  # a damaged record of earlier starts is started again
        starts.append({"started": time.strftime("%Y-%m-%d %H:%M:%S"), "world": dist.world, **versions})
        files.atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(starts, indent=1)))
    distributed.barrier()




def append_metrics(run_dir: Path, record: dict) -> None:
    with files.open_own(run_dir / METRICS_FILE) as f:
        f.write(json.dumps(files.json_safe(record)) + "\n")


def write_metrics(run_dir: Path, history: list[dict]) -> None:
    """metrics.jsonl as the checkpoint's history says: a crash between the checkpoint and the append
    (or during the append) leaves nothing that a resume keeps."""
    text = "".join(json.dumps(files.json_safe(record)) + "\n" for record in history)
    files.atomic_write(run_dir / METRICS_FILE, lambda tmp: Path(tmp).write_text(text))


def read_summary(run_dir: Path) -> dict | None:
    """The finished run's summary; None when there is none or it is unreadable (it is rebuilt from
    last.pt: the checkpoint, not this file, is the record)."""
    path = Path(run_dir) / SUMMARY_FILE
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (ValueError, OSError):
        return None


def write_summary(run_dir: Path, summary: dict) -> None:
    text = json.dumps(files.json_safe(summary), indent=2)
    files.atomic_write(run_dir / SUMMARY_FILE, lambda tmp: Path(tmp).write_text(text))

"""The studies' one policy for their training runs: where they go, when one is reused, resumed or
trained, what the console says, and the pool that runs them. quickstart, fidelity and table use it.

Layout under --out: each run is a usi run directory <runs>/<name>/, its own output in <runs>/<name>.log
beside it; <runs> is <out>/seed<N> for the seeded studies on generated data (<out>/data), <out> itself
for `usi table`; a study's results are <out>/<stem>.{md,csv,png} (usi/studies/table.py writes them).

Deciding what to do with a run; the order is important:
  1. --rerun: the run directory is removed and the run trains afresh.
  2. A finished run (summary.json) is reused only when the recipe it recorded (recipe.yaml) is the recipe
     the study asks for now, resume_free fields aside (usi.training.rundir.check_same_recipe); one of
     another recipe is refused in one line naming the key that differs, never silently reused.
  3. An unfinished run (a recipe.yaml, no summary) is resumed from its last.pt, under the same rule.
  4. Anything else trains from scratch.
A job's recipe is built, and the decision made, when the jobs it needs are done (a student's teacher
weights exist only then), in the main process; the console gets one line per decision and one per run
that ends.
"""
from __future__ import annotations

import copy
import json
import shutil
import signal
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Executor, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from usi import recipe as recipe_mod
from usi.data.synthetic import make_dataset
from usi.distill.soft_labels import read_manifest
from usi.errors import UsageError, printable, shorten
from usi.recipe import Recipe
from usi.runtime import files
from usi.studies.launch import Children, launcher
from usi.training.rundir import RECIPE_FILE, check_same_recipe, check_writable, read_summary


@dataclass
class Job:
    name: str
    tree: dict  # the recipe as data: parsed YAML with the study's settings in place
    needs: tuple[str, ...] = ()  # jobs that must be done first (e.g. the teacher whose weights it reads)
    command: str = "train"  # the usi command: train, or soft-labels (a store, written into the run's folder)
    args: tuple[str, ...] = ()  # more arguments of that command (soft-labels: --top-k K)
    note: str = ""  # how the study runs it, for its table (e.g. why it does not read a shared store)


@dataclass
class Outcome:
    summary: dict | None  # the run's summary.json; None when it did not finish
    reused: bool = False
    failure: str = ""  # why it did not finish (only studies that keep going record one)


class RunFailed(Exception):
    """A run that ended without finishing; the message says why, in one line."""


def settings(tree: dict, *layers: dict | list[str]) -> dict:
    """A copy of a recipe tree with each layer set in turn, later ones winning: {"section.key": value}
    (the study's settings, as data) or `section.key=value` strings (what a user typed)."""
    tree = copy.deepcopy(tree)
    for layer in layers:
        pairs = layer.items() if isinstance(layer, dict) else map(recipe_mod.parse_override, layer)
        for key, value in pairs:
            recipe_mod.set_dotted(tree, key, copy.deepcopy(value))
    return tree


def as_overrides(values: dict) -> list[str]:
    """`section.key=value` for commands that take overrides (usi eval); each value written by json (a
    subset of YAML), so a path with ':' or '#' in it stays one string."""
    return [f"{key}={json.dumps(value)}" for key, value in values.items()]


def log_file(run_dir: Path) -> Path:
    return run_dir.parent / f"{run_dir.name}.log"  # not with_suffix: a model name may hold a dot


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


def recipe_for(job: Job, run_dir: Path, rerun: bool) -> Recipe:
    resume = "never" if rerun or not run_dir.exists() else "auto"
    return recipe_mod.from_tree(settings(job.tree, {"run.dir": str(run_dir), "run.resume": resume}))


def decide(recipe: Recipe, run_dir: Path, rerun: bool) -> str:
    """'reuse', 'resume' or 'train', by the rule in this module's docstring."""
    if rerun:
        return "train"
    finished = read_summary(run_dir) is not None
    if not finished and not (run_dir / RECIPE_FILE).is_file():
        return "train"
    what = (f"{run_dir} is a finished run of another recipe" if finished else f"cannot resume {run_dir}")
    check_same_recipe(recipe, recipe_mod.read_yaml(run_dir / RECIPE_FILE), what,
                      remedy="pass --rerun to train it again, or another --out")
    return "reuse" if finished else "resume"


def store_top_k(job: Job) -> int | None:
    """The top-K a store job asks for (its --top-k), None for every class."""
    args = list(job.args)
    return int(args[args.index("--top-k") + 1]) if "--top-k" in args else None


def other_top_k(manifest: dict | None, job: Job) -> bool:
    """A store (complete or stopped part-way) of another K than the job asks for."""
    if not manifest:
        return False
    return manifest.get("top_k") != (store_top_k(job) or manifest.get("classes"))


def store_done(recipe: Recipe, folder: Path, job: Job) -> bool:
    """A soft-label store job is reused when complete, of the K it asks for, and written for this recipe
    (recorded beside it when it completed); anything else runs `usi soft-labels`, which resumes it or
    refuses a store of other facts."""
    saved, manifest = store_recipe(folder), read_manifest(folder)
    if manifest is None or manifest.get("complete") is not True or not saved.is_file() or other_top_k(manifest, job):
        return False
    try:
        check_same_recipe(recipe, recipe_mod.read_yaml(saved), str(folder))
    except UsageError:
        return False
    return True


def store_recipe(folder: Path) -> Path:
    return folder.parent / f"{folder.name}.recipe.yaml"


def open_run(job: Job, run_dir: Path, rerun: bool) -> tuple[Recipe, str]:
    """(the job's recipe, what to do with its run: decide's answer); a rerun's old directory is removed."""
    recipe = recipe_for(job, run_dir, rerun)
    if job.command != "train":
        verb = "reuse" if not rerun and store_done(recipe, run_dir, job) else "train"
    else:
        verb = decide(recipe, run_dir, rerun)
    if rerun and run_dir.exists():
        shutil.rmtree(run_dir)
    return recipe, verb


def run_here(job: Job, run_dir: Path, rerun: bool) -> dict:
    """One job in this process by the same policy, without pool or console line: its summary."""
    recipe, verb = open_run(job, run_dir, rerun)
    if verb == "reuse":
        return read_summary(run_dir)
    from usi.training.loop import train  # only where a run trains

    return train(recipe)


ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # a slot of one core: the same bits on every machine


class Stopped(Exception):
    """A run that a signal stopped (its checkpoint written): the study starts nothing new."""


def last_error(log: Path) -> str:
    """The line of a run's log that says why it failed."""
    lines = [line for line in log.read_text(errors="replace").strip().splitlines() if line.strip()]
    errors = [line for line in lines if "usi: error" in line or "Error" in line]
    return shorten((errors or lines or ["no output"])[-1].strip(), 300)


def train_child(children: Children, nproc: int, recipe: Recipe, log: Path) -> dict:
    """One run through `usi train` (under torchrun for nproc > 1) in a child process of a free slot, its
    output appended to its log: its summary, RunFailed with the error's line, or Stopped."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "recipe.yaml"
        recipe.save(path)
        t0 = time.time()
        code = children.run(launcher(nproc) + ["train", str(path)], log)
        add_seconds(Path(recipe.run.dir), time.time() - t0)
    summary = read_summary(Path(recipe.run.dir))
    if code != 0 and summary is None and children.stopping:  # whatever its code: it may have died of the signal
        raise Stopped(f"stopped by {signal.Signals(children.stopping).name}")
    if code != 0 and summary is None:
        raise RunFailed(last_error(log))
    return summary or {}  # finished (a signal just after its summary.json changes nothing)


def store_child(children: Children, nproc: int, job: Job, *, recipe: Recipe, log: Path) -> dict:
    """A soft-label store job through `usi soft-labels` into its run folder, as train_child runs a run; its
    recipe is recorded beside the store once complete (store_done)."""
    folder = Path(recipe.run.dir)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "recipe.yaml"
        recipe.save(path)
        t0 = time.time()
        code = children.run(launcher(nproc) + [job.command, str(path), "--out", str(folder), *job.args], log)
        add_seconds(folder, time.time() - t0)
    if code != 0 and children.stopping:
        raise Stopped(f"stopped by {signal.Signals(children.stopping).name}")
    if code != 0:
        raise RunFailed(last_error(log))
    recipe.save(store_recipe(folder))
    return {}


def seconds_file(run_dir: Path) -> Path:
    return run_dir.parent / f"{run_dir.name}.seconds"


def add_seconds(run_dir: Path, seconds: float) -> None:
    """The wall time of the run's processes, start-up included, summed over every start (a resume adds)."""
    text = f"{spent_seconds(run_dir) + seconds:.1f}\n"
    files.atomic_write(seconds_file(run_dir), lambda tmp: Path(tmp).write_text(text))  # never through a link


def spent_seconds(run_dir: Path) -> float:
    try:
        return float(seconds_file(run_dir).read_text())
    except (OSError, ValueError):
        return 0.0


def run_children(jobs: list[Job], runs: Path, *, envs: list[dict], nproc: int = 1,
                 then: Callable[[Children, Path], object] | None = None, **how) -> dict[str, Outcome]:
    """run_all with each run a child process in one of `envs`' slots (launch.slot_envs); then(children,
    run_dir) follows each run that finished, in the same worker (an evaluation, say). A signal reaches
    every child, each checkpoints, and Interrupted is raised once all have ended."""
    children = Children(envs)
    by_dir = {str(runs / j.name): j for j in jobs}

    def work(recipe: Recipe, log: Path) -> dict:
        job = by_dir.get(recipe.run.dir)
        if job is not None and job.command != "train":
            return store_child(children, nproc, job, recipe=recipe, log=log)
        summary = train_child(children, nproc, recipe, log)
        if then is not None:
            then(children, Path(recipe.run.dir))
        return summary

    with children.forwarding(), ThreadPoolExecutor(len(envs)) as pool:
        return run_all(jobs, runs, pool=pool, workers=len(envs), work=work, halted=lambda: bool(children.stopping),
                       **how)


def run_all(jobs: list[Job], runs: Path, *, pool: Executor, workers: int, rerun: bool, tag: str, start: float,
            work: Callable[[Recipe, Path], dict], keep_going: bool = False,
            halted: Callable[[], bool] = lambda: False) -> dict[str, Outcome]:
    """{name: outcome} of every job, `workers` at a time, each as soon as the jobs it needs are done, in
    the order given otherwise. work(recipe, log) trains one run in the pool and returns its summary.
    keep_going: a job that cannot start or fails is recorded with its reason (else it raises). halted():
    true once a signal arrived: nothing new is opened."""
    outcomes: dict[str, Outcome] = {}
    waiting, queued, stopped = {}, list(jobs), False

    def say(text: str) -> None:
        print(f"[{tag}] {time.time() - start:4.0f} s  {printable(text)}", flush=True)

    def begin(job: Job) -> None:
        run_dir = runs / job.name
        try:
            recipe, verb = open_run(job, run_dir, rerun)
        except UsageError as e:
            if not keep_going:
                raise
            outcomes[job.name] = Outcome(None, failure=str(e))
            say(f"{job.name} cannot start: {e}")
            return
        if verb == "reuse":
            outcomes[job.name] = Outcome(read_summary(run_dir), reused=True)
            say(f"reusing {job.name}: already finished{best(outcomes[job.name].summary)}")
            return
        say(f"training {job.name}" + (" (resuming its last checkpoint)" if verb == "resume" else ""))
        waiting[pool.submit(work, recipe, log_file(run_dir))] = job.name

    def start_ready() -> None:
        while len(waiting) < workers and not stopped and not halted():
            job = next((j for j in queued if all(n in outcomes for n in j.needs)), None)
            if job is None:
                return
            queued.remove(job)
            failed = next((n for n in job.needs if outcomes[n].failure), None)
            if failed is not None and keep_going:  # its teacher or store is not there: it would only fail
                outcomes[job.name] = Outcome(None, failure=f"not run: {failed} did not finish")
                say(f"{job.name} not run: {failed} did not finish")
                continue
            begin(job)

    start_ready()
    while waiting:
        done, _ = wait(waiting, return_when=FIRST_COMPLETED)
        for future in done:
            name = waiting.pop(future)
            try:
                outcomes[name] = Outcome(future.result())
            except Stopped as e:
                outcomes[name], stopped = Outcome(None, failure=str(e)), True
                continue
            except (RunFailed, UsageError) as e:
                if not keep_going:
                    raise
                outcomes[name] = Outcome(None, failure=str(e))
                say(f"{name} failed: {e} (log: {log_file(runs / name)})")
                continue
            say(f"{name} done{best(outcomes[name].summary)} (log: {log_file(runs / name)})")
        start_ready()
    if queued and not stopped and not halted():  # a name in `needs` that no job has
        raise ValueError(f"jobs never ready: {', '.join(j.name for j in queued)}")
    return outcomes


def best(summary: dict | None) -> str:
    value = ((summary or {}).get("best") or {}).get("value")
    return f": best top-1 {value:.1f}" if isinstance(value, (int, float)) else ""


def summaries(outcomes: dict[str, Outcome]) -> dict[str, dict]:
    return {name: o.summary for name, o in outcomes.items()}


def reused(outcomes: dict[str, Outcome]) -> int:
    return sum(o.reused for o in outcomes.values())


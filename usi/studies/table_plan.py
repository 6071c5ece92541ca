"""`usi table FILE --plan`: the table's runs as launch commands and a Slurm job array, run by nothing here.

Writes under <out>/plan/:
  <run>.yaml           each run's whole recipe (run.dir set, run.resume=auto: a rerun or a requeue resumes)
  teacher.txt          the teacher's command, when the table trains its own teacher
  runs.txt             one command per student run (torchrun when a run has several processes)
  slurm-teacher.sh     the teacher as one Slurm job
  slurm.sh             the students as a Slurm job array, one task per line of runs.txt
  soft-labels.txt      share_teacher: one `usi soft-labels` command per seed's store, and
  slurm-soft-labels.sh its Slurm array: after the teacher, before the students
  submit.sh            submits them, each stage after the one before has finished
Each array task execs its command, so Slurm's SIGTERM (preemption, --signal before the time limit)
reaches torchrun and the run checkpoints; --requeue puts it back in the queue, where it resumes.
`usi table FILE --collect` then builds the table from the runs that finished.
"""
from __future__ import annotations

import shlex
from pathlib import Path

import yaml

from usi import recipe as recipe_mod
from usi.studies.jobs import Job, settings
from usi.studies.shared_store import STORE

ARRAY = """#!/bin/bash
#SBATCH --job-name={name}
#SBATCH --array=0-{last}
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node={nproc}
#SBATCH --cpus-per-task={cpus}
#SBATCH --requeue
#SBATCH --signal=B:TERM@300
#SBATCH --output={logs}/%x-%A_%a.out
# One task per line of {commands}; each resumes its run after a requeue (run.resume=auto).
set -euo pipefail
cd {cwd}
line=$(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" {commands})
eval "exec $line"
"""


def command(nproc: int, recipe_file: Path, job: Job | None = None, out: Path | None = None) -> str:
    launch = "python -m usi" if nproc <= 1 else f"torchrun --standalone --nproc_per_node={nproc} -m usi"
    if job is None or job.command == "train":
        return f"{launch} train {shlex.quote(str(recipe_file))}"
    rest = ["--out", str(out / job.name), *job.args]  # a store: written into its run folder
    return f"{launch} {job.command} {shlex.quote(str(recipe_file))} {' '.join(map(shlex.quote, rest))}"


def checked_tree(job: Job, out: Path, pending_teacher: bool) -> dict:
    """The job's recipe as it will run, checked. A KD run's teacher weights that the plan's own teacher
    run will write do not exist yet, nor the soft-label store it reads: those keys are left out of the check."""
    tree = settings(job.tree, {"run.dir": str(out / job.name), "run.resume": "auto"})
    pending = {"teacher.weights": None} if pending_teacher and job.needs else {}
    pending |= {"teacher.soft_labels": None} if any(n.endswith(f"/{STORE}") for n in job.needs) else {}
    recipe_mod.from_tree(settings(tree, pending))
    return tree


def recipe_file(name: str, tree: dict, plan_dir: Path) -> Path:
    path = plan_dir / f"{name.replace('/', '-')}.yaml"
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def write_plan(todo: list[Job], out: Path, *, nproc: int, cpus: int = 8) -> list[Path]:
    """Every file of the plan (this module's docstring); the paths written."""
    pending = any(j.name == "teacher" for j in todo)
    trees = {j.name: checked_tree(j, out, pending) for j in todo}  # a bad run is refused before any file
    plan_dir = out / "plan"
    plan_dir.mkdir(parents=True, exist_ok=True)
    by_name = {j.name: j for j in todo}
    lines = {name: command(nproc, recipe_file(name, tree, plan_dir).resolve(), by_name[name], out)
             for name, tree in trees.items()}
    teacher = lines.pop("teacher", None)
    stores = [lines.pop(j.name) for j in todo if j.command != "train"]
    written = [plan_dir / "runs.txt", plan_dir / "slurm.sh", plan_dir / "submit.sh"]
    (plan_dir / "runs.txt").write_text("\n".join(lines.values()) + "\n")
    common = {"nproc": nproc, "cpus": cpus, "logs": shlex.quote(str(plan_dir.resolve())),
              "cwd": shlex.quote(str(Path.cwd()))}
    (plan_dir / "slurm.sh").write_text(ARRAY.format(name="usi-table", last=len(lines) - 1,
                                                    commands=shlex.quote(str((plan_dir / "runs.txt").resolve())),
                                                    **common))
    submit = ["#!/bin/bash", "set -euo pipefail", f"cd {shlex.quote(str(plan_dir.resolve()))}"]
    after = ""  # the dependency of the next stage
    for stage, stage_lines in (("teacher", [teacher] if teacher else []), ("soft-labels", stores)):
        if not stage_lines:
            continue
        (plan_dir / f"{stage}.txt").write_text("\n".join(stage_lines) + "\n")
        (plan_dir / f"slurm-{stage}.sh").write_text(ARRAY.format(
            name=f"usi-{stage}", last=len(stage_lines) - 1,
            commands=shlex.quote(str((plan_dir / f"{stage}.txt").resolve())), **common))
        variable = stage.replace("-", "_")
        submit += [f"{variable}=$(sbatch --parsable {after}slurm-{stage}.sh)"]
        after = f"--dependency=afterok:${{{variable}}} "
        written += [plan_dir / f"{stage}.txt", plan_dir / f"slurm-{stage}.sh"]
    submit += [f"sbatch {after}slurm.sh"]
    (plan_dir / "submit.sh").write_text("\n".join(submit) + "\n")
    return written

"""`usi table`: the architecture-agnostic table as a job users plan, run, stop, resume and publish.

  usi table recipes/tables/imagenette.yaml             # a table file (usi/studies/table_spec.py)
  usi table recipes/tables/imagenette.yaml --plan      # launch commands and a Slurm array, nothing run
  usi table recipes/tables/imagenette.yaml --collect   # the table from the runs that have finished
  usi table usi --models resnet50 vit_small_patch16_224 --seeds 0 1 2 data.root=/data/imagenet

Each seed x model x (KD, no KD) is one `usi train` run in a child process, `jobs` at a time (the CPU
cores split between them, or jobs x nproc GPUs), reused when it finished with the same recipe and
resumed when it did not (usi/studies/jobs.py). SIGTERM/Ctrl-C stops every run with a checkpoint;
the same command resumes. A model that fails leaves its row a note. Every student's best weights
are evaluated against the teacher (`usi eval`, kept beside the run). Rows give mean +- standard error
over seeds, the gain from paired seeds (usi/studies/aggregate.py), and each run's provenance in
table.json; table.md, table.csv and table.png beside it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from usi import recipe as recipe_mod
from usi.distill.soft_labels import read_manifest
from usi.errors import UsageError, file_problem, printable
from usi.recipe.loading import RECIPES
from usi.runtime import files
from usi.runtime.preempt import raising_interrupted
from usi.studies import aggregate, jobs, table, table_plan, table_spec
from usi.studies.launch import Children, cores, launcher, slot_envs
from usi.studies.table_rows import build_rows, cells, results, runs_of
from usi.studies.table_spec import KINDS, Row, TableSpec
from usi.training.checkpoint import BEST
from usi.training.rundir import RECIPE_FILE, check_writable, read_summary

DEFAULT_MODELS = ["resnet50", "mobilenetv3_large_100", "efficientnet_b0", "vit_small_patch16_224", "levit_384",
                  "convnext_small", "mixer_b16_224"]
COLUMNS = ["model", "kind", "family", "params_m", "gmacs", "top1_nokd", "top1_kd", "gain", "expect",
           "agreement_nokd", "agreement_kd", "kl_kd", "ece_nokd", "ece_kd", "nll_nokd", "nll_kd", "infer_img_s",
           "train_proc_s", "train_gpu_h", "seeds_nokd", "seeds_kd", "selection", "deviates", "note"]
CSV_EXTRA = ["timm_name", "top1_nokd_se", "top1_kd_se", "gain_se", "paired_seeds", "vs_expected", "infer_precision",
             "input_size"]


def table_file(source: str) -> Path | None:
    """The table file `source` names (a path, or a built-in table such as `imagenette`), None for a recipe."""
    builtin = RECIPES / "tables" / f"{source}.yaml"
    if not Path(source).exists() and "/" not in source and builtin.is_file():
        return builtin
    path = Path(source)
    if path.suffix not in (".yaml", ".yml") or not path.is_file():
        return None
    tree = recipe_mod.read_yaml(path, "table file")
    # a table file by any key of its own ("teacher" is a recipe section too): a typo's message is then the
    # table file's, and a recipe with no table key stays the shorthand's recipe
    return path if isinstance(tree, dict) and set(tree) & (table_spec.KEYS - {"teacher"}) else None


def spec_from(args: argparse.Namespace) -> TableSpec:
    """The table file, or the shorthand RECIPE --models ...; flags given on the command line win."""
    path = table_file(args.source)
    if path is not None:
        spec = table_spec.load(path)
        if args.models:
            raise UsageError("--models is for the shorthand `usi table RECIPE --models ...`; a table file lists "
                             "its models under models:")
    else:
        spec = TableSpec(recipe=args.source, rows=[Row(m, m) for m in args.models or DEFAULT_MODELS])
    for flag in ("kd", "jobs", "nproc", "out"):
        if getattr(args, flag) is not None:
            setattr(spec, flag, getattr(args, flag))
    if args.seeds is not None:
        spec.seeds = table_spec.check_seeds("--seeds", args.seeds)
    if spec.jobs < 1 or spec.nproc < 1:
        raise UsageError("--jobs and --nproc must be at least 1")
    if not str(spec.out) or str(spec.out) == ".":
        raise UsageError("--out must name a folder for the table's runs")
    table_spec.check_owned("the command line's overrides", args.overrides)
    if spec.teacher is not None:
        teacher_keys = [o for o in args.overrides if o.startswith("teacher.")] + \
            [k for k in spec.overrides if k.startswith("teacher.")]
        if teacher_keys:
            raise UsageError(f"{teacher_keys[0].split('=')[0]}: the table trains its own teacher (teacher:); set "
                             f"it there")
    return spec


def sized(spec: TableSpec, runs: int, gpus: int) -> None:
    """jobs and nproc within the machine: jobs capped at the runs and the cores (or GPUs), with a line."""
    if not gpus and spec.nproc > cores():
        raise UsageError(f"nproc={spec.nproc} processes per run on {cores()} CPU cores; use nproc <= {cores()}")
    most = min(runs, gpus // spec.nproc if gpus else max(1, cores() // spec.nproc))
    if spec.jobs > most:
        print(f"[table] jobs={spec.jobs} capped to {most} ({runs} runs, "
              f"{f'{gpus} GPUs' if gpus else f'{cores()} CPU cores'})", flush=True)
        spec.jobs = max(1, most)


def checked_base(spec: TableSpec, overrides: list[str], here: bool = True):
    """The shared recipe with the table's overrides, checked once: a bad value fails here, before any run;
    `here` (not --plan): the data and --out must be usable on this machine too."""
    tree = jobs.settings(recipe_mod.read_yaml(recipe_mod.recipe_path(spec.recipe)), spec.overrides)
    base = recipe_mod.from_tree(tree, overrides)
    if here and base.data.format == "folder" and not os.path.isdir(os.path.join(base.data.root, base.data.train_split)):
        raise UsageError(f"data.root={printable(str(base.data.root))[:200]} has no {base.data.train_split}/ folder "
                         f"here; set data.root (or plan the runs for another machine with --plan)")
    check_writable(spec.out, "out")
    if spec.kd != "off" and spec.teacher is None and not base.kd:
        raise UsageError(f"kd={spec.kd} needs a teacher: the recipe {spec.recipe} has none; set teacher: in the "
                         f"table file or teacher.name=... (or kd: off)")
    return base


def teacher_overrides(spec: TableSpec, base) -> dict:
    """What `usi eval` needs to measure a student against the table's teacher (paths only from here)."""
    if spec.kd == "off":
        return {}
    if spec.teacher is not None:
        return table_spec.teacher_settings(spec)
    t = base.teacher
    return {"teacher.name": t.name, "teacher.weights": t.weights, "teacher.kwargs": t.kwargs,
            "teacher.extra": t.extra, "teacher.combine": t.combine}


def data_overrides(base) -> dict:
    """`usi eval` takes data paths from its command line only, never from a checkpoint."""
    d = base.data
    out = {"data.root": d.root, "data.val_split": d.val_split, "run.device": base.run.device}
    return out | ({"data.val_shards": d.val_shards} if d.val_shards else {})


def evaluate(children: Children, nproc: int, run_dir: Path, overrides: list[str]) -> dict | None:
    """`usi eval` of the run's best weights (the whole report), kept beside the run and reused while the
    weights and the arguments are the same."""
    ckpt = run_dir / BEST
    if not ckpt.is_file():
        return None
    args = ["eval", str(ckpt), *overrides, "--json"]
    # the teacher's file too: a student measured against another teacher file is measured again
    teacher = next((json.loads(o.split("=", 1)[1]) for o in overrides if o.startswith("teacher.weights=")), None)
    key = {"args": args, "weights": [ckpt.stat().st_size, ckpt.stat().st_mtime_ns],
           "teacher": [os.stat(teacher).st_size, os.stat(teacher).st_mtime_ns] if teacher else None}
    saved = run_dir.parent / f"{run_dir.name}.eval.json"
    if saved.is_file():
        cached = json.loads(saved.read_text())
        if cached.get("key") == key and "report" in cached:
            return cached["report"]
    with tempfile.TemporaryDirectory() as tmp:  # a fresh name: never a link planted beside the run
        out = Path(tmp) / "report.json"
        if children.run(launcher(nproc) + args, jobs.log_file(run_dir), stdout=out) != 0:
            return None
        report = json.loads(out.read_text())
    files.atomic_write(saved, lambda tmp: Path(tmp).write_text(json.dumps({"key": key, "report": report})))
    return report


def collected(spec: TableSpec, todo: list[jobs.Job]) -> dict[str, jobs.Outcome]:
    """--collect: the outcome of each run from its folder alone; a missing one says why."""
    outcomes = {}
    for job in runs_of(todo):
        run_dir = spec.out / job.name
        summary = read_summary(run_dir)
        if summary is None:
            why = "unfinished" if (run_dir / RECIPE_FILE).is_file() else "not started"
            outcomes[job.name] = jobs.Outcome(None, failure=f"missing ({why})")
            continue
        try:
            recipe, _ = jobs.open_run(job, run_dir, rerun=False)
            outcomes[job.name] = jobs.Outcome(summary, reused=True)
        except UsageError as e:
            outcomes[job.name] = jobs.Outcome(None, failure=str(e))
    return outcomes


def old_rows(path: Path) -> list[dict]:
    problem = file_problem(path)
    if problem or path.stat().st_size > 256 << 20:
        raise UsageError(f"--compare {path} {problem or 'is larger than a table.json can be'}")
    try:
        rows = json.loads(path.read_text())["rows"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UsageError(f"--compare {path}: not a usi table.json ({type(e).__name__})") from None
    numbers = ("top1_nokd", "top1_kd", "gain", "top1_nokd_se", "top1_kd_se", "gain_se")
    if not isinstance(rows, list) or not all(
            isinstance(r, dict) and isinstance(r.get("model"), str) and isinstance(r.get("runs", []), list)
            and all(isinstance(run, dict) for run in r.get("runs", []))
            and all(r.get(k) is None or table_spec.finite_number(r.get(k)) for k in numbers) for r in rows):
        raise UsageError(f"--compare {path}: not a usi table.json (its rows are not table rows)")
    return rows


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="usi table", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="a table file (YAML with models:, or a built-in table: imagenette), or a recipe "
                                  "(a built-in name or a path)")
    p.add_argument("overrides", nargs="*", help="section.key=value for every run (not model.name / run.dir)")
    p.add_argument("--models", nargs="+", help="with a recipe: the timm models (default: the paper's seven)")
    p.add_argument("--kd", choices=sorted(KINDS))
    p.add_argument("--seeds", nargs="+", type=int)
    p.add_argument("--jobs", type=int, help="runs at once on this machine (default 1, or the table file's)")
    p.add_argument("--nproc", type=int, help="processes (GPUs) per run")
    p.add_argument("--out", type=Path)
    p.add_argument("--rerun", action="store_true", help="train again even where a finished run exists")
    p.add_argument("--plan", action="store_true", help="write launch commands and a Slurm array; run nothing")
    p.add_argument("--collect", action="store_true", help="the table from finished runs only; train nothing")
    p.add_argument("--compare", type=Path, metavar="OLD_TABLE_JSON", help="say what moved against an older table")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where inference throughput and GMACs are measured")
    # overrides may come before or after the flags, as in `usi train` (and after --models' names)
    args, extra = p.parse_known_args(argv)
    if any("=" not in e or e.startswith("-") for e in extra):
        p.error(f"unrecognized arguments: {' '.join(extra)}")
    models = args.models or []
    args.overrides += [m for m in models if "=" in m] + extra
    args.models = [m for m in models if "=" not in m] or None
    if args.plan and args.collect:
        p.error("--plan and --collect exclude each other")
    return args


def refuse_other_recipes(todo: list[jobs.Job], out: Path) -> None:
    """A finished or unfinished run of another recipe in the table's folders stops the table before
    anything runs (one line naming the key that differs): its results are never replaced by notes."""
    for job in todo:
        if job.command != "train":  # a store of another K: its KD rows trained on other labels
            manifest = read_manifest(out / job.name)
            if jobs.other_top_k(manifest, job):
                raise UsageError(f"{out / job.name} holds a top-{manifest['top_k']} soft-label store, the table asks "
                                 f"for top-{jobs.store_top_k(job) or manifest['classes']}; pass --rerun to write it and "
                                 f"train its KD rows again, or give another out")
            continue
        run_dir = out / job.name
        if not (run_dir / RECIPE_FILE).is_file():
            continue
        try:
            recipe = jobs.recipe_for(job, run_dir, rerun=False)
        except UsageError:  # a run that cannot be built yet (its teacher to come) or at all: its row says why
            continue
        jobs.decide(recipe, run_dir, rerun=False)


def eval_overrides(spec: TableSpec, base) -> list[str]:
    """usi eval's arguments: the data, and the teacher when there is one to measure against (a teacher run
    that failed leaves the no-KD rows measured without it)."""
    teacher = teacher_overrides(spec, base)
    if spec.teacher is not None and teacher and not Path(teacher["teacher.weights"]).is_file():
        teacher = {}
    return jobs.as_overrides(data_overrides(base) | teacher)


def main(argv=None) -> int:
    args = parse(argv)
    start = time.time()
    spec = spec_from(args)
    old = old_rows(args.compare) if args.compare else None  # a bad file fails now, not after the runs
    base = checked_base(spec, args.overrides, here=not args.plan)  # a bad recipe fails here, once
    todo = table_spec.plan(spec, args.overrides)
    if args.plan:
        paths = table_plan.write_plan(todo, spec.out, nproc=spec.nproc)
        print(f"planned {len(todo)} runs; nothing was run. Written: {', '.join(str(p) for p in paths)}\n"
              f"then: bash {spec.out / 'plan' / 'submit.sh'} (or each line of runs.txt), and "
              f"usi table {args.source} --collect")
        return 0
    gpus = torch.cuda.device_count() if base.run.device != "cpu" else 0
    sized(spec, len(todo), gpus)
    envs = slot_envs(spec.jobs, spec.nproc, gpus)
    if not args.rerun:
        refuse_other_recipes(todo, spec.out)

    def evaluated(children: Children, run_dir: Path) -> None:
        """Each student as soon as it is trained, once the table's teacher is final (a teacher still
        training has a best.safetensors already: agreement with it would be agreement with an early one)."""
        teacher_done = spec.teacher is None or read_summary(spec.out / "teacher") is not None
        if run_dir.name != "teacher" and teacher_done:
            evaluate(children, spec.nproc, run_dir, eval_overrides(spec, base))

    if args.collect:
        outcomes = collected(spec, todo)
    else:
        outcomes = jobs.run_children(todo, spec.out, envs=envs, nproc=spec.nproc, then=evaluated, rerun=args.rerun,
                                     tag="table", start=start, keep_going=True)
    finished = [j.name for j in runs_of(todo)
                if j.name != "teacher" and (outcomes.get(j.name) or jobs.Outcome(None)).summary]
    if not finished:
        failures = [f"{n}: {o.failure}" for n, o in outcomes.items() if o.failure]
        raise UsageError(f"no run of the table has finished ({len(failures)} of {len(outcomes)} did not: "
                         f"{printable(failures[0] if failures else 'none started')[:300]}); nothing was written")
    children = Children(envs)
    with children.forwarding(), ThreadPoolExecutor(len(envs)) as pool:
        reports = dict(zip(finished, pool.map(
            lambda name: evaluate(children, spec.nproc, spec.out / name, eval_overrides(spec, base)), finished)))
    with raising_interrupted(lambda name: f"stopped by {name} while measuring the models' costs; the runs are "
                                          f"kept: the same command makes the table"):
        rows = build_rows(spec, base, results(spec, todo, outcomes, reports), torch.device(args.device))
    missing = [n for n, o in outcomes.items() if o.failure.startswith("missing")]
    teacher = (spec.teacher.name if spec.teacher else base.teacher.name) if spec.kd != "off" else "none (kd off)"
    title = spec.title or f"usi table {args.source}: recipe {spec.recipe}, teacher {teacher}"
    title += (f"\n{len(spec.seeds)} seeds {spec.seeds}, {len(runs_of(todo))} runs ({jobs.reused(outcomes)} reused), "
              f"{spec.jobs} at a time x {spec.nproc} processes; top-1 as mean ± standard error over seeds, the gain "
              f"from paired seeds; inference {rows[-1].get('infer_precision') or ''}; {time.time() - start:.0f} s")
    meta = {"spec": {"recipe": spec.recipe, "seeds": spec.seeds, "kd": spec.kd, "jobs": spec.jobs,
                     "nproc": spec.nproc, "overrides": spec.overrides, "cli_overrides": args.overrides,
                     "share_teacher": spec.share_teacher, "top_k": spec.top_k},
            "missing": missing}
    paths = table.write(rows, spec.out, "table", title, columns=COLUMNS + CSV_EXTRA, meta=meta)
    shown = table.markdown(table.filled(COLUMNS, rows), cells(rows))
    table.text_file(paths["md"], f"{title}\n\n{shown}\n")
    table.show(title, shown, paths)
    if missing:
        print(f"missing {len(missing)} of {len(outcomes)} runs: {', '.join(missing[:8])}"
              + (" ..." if len(missing) > 8 else ""))
    if args.compare:
        print(f"\nagainst {args.compare}:\n" + "\n".join(printable(line) for line in aggregate.compare(old, rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

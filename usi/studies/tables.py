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
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from usi import recipe as recipe_mod
from usi.errors import UsageError
from usi.recipe.loading import RECIPES
from usi.runtime import files
from usi.studies import aggregate, jobs, table, table_plan, table_spec
from usi.studies.launch import Children, launcher, slot_envs
from usi.studies.table_spec import KINDS, Row, TableSpec
from usi.training.checkpoint import BEST
from usi.training.rundir import RECIPE_FILE, read_summary

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
    return path if isinstance(tree, dict) and "models" in tree else None


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
        spec.seeds = args.seeds
    if spec.jobs < 1 or spec.nproc < 1:
        raise UsageError("--jobs and --nproc must be at least 1")
    return spec


def checked_base(spec: TableSpec, overrides: list[str]):
    """The shared recipe with the table's overrides, checked once: a bad value fails here, before any run."""
    tree = jobs.settings(recipe_mod.read_yaml(recipe_mod.recipe_path(spec.recipe)), spec.overrides)
    base = recipe_mod.from_tree(tree, overrides)
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
    key = {"args": args, "weights": [ckpt.stat().st_size, ckpt.stat().st_mtime_ns]}
    saved = run_dir.parent / f"{run_dir.name}.eval.json"
    if saved.is_file():
        cached = json.loads(saved.read_text())
        if cached.get("key") == key and "report" in cached:
            return cached["report"]
    out = saved.with_suffix(".out")
    if children.run(launcher(nproc) + args, jobs.log_file(run_dir), stdout=out) != 0:
        return None
    report = json.loads(out.read_text())
    out.unlink()
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


def measured_cost(row: Row, base, num_classes: int, device: torch.device) -> tuple[dict, str]:
    """Params, GMACs and inference speed at the data's class count and the row's own input size."""
    kwargs = dict(row.overrides.get("model.kwargs") or base.model.kwargs or {})
    size = row.overrides.get("data.input_size") or base.data.input_size
    try:
        if size is None:
            size = table.default_size(row.name)
        cost = table.model_cost(row.name, num_classes, int(size), device, **kwargs)
        return {**cost, "input_size": int(size)}, ""
    except Exception as e:  # an unknown name or a failing model: the row still says what happened
        return {}, f"cost: {type(e).__name__}: {str(e)[:120]}"


def results(spec: TableSpec, todo: list[jobs.Job], outcomes: dict, reports: dict) -> dict[str, list[dict]]:
    """{row label: [run records]} of the student runs; the teacher's record under 'teacher'."""
    teacher_sha = aggregate.sha256(Path(table_spec.teacher_settings(spec).get("teacher.weights") or ""))
    by_row = {}
    for job in runs_of(todo):
        if job.name == "teacher":
            continue
        seed, rest = job.name.split("/", 1)
        label, kind = rest.rsplit("-", 1)
        outcome = outcomes.get(job.name) or jobs.Outcome(None, failure="not run")
        report = reports.get(job.name) or {}
        metrics = next(iter((report.get("students") or {}).values()), None)
        by_row.setdefault(label, []).append({
            "name": job.name, "seed": int(seed[4:]), "kd": kind == "kd", "metrics": metrics,
            "summary": outcome.summary, "seconds": jobs.spent_seconds(spec.out / job.name), "failure": outcome.failure or ("" if metrics or not outcome.summary
                                                                       else "evaluation failed"),
            "teacher": report.get("teacher"), "store_note": job.note,
            "provenance": aggregate.provenance(spec.out / job.name, outcome.summary,
                                               teacher_sha if kind == "kd" else None)})
    return by_row


def runs_of(todo: list[jobs.Job]) -> list[jobs.Job]:
    """The training runs of the plan (not its soft-label store jobs)."""
    return [j for j in todo if j.command == "train"]


def store_notes(runs: list[dict]) -> list[str]:
    """Why a row's KD runs used the live teacher instead of the shared store, once per distinct reason."""
    return list(dict.fromkeys(r["store_note"] for r in runs if r.get("store_note")))


def build_rows(spec: TableSpec, base, by_row: dict, device: torch.device) -> list[dict]:
    on_gpu = device.type == "cuda"
    num_classes = next((r["summary"]["num_classes"] for runs in by_row.values() for r in runs
                        if r.get("summary")), 1000)
    rows = []
    teacher_metrics = next((r["teacher"] for runs in by_row.values() for r in runs if r.get("teacher")), None)
    if spec.kd != "off" and (spec.teacher or base.teacher.name):
        t_row = spec.teacher or Row("teacher", base.teacher.name, {"model.kwargs": base.teacher.kwargs})
        cost, note = measured_cost(t_row, base, num_classes, device)
        out = table.row(f"teacher ({t_row.name})", nokd=teacher_metrics, kd=None, cost=cost, note=note,
                        family=table.family_of(t_row.name))
        rows.append(out | {"infer_precision": cost.get("infer_precision"), "input_size": cost.get("input_size")})
    for row in spec.rows:
        runs = by_row.get(row.label, [])
        out = aggregate.student_row(row, runs, kd_kinds=KINDS[spec.kd], tolerance=spec.tolerance)
        cost, note = measured_cost(row, base, num_classes, device)
        family = table.family_of(row.name)
        deviates = table_spec.deviations(row)
        out |= {"kind": table.kind_of(family), "family": family, **cost,
                **aggregate.cost_of(runs, spec.nproc, on_gpu),
                "deviates": ", ".join(f"{k}={json.dumps(v)}" for k, v in deviates.items()),
                "note": "; ".join(n for n in (out["note"], note, *store_notes(runs)) if n)}
        rows.append(out)
    return rows


def cell(value, column: str = "") -> str:
    return table.cell(value, column)


def cells(rows: list[dict]) -> list[dict]:
    """Rows for the markdown: a mean with its standard error as 'm +- se'."""
    shown = []
    for r in rows:
        r = dict(r)
        for key in ("top1_nokd", "top1_kd", "gain"):
            if r.get(key) is not None and r.get(f"{key}_se") is not None:
                r[key] = f"{r[key]:.2f} ± {r[f'{key}_se']:.2f}"
        shown.append(r)
    return shown


def old_rows(path: Path) -> list[dict]:
    try:
        rows = json.loads(path.read_text())["rows"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UsageError(f"--compare {path}: not a usi table.json ({type(e).__name__})") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) and "model" in r for r in rows):
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


def main(argv=None) -> int:
    args = parse(argv)
    start = time.time()
    spec = spec_from(args)
    old = old_rows(args.compare) if args.compare else None  # a bad file fails now, not after the runs
    base = checked_base(spec, args.overrides)  # a bad recipe fails here, once
    todo = table_spec.plan(spec, args.overrides)
    if args.plan:
        paths = table_plan.write_plan(todo, spec.out, nproc=spec.nproc)
        print(f"planned {len(todo)} runs; nothing was run. Written: {', '.join(str(p) for p in paths)}\n"
              f"then: bash {spec.out / 'plan' / 'submit.sh'} (or each line of runs.txt), and "
              f"usi table {args.source} --collect")
        return 0
    envs = slot_envs(spec.jobs, spec.nproc, torch.cuda.device_count() if base.run.device != "cpu" else 0)
    eval_args = jobs.as_overrides(data_overrides(base) | teacher_overrides(spec, base))

    def evaluated(children: Children, run_dir: Path) -> None:  # each student as soon as it is trained
        if run_dir.name != "teacher":
            evaluate(children, spec.nproc, run_dir, eval_args)

    if args.collect:
        outcomes = collected(spec, todo)
    else:
        outcomes = jobs.run_children(todo, spec.out, envs=envs, nproc=spec.nproc, then=evaluated, rerun=args.rerun,
                                     tag="table", start=start, keep_going=True)
    children = Children(envs)
    finished = [j.name for j in runs_of(todo)
                if j.name != "teacher" and (outcomes.get(j.name) or jobs.Outcome(None)).summary]
    with children.forwarding(), ThreadPoolExecutor(len(envs)) as pool:
        reports = dict(zip(finished, pool.map(
            lambda name: evaluate(children, spec.nproc, spec.out / name, eval_args), finished)))
    device = torch.device(args.device)
    rows = build_rows(spec, base, results(spec, todo, outcomes, reports), device)
    missing = [n for n, o in outcomes.items() if o.failure.startswith("missing")]
    reused = jobs.reused(outcomes)
    title = (spec.title or f"usi table {args.source}: recipe {spec.recipe}, teacher "
             f"{spec.teacher.name if spec.teacher else base.teacher.name}")
    title += (f"\n{len(spec.seeds)} seeds {spec.seeds}, {len(todo)} runs ({reused} reused), {spec.jobs} at a time x "
              f"{spec.nproc} processes; top-1 as mean ± standard error over seeds, the gain from paired seeds; "
              f"inference {rows[-1].get('infer_precision') or ''}; {time.time() - start:.0f} s")
    meta = {"spec": {"recipe": spec.recipe, "seeds": spec.seeds, "kd": spec.kd, "jobs": spec.jobs,
                     "nproc": spec.nproc, "overrides": spec.overrides, "cli_overrides": args.overrides},
            "missing": missing}
    paths = table.write(rows, spec.out, "table", title, columns=COLUMNS + CSV_EXTRA, meta=meta)
    paths["md"].write_text(f"{title}\n\n{table.markdown(table.filled(COLUMNS, rows), cells(rows))}\n")
    table.show(title, table.markdown(table.filled(COLUMNS, rows), cells(rows)), paths)
    if missing:
        print(f"missing {len(missing)} of {len(outcomes)} runs: {', '.join(missing[:8])}"
              + (" ..." if len(missing) > 8 else ""))
    if args.compare:
        print(f"\nagainst {args.compare}:\n" + "\n".join(aggregate.compare(old, rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

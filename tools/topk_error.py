"""What a top-K soft-label store changes against the exact teacher, per table row and seed: the KD term's
relative error at every training step, and the final top-1 and agreement.

Per seed, an exact store (K = the class count, `usi soft-labels`) is written once for each group of KD rows
whose facts match (usi/studies/shared_store.py groups them, as `usi table` does), each top-K store is cut from
it (no second teacher pass: the exact store holds every logit), and every row trains from both:
- from the exact store: the live-teacher run bit for bit (tests/test_stored_teacher.py; `--live` also trains
  the live runs here and compares the weights), through `usi train` child processes; or, with
  `--live-table DIR` (a finished `usi table` of this very recipe), its KD runs stand for them, unretrained;
- from the top-K store, in worker processes of this tool, where each step's KD term is computed a second
  time against the exact logits of the same batch, for the same student logits: the step's relative error
  |KD_K - KD_exact| / KD_exact, and the teacher's probability mass outside its top K (the tail).

    python tools/topk_error.py imagenette data.root=/data/imagenette data.workers=1 \
        aug.randaugment_fill=[124,116,104] --teacher-weights runs/tables/imagenette/teacher/best.safetensors \
        --top-k 5 --out runs/topk-imagenette

Writes <out>/topk-error.md and .json; every run stays under <out>/seed<S>/, and a rerun reuses what finished.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import multiprocessing
import shutil
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from safetensors.torch import load_file

from usi import recipe as recipe_mod
from usi.distill import soft_labels as store
from usi.errors import UsageError
from usi.runtime.preempt import Interrupted
from usi.studies import jobs, shared_store, table, table_spec, tables
from usi.studies.aggregate import mean_se
from usi.studies.launch import slot_envs
from usi.studies.table_rows import class_count
from usi.training.checkpoint import BEST
from usi.training.rundir import RECIPE_FILE, check_out, check_same_recipe

ERRORS = "kd-error.json"  # beside a top-K run's files: its per-step figures


# ---------------------------------------------------------------- the plan


def kd_jobs(args) -> tuple[table_spec.TableSpec, list[jobs.Job]]:
    """The table's KD runs (every seed and row), with the teacher's weights in place."""
    spec = table_spec.load(tables.table_file(args.table) or Path(args.table))
    spec.kd, spec.share_teacher = "on", False
    if args.seeds:
        spec.seeds = args.seeds
    weights = args.teacher_weights or (spec.out / "teacher" / BEST if spec.teacher else None)
    todo = [j for j in table_spec.plan(spec, args.overrides) if j.name != "teacher"]
    for job in todo:
        if spec.teacher is not None:
            job.tree = jobs.settings(job.tree, {"teacher.weights": str(weights)})
        job.needs = ()
    return spec, todo


def groups(seed_jobs: list[jobs.Job]) -> list[list[jobs.Job]]:
    """The seed's KD rows grouped by their store facts: one exact store serves each group."""
    found: list[tuple[dict, list[jobs.Job]]] = []
    for job in seed_jobs:
        facts = shared_store.plan_facts(job.tree, 1)
        home = next((g for f, g in found if shared_store.difference(f, facts, job.tree) is None), None)
        if home is None:
            found.append((facts, [job]))
        else:
            home.append(job)
    return [g for _, g in found]


def cut(exact: Path, out: Path, k: int) -> None:
    """A top-K store from an exact one, chunk by chunk; the same facts, so the same runs read it."""
    manifest = store.read_manifest(exact)
    if out.is_dir() and (store.read_manifest(out) or {}).get("complete"):
        return
    out.mkdir(parents=True, exist_ok=True)
    chunks, size = {}, 0
    for name, digest in manifest["chunks"].items():
        c = store.read_chunk(exact, name, digest)
        full = store.full_logits(c["values"], c["indices"], c["lse"], manifest["classes"])
        chunks[name] = store.write_chunk(out, name, [store.top_k(full, k)])
        size += (out / name).stat().st_size
    store.write_manifest(out, {**manifest, "top_k": k, "chunks": chunks, "bytes": size})


# ---------------------------------------------------------------- a top-K run, measured (in a worker process)


class ExactBeside:
    """Answers for the teacher in the step with the top-K store, and keeps the exact logits of that step."""

    def __init__(self, top: store.StoredLabels, exact: store.StoredLabels):
        self.top, self.exact, self.logits = top, exact, None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        epoch, step, live = self.top.epoch, self.top.step, self.top.live
        answer = self.top(x)
        self.logits = None if live else self.exact.logits_at(epoch, step).to(answer.device)
        return answer

    def __getattr__(self, name):
        return getattr(self.top, name)


class MeasuredLoss:
    """The run's loss, unchanged; beside it the KD term against the exact logits, per step."""

    def __init__(self, loss, beside: ExactBeside, k: int):
        self.loss, self.beside, self.k = loss, beside, k
        self.errors, self.tails, self.kd = [], [], []

    def __call__(self, student_logits, soft_targets, teacher_logits):
        task, kd = self.loss(student_logits, soft_targets, teacher_logits)
        exact = self.beside.logits
        if exact is not None:
            with torch.no_grad():
                _, kd_exact = self.loss(student_logits.detach(), soft_targets, exact)
                tail = 1.0 - exact.float().softmax(1).topk(self.k, dim=1).values.sum(1).mean()
            self.errors.append(abs(kd.item() - kd_exact.item()) / max(kd_exact.item(), 1e-12))
            self.tails.append(tail.item())
            self.kd.append(kd_exact.item())
        return task, kd


REFERENCES: dict[str, str] = {}  # a top-K run's folder -> the exact store beside its own (set in each worker)


def worker_setup(references: dict[str, str]) -> None:
    torch.set_num_threads(1)  # one core per worker, as `usi table`'s slots
    REFERENCES.update(references)


def measured_run(recipe, log: Path) -> dict:
    """usi train of a top-K run, in this worker, with its loss measured (MeasuredLoss); the figures go to
    ERRORS in its folder."""
    from usi.training import build, loop

    original, measured = build.build_training, []

    def instrumented(*args, **kwargs):
        t = original(*args, **kwargs)
        exact = Path(REFERENCES[recipe.run.dir])
        beside = ExactBeside(t.state.soft_labels, store.StoredLabels(exact, store.read_manifest(exact),
                                                                     rank=0, teacher=None))
        loss = MeasuredLoss(t.cfg.loss, beside, t.state.soft_labels.manifest["top_k"])
        t.state.soft_labels, t.cfg = beside, dataclasses.replace(t.cfg, loss=loss)
        measured.append(loss)
        return t

    build.build_training = instrumented  # this worker's own module: the run is usi train's, step for step
    with open(log, "a") as out, contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        summary = loop.train(recipe)
    loss = measured[-1]
    figures = {"errors": loss.errors, "tails": loss.tails, "kd_exact": loss.kd}
    (Path(recipe.run.dir) / ERRORS).write_text(json.dumps(figures))
    return summary


# ---------------------------------------------------------------- the report


def check_live(job: jobs.Job, run_dir: Path) -> None:
    """The live table's KD run must be this job's recipe (its own store aside)."""
    if not (run_dir / "summary.json").is_file():
        raise UsageError(f"--live-table: {run_dir} holds no finished run")
    recipe = jobs.recipe_for(jobs.Job(job.name, jobs.settings(job.tree, {"teacher.soft_labels": None})),
                             run_dir, rerun=False)
    check_same_recipe(recipe, recipe_mod.read_yaml(run_dir / RECIPE_FILE), f"--live-table: {run_dir}",
                      remedy="give the table of this recipe")


def figures_of(run_dir: Path) -> dict:
    s = json.loads((run_dir / "summary.json").read_text())["selected_val"]
    return {"top1": s["top1"], "agreement": s["agreement"]}


def max_weight_difference(a: Path, b: Path) -> float:
    wa, wb = load_file(a / BEST), load_file(b / BEST)
    return max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa if wa[k].numel())


def bytes_per_image(manifest: dict) -> float:
    f = manifest["facts"]
    return manifest["bytes"] / (f["epochs"] * f["steps_per_epoch"] * f["data.batch_size"] * f["processes"])


def pm(values: list[float], digits: int = 2) -> str:
    mean, se = mean_se(values)
    return "-" if mean is None else f"{mean:.{digits}f}" + (f" ± {se:.{digits}f}" if se is not None else "")


def row_report(label: str, seeds: list[int], out: Path, k: int, *, live: bool, live_table: Path | None) -> dict:
    exact = [figures_of(live_table / f"seed{s}" / f"{label}-kd" if live_table else out / f"seed{s}" / f"{label}-exact")
             for s in seeds]
    top = [figures_of(out / f"seed{s}" / f"{label}-top{k}") for s in seeds]
    steps = [json.loads((out / f"seed{s}" / f"{label}-top{k}" / ERRORS).read_text()) for s in seeds]
    row = {"model": label, "k": k, "seeds": len(seeds),
           "kd_rel_error_mean_pct": pm([100 * statistics.fmean(f["errors"]) for f in steps]),
           "kd_rel_error_max_pct": f"{100 * max(max(f['errors']) for f in steps):.1f}",
           "tail_mass_mean_pct": pm([100 * statistics.fmean(f["tails"]) for f in steps]),
           "top1_live": pm([f["top1"] for f in exact]), "top1_topk": pm([f["top1"] for f in top]),
           "top1_diff": pm([b["top1"] - a["top1"] for a, b in zip(exact, top)]),
           "agreement_live": pm([f["agreement"] for f in exact]),
           "agreement_topk": pm([f["agreement"] for f in top]),
           "agreement_diff": pm([b["agreement"] - a["agreement"] for a, b in zip(exact, top)])}
    if live:
        row["max_weight_diff_exact_vs_live"] = max(
            max_weight_difference(out / f"seed{s}" / f"{label}-exact", out / f"seed{s}" / f"{label}-live") for s in seeds)
    return row


# ---------------------------------------------------------------- main


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("table", help="a table file, or a built-in table's name (imagenette)")
    p.add_argument("overrides", nargs="*", help="section.key=value for every run")
    p.add_argument("--top-k", type=int, nargs="+", default=[5])
    p.add_argument("--seeds", type=int, nargs="+")
    p.add_argument("--teacher-weights", type=Path, help="for a table that trains its teacher: its weights (default: "
                                                        "<the table's out>/teacher/best.safetensors)")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--live", action="store_true", help="also train each KD run with the live teacher and compare")
    p.add_argument("--live-table", type=Path, help="a finished usi table of this recipe: its KD runs are the "
                                                   "reference, not trained again")
    p.add_argument("--out", type=Path, required=True)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args, start = parse(argv), time.time()
    spec, todo = kd_jobs(args)
    classes = class_count(recipe_mod.from_tree(todo[0].tree), {}) if todo else None
    if any(not 1 <= k <= (classes or k) for k in args.top_k):
        raise UsageError(f"--top-k {' '.join(map(str, args.top_k))}: each K must be 1..{classes or 'the class count'}")
    check_out(args.out)
    exact_jobs, top_jobs, references = [], [], {}
    for seed in spec.seeds:
        for n, group in enumerate(groups([j for j in todo if j.name.startswith(f"seed{seed}/")])):
            folder = f"seed{seed}/exact-store-{n}"
            exact_jobs.append(jobs.Job(folder, group[0].tree, command=shared_store.STORE))
            for job in group:
                if args.live_table:
                    check_live(job, args.live_table / job.name)
                else:
                    exact_jobs.append(jobs.Job(job.name.replace("-kd", "-exact"), jobs.settings(
                        job.tree, {"teacher.soft_labels": str(args.out / folder)}), needs=(folder,)))
                if args.live:
                    exact_jobs.append(jobs.Job(job.name.replace("-kd", "-live"), job.tree))
                for k in args.top_k:
                    name = job.name.replace("-kd", f"-top{k}")
                    cut_to = args.out / f"seed{seed}" / f"top{k}-store-{n}"
                    top_jobs.append((cut_to, k, args.out / folder,
                                     jobs.Job(name, jobs.settings(job.tree, {"teacher.soft_labels": str(cut_to)}))))
                    references[str(args.out / name)] = str(args.out / folder)
    envs = slot_envs(args.jobs, 1, 0)
    jobs.run_children(exact_jobs, args.out, envs=envs, rerun=False, tag="exact", start=start)
    for cut_to, k, exact, _ in top_jobs:
        cut(exact, cut_to, k)
    for _, _, _, job in top_jobs:  # a top-K run is measured whole: one without its figures trains again
        run_dir = args.out / job.name
        if run_dir.exists() and not (run_dir / ERRORS).is_file():
            shutil.rmtree(run_dir)
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(args.jobs, mp_context=spawn, initializer=worker_setup, initargs=(references,)) as pool:
        jobs.run_all([j for *_, j in top_jobs], args.out, pool=pool, workers=args.jobs, rerun=False, tag="top-k",
                     start=start, work=measured_run)
    labels = [r.label for r in spec.rows]
    rows = [row_report(label, spec.seeds, args.out, k, live=args.live, live_table=args.live_table)
            for k in args.top_k for label in labels]
    stores = {k: store.read_manifest(args.out / f"seed{spec.seeds[0]}" / f"top{k}-store-0") for k in args.top_k}
    sizes = ", ".join(f"top-{k}: {m['bytes'] / 1e6:.3f} MB ({bytes_per_image(m):.1f} B per image per epoch)"
                      for k, m in stores.items())
    reference = (f"live: the KD runs of {args.live_table}" if args.live_table else
                 "live: runs from the exact store, each the live-teacher run bit for bit")
    title = (f"top-K soft labels against the exact teacher ({reference}): table {args.table}, seeds {spec.seeds}, "
             f"{time.time() - start:.0f} s; a store (seed {spec.seeds[0]}) {sizes}")
    columns = list(dict.fromkeys(c for r in rows for c in r))
    shown = table.markdown(columns, rows, cell=lambda v, c: str(v))
    paths = {"md": args.out / "topk-error.md", "json": args.out / "topk-error.json"}
    table.text_file(paths["md"], f"{title}\n\n{shown}\n")
    table.text_file(paths["json"], json.dumps({"title": title, "rows": rows}, indent=1) + "\n")
    table.show(title, shown, paths)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (UsageError, jobs.RunFailed) as e:
        sys.exit(f"topk_error: {e}")
    except Interrupted as e:  # SIGTERM/Ctrl-C: every run checkpointed; the same command goes on
        print(f"topk_error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)

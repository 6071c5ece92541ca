"""`usi table`'s rows from its runs: each run's record (metrics, summary, cost, provenance) gathered, the
rows built over seeds (usi/studies/aggregate.py), the teacher a row of its own, the columns measured at the
data's class count and each row's input size."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from usi.data.folder import find_classes
from usi.studies import aggregate, jobs, table, table_spec
from usi.studies.table_spec import KINDS, Row, TableSpec


def class_count(base, by_row: dict) -> int | None:
    """The data's class count: from a finished run, else the class map or the train folder's classes; None
    where neither tells (the cost columns are then left empty, never measured with timm's 1000)."""
    done = next((r["summary"].get("num_classes") for runs in by_row.values() for r in runs if r.get("summary")), None)
    if done:
        return done
    if base.data.class_map is not None and isinstance(base.data.class_map, list):
        return len(base.data.class_map)
    try:
        return len(find_classes(Path(base.data.root) / base.data.train_split))
    except Exception:  # no folder here (shards, or data on another machine): no count
        return None


def measured_cost(row: Row, base, num_classes: int | None, device: torch.device) -> tuple[dict, str]:
    """Params, GMACs and inference speed at the data's class count and the row's own input size."""
    if num_classes is None:
        return {}, "cost: the data's class count is unknown here (no finished run, no train folder)"
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
            "summary": outcome.summary, "seconds": jobs.spent_seconds(spec.out / job.name),
            "failure": outcome.failure or ("" if metrics or not outcome.summary else "evaluation failed"),
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
    num_classes = class_count(base, by_row)
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



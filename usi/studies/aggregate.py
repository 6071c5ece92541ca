"""A table's rows from its runs: mean and standard error over seeds, the KD gain from paired seeds,
expected figures checked, each run's provenance, and what moved against an older table.

A KD run and its no-KD run of one seed see the same data order and the same mixed batches (every
random draw comes from seed, epoch, rank and step), so the gain is estimated from the paired
differences: its standard error is that of the per-seed gains, usually smaller than the two top-1
standard errors combined.
"""
from __future__ import annotations

import hashlib
import json
import math
import statistics
from pathlib import Path

from usi import recipe as recipe_mod
from usi.distill.soft_labels import read_manifest
from usi.training.rundir import RECIPE_FILE

METRICS = ("top1", "top5", "nll", "ece", "agreement", "kl")
UNHASHED = ("run.dir", "run.resume")  # where a run lives and how it was started: not what it trains


def mean_se(values: list[float]) -> tuple[float | None, float | None]:
    """(mean, standard error of the mean); the error is None under two values."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return None, None
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else None
    return statistics.fmean(values), se


def sha256(path: Path) -> str | None:
    if not Path(path).is_file():
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def recipe_hash(run_dir: Path) -> str | None:
    """What the run trained, as a hash: its recorded recipe without where it lives."""
    try:
        tree = recipe_mod.read_yaml(run_dir / RECIPE_FILE)
    except Exception:  # no recipe recorded (the run never started): nothing to hash
        return None
    for key in UNHASHED:
        section, name = key.split(".")
        (tree.get(section) or {}).pop(name, None)
    return hashlib.sha256(json.dumps(tree, sort_keys=True, default=str).encode()).hexdigest()[:16]


def soft_labels_of(run_dir: Path) -> dict | None:
    """The store a run's teacher answered from (teacher.soft_labels): its folder and top-K of C; None: live."""
    try:
        folder = (recipe_mod.read_yaml(run_dir / RECIPE_FILE).get("teacher") or {}).get("soft_labels")
    except Exception:  # no recipe recorded: no store either
        return None
    manifest = read_manifest(Path(folder)) if folder else None
    return {"folder": folder, "top_k": manifest.get("top_k"), "classes": manifest.get("classes")} if manifest else None


def provenance(run_dir: Path, summary: dict | None, teacher_sha: str | None) -> dict:
    versions = (summary or {}).get("versions") or {}
    return {"usi": versions.get("usi"), "timm": versions.get("timm"), "torch": versions.get("torch"),
            "git": versions.get("git"), "recipe_sha256": recipe_hash(run_dir), "teacher_sha256": teacher_sha,
            "soft_labels": soft_labels_of(run_dir)}


def per_kind(runs: list[dict], kd: bool) -> dict:
    """Means and standard errors of one kind's runs over their seeds: top1_kd, top1_kd_se, ..., seeds_kd
    (_nokd for the runs without the teacher)."""
    kind = "kd" if kd else "nokd"
    mine = [r for r in runs if r["kd"] == kd and r.get("metrics")]
    out = {f"seeds_{kind}": len(mine)}
    for metric in METRICS:
        out[f"{metric}_{kind}"], out[f"{metric}_{kind}_se"] = mean_se([r["metrics"].get(metric) for r in mine])
    return out


def paired_gain(runs: list[dict]) -> tuple[float | None, float | None, int]:
    """Mean KD gain in top-1 over the seeds that have both runs, its standard error, and their count."""
    top1 = {(r["seed"], r["kd"]): r["metrics"]["top1"] for r in runs if r.get("metrics")}
    diffs = [top1[(s, True)] - top1[(s, False)] for s, kd in top1 if kd and (s, False) in top1]
    mean, se = mean_se(diffs)
    return mean, se, len(diffs)


def cost_of(runs: list[dict], nproc: int, on_gpu: bool) -> dict:
    """Training cost of a row: process-seconds over all its runs, start-up included (GPU-hours on GPUs)."""
    seconds = sum(r.get("seconds") or (r.get("summary") or {}).get("wall_time_s") or 0 for r in runs) * nproc
    return {"train_gpu_h": seconds / 3600} if on_gpu else {"train_proc_s": seconds}


def expectation(value: float | None, expect: float | None, tolerance: float) -> tuple[float | None, str]:
    """(top-1 minus the expected figure, a flag when it falls short by more than the tolerance)."""
    if expect is None or value is None:
        return None, ""
    delta = value - expect
    return delta, (f"{-delta:.1f} under the expected {expect:g} (tolerance {tolerance:g})"
                   if delta < -tolerance else "")


def student_row(row, runs: list[dict], *, kd_kinds: tuple[bool, ...], tolerance: float) -> dict:
    """One model's row: per-kind means +- SE, the paired gain, the expected figure, the notes."""
    out = {"model": row.label, "timm_name": row.name}
    for kd in kd_kinds:
        out |= per_kind(runs, kd)
    out["gain"], out["gain_se"], out["paired_seeds"] = paired_gain(runs) if len(kd_kinds) == 2 else (None, None, 0)
    headline = out.get("top1_kd") if True in kd_kinds else out.get("top1_nokd")
    out["vs_expected"], short = expectation(headline, row.expect, tolerance)
    out["expect"] = row.expect
    notes = [f"{r['name']}: {r['failure']}" for r in runs if r.get("failure")] + ([short] if short else [])
    out["note"] = "; ".join(notes)
    out["selection"] = ", ".join(sorted({(r.get("summary") or {}).get("selection") or "val"
                                         for r in runs if r.get("summary")})) or None
    out["runs"] = [{k: r.get(k) for k in ("name", "seed", "kd", "metrics", "provenance", "failure")} for r in runs]
    return out


def compare(old: list[dict], new: list[dict]) -> list[str]:
    """Lines saying what moved between two tables' rows (by model label): top-1, gain, versions."""
    before = {r["model"]: r for r in old}
    lines = []
    for r in new:
        o = before.pop(r["model"], None)
        if o is None:
            lines.append(f"{r['model']}: new row")
            continue
        moved = []
        for key in ("top1_nokd", "top1_kd", "gain"):
            a, b = o.get(key), r.get(key)
            if a is None or b is None:
                continue
            ses = [s for s in (o.get(f"{key}_se"), r.get(f"{key}_se")) if s is not None]
            se = math.sqrt(sum(s * s for s in ses)) if ses else None
            beyond = se is not None and abs(b - a) > 2 * se
            moved.append(f"{key} {a:.2f} -> {b:.2f} ({b - a:+.2f}" + (f", SE {se:.2f}" if se else "")
                         + (", beyond 2 SE" if beyond else "") + ")")
        versions = {tuple(sorted((k, v) for k, v in (run.get("provenance") or {}).items() if k != "teacher_sha256"))
                    for run in (o.get("runs") or []) + (r.get("runs") or [])}
        if len(versions) > 1:
            moved.append("code, versions or recipe differ")
        lines.append(f"{r['model']}: " + ("; ".join(moved) or "nothing to compare"))
    lines += [f"{label}: gone from the new table" for label in before]
    return lines

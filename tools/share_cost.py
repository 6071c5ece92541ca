"""What `share_teacher: true` saves: one KD table run twice by `usi table`, with the live teacher in every
KD run and with one exact soft-label store per seed, back to back on this machine; the same runs, the same
slots, the same evaluations.

Reported: each table's wall time; the store pass (its seconds, its size per epoch and per image); per KD
run the training time with the live teacher and from the store, so the teacher's share of a live KD run
(1 - store / live training time) and the store's read time per step against the step; and whether the two
tables' top-1 agree (an exact store must give the live runs' weights, so the same top-1).

    python tools/share_cost.py quickstart-table.yaml data.workers=1 aug.randaugment_fill=[124,116,104] \
        --out runs/share-cost
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from usi import recipe as recipe_mod
from usi.distill import soft_labels as store
from usi.errors import UsageError
from usi.studies import jobs, table, tables
from usi.studies.shared_store import STORE
from usi.training.rundir import check_out


def table_file(source: str, out: Path, share: bool) -> Path:
    """The given table as a KD-only table writing to `out`, with or without the shared store."""
    tree = dict(recipe_mod.read_yaml(tables.table_file(source) or Path(source), "table file"))
    tree.update({"kd": "on", "share_teacher": share, "out": str(out)})
    tree.pop("top_k", None)  # exact: the shared table must train the live table's runs
    out.mkdir(parents=True, exist_ok=True)
    path = out.parent / f"{out.name}.yaml"
    path.write_text(json.dumps(tree))  # YAML reads JSON
    return path


def run_table(path: Path, overrides: list[str], log: Path) -> float:
    t0 = time.time()
    with open(log, "w") as out:
        code = subprocess.call([sys.executable, "-m", "usi", "table", str(path), *overrides], stdout=out,
                               stderr=subprocess.STDOUT)
    if code != 0:
        sys.exit(f"share_cost: usi table {path} failed ({code}); see {log}")
    return time.time() - t0


def kd_runs(out: Path) -> dict[str, dict]:
    """{seed<S>/<label>-kd: its summary} of a finished table."""
    return {f"{d.parent.name}/{d.name}": json.loads((d / "summary.json").read_text())
            for d in sorted(out.glob("seed*/*-kd")) if (d / "summary.json").is_file()}


def steps_of(summary: dict, manifest: dict) -> int:
    return summary["epochs"] * manifest["facts"]["steps_per_epoch"]


def report(live_out: Path, shared_out: Path, walls: dict) -> tuple[str, list[dict]]:
    live, shared = kd_runs(live_out), kd_runs(shared_out)
    stores = [s for s in sorted(shared_out.glob(f"seed*/{STORE}")) if store.read_manifest(s)]
    if not stores:
        raise UsageError(f"the shared table wrote no soft-label store (no KD row's facts let it share: see "
                         f"{shared_out}/table.md's notes)")
    manifest = store.read_manifest(stores[0])
    rows = []
    for name in sorted(set(live) & set(shared)):  # a row that failed in either table has nothing to compare
        a, b = live[name], shared[name]
        steps = steps_of(b, manifest)
        read = b.get("soft_labels_read_s")  # absent: this row ran with the live teacher (its table note says why)
        rows.append({
            "run": name, "train_s_live": round(a["train_time_s"], 1), "train_s_store": round(b["train_time_s"], 1),
            "teacher_share_pct": round(100 * (1 - b["train_time_s"] / a["train_time_s"]), 1) if read else None,
            "step_ms_store": round(1000 * b["train_time_s"] / steps, 2),
            "read_ms_per_step": round(1000 * read / steps, 3) if read else None,
            "top1_live": round(a["selected_val"]["top1"], 2), "top1_store": round(b["selected_val"]["top1"], 2)})
    pass_s = [jobs.spent_seconds(s) for s in stores]
    epochs = manifest["facts"]["epochs"]
    per_epoch = manifest["bytes"] / epochs
    samples = manifest["facts"]["steps_per_epoch"] * manifest["facts"]["data.batch_size"] * manifest["facts"]["processes"]
    same = sum(r["top1_live"] == r["top1_store"] for r in rows)
    shares = [r["teacher_share_pct"] for r in rows if r["teacher_share_pct"] is not None]
    saved = 1 - walls["shared"] / walls["live"]
    lines = [
        f"live table {walls['live']:.0f} s, shared table {walls['shared']:.0f} s "
        f"({100 * abs(saved):.1f}% {'less' if saved >= 0 else 'more'}), of which the store pass "
        f"{statistics.fmean(pass_s):.0f} s per seed ({len(stores)} seeds)",
        f"teacher's share of a live KD run's training time: median {statistics.median(shares):.1f}% "
        f"(rows {', '.join(f'{s:.1f}' for s in shares)})" if shares else "no KD row read the store",
        f"store: top-{manifest['top_k']} of {manifest['classes']} classes, {per_epoch / 1e6:.3f} MB per epoch, "
        f"{per_epoch / samples:.1f} B per image per epoch ({samples} images per epoch, {epochs} epochs)",
        f"top-1 equal in both tables: {same} of {len(rows)} rows (a row whose normalization differs from the "
        f"store's own sees the teacher's input rounded otherwise, so its run drifts)",
    ]
    return "\n".join(lines), rows


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("table", help="a table file (or a built-in table's name); it is run with kd: on")
    p.add_argument("overrides", nargs="*", help="section.key=value for every run of both tables")
    p.add_argument("--out", type=Path, required=True)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    check_out(args.out)
    walls = {}
    for kind, share in (("live", False), ("shared", True)):
        path = table_file(args.table, args.out / kind, share)
        walls[kind] = run_table(path, args.overrides, args.out / f"{kind}.log")
    text, rows = report(args.out / "live", args.out / "shared", walls)
    columns = list(rows[0])
    shown = table.markdown(columns, rows, cell=lambda v, c: "-" if v is None else str(v))
    table.text_file(args.out / "share-cost.md", f"{text}\n\n{shown}\n")
    table.text_file(args.out / "share-cost.json", json.dumps({"walls_s": walls, "summary": text, "rows": rows},
                                                              indent=1) + "\n")
    print(f"{text}\n\n{shown}\n\nwritten: {args.out / 'share-cost.md'}, {args.out / 'share-cost.json'}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UsageError as e:
        sys.exit(f"share_cost: {e}")

"""Result tables from run directories' summary.json files: shared by the quickstart and tools/bench_table.py."""
from __future__ import annotations

import json
from pathlib import Path


def read_summary(run_dir: Path) -> dict | None:
    path = Path(run_dir) / "summary.json"
    return json.loads(path.read_text()) if path.is_file() else None


def final_or_best(summary: dict | None, key: str = "top1") -> float | None:
    """The best-ranked weights' value of `key` at the end of training (raw or EMA, as ranked)."""
    if not summary:
        return None
    final = summary.get("final", {})
    variant = summary.get("best", {}).get("weights")
    if variant in final and key in final[variant]:
        return final[variant][key]
    best = summary.get("best", {})
    return best.get("value") if best.get("metric") == key else None


def markdown(columns: list[str], rows: list[list]) -> str:
    def cell(v):
        if v is None:
            return "-"
        return f"{v:.2f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)

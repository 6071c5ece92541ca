"""usi/runtime/progress.py: log.txt and the progress line."""
import json

import pytest
from conftest import read_jsonl, usi_main
from helpers import train_args


def test_log_txt_starts_with_the_start_up_lines_and_the_summary_is_the_whole_run(image_root, tmp_path):
    run = tmp_path / "run"
    assert usi_main(*train_args(image_root, run, "run.stop_after=1")).returncode == 0
    log = (run / "log.txt").read_text()
    assert "global batch 8 = 8 x 1 processes x 1 accumulation" in log.splitlines()[0]
    assert "student test_resnet: 0.37M params" in log and "epoch 1:" in log
    assert usi_main(*train_args(image_root, run, "run.resume=auto")).returncode == 0
    summary = json.loads((run / "summary.json").read_text())
    records = read_jsonl(run / "metrics.jsonl")
    images = sum(r["train"]["images"] for r in records)
    assert images == 2 * 64 and summary["train_img_per_s"] == pytest.approx(
        images / sum(r["train"]["time_s"] for r in records))
    assert summary["wall_time_s"] > summary["train_time_s"] / 2  # this invocation's, from start-up
    assert "resumed from" in (run / "log.txt").read_text()

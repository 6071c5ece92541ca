"""usi/runtime/progress.py: log.txt and the progress line."""
import json

import pytest

from usi.runtime.progress import clock, step_line

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


def test_clock_writes_minutes_under_an_hour_and_hours_above():
    assert clock(0) == "0:00" and clock(59.6) == "1:00" and clock(125) == "2:05"
    assert clock(3599) == "59:59" and clock(3600) == "1:00:00" and clock(3723) == "1:02:03"


def test_the_step_line_gives_the_time_left_in_the_epoch_and_the_run():
    plain = step_line({"loss": 0.123456, "lr": 2e-3, "img/s": 512}, epoch=0, epochs=3, step=10, steps=100)
    assert plain == "epoch 1/3  step 10/100  loss 0.1235  lr 0.002  img/s 512"
    timed = step_line({"loss": 1.0}, epoch=1, epochs=3, step=40, steps=100, seconds_per_step=0.5)
    # 60 steps left in epoch 2 (30 s), and 60 + 100 of epoch 3 in the run (80 s)
    assert timed.endswith("  eta 0:30 epoch, 1:20 run")


def test_the_progress_line_tells_the_time_left_in_the_epoch_and_the_run():
    line = step_line({"task": 1.5}, epoch=1, epochs=3, step=8, steps=10, seconds_per_step=2.0)
    # 2 steps of this epoch, then 10 more of the last epoch: 4 s and 24 s
    assert line == "epoch 2/3  step 8/10  task 1.5  eta 0:04 epoch, 0:24 run"
    assert "1:00:00 run" in step_line({}, epoch=0, epochs=1, step=0, steps=3600, seconds_per_step=1.0)
    # the evaluations still to come: this epoch's and the run's
    with_eval = step_line({}, epoch=1, epochs=3, step=8, steps=10, seconds_per_step=2.0, eval_left_s=(30.0, 60.0))
    assert with_eval.endswith("eta 0:34 epoch, 1:24 run")



def test_log_txt_is_never_appended_through_a_link(tmp_path):
    from usi.errors import UsageError
    from usi.runtime.progress import setup_logging
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "log.txt").symlink_to(victim)  # planted after the run directory's checks
    try:
        with pytest.raises(UsageError, match="log.txt is a symbolic link"):
            setup_logging(tmp_path / "run", main=True)
    finally:
        setup_logging(None, main=True)
    assert victim.read_text() == "precious\n"

"""usi/training/rundir.py: the run directory's policy: never overwrite, resume rules, the lock, metrics.jsonl
and summary.json that survive damage."""
import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from conftest import REPO, read_jsonl, usi_main
from helpers import one_error, train, train_args


def test_an_existing_run_is_never_overwritten(image_root, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "precious.txt").write_text("keep")
    out = train(image_root, run)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        f"usi: error: run directory {run} already holds a run; pass run.resume=auto to continue it "
        f"or choose another run.dir"]
    assert [p.name for p in run.iterdir()] == ["precious.txt"]


def test_resume_refuses_a_different_recipe(image_root, tmp_path):
    assert train(image_root, tmp_path / "run", "run.stop_after=1").returncode == 0
    out = train(image_root, tmp_path / "run", "run.resume=auto", "optim.lr=0.1")
    assert out.returncode == 2 and "optim.lr was 0.002, now 0.1" in out.stderr


def test_an_explicit_resume_into_another_finished_run_is_refused_and_changes_nothing(image_root, tmp_path):
    assert usi_main(*train_args(image_root, tmp_path / "A", "run.stop_after=1")).returncode == 0
    assert usi_main(*train_args(image_root, tmp_path / "B", "optim.lr=0.01")).returncode == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "B").iterdir()}
    out = usi_main(*train_args(image_root, tmp_path / "B", "optim.lr=0.01", f"run.resume={tmp_path / 'A' / 'last.pt'}"))
    one_error(out, "cannot resume from")  # A's checkpoint holds another recipe (lr 0.002)
    out = usi_main(*train_args(image_root, tmp_path / "B", f"run.resume={tmp_path / 'A' / 'last.pt'}"))
    one_error(out, f"cannot resume {tmp_path / 'B'}: optim.lr was 0.01, now 0.002")
    assert {p.name: p.read_bytes() for p in (tmp_path / "B").iterdir()} == before
    out = usi_main(*train_args(image_root, tmp_path / "C", "optim.lr=0.01", f"run.resume={tmp_path / 'A' / 'last.pt'}"))
    one_error(out, "cannot resume from")
    assert not (tmp_path / "C").exists()


def test_a_run_directory_moved_or_spelled_otherwise_resumes(image_root, tmp_path, monkeypatch):
    assert usi_main(*train_args(image_root, tmp_path / "r", "run.stop_after=1")).returncode == 0
    shutil.copytree(tmp_path / "r", tmp_path / "copy")
    moved = usi_main(*train_args(image_root, tmp_path / "copy", "run.resume=auto", "run.stop_after=1"))
    assert moved.returncode == 0, moved.stderr  # its recipe.yaml names run.dir r: that may differ
    assert [r["epoch"] for r in read_jsonl(tmp_path / "copy" / "metrics.jsonl")] == [1, 2]
    monkeypatch.chdir(tmp_path)
    elsewhere = usi_main(*train_args(image_root, "r/", f"run.resume={tmp_path / 'r' / 'last.pt'}"))
    assert elsewhere.returncode == 0, elsewhere.stderr  # the same directory, spelled relative with a slash
    assert [r["epoch"] for r in read_jsonl(tmp_path / "r" / "metrics.jsonl")] == [1, 2]


@pytest.mark.parametrize("damage", ["", '{"best": {"val'])
def test_an_empty_or_torn_summary_of_a_finished_run_is_rebuilt(image_root, tmp_path, damage):
    run = tmp_path / "r"
    assert usi_main(*train_args(image_root, run)).returncode == 0
    summary = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(damage)
    again = usi_main(*train_args(image_root, run, "run.resume=auto"))
    assert again.returncode == 0 and "already finished" in again.stderr, again.stderr
    assert json.loads((run / "summary.json").read_text())["best"] == summary["best"]


def test_a_torn_metrics_line_or_a_lost_summary_loses_nothing(image_root, tmp_path):
    run = tmp_path / "r"
    assert usi_main(*train_args(image_root, run, "run.stop_after=1")).returncode == 0
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 2, "train": {"task_lo')  # a crash (or a full disk) in the middle of an append
    assert usi_main(*train_args(image_root, run, "run.resume=auto")).returncode == 0
    assert [r["epoch"] for r in read_jsonl(run / "metrics.jsonl")] == [1, 2]
    summary = json.loads((run / "summary.json").read_text())
    (run / "summary.json").unlink()  # lost after the final checkpoint
    again = usi_main(*train_args(image_root, run, "run.resume=auto"))
    assert again.returncode == 0 and "already finished" in again.stderr
    restored = json.loads((run / "summary.json").read_text())
    for key in ("best", "final", "epochs", "num_classes", "params"):
        assert restored[key] == summary[key], key


def test_two_runs_started_into_one_directory_never_mix(image_root, tmp_path):
    run = tmp_path / "r"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    slow = ["sched.epochs=3", "data.input_size=48", "data.batch_size=2", "optim.global_batch=2"]
    first = subprocess.Popen([sys.executable, "-m", "usi", *train_args(image_root, run, *slow)], cwd=REPO,
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (run / ".lock").exists() and time.time() < deadline:
        time.sleep(0.02)
    for resume in ("never", "auto"):
        second = usi_main(*train_args(image_root, run, *slow, f"run.resume={resume}"))
        one_error(second, "is in use by usi pid")
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-2000:]
    assert [r["epoch"] for r in read_jsonl(run / "metrics.jsonl")] == [1, 2, 3]
    assert not (run / ".lock").exists()


def test_a_folder_that_is_no_run_is_never_written_into(image_root, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "metrics.jsonl").write_text("precious\n")
    (mine / "summary.json").write_text('{"mine": 1}')
    for resume in ("auto", "never"):
        out = usi_main(*train_args(image_root, mine, f"run.resume={resume}"))
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert (mine / "metrics.jsonl").read_text() == "precious\n" and sorted(p.name for p in mine.iterdir()) == [
        "metrics.jsonl", "summary.json"]


def test_a_failed_start_removes_every_folder_it_made(image_root, tmp_path):
    out = usi_main(*train_args("/no/such/data", tmp_path / "a" / "b" / "c"))
    one_error(out, "does not exist")
    assert not (tmp_path / "a").exists()

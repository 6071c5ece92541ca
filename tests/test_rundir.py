"""usi/training/rundir.py: the run directory's policy: never overwrite, resume rules, the lock, metrics.jsonl
and summary.json that survive damage."""
import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from usi.training import rundir

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


@pytest.fixture(scope="module")
def linked_run(image_root, tmp_path_factory):
    """A run stopped after epoch 1, made through a parent folder that is a link (another disk): allowed."""
    base = tmp_path_factory.mktemp("links")
    (base / "disk").mkdir()
    (base / "runs").symlink_to(base / "disk")
    out = usi_main(*train_args(image_root, base / "runs" / "r", "run.stop_after=1", "run.loggers=[tensorboard]"))
    assert out.returncode == 0, out.stderr[-2000:]
    return base / "disk" / "r"


def test_a_run_directory_or_its_parent_given_as_a_link_is_the_user_s_choice(image_root, linked_run, tmp_path):
    assert (linked_run / "last.pt").is_file() and not linked_run.is_symlink()
    assert {p.name for p in linked_run.iterdir()} <= set(rundir.OWN)  # every name a run writes is guarded
    run = tmp_path / "copy"
    shutil.copytree(linked_run, tmp_path / "elsewhere")
    run.symlink_to(tmp_path / "elsewhere")  # the run directory itself a link
    out = usi_main(*train_args(image_root, run, "run.resume=auto", "run.loggers=[tensorboard]"))
    assert out.returncode == 0, out.stderr[-2000:]
    assert [r["epoch"] for r in read_jsonl(tmp_path / "elsewhere" / "metrics.jsonl")] == [1, 2]


@pytest.mark.parametrize("name, kind", [(name, "symlink") for name in rundir.OWN] + [
    (".lock", "hard link"), ("log.txt", "hard link"), ("last.pt", "folder"), ("tensorboard", "file")])
def test_a_link_where_usi_writes_is_refused_and_nothing_outside_the_run_changes(image_root, linked_run, tmp_path,
                                                                               name, kind):
    run = tmp_path / "r"
    shutil.copytree(linked_run, run)
    outside = tmp_path / "user"
    outside.mkdir()
    victim = outside / "victim"
    folder = rundir.OWN[name] == "folder"
    if folder:
        victim.mkdir()
    elif (run / name).is_file():
        shutil.copy(run / name, victim)  # a user's copy of the very file: a resume would take it as its own
    else:
        victim.write_text("precious\n")
    shutil.rmtree(run / name) if (run / name).is_dir() else (run / name).unlink(missing_ok=True)
    if kind == "symlink":
        (run / name).symlink_to(victim)
    elif kind == "hard link":
        os.link(victim, run / name)
    elif kind == "folder":
        (run / name).mkdir()
    else:
        (run / name).write_text("a file where a folder goes")
    before = {p.name: p.read_bytes() for p in outside.rglob("*") if p.is_file()}
    for resume in ("auto", "never"):
        out = usi_main(*train_args(image_root, run, f"run.resume={resume}", "run.loggers=[tensorboard]"))
        one_error(out, f"run directory {run}: {name} is")
    assert {p.name: p.read_bytes() for p in outside.rglob("*") if p.is_file()} == before
    assert not folder or not any(victim.iterdir())


def test_a_lone_planted_lock_link_in_an_empty_folder_is_refused(image_root, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / ".lock").symlink_to(victim)  # a folder with only a .lock holds no run: a fresh start
    one_error(usi_main(*train_args(image_root, tmp_path / "r")), ".lock is a symbolic link")
    assert victim.read_text() == "precious\n"

"""Crashes, kill -9, restarts and hostile input, through the real command line."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, TINY, Payload, read_jsonl, usi_cmd, usi_main
from safetensors.torch import save_file

from usi.training import checkpoint


def train_args(root, run_dir, *extra):
    return ["train", "quickstart", *TINY, f"data.root={root}", f"run.dir={run_dir}", *extra]


def start(args, torchrun=0, max_restarts=0):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    prefix = [sys.executable, "-m", "usi"]
    if torchrun:
        prefix = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}",
                  f"--max-restarts={max_restarts}", "-m", "usi"]
    return subprocess.Popen(prefix + args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def wait_for_epochs(run_dir: Path, n: int, proc, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        path = run_dir / "metrics.jsonl"
        if path.is_file() and len(read_jsonl(path)) >= n:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise TimeoutError


def weights(run_dir):
    state = torch.load(run_dir / "last.pt")
    return state["student"], state["ema"]


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_kill_9_mid_epoch_then_resume_matches_an_uninterrupted_run(image_root, tmp_path):
    extra = ["sched.epochs=3", "run.log_interval=1"]
    whole = usi_main(*train_args(image_root, tmp_path / "whole", *extra))
    assert whole.returncode == 0, whole.stderr
    proc = start(train_args(image_root, tmp_path / "cut", *extra))
    wait_for_epochs(tmp_path / "cut", 1, proc)
    time.sleep(0.5)  # now inside epoch 2 (or writing its checkpoint)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert checkpoint.load(tmp_path / "cut" / checkpoint.LAST)["epoch"] >= 1  # the last checkpoint still loads
    again = usi_main(*train_args(image_root, tmp_path / "cut", *extra, "run.resume=auto"))
    assert again.returncode == 0, again.stderr
    assert [r["epoch"] for r in read_jsonl(tmp_path / "cut" / "metrics.jsonl")] == [1, 2, 3]
    for a, b in zip(weights(tmp_path / "whole"), weights(tmp_path / "cut")):
        assert same(a, b)


def test_mid_epoch_checkpoints_resume_without_losing_the_epoch(image_root, tmp_path):
    extra = ["sched.epochs=2", "run.ckpt_every_steps=3", "run.log_interval=1", "run.stop_after=1"]
    assert usi_main(*train_args(image_root, tmp_path / "r", *extra)).returncode == 0
    state = checkpoint.load(tmp_path / "r" / checkpoint.LAST)
    steps = state["num_updates"]
    # rewind to the mid-epoch checkpoint of epoch 2 by training it partly: write one from a fresh process
    mid = {**state, "epoch": 1, "step": 3, "num_updates": steps + 3}
    checkpoint.save(mid, tmp_path / "r" / checkpoint.LAST)
    out = usi_main(*train_args(image_root, tmp_path / "r", *extra[:-1], "run.resume=auto"))
    assert out.returncode == 0, out.stderr
    assert "resumed from" in out.stderr and "epoch 2, step 3" in out.stderr
    assert "step 4/" in out.stderr and "step 1/" not in out.stderr.split("resumed from")[1]
    final = checkpoint.load(tmp_path / "r" / checkpoint.LAST)
    assert final["epoch"] == 2 and final["num_updates"] == steps + state["num_updates"]


CRASHING_SAVE = """
import os, signal, sys, torch
from usi.training import checkpoint
real_save = torch.save
def half_then_die(obj, f):
    real_save(obj, f)
    with open(f, "r+b") as fh:
        fh.truncate(os.path.getsize(f) // 2)
    os.kill(os.getpid(), signal.SIGKILL)
torch.save = half_then_die
checkpoint.save({"student": {"w": torch.ones(3)}, "epoch": 2, "step": 0}, sys.argv[1])
"""


def test_kill_9_during_a_checkpoint_write_keeps_the_previous_one(tmp_path):
    path = tmp_path / "last.pt"
    checkpoint.save({"student": {"w": torch.zeros(3)}, "epoch": 1, "step": 0}, path)
    proc = subprocess.run([sys.executable, "-c", CRASHING_SAVE, str(path)], cwd=REPO)
    assert proc.returncode == -signal.SIGKILL
    state = checkpoint.load(path)
    assert state["epoch"] == 1 and torch.equal(state["student"]["w"], torch.zeros(3))


def worker_pids(parent: int) -> list[int]:
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == parent:
            pids.append(int(stat.parent.name))
    return pids


def test_a_rank_killed_under_torchrun_max_restarts_resumes_by_itself(image_root, tmp_path):
    run = tmp_path / "ddp"
    # 5 epochs: a wide window for the kill after epoch 1, even on a fast machine
    args = train_args(image_root, run, "sched.epochs=5", "data.batch_size=4", "optim.global_batch=8",
                      "run.resume=auto")
    proc = start(args, torchrun=2, max_restarts=1)
    wait_for_epochs(run, 1, proc)
    workers = worker_pids(proc.pid)
    assert len(workers) == 2
    os.kill(workers[1], signal.SIGKILL)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "resumed from" in err
    assert [r["epoch"] for r in read_jsonl(run / "metrics.jsonl")] == [1, 2, 3, 4, 5]
    assert json.loads((run / "summary.json").read_text())["epochs"] == 5


def test_a_diverging_run_stops_naming_the_update_lr_and_checkpoint(image_root, tmp_path):
    out = usi_main(*train_args(image_root, tmp_path / "r", "optim.lr=1e30", "run.max_nonfinite=2", "sched.epochs=3",
                              "sched.warmup_epochs=0", "ema.enabled=false"))
    assert out.returncode == 1
    (line,) = [x for x in out.stderr.splitlines() if x.startswith("usi: stopped")]
    assert "non-finite updates in a row (run.max_nonfinite=" in line and "lr now" in line and "checkpoint" in line


def test_unreadable_images_are_skipped_counted_and_stop_past_the_limit(image_root, tmp_path):
    import shutil
    data = tmp_path / "data"
    shutil.copytree(image_root, data)
    for i, path in enumerate(sorted((data / "train").rglob("*.jpg"))[:3]):
        path.write_bytes(b"" if i == 0 else b"junk")
    # a process of its own: the loader workers' warnings go to its stderr (this process's capture misses them)
    ok = usi_cmd(*train_args(data, tmp_path / "ok", "data.workers=2"))
    assert ok.returncode == 0, ok.stderr
    rows = read_jsonl(tmp_path / "ok" / "metrics.jsonl")
    assert rows[-1]["train"]["bad_images"] == 3  # distinct files, over both loader workers and epochs
    assert "skipped unreadable image" in ok.stderr
    stop = usi_main(*train_args(data, tmp_path / "stop", "data.max_bad_samples=2"))
    assert stop.returncode == 2 and "3 unreadable images so far exceeds data.max_bad_samples=2" in stop.stderr


@pytest.mark.parametrize("make, message", [
    (lambda t: ["teacher.name=test_resnet", f"teacher.weights={teacher_file(t, 1000)}"],
     "teacher test_resnet predicts 1000 classes but the dataset has 4"),
    (lambda t: [f"run.dir={blocker(t)}/run"], "is not a writable directory"),
    (lambda t: [f"run.resume={evil(t)}"], "refused to load"),
    (lambda t: ["teacher.name=test_resnet", f"teacher.weights={evil(t)}"], "refused to load"),
])
def test_bad_files_end_in_one_line_exit_2_and_no_side_effect(image_root, tmp_path, make, message):
    os.environ["USI_PWNED"] = str(tmp_path / "pwned")
    args = train_args(image_root, tmp_path / "r") + make(tmp_path)
    out = usi_main(*args)
    assert out.returncode == 2, out.stderr
    errors = [x for x in out.stderr.splitlines() if x.startswith("usi: error:")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in out.stderr
    assert not (tmp_path / "pwned").exists()


def teacher_file(tmp_path, classes):
    import timm
    path = tmp_path / "teacher.safetensors"
    save_file(timm.create_model("test_resnet", num_classes=classes).state_dict(), str(path))
    return path


def blocker(tmp_path):
    path = tmp_path / "a-file"
    path.write_text("not a directory")
    return path



def evil(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": 1, "student": {}, "x": Payload()}, path)
    return path

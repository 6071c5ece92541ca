
import signal
import subprocess
import sys

import pytest
import torch

from usi.errors import UsageError
from usi.runtime import files
from usi.training import checkpoint

from conftest import REPO, Payload, read_jsonl, usi_main
from helpers import one_error, teacher_files, train, train_args


def state():
    return {"student": {"w": torch.arange(4.0)}, "epoch": 3, "step": 0}


def test_save_is_atomic_and_leaves_no_temporary_files(tmp_path):
    path = tmp_path / "last.pt"
    checkpoint.save(state(), path)
    checkpoint.save({**state(), "epoch": 4}, path)
    assert checkpoint.load(path)["epoch"] == 4
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_a_failed_write_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "last.pt"
    checkpoint.save(state(), path)

    def crash(tmp):
        tmp.write_bytes(b"half a checkp")
        raise OSError("disk full")

    with pytest.raises(OSError):
        files.atomic_write(path, crash)
    assert checkpoint.load(path)["epoch"] == 3
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_truncated_and_foreign_files_are_clear_errors(tmp_path):
    good = tmp_path / "last.pt"
    checkpoint.save(state(), good)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[:100])
    with pytest.raises(UsageError, match="not a readable checkpoint"):
        checkpoint.load(cut)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    with pytest.raises(UsageError, match="not a usi training checkpoint"):
        checkpoint.load(other)
    with pytest.raises(UsageError, match="does not exist"):
        checkpoint.load(tmp_path / "missing.pt")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 20)
    with pytest.raises(UsageError, match="not a readable safetensors file"):
        files.load_state_file(bad)



def test_a_pickle_payload_is_refused_without_running(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("USI_PWNED", str(marker))
    path = tmp_path / "evil.pt"
    torch.save({**state(), "format": 1, "extra": Payload()}, path)
    with pytest.raises(UsageError, match="refused to load"):
        checkpoint.load(path)
    assert not marker.exists()


def test_exported_weights_carry_metadata(tmp_path):
    path = tmp_path / "best.safetensors"
    files.export_weights({"w": torch.ones(2, 2)}, path, {"model": "resnet50"})
    assert files.read_metadata(path)["model"] == "resnet50"
    assert torch.equal(files.load_state_file(path)["w"], torch.ones(2, 2))


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


def test_a_feature_checkpoint_does_not_resume_a_plain_run(image_root, tmp_path):
    (path,) = teacher_files(tmp_path, ("test_resnet",))
    teacher = ["teacher.name=test_resnet", f"teacher.weights={path}"]
    feature = ["features.student=layer3", "features.teacher=layer4"]
    assert train(image_root, tmp_path / "run", *teacher, *feature, "run.stop_after=1").returncode == 0
    out = train(image_root, tmp_path / "other", *teacher, f"run.resume={tmp_path / 'run' / 'last.pt'}")
    assert out.returncode == 2 and "was trained with feature KD" in out.stderr.splitlines()[-1]


def test_a_full_disk_while_training_says_so_in_one_line_and_the_run_resumes(image_root, tmp_path, monkeypatch):
    run = tmp_path / "r"
    assert usi_main(*train_args(image_root, run, "run.stop_after=1")).returncode == 0  # epoch 1's last.pt

    def full(obj, f):  # what torch.save raises when the disk fills up (measured on a full tmpfs)
        open(f, "wb").write(b"half a checkp")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

    monkeypatch.setattr(torch, "save", full)
    monkeypatch.setattr(files, "free_bytes", lambda folder: 0)
    out = usi_main(*train_args(image_root, run, "run.resume=auto"))
    one_error(out, f"disk full while writing {run / 'last.pt'}; the previous last.pt is intact")  # not "unexpected pos"
    monkeypatch.undo()
    assert checkpoint.load(run / "last.pt")["epoch"] == 1
    out = usi_main(*train_args(image_root, run, "run.resume=auto"))
    assert out.returncode == 0 and [r["epoch"] for r in read_jsonl(run / "metrics.jsonl")] == [1, 2], out.stderr

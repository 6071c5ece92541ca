"""usi/training/ledger.py: resume: exact after an epoch boundary, mid-epoch and after kill -9; data that changed."""
import json
import os
import shutil
import signal
import time

import pytest
import torch

from usi.training import checkpoint

from conftest import read_jsonl, usi_main
from helpers import one_error, start, teacher_file, train, train_args, wait_for_epochs


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


@pytest.mark.parametrize("randaugment_on", ["workers", "device"])
def test_resume_at_an_epoch_boundary_gives_the_same_weights(image_root, tmp_path, randaugment_on):
    # a loader worker: its seeding must be exact too; and RandAugment's on the device
    extra = ["sched.epochs=3", "data.workers=1", f"aug.randaugment_on={randaugment_on}"]
    assert train(image_root, tmp_path / "whole", *extra).returncode == 0
    first = train(image_root, tmp_path / "cut", *extra, "run.stop_after=1")
    assert first.returncode == 0 and not (tmp_path / "cut" / "summary.json").exists()
    assert len(read_jsonl(tmp_path / "cut" / "metrics.jsonl")) == 1
    again = train(image_root, tmp_path / "cut", *extra, "run.resume=auto")
    assert again.returncode == 0, again.stderr
    a, b = torch.load(tmp_path / "whole" / "last.pt"), torch.load(tmp_path / "cut" / "last.pt")
    for key in ("student", "ema"):
        assert a[key].keys() == b[key].keys()
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    timing = ("train", "eval_time_s")  # wall-clock figures differ between any two runs
    strip = lambda rows: [{k: v for k, v in r.items() if k not in timing} for r in rows]  # noqa: E731
    whole, cut = (read_jsonl(tmp_path / name / "metrics.jsonl") for name in ("whole", "cut"))
    assert strip(whole) == strip(cut)
    # resuming a finished run changes nothing
    summary = (tmp_path / "cut" / "summary.json").read_text()
    assert train(image_root, tmp_path / "cut", *extra, "run.resume=auto").returncode == 0
    assert (tmp_path / "cut" / "summary.json").read_text() == summary


def test_resuming_on_data_whose_class_names_differ_is_refused(image_root, tmp_path):
    assert usi_main(*train_args(image_root, tmp_path / "r", "run.stop_after=1")).returncode == 0
    renamed = tmp_path / "renamed"
    shutil.copytree(image_root, renamed)
    for split in ("train", "val"):
        (renamed / split / "circle").rename(renamed / split / "zcircle")  # same count, labels shift
    out = usi_main(*train_args(renamed, tmp_path / "r", "run.resume=auto"))
    one_error(out, "they differ at label 0 ('circle' vs 'frame')")


def test_a_resumed_minival_run_holds_out_the_same_images_and_keeps_its_selection(image_root, tmp_path):
    # with a teacher: its minival logits (agreement, KL) are computed again on resume, from the same images
    extra = ["data.minival=0.25", "teacher.name=test_resnet", f"teacher.weights={teacher_file(tmp_path / 't.st')}",
             "run.best_metric=kl"]
    assert train(image_root, tmp_path / "whole", *extra).returncode == 0
    assert train(image_root, tmp_path / "cut", *extra, "run.stop_after=1").returncode == 0
    again = train(image_root, tmp_path / "cut", *extra, "run.resume=auto")
    assert again.returncode == 0, again.stderr
    timing = ("train", "eval_time_s")
    strip = lambda rows: [{k: v for k, v in r.items() if k not in timing} for r in rows]  # noqa: E731
    whole, cut = (read_jsonl(tmp_path / name / "metrics.jsonl") for name in ("whole", "cut"))
    assert strip(whole) == strip(cut) and all("kl" in r["minival"]["ema"] for r in cut)
    a, b = (json.loads((tmp_path / name / "summary.json").read_text()) for name in ("whole", "cut"))
    assert a["selection"] == b["selection"] == "minival (16 images)"
    assert a["best"] == b["best"] and a["selected_val"] == b["selected_val"]
    best = b["best"]
    assert best["value"] == min(r["minival"][w]["kl"] for r in cut for w in ("raw", "ema"))  # ranked on minival
    assert b["selected_val"] == cut[best["epoch"] - 1][best["weights"]]  # and reported on val

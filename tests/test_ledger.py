"""usi/training/ledger.py: resume: exact after an epoch boundary, mid-epoch and after kill -9; data that changed; a
longer schedule; the top-k weights."""
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


def test_a_longer_schedule_on_resume_follows_a_fresh_schedule_of_the_new_length(image_root, tmp_path):
    """timm's train.py builds the scheduler from the new total and steps it to the resumed update; so does usi."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from usi import recipe as R
    from usi.training.build import create_scheduler

    run, extra = tmp_path / "r", ["run.log_interval=1", "run.loggers=[tensorboard]"]
    assert usi_main(*train_args(image_root, run, *extra)).returncode == 0  # 2 epochs of 8 updates
    out = usi_main(*train_args(image_root, run, *extra, "sched.epochs=3", "run.resume=auto"))
    assert out.returncode == 0, out.stderr[-2000:]
    assert [r["epoch"] for r in read_jsonl(run / "metrics.jsonl")] == [1, 2, 3]  # one more epoch
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    logged = {e.step: e.value for e in events.Scalars("train/lr") if e.step > 16}
    # a fresh 3-epoch schedule, stepped per update; the lr shown after update n is the one update n + 1 uses
    recipe = R.load(None, [*[a for a in train_args(image_root, run)[2:] if "=" in a], "sched.epochs=3"])
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=recipe.optim.lr)
    scheduler, _ = create_scheduler(recipe, optimizer, 8)
    fresh = {}
    for n in range(17, 25):
        scheduler.step_update(num_updates=n)
        fresh[n] = optimizer.param_groups[0]["lr"]
    assert sorted(logged) == list(range(17, 25))
    assert logged == pytest.approx(fresh, rel=1e-6) and fresh[17] > 10 * recipe.sched.min_lr  # not the old end
    summary = __import__("json").loads((run / "summary.json").read_text())
    assert summary["schedule_changes"] == [{"epochs_before": 2, "epochs": 3, "at_epoch": 2, "at_update": 16}]
    assert "sched.epochs changed from 2 to 3 at epoch 2" in (run / "log.txt").read_text()
    # shorter than what is done: one line, nothing lost
    short = usi_main(*train_args(image_root, run, *extra, "sched.epochs=2", "run.resume=auto"))
    one_error(short, "sched.epochs=2 is fewer than the 3 epochs it has already trained")
    assert checkpoint.load(run / checkpoint.LAST)["epoch"] == 3


class Evaluated:
    """A stand-in TrainState: raw and EMA models whose weights say which epoch they were exported at."""
    def __init__(self):
        self.raw = torch.nn.Linear(1, 1, bias=False)

    def models_to_eval(self):
        return {"raw": self.raw, "ema": self.raw}


def test_keep_best_keeps_the_top_k_files_and_deletes_the_ones_that_drop_out(tmp_path):
    from safetensors.torch import load_file

    from usi import recipe as R
    from usi.training.ledger import Ledger

    state = Evaluated()
    ledger = Ledger(state, recipe=R.load(None, ["run.keep_best=3", "run.best_metric=nll"]), classes=["a"],
                    run_dir=tmp_path, steps=1, epochs=9, main=True)
    for epoch, nll in enumerate([5.0, 3.0, 4.0, 6.0, 1.0, 2.0, float("nan")]):
        state.raw.weight.data.fill_(epoch + 1)
        ledger.evaluated({"raw": {"nll": nll}, "ema": {"nll": nll + 1}}, epoch)
    # nll 1 (epoch 5), 2 (epoch 6), 3 (epoch 2): the best in best.safetensors, the others by epoch
    assert [(e["epoch"], e["value"], e["file"]) for e in ledger.kept] == [
        (5, 1.0, "best.safetensors"), (6, 2.0, "best-e6.safetensors"), (2, 3.0, "best-e2.safetensors")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best-e2.safetensors", "best-e6.safetensors",
                                                          "best.safetensors"]
    for entry in ledger.kept:  # each file holds the weights of its epoch
        assert load_file(tmp_path / entry["file"])["weight"].item() == entry["epoch"]
    assert ledger.best == {"metric": "nll", "value": 1.0, "weights": "raw", "epoch": 5}
    # a resume with a smaller run.keep_best drops the rest; a file a crash left behind goes too
    (tmp_path / "best-e9.safetensors").write_bytes(b"")
    ledger.recipe = R.load(None, ["run.keep_best=2", "run.best_metric=nll"])
    ledger.open()
    assert sorted(p.name for p in tmp_path.glob("best*")) == ["best-e6.safetensors", "best.safetensors"]


def test_the_top_k_survive_a_resume(image_root, tmp_path):
    run, extra = tmp_path / "r", ["sched.epochs=3", "run.keep_best=2", "run.best_metric=nll"]
    assert usi_main(*train_args(image_root, run, *extra, "run.stop_after=2")).returncode == 0
    out = usi_main(*train_args(image_root, run, *extra, "run.resume=auto"))
    assert out.returncode == 0, out.stderr[-2000:]
    nll = {r["epoch"]: min(r["raw"]["nll"], r["ema"]["nll"]) for r in read_jsonl(run / "metrics.jsonl")}
    top = sorted(nll, key=nll.get)[:2]
    kept = checkpoint.load(run / checkpoint.LAST)["kept"]
    assert [e["epoch"] for e in kept] == top and [e["value"] for e in kept] == [nll[e] for e in top]
    assert sorted(p.name for p in run.glob("best*.safetensors")) == sorted(e["file"] for e in kept)

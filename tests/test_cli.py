"""End to end through the real command line: `python -m usi ...`, also under torchrun (gloo, CPU)."""
import json

import pytest
import torch
from conftest import TINY, read_jsonl, usi_cmd, usi_main
from safetensors.torch import load_file

from usi import recipe as recipe_mod


def train(root, run_dir, *extra, torchrun=0, process=False):
    """In this process (fast) unless under torchrun or asked for a process of its own."""
    args = ("train", "quickstart", *TINY, f"data.root={root}", f"run.dir={run_dir}", *extra)
    return usi_cmd(*args, torchrun=torchrun) if torchrun or process else usi_main(*args)


def test_a_run_writes_metrics_checkpoints_recipe_and_summary(image_root, tmp_path):
    out = train(image_root, tmp_path / "run", process=True)  # the real command line, once
    assert out.returncode == 0, out.stderr
    run = tmp_path / "run"
    epochs = read_jsonl(run / "metrics.jsonl")
    assert [e["epoch"] for e in epochs] == [1, 2]
    for e in epochs:
        for variant in ("raw", "ema"):
            assert e[variant]["count"] == 12  # every val image, once
            assert 0 <= e[variant]["top1"] <= 100 and e[variant]["nll"] > 0
        assert e["train"]["task_loss"] > 0 and e["train"]["kd_loss"] == 0 and e["train"]["img_per_s"] > 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["epochs"] == 2 and summary["num_classes"] == 4 and summary["teacher"] is None
    best = summary["best"]
    assert best["value"] == max(max(e["raw"]["top1"], e["ema"]["top1"]) for e in epochs)
    assert set(load_file(run / "best.safetensors")) == set(torch.load(run / "last.pt")["student"])
    # the effective recipe reproduces the run
    saved = recipe_mod.load(run / "recipe.yaml")
    assert saved.model.name == "test_resnet" and saved.data.batch_size == 8 and saved.run.dir == str(run)
    assert "epoch 2/2" in out.stderr and "img/s" in out.stderr and " run" in out.stderr and "eta " in out.stderr


def test_kd_run_from_a_trained_teacher_reports_fidelity(image_root, tmp_path):
    assert train(image_root, tmp_path / "teacher").returncode == 0
    weights = tmp_path / "teacher" / "best.safetensors"
    out = train(image_root, tmp_path / "student", "model.name=test_efficientnet", "teacher.name=test_resnet",
                f"teacher.weights={weights}")
    assert out.returncode == 0, out.stderr
    epochs = read_jsonl(tmp_path / "student" / "metrics.jsonl")
    assert all(e["train"]["kd_loss"] > 0 for e in epochs)
    assert all(0 <= e["ema"]["agreement"] <= 100 and e["ema"]["kl"] >= 0 for e in epochs)
    summary = json.loads((tmp_path / "student" / "summary.json").read_text())
    teacher_summary = json.loads((tmp_path / "teacher" / "summary.json").read_text())
    # the teacher's val top-1 measured by the student's run is the teacher run's own best
    assert summary["teacher_metrics"]["top1"] == pytest.approx(teacher_summary["best"]["value"])


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


@pytest.mark.parametrize("args, message", [
    (["optim.lr=-1"], "optim.lr=-1.0 is out of range"),
    (["model.name=resnet5o"], "did you mean"),
    (["data.root=/no/such/data"], "data.root='/no/such/data' does not exist"),
    (["data.batch_size=128", "optim.global_batch=128"], "is larger than one epoch"),
    (["model.name=test_vit", "model.kwargs={depth: oops}"], "model.kwargs"),
])
def test_bad_input_ends_in_one_line_and_exit_2(image_root, tmp_path, args, message):
    out = usi_main("train", "quickstart", *TINY, f"data.root={image_root}", f"run.dir={tmp_path / 'r'}", *args)
    assert out.returncode == 2
    lines = [line for line in out.stderr.strip().splitlines() if "usi: error" in line or "Traceback" in line]
    assert len(lines) == 1 and message in lines[0], out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "r").exists()  # nothing written: the corrected command can run as is


def test_gradient_accumulation_reaches_the_global_batch(image_root, tmp_path):
    out = train(image_root, tmp_path / "acc", "optim.global_batch=16", "sched.epochs=1", "sched.warmup_epochs=0")
    assert out.returncode == 0, out.stderr
    assert "global batch 16 = 8 x 1 processes x 2 accumulation" in out.stderr
    steps = len(read_jsonl(tmp_path / "acc" / "metrics.jsonl"))
    assert steps == 1 and torch.load(tmp_path / "acc" / "last.pt")["num_updates"] == 64 // 8 // 2


def test_two_process_torchrun_gloo_run_end_to_end(image_root, tmp_path):
    out = train(image_root, tmp_path / "ddp", "data.batch_size=4", "optim.global_batch=8", torchrun=2)
    assert out.returncode == 0, out.stderr[-3000:]
    epochs = read_jsonl(tmp_path / "ddp" / "metrics.jsonl")
    assert [e["epoch"] for e in epochs] == [1, 2]
    assert all(e["ema"]["count"] == 12 for e in epochs)  # each val image counted once over both ranks
    assert "global batch 8 = 4 x 2 processes x 1 accumulation" in out.stderr
    assert json.loads((tmp_path / "ddp" / "summary.json").read_text())["epochs"] == 2

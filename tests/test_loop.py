"""usi/training/loop.py: how the epoch loop ends a run that cannot go on."""
import json
import shutil

import pytest
from safetensors import safe_open

from usi.training import loop

from conftest import read_jsonl, usi_main
from helpers import one_error, teacher_file, train_args


def test_a_run_whose_every_update_is_skipped_does_not_exit_0(image_root, tmp_path):
    out = usi_main(*train_args(image_root, tmp_path / "r", "optim.lr=1e30", "run.max_nonfinite=1000", "sched.epochs=3",
                              "sched.warmup_epochs=0", "ema.enabled=false"))
    assert out.returncode == 1, out.stderr[-2000:]
    (line,) = [x for x in out.stderr.splitlines() if x.startswith("usi: stopped")]
    assert "every one of the 8 updates of epoch" in line and "skipped as non-finite" in line
    assert not (tmp_path / "r" / "summary.json").exists()


@pytest.mark.parametrize("checkpointed", [False, True])
def test_val_data_found_all_unreadable_after_an_epoch_is_one_line_and_blocks_no_rerun(image_root, tmp_path,
                                                                                       checkpointed):
    data = tmp_path / "data"
    shutil.copytree(image_root, data)
    for path in (data / "val").rglob("*.jpg"):
        path.write_bytes(b"not an image")
    every = ["run.ckpt_every_steps=2"] if checkpointed else []
    one_error(usi_main(*train_args(data, tmp_path / "r", *every)), "no val image could be read (12 unreadable")
    if not checkpointed:  # nothing recorded yet: the start leaves nothing behind, the same command runs
        assert not (tmp_path / "r").exists()
        out = usi_main(*train_args(image_root, tmp_path / "r"))
    else:  # a mid-epoch checkpoint was written: the run is kept, and resumes
        assert (tmp_path / "r" / "last.pt").is_file()
        out = usi_main(*train_args(image_root, tmp_path / "r", *every, "run.resume=auto"))
        assert "resumed from" in out.stderr
    assert out.returncode == 0, out.stderr[-2000:]


def test_a_teacher_pass_that_fails_after_the_directory_is_made_leaves_nothing(image_root, tmp_path, monkeypatch):
    from usi.training import loop

    def broken(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")
    monkeypatch.setattr(loop, "teacher_val_logits", broken)
    teacher = teacher_file(tmp_path / "t.safetensors")
    args = train_args(image_root, tmp_path / "runs" / "r", "teacher.name=test_resnet", f"teacher.weights={teacher}",
                      "sched.epochs=1", "sched.warmup_epochs=0")
    out = usi_main(*args)
    assert out.returncode == 1 and "usi: error: RuntimeError: CUDA error" in out.stderr, out.stderr[-2000:]
    assert not (tmp_path / "runs").exists()
    monkeypatch.undo()
    out = usi_main(*args)
    assert out.returncode == 0, out.stderr[-2000:]


def test_a_diverging_run_stops_naming_the_update_lr_and_checkpoint(image_root, tmp_path):
    out = usi_main(*train_args(image_root, tmp_path / "r", "optim.lr=1e30", "run.max_nonfinite=2", "sched.epochs=3",
                              "sched.warmup_epochs=0", "ema.enabled=false"))
    assert out.returncode == 1
    (line,) = [x for x in out.stderr.splitlines() if x.startswith("usi: stopped")]
    assert "non-finite updates in a row (run.max_nonfinite=" in line and "lr now" in line and "checkpoint" in line


def test_best_weights_are_selected_on_minival_where_it_and_val_disagree(image_root, tmp_path, monkeypatch):
    """Rigged top-1s: on val the raw weights win, on minival the EMA ones. data.minival selects on minival (and
    reports the chosen weights' val metrics); data.minival=0, the USI paper's protocol, on val."""
    real = loop.evaluate

    def rigged(models, loader, compute, **kwargs):
        metrics, logits = real(models, loader, compute, **kwargs)
        on_minival = len(loader.dataset) == 16  # 64 train images x 0.25; val has 12
        metrics["raw"]["top1"], metrics["ema"]["top1"] = (10.0, 90.0) if on_minival else (80.0, 20.0)
        return metrics, logits

    monkeypatch.setattr(loop, "evaluate", rigged)
    assert usi_main(*train_args(image_root, tmp_path / "mini", "data.minival=0.25")).returncode == 0
    summary = json.loads((tmp_path / "mini" / "summary.json").read_text())
    assert summary["selection"] == "minival (16 images)"
    assert (summary["best"]["weights"], summary["best"]["value"]) == ("ema", 90.0)
    assert summary["selected_val"]["top1"] == 20.0 and summary["selected_val"]["count"] == 12
    first = read_jsonl(tmp_path / "mini" / "metrics.jsonl")[0]
    assert first["selected_on"] == "minival" and first["raw"]["top1"] == 80.0 and first["minival"]["ema"]["top1"] == 90
    with safe_open(tmp_path / "mini" / "best.safetensors", "pt") as f:
        assert f.metadata()["weights"] == "ema" and f.metadata()["selection"] == "minival (16 images)"

    assert usi_main(*train_args(image_root, tmp_path / "val")).returncode == 0
    summary = json.loads((tmp_path / "val" / "summary.json").read_text())
    assert summary["selection"] == "val" and summary["best"]["weights"] == "raw"
    assert summary["selected_val"]["top1"] == summary["best"]["value"] == 80.0
    assert "minival" not in read_jsonl(tmp_path / "val" / "metrics.jsonl")[0]

"""usi/cli.py: the `usi` command end to end (`python -m usi ...`): a whole run, a KD run, bad input in one line
(exit 2; the unforeseen: exit 1), a built wheel installed elsewhere. Torchrun runs are in test_distributed.py."""
import json
import os
import subprocess
import sys
import zipfile

import pytest
import torch
from safetensors.torch import load_file

from usi import recipe as recipe_mod

from conftest import REPO, TINY, read_jsonl, usi_main
from helpers import train, train_args


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


def test_an_unforeseen_error_is_still_one_line_and_its_traceback_is_kept(image_root, tmp_path, monkeypatch):
    import usi.training.build

    def broken(*args, **kwargs):
        raise ZeroDivisionError("something nobody checked for")

    monkeypatch.setattr(usi.training.build, "build_training", broken)
    out = usi_main(*train_args(image_root, tmp_path / "r"))
    lines = [x for x in out.stderr.splitlines() if x.startswith("usi: error:")]
    assert out.returncode == 1 and len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    assert "ZeroDivisionError: something nobody checked for (in test_cli.py:" in lines[0]
    assert "USI_TRACEBACK=1" in lines[0] and not (tmp_path / "r").exists()


def test_a_built_wheel_installed_elsewhere_trains_with_its_built_in_recipes(image_root, tmp_path):
    dist = tmp_path / "dist"
    # a module an earlier build left in build/lib (moved or removed since) must not ship
    stale = REPO / "build" / "lib" / "usi" / "train.py"
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.write_text("raise ImportError('a module of an earlier layout')\n")
    subprocess.run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(dist)], cwd=REPO, check=True, capture_output=True)
    (wheel,) = dist.glob("usi-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    wanted = {"usi/recipes/usi.yaml", "usi/recipes/quickstart.yaml", "usi/data/shard_writer.py", "usi/studies/tables.py"}
    assert wanted <= set(names) and "usi/train.py" not in names
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, capture_output=True)
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}  # torch & co. from this environment

    def usi(*args):
        return subprocess.run([sys.executable, "-m", "usi", *args], cwd=empty, env=env, capture_output=True, text=True,
                              timeout=300)

    where = subprocess.run([sys.executable, "-c", "import usi; print(usi.__file__)"], cwd=empty, env=env,
                           capture_output=True, text=True)
    assert where.stdout.startswith(str(site))  # the wheel's usi, not the checkout's
    assert usi("--version").stdout.strip() == f"usi {__import__('usi').__version__}"
    run = usi(*train_args(image_root, "run", "sched.epochs=1", "sched.warmup_epochs=0"))
    assert run.returncode == 0, run.stderr[-2000:]
    assert (empty / "run" / "best.safetensors").is_file()
    assert usi("eval", "run/best.safetensors", f"data.root={image_root}").returncode == 0
    shards = usi("shards", str(image_root / "val"), "shards", "--classes-from", str(image_root / "train"))
    assert shards.returncode == 0 and (empty / "shards" / "index.json").is_file(), shards.stderr
    typo = usi("train", "usi", "--dry-run", "model.name=resnet5O")
    assert usi("table", "--help").returncode == 0 and typo.returncode == 2 and "did you mean" in typo.stderr

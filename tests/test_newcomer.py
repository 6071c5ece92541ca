"""What a newcomer and a timm user meet first: a plain install, tracking, fine-tuning, a dry run, export,
and what a run says about itself."""
import json
import os
import subprocess
import sys
import zipfile

import pytest
import timm
import torch
from conftest import REPO, TINY, read_jsonl, usi_cmd, usi_main
from safetensors.torch import save_file

from usi import models
from usi import recipe as R
from usi.training import build


def train_args(root, run_dir, *extra):
    return ["train", "quickstart", *TINY, f"data.root={root}", f"run.dir={run_dir}", *extra]


# ---------------------------------------------------------------- a real install


def test_a_built_wheel_installed_elsewhere_trains_with_its_built_in_recipes(image_root, tmp_path):
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(dist)], cwd=REPO, check=True, capture_output=True)
    (wheel,) = dist.glob("usi-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    wanted = {"usi/recipes/usi.yaml", "usi/recipes/quickstart.yaml", "usi/data/shard_writer.py", "usi/studies/tables.py"}
    assert wanted <= set(names)
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


# ---------------------------------------------------------------- tracking


def test_tensorboard_gets_interval_losses_and_epoch_metrics(image_root, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    out = usi_main(*train_args(image_root, run, "run.loggers=[tensorboard]"))
    assert out.returncode == 0, out.stderr[-2000:]
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/task_loss", "train/kd_loss", "train/lr", "train/img_per_s", "raw/top1", "ema/nll",
            "epoch_train/task_loss"} <= tags
    assert len(events.Scalars("train/task_loss")) == 2 * 4  # 8 steps an epoch, a point every 2 steps, 2 epochs
    top1 = [e.value for e in events.Scalars("raw/top1")]
    assert top1 == [r["raw"]["top1"] for r in read_jsonl(run / "metrics.jsonl")]
    assert [e.step for e in events.Scalars("raw/top1")] == [8, 16]  # keyed by the update count


FAKE_WANDB = '''
import json, os, uuid
class util:
    generate_id = staticmethod(lambda: uuid.uuid4().hex[:8])
class Run:
    def log(self, scalars, step): pass
    def finish(self): pass
def init(**kwargs):
    with open(os.environ["WANDB_CALLS"], "a") as f:
        f.write(json.dumps({k: kwargs[k] for k in ("id", "resume", "project")}) + "\\n")
    return Run()
'''


def test_a_wandb_run_keeps_its_id_across_a_resume(image_root, tmp_path):
    fake = tmp_path / "fake" / "wandb"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(FAKE_WANDB)  # no network here: the calls usi makes are what is tested
    env = {"PYTHONPATH": str(tmp_path / "fake"), "WANDB_CALLS": str(tmp_path / "calls.jsonl")}
    run = tmp_path / "run"
    assert usi_cmd(*train_args(image_root, run, "run.loggers=[wandb]", "run.stop_after=1"), env=env).returncode == 0
    assert usi_cmd(*train_args(image_root, run, "run.loggers=[wandb]", "run.resume=auto"), env=env).returncode == 0
    calls = read_jsonl(tmp_path / "calls.jsonl")
    assert len(calls) == 2 and calls[0]["id"] == calls[1]["id"] and calls[0]["resume"] == "allow"


@pytest.mark.parametrize("logger, extra", [("wandb", "usi[wandb]"), ("tensorboard", "usi[tensorboard]")])
def test_a_missing_tracker_package_is_one_line_naming_the_extra(image_root, tmp_path, monkeypatch, logger, extra):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == logger else real(name, *a))
    for dry in ([], ["--dry-run"]):  # the dry run checks it too
        out = usi_main(*train_args(image_root, tmp_path / "r", f"run.loggers=[{logger}]"), *dry)
        assert out.returncode == 2 and f"pip install '{extra}'" in out.stderr and not (tmp_path / "r").exists()


# ---------------------------------------------------------------- fine-tuning


def test_a_student_starts_from_a_local_file_with_its_classifier_reinitialized(image_root, tmp_path):
    source = timm.create_model("test_resnet", num_classes=10)
    save_file(source.state_dict(), str(tmp_path / "pretrained.safetensors"))
    recipe = R.load(None, ["model.name=test_resnet", f"model.weights={tmp_path / 'pretrained.safetensors'}"])
    student = models.create_student(recipe.model, 4, None, starting_weights=True)
    assert torch.equal(student.conv1[0].weight, source.conv1[0].weight)  # the body: the file's
    assert student.fc.weight.shape == (4, student.fc.weight.shape[1])  # the head: 4 classes, fresh
    out = usi_main(*train_args(image_root, tmp_path / "run", f"model.weights={tmp_path / 'pretrained.safetensors'}",
                               "optim.layer_decay=0.75", "sched.epochs=1", "sched.warmup_epochs=0"))
    assert out.returncode == 0 and "classifier re-initialized" in out.stderr, out.stderr[-2000:]


def test_layer_decay_scales_the_lr_per_layer():
    recipe = R.load(None, ["model.name=test_resnet", "optim.layer_decay=0.5"])
    opt = build.create_optimizer(recipe, timm.create_model("test_resnet", num_classes=4), lr=1e-3)
    scales = sorted({round(g["lr_scale"], 4) for g in opt.param_groups})
    assert scales[-1] == 1.0 and scales[0] < 0.1 and len(scales) > 3


def test_starting_weights_of_another_architecture_are_one_line(image_root, tmp_path):
    save_file(timm.create_model("resnet18", num_classes=4).state_dict(), str(tmp_path / "r18.safetensors"))
    out = usi_main(*train_args(image_root, tmp_path / "r", f"model.weights={tmp_path / 'r18.safetensors'}"))
    assert out.returncode == 2 and "do not fit ResNet: shapes differ (file vs model)" in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and not (tmp_path / "r").exists()


@pytest.mark.parametrize("args, message", [
    (["model.kwargs={pretrained: true}"], "model.kwargs sets pretrained, which usi sets from model.pretrained"),
    (["model.kwargs={num_classes: 3}"], "model.kwargs sets num_classes"),
    (["model.pretrained=true", "model.weights=x.pt"], "keep one"),
    (["model.weights=/no/such.safetensors"], "does not exist"),
    (["model.pretrained=true"], "could not get pretrained weights for test_resnet from timm"),
])
def test_fine_tuning_mistakes_are_one_line(image_root, tmp_path, args, message):
    out = usi_main(*train_args(image_root, tmp_path / "r", *args))
    assert out.returncode == 2 and message in out.stderr and not (tmp_path / "r").exists(), out.stderr


# ---------------------------------------------------------------- a dry run, keys, version


def test_a_dry_run_checks_everything_writes_nothing_and_prints_the_plan(image_root, tmp_path):
    teacher = tmp_path / "t.safetensors"
    save_file(timm.create_model("test_resnet", num_classes=4).state_dict(), str(teacher))
    out = usi_main(*train_args(image_root, tmp_path / "r", "teacher.name=test_resnet", f"teacher.weights={teacher}",
                               "optim.global_batch=16"), "--dry-run")
    assert out.returncode == 0, out.stderr
    assert not (tmp_path / "r").exists()
    for line in ("model:\n  name: test_resnet", "64 train / 12 val images, 4 classes", "teacher: test_resnet",
                 "global batch 16 = 8 x 1 processes x 2 accumulation", "8 per epoch x 2 epochs = 16 steps, 8 updates"):
        assert line in out.stdout, line
    wrong = tmp_path / "t10.safetensors"
    save_file(timm.create_model("test_resnet", num_classes=10).state_dict(), str(wrong))
    out = usi_main(*train_args(image_root, tmp_path / "r", "teacher.name=test_resnet", f"teacher.weights={wrong}"),
                   "--dry-run")
    assert out.returncode == 2 and "predicts 10 classes but the dataset has 4" in out.stderr


def test_usi_keys_lists_every_key_with_its_default_and_meaning():
    out = usi_main("keys")
    lines = [x for x in out.stdout.splitlines() if x.startswith("  ")]
    assert len(lines) == sum(len(R.fields_of(s)) for s in R.SECTIONS)
    assert "  run.max_steps = 0 (>= 0): " in out.stdout and "  data.eval_batch_size = None" in out.stdout
    assert usi_main("keys", "optimm").returncode == 2


# ---------------------------------------------------------------- export


def test_export_gives_a_folder_timm_loads_without_usi_and_an_onnx_model(image_root, tmp_path):
    run = tmp_path / "run"
    assert usi_main(*train_args(image_root, run, "sched.epochs=1", "sched.warmup_epochs=0")).returncode == 0
    out = usi_main("export", str(run / "last.pt"), str(tmp_path / "export"), "--onnx")
    assert out.returncode == 0, out.stderr
    code = (f"import timm, torch; m = timm.create_model('local-dir:{tmp_path / 'export'}', pretrained=True).eval(); "
            f"print(m.pretrained_cfg['crop_pct'], m.pretrained_cfg['input_size'], m.num_classes)")
    alone = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert alone.stdout.split() == ["0.95", "(3,", "16,", "16)", "4"], alone.stderr  # the student's eval settings
    report = json.loads((tmp_path / "export" / "usi-export.json").read_text())
    assert report["weights"] == "ema" and report["timm_max_abs_diff"] < 1e-5 and report["onnx_max_abs_diff"] < 1e-4
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["label_names"] == sorted(p.name for p in (image_root / "train").iterdir())
    again = usi_main("export", str(run / "last.pt"), str(tmp_path / "export"))
    assert again.returncode == 2 and "not an empty folder" in again.stderr


# ---------------------------------------------------------------- what a run tells you


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


# ---------------------------------------------------------------- self-distillation


def test_self_distillation_from_a_previous_run_with_the_student_started_from_the_teacher(image_root, tmp_path):
    """The seed paper's self-distillation: the teacher is an earlier usi run of the same architecture (its
    best.safetensors), and the student may start from those weights (teacher-init) or from scratch."""
    first = tmp_path / "first"
    assert usi_main(*train_args(image_root, first, "sched.epochs=1", "sched.warmup_epochs=0")).returncode == 0
    best = json.loads((first / "summary.json").read_text())["best"]
    weights = first / "best.safetensors"
    kd = ["teacher.name=test_resnet", f"teacher.weights={weights}", "sched.epochs=1", "sched.warmup_epochs=0"]
    for init, extra in (("scratch", []), ("teacher-init", [f"model.weights={weights}"])):
        out = usi_main(*train_args(image_root, tmp_path / init, *kd, *extra))
        assert out.returncode == 0, out.stderr[-2000:]
        teacher = json.loads((tmp_path / init / "summary.json").read_text())["teacher_metrics"]
        assert teacher["top1"] == best["value"] and teacher["count"] == 12  # the earlier run's best, measured anew
        assert ("student weights from" in out.stderr) == (init == "teacher-init")

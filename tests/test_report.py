"""`usi eval` (usi/evaluation/report.py) and the teacher-logit cache, through the real command line."""
import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from usi import models
from usi import recipe as R
from usi.runtime import files
from usi.training import checkpoint

from conftest import REPO, TINY, usi_cmd, usi_main
from helpers import ensemble_args, nan_copy, one_error, strict_json, teacher_file, teacher_files, train, train_args


@pytest.fixture(scope="module")
def kd_run(odd_root, tmp_path_factory):
    """A teacher run and a KD student run on the 5-class data (15 val images)."""
    base = tmp_path_factory.mktemp("runs")
    common = [*TINY, f"data.root={odd_root}", "sched.epochs=1", "sched.warmup_epochs=0"]
    assert usi_main("train", "quickstart", *common, f"run.dir={base / 'teacher'}").returncode == 0
    weights = base / "teacher" / "best.safetensors"
    out = usi_main("train", "quickstart", *common, f"run.dir={base / 'student'}", "model.name=test_efficientnet",
                   "teacher.name=test_resnet", f"teacher.weights={weights}")
    assert out.returncode == 0, out.stderr
    KD_RUN_PATHS[:] = [f"data.root={odd_root}", f"teacher.weights={weights}"]
    return base


# usi eval takes every path from its command line (never from the checkpoint): the data and the teacher
KD_RUN_PATHS = []


def eval_json(ckpt, *overrides, torchrun=0, env=None):
    args = ("eval", str(ckpt), *KD_RUN_PATHS, *overrides, "--json")
    out = usi_cmd(*args, torchrun=torchrun, env=env) if torchrun else usi_main(*args, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


def test_eval_reports_accuracy_calibration_and_fidelity(kd_run, tmp_path):
    env = {"USI_CACHE": str(tmp_path / "cache")}
    first = eval_json(kd_run / "student" / "best.safetensors", env=env)
    assert first["images"] == 15 and first["teacher_cached"] is False
    (variant, m), = first["students"].items()
    assert variant in ("raw", "ema") and m["count"] == 15
    for key in ("top1", "top5", "nll", "ece", "agreement", "kl"):
        assert key in m
    second = eval_json(kd_run / "student" / "best.safetensors", env=env)
    assert second["teacher_cached"] is True
    assert second["students"] == first["students"] and second["teacher"] == first["teacher"]


def test_eval_of_a_full_checkpoint_reports_raw_and_ema(kd_run):
    report = eval_json(kd_run / "student" / "last.pt")
    assert set(report["students"]) == {"raw", "ema"}


def test_the_cache_is_invalidated_by_transform_files_and_teacher_weights(kd_run, odd_root, tmp_path):
    env = {"USI_CACHE": str(tmp_path / "cache")}
    ckpt = kd_run / "student" / "best.safetensors"
    assert eval_json(ckpt, env=env)["teacher_cached"] is False
    assert eval_json(ckpt, env=env)["teacher_cached"] is True
    assert eval_json(ckpt, "aug.eval_crop_pct=0.8", env=env)["teacher_cached"] is False  # transform
    data = tmp_path / "data"
    shutil.copytree(odd_root, data)
    assert eval_json(ckpt, f"data.root={data}", env=env)["teacher_cached"] is False  # other file list
    extra = next((data / "val" / "circle").iterdir())
    shutil.copy(extra, extra.with_name("copy.jpg"))
    assert eval_json(ckpt, f"data.root={data}", env=env)["teacher_cached"] is False
    weights = kd_run / "teacher" / "best.safetensors"
    copy = tmp_path / "t2.safetensors"
    copy.write_bytes(weights.read_bytes())
    assert eval_json(ckpt, f"teacher.weights={copy}", env=env)["teacher_cached"] is True  # same bytes: same key


def test_distributed_eval_is_exact_on_an_odd_val_set(kd_run):
    one = eval_json(kd_run / "student" / "last.pt")
    two = eval_json(kd_run / "student" / "last.pt", torchrun=2)
    assert one["images"] == 15
    for name in ("raw", "ema"):
        a, b = one["students"][name], two["students"][name]
        # every image counted once: counting metrics are identical
        counted = ("count", "top1", "top5", "agreement")
        assert [b[k] for k in counted] == [a[k] for k in counted]
        # continuous ones differ only by fp32 forward rounding (CPU kernels block batches of 8 and 15 differently)
        for key in ("nll", "ece", "kl"):
            assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-7), (name, key)


def test_eval_at_another_resolution(kd_run):
    report = eval_json(kd_run / "student" / "best.safetensors", "data.input_size=24")
    assert report["input_size"] == 24


def test_eval_prints_a_one_screen_report(kd_run):
    out = usi_main("eval", str(kd_run / "student" / "best.safetensors"), *KD_RUN_PATHS)
    assert out.returncode == 0
    assert "top-1" in out.stdout and "KL(t||s)" in out.stdout and "teacher" in out.stdout
    assert len(out.stdout.splitlines()) < 25


def test_eval_of_a_non_usi_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "x.pt"
    bad.write_bytes(b"garbage")
    out = usi_main("eval", str(bad))
    assert out.returncode == 2 and out.stderr.startswith("usi: error:")


def test_eval_never_runs_commands_or_opens_files_named_in_a_checkpoint(image_root, tmp_path):
    pwned = tmp_path / "pwned"
    subprocess.run([sys.executable, "-m", "usi", "shards", str(image_root / "val"), str(tmp_path / "shards" / "val"),
                    "--classes-from", str(image_root / "train"), "--shard-size", "4"], cwd=REPO, check=True,
                   capture_output=True)
    trained = usi_main(*train_args(image_root, tmp_path / "run", "sched.epochs=1", "sched.warmup_epochs=0"))
    assert trained.returncode == 0
    hostile = R.load(tmp_path / "run" / "recipe.yaml", [
        "data.format=shards",
        f"data.val_shards=pipe:touch {pwned}; cat {tmp_path}/shards/val/shard-{{000000..000002}}.tar",
        "teacher.name=test_resnet", f"teacher.weights={tmp_path / 'run' / 'last.pt'}"])
    state = files.load_state_file(tmp_path / "run" / "best.safetensors")
    meta = files.read_metadata(tmp_path / "run" / "best.safetensors")
    files.export_weights(state, tmp_path / "evil.safetensors", {**meta, "recipe": hostile.to_yaml()})
    full = checkpoint.load(tmp_path / "run" / "last.pt")
    checkpoint.save({**{k: v for k, v in full.items() if k != "format"}, "recipe": hostile.to_yaml()},
                    tmp_path / "evil.pt")
    for ckpt in ("evil.safetensors", "evil.pt"):
        out = usi_main("eval", str(tmp_path / ckpt), f"data.root={tmp_path / 'shards'}", "--json")
        assert out.returncode == 0, out.stderr[-2000:]
        report = strict_json(out.stdout)
        assert report["images"] == 12 and "teacher" not in report  # the index's own shards; no teacher file opened
        assert "teacher not evaluated" in out.stderr
        assert not pwned.exists()
    one_error(usi_main("eval", str(tmp_path / "evil.pt")), "usi eval needs data.root=")


def test_eval_json_and_run_files_are_valid_json_for_diverged_weights(image_root, tmp_path):
    run = tmp_path / "r"
    assert usi_main(*train_args(image_root, run, "sched.epochs=1", "sched.warmup_epochs=0")).returncode == 0
    state = checkpoint.load(run / "last.pt")
    state["student"] = nan_copy(state["student"])
    checkpoint.save({k: v for k, v in state.items() if k != "format"}, tmp_path / "nan.pt")
    out = usi_main("eval", str(tmp_path / "nan.pt"), f"data.root={image_root}", "--json")
    assert out.returncode == 0, out.stderr[-2000:]
    report = strict_json(out.stdout)
    assert report["students"]["raw"]["nll"] is None  # NaN is written as null
    for name in ("metrics.jsonl", "summary.json"):
        for line in (run / name).read_text().splitlines() if name.endswith("l") else [(run / name).read_text()]:
            strict_json(line)


def test_weights_of_a_diverged_run_are_measured_as_wrong_and_not_exported(image_root, tmp_path):
    run = tmp_path / "r"
    assert usi_main(*train_args(image_root, run, "sched.epochs=1", "sched.warmup_epochs=0")).returncode == 0
    state = checkpoint.load(run / "last.pt")
    state["student"] = nan_copy(state["student"])
    state["ema"] = {}
    checkpoint.save({k: v for k, v in state.items() if k != "format"}, tmp_path / "nan.pt")
    teacher = teacher_file(tmp_path / "teacher.safetensors")
    out = usi_main("eval", str(tmp_path / "nan.pt"), f"data.root={image_root}", "teacher.name=test_resnet",
                   f"teacher.weights={teacher}", "--json")
    assert out.returncode == 0 and "NaN or infinite logits for 12 of 12" in out.stderr, out.stderr
    raw = strict_json(out.stdout)["students"]["raw"]
    assert raw["top1"] == 0 and raw["top5"] == 0 and raw["agreement"] == 0 and raw["nonfinite"] == 12
    one_error(usi_main("export", str(tmp_path / "nan.pt"), str(tmp_path / "out")), "a diverged run")
    assert not (tmp_path / "out").exists()


def test_eval_of_a_feature_kd_or_ensemble_run_needs_no_teacher(image_root, tmp_path):
    paths = teacher_files(tmp_path)
    out = train(image_root, tmp_path / "run", *ensemble_args(paths), "features.student=layer3",
                "features.teacher=layer4", "sched.epochs=1", "sched.warmup_epochs=0")
    assert out.returncode == 0, out.stderr
    for ckpt in ("best.safetensors", "last.pt"):
        for extra in ([], ["teacher.name=null"]):
            report = usi_main("eval", str(tmp_path / "run" / ckpt), f"data.root={image_root}", *extra, "--json")
            assert report.returncode == 0, report.stderr
            assert "teacher" not in json.loads(report.stdout)


def test_eval_refuses_a_teacher_of_classes_in_another_order_and_sizes_weights_before_building(kd_run, tmp_path,
                                                                                             monkeypatch):
    teacher, student = kd_run / "teacher" / "best.safetensors", kd_run / "student" / "best.safetensors"
    meta, state = files.read_metadata(teacher), files.load_state_file(teacher)
    permuted = tmp_path / "permuted.safetensors"
    save_file(state, str(permuted), metadata={**meta, "classes": json.dumps(json.loads(meta["classes"])[::-1])})
    out = usi_main("eval", str(student), KD_RUN_PATHS[0], "teacher.name=test_resnet", f"teacher.weights={permuted}")
    one_error(out, f"teacher.weights={permuted} were trained on the same 5 classes in another order (label 0 is "
                   f"'triangle' there and 'circle' here)")  # before: agreement and KL against shuffled labels
    many = tmp_path / "many.safetensors"  # a class list far longer than the classifier it comes with
    save_file(state, str(many), metadata={**meta, "classes": json.dumps([f"c{i}" for i in range(200_000)])})
    built, create = [], models.create_student
    monkeypatch.setattr(models, "create_student", lambda cfg, n, *a, **k: built.append(
        (n, torch.empty(0).device.type)) or create(cfg, n, *a, **k))
    one_error(usi_main("eval", str(many), KD_RUN_PATHS[0]), "does not fit test_resnet: shapes differ (file vs model)")
    assert (200_000, "meta") in built and (200_000, "cpu") not in built  # compared on the meta device only

"""`usi table` (usi/studies/tables.py): one recipe, many backbones, on tiny models, CPU."""
import csv
import json

import pytest
import timm
from safetensors.torch import save_file

from conftest import TINY
from helpers import run_tool


def test_bench_table_runs_each_model_skips_finished_ones_and_survives_a_failure(image_root, tmp_path):
    teacher = tmp_path / "teacher.safetensors"
    save_file(timm.create_model("test_resnet", num_classes=4).state_dict(), str(teacher))
    overrides = [o for o in TINY if not o.startswith(("model.", "teacher."))] + [
        f"data.root={image_root}", "sched.epochs=1", "sched.warmup_epochs=0", "teacher.name=test_resnet",
        f"teacher.weights={teacher}"]
    args = ["-m", "usi", "table", "recipes/quickstart.yaml", *overrides, "--models", "test_efficientnet",
            "not_a_model", "--nproc", "1", "--out", str(tmp_path / "table"), "--device", "cpu"]
    out = run_tool(*args)
    assert out.returncode == 0, out.stderr[-2000:]
    with open(tmp_path / "table" / "table.csv") as f:
        rows = {r["model"]: r for r in csv.DictReader(f)}
    good, bad = rows["test_efficientnet"], rows["not_a_model"]
    assert float(good["top1_kd"]) >= 0 and float(good["top1_nokd"]) >= 0
    assert 0 <= float(good["agreement_kd"]) <= 100 and float(good["kl_kd"]) >= 0 and float(good["gmacs"]) > 0
    assert "is not a timm model" in bad["note"]
    assert (tmp_path / "table" / "table.png").stat().st_size > 1000
    assert (tmp_path / "table" / "test_efficientnet-kd.eval.json").is_file()  # kept: a re-run evaluates nothing
    again = run_tool(*args)
    assert again.returncode == 0 and again.stdout.count("already finished") == 2


def test_usi_table_takes_overrides_before_or_after_its_flags():
    from usi.studies.tables import DEFAULT_MODELS, parse
    args = parse(["recipes/usi.yaml", "--nproc", "8", "--out", "runs/t", "data.root=/data/imagenet"])
    assert args.overrides == ["data.root=/data/imagenet"] and args.nproc == 8 and args.models == DEFAULT_MODELS
    args = parse(["recipes/usi.yaml", "optim.lr=1e-3", "--models", "resnet50", "vit_small_patch16_224",
                  "data.root=/d"])
    assert args.models == ["resnet50", "vit_small_patch16_224"] and args.overrides == ["optim.lr=1e-3", "data.root=/d"]
    with pytest.raises(SystemExit):
        parse(["recipes/usi.yaml", "--nproc", "1", "--bogus"])


def test_bench_table_composes_with_an_ensemble_and_feature_kd(image_root, tmp_path):
    files = []
    for i in range(2):
        files.append(tmp_path / f"teacher{i}.safetensors")
        save_file(timm.create_model("test_resnet", num_classes=4).state_dict(), str(files[-1]))
    overrides = [o for o in TINY if not o.startswith(("model.", "teacher."))] + [
        f"data.root={image_root}", "sched.epochs=1", "sched.warmup_epochs=0", "teacher.name=test_resnet",
        f"teacher.weights={files[0]}", f"teacher.extra=[{{name: test_resnet, weights: {files[1]}}}]",
        "features.student=layer3", "features.teacher=layer4"]
    out = run_tool("-m", "usi", "table", "recipes/quickstart.yaml", *overrides, "--models", "test_resnet",
                   "--nproc", "1", "--out", str(tmp_path / "table"), "--device", "cpu")
    assert out.returncode == 0, out.stderr[-2000:]
    with open(tmp_path / "table" / "table.csv") as f:
        (row,) = csv.DictReader(f)
    assert float(row["top1_nokd"]) >= 0 and not row["note"]  # the baseline row drops teacher and features
    metrics = json.loads((tmp_path / "table" / "test_resnet-kd.eval.json").read_text())["metrics"]
    assert len(metrics["members"]) == 2  # evaluated against the whole ensemble, each member too
    assert "feature KD: student layer3 -> teacher layer4" in (tmp_path / "table" / "test_resnet-kd.log").read_text()


def test_bench_table_survives_a_first_model_that_fails_before_any_folder_exists(image_root, tmp_path):
    overrides = [o for o in TINY if not o.startswith(("model.", "teacher."))] + [
        f"data.root={image_root}", "sched.epochs=1", "sched.warmup_epochs=0", "data.input_size=18"]
    out_dir = tmp_path / "new" / "table"  # does not exist yet
    out = run_tool("-m", "usi", "table", "recipes/quickstart.yaml", *overrides, "model.kwargs={patch_size: 4}",
                   "--models", "test_vit", "--kd", "off", "--nproc", "1", "--out", str(out_dir), "--device", "cpu")
    assert out.returncode == 0, out.stderr[-2000:]
    with open(out_dir / "table.csv") as f:
        (row,) = csv.DictReader(f)
    assert "fails on 18 px inputs" in row["note"]

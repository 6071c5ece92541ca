"""The fidelity study's whole path on a shrunken dataset: three teachers, four students, the table and plot."""
import csv
import json

import pytest

from usi.studies.fidelity import COLUMNS, study

from conftest import usi_main

SMALL = ["sched.epochs=2", "data.batch_size=8", "optim.global_batch=8", "data.input_size=16", "data.workers=0"]


def test_the_fidelity_study_measures_each_student_against_its_own_teacher(tmp_path):
    rows = study(tmp_path, seed=3, per_class=(8, 3), extra=SMALL)
    assert [r["student"] for r in rows] == [f"test_resnet ({n})" for n in (
        "self-aug-off", "self-aug-on", "self-aug-on-teacher-init", "ensemble-aug-on")]
    for r in rows:
        for key in ("student_top1", "teacher_top1", "agree_train", "agree_val"):
            assert 0 <= r[key] <= 100, (r, key)
        assert r["kl_train"] >= 0 and r["kl_val"] >= 0
    self_rows = rows[:3]
    assert len({r["teacher_top1"] for r in self_rows}) == 1  # one teacher for the three
    # the study's figures are those `usi eval` gives, on val and on train, against the same teacher(s)
    data, runs = tmp_path / "data", tmp_path / "seed3"
    single = ["teacher.name=test_resnet", f"teacher.weights={runs / 'teacher-a' / 'best.safetensors'}"]
    ensemble = single + ["teacher.extra=[" + ", ".join(
        f"{{name: test_resnet, weights: {runs / t / 'best.safetensors'}}}" for t in ("teacher-b", "teacher-c")) + "]"]
    for name, teacher, r in (("self-aug-on", single, rows[1]), ("ensemble-aug-on", ensemble, rows[3])):
        for split, key in (("val", "agree_val"), ("train", "agree_train")):
            out = usi_main("eval", str(runs / name / "best.safetensors"), f"data.root={data}",
                           f"data.val_split={split}", *teacher, "--json")
            report = json.loads(out.stdout)
            (student,) = report["students"].values()
            assert student["agreement"] == pytest.approx(r[key])
            assert report["images"] == (80 if split == "train" else 30)
            if split == "val":
                assert report["teacher"]["top1"] == pytest.approx(r["teacher_top1"])
    # augmentation off: no mixup, cutmix, RandAugment or repeats in that run's recipe
    off = json.loads(json.dumps(__import__("yaml").safe_load((runs / "self-aug-off" / "recipe.yaml").read_text())))
    assert off["aug"]["mixup_alpha"] == 0 and off["aug"]["cutmix_alpha"] == 0 and off["aug"]["auto_augment"] is None
    assert off["aug"]["repeats"] == 1
    init = __import__("yaml").safe_load((runs / "self-aug-on-teacher-init" / "recipe.yaml").read_text())
    assert init["model"]["weights"].endswith("teacher-a/best.safetensors")
    with open(tmp_path / "fidelity-seed3.csv") as f:
        assert list(csv.DictReader(f).fieldnames) == COLUMNS
    assert (tmp_path / "fidelity-seed3.png").stat().st_size > 1000
    assert "| student |" in (tmp_path / "fidelity-seed3.md").read_text()
    assert "reused" not in (tmp_path / "fidelity-seed3.md").read_text()
    # a second call trains nothing and measures the same, and its title says so
    assert study(tmp_path, seed=3, per_class=(8, 3), extra=SMALL) == rows
    assert "(7 of 7 runs reused)" in (tmp_path / "fidelity-seed3.md").read_text()


def test_the_fidelity_command_checks_its_arguments():
    out = usi_main("fidelity", "--student-epochs", "1")
    assert out.returncode == 2 and "--student-epochs must be at least 2" in out.stderr

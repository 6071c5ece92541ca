"""usi/training/stored_teacher.py: a student trained from a store (teacher.soft_labels) equals the live run
(CPU, same seed), resumed mid-epoch too; a store of other facts or a changed teacher is refused at start."""
import json
import shutil

import pytest
import torch

from usi.distill import soft_labels as store
from usi.training import checkpoint

from conftest import usi_main
from helpers import one_error, soft_label_store, teacher_file, train, train_args


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    torch.manual_seed(7)
    path = teacher_file(tmp_path_factory.mktemp("teacher") / "teacher.safetensors")
    return ["teacher.name=test_resnet", f"teacher.weights={path}"]


@pytest.fixture(scope="module")
def full_store(image_root, teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("store") / "s"
    done = soft_label_store(image_root, out, teacher)
    assert done.returncode == 0, done.stderr
    return out


def student(run_dir):
    return torch.load(run_dir / "last.pt")["student"]


def max_difference(a, b):
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def resumed_mid_epoch(root, run_dir, *extra):
    """Epoch 1, then a checkpoint rewound to epoch 2 step 3 (as test_ledger does), then resumed to the end."""
    assert train(root, run_dir, *extra, "run.stop_after=1").returncode == 0
    state = checkpoint.load(run_dir / checkpoint.LAST)
    checkpoint.save({**state, "epoch": 1, "step": 3, "num_updates": state["num_updates"] + 3},
                    run_dir / checkpoint.LAST)
    out = train(root, run_dir, *extra, "run.resume=auto")
    assert out.returncode == 0, out.stderr
    return out


def test_a_student_trained_from_the_store_has_the_live_runs_weights(image_root, teacher, full_store, tmp_path):
    manifest = json.loads((full_store / "manifest.json").read_text())
    assert manifest["complete"] and manifest["top_k"] == 4 and len(manifest["chunks"]) == 2 * 3  # 8 steps / 3
    live = train(image_root, tmp_path / "live", *teacher)
    stored = train(image_root, tmp_path / "stored", *teacher, f"teacher.soft_labels={full_store}")
    assert live.returncode == 0 and stored.returncode == 0, stored.stderr
    assert "recomputed and matched" in stored.stderr
    assert max_difference(student(tmp_path / "live"), student(tmp_path / "stored")) == 0.0  # CPU, fp32: bit for bit
    # the store's cost is in the summary, within the training time; a live run has none
    summaries = {k: json.loads((tmp_path / k / "summary.json").read_text()) for k in ("live", "stored")}
    assert "soft_labels_read_s" not in summaries["live"]
    assert 0 < summaries["stored"]["soft_labels_read_s"] < summaries["stored"]["train_time_s"]
    # resumed mid-epoch: the folder loader reseeds from the step, so the live teacher serves that epoch's rest
    resumed_mid_epoch(image_root, tmp_path / "live_cut", *teacher)
    out = resumed_mid_epoch(image_root, tmp_path / "stored_cut", *teacher, f"teacher.soft_labels={full_store}")
    assert "the live teacher serves the rest of this epoch" in out.stderr
    assert max_difference(student(tmp_path / "live_cut"), student(tmp_path / "stored_cut")) == 0.0


def test_a_run_of_other_facts_is_refused_naming_the_key(image_root, teacher, full_store, tmp_path):
    out = usi_main(*train_args(image_root, tmp_path / "r", *teacher, f"teacher.soft_labels={full_store}",
                               "run.seed=3"))
    one_error(out, "run.seed: the store has 42, this run 3")
    assert not (tmp_path / "r").exists()
    one_error(usi_main(*train_args(image_root, tmp_path / "r", *teacher, f"teacher.soft_labels={full_store}",
                                   "aug.mixup_alpha=0.5")), "aug.mixup_alpha")


def test_a_changed_teacher_file_is_caught_by_the_self_check(image_root, teacher, full_store, tmp_path):
    # same name, same size, other weights: the recorded checksum differs, so a store copied beside a newer
    # teacher file is refused by its facts; with the checksum forged, the recomputed steps catch it
    weights = teacher[1].split("=", 1)[1]
    changed = tmp_path / "changed.safetensors"
    torch.manual_seed(99)
    teacher_file(changed)
    forged = tmp_path / "forged"
    forged.mkdir()
    for f in full_store.iterdir():
        (forged / f.name).write_bytes(f.read_bytes())
    manifest = json.loads((forged / "manifest.json").read_text())
    manifest["facts"]["teacher"]["weights"] = f"sha256:{store.sha256_file(changed)}"
    store.write_manifest(forged, manifest)
    args = ["teacher.name=test_resnet", f"teacher.weights={changed}", f"teacher.soft_labels={forged}"]
    one_error(usi_main(*train_args(image_root, tmp_path / "r", *args)), "does not match the live teacher at epoch 1")
    assert not (tmp_path / "r").exists()
    assert weights != str(changed)


def test_the_dry_run_names_the_store_and_a_resume_may_read_it_elsewhere(image_root, teacher, full_store, tmp_path):
    dry = usi_main(*train_args(image_root, tmp_path / "d", *teacher, f"teacher.soft_labels={full_store}"), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert f"soft labels: {full_store}, top-4 of 4 classes (exact), 6 chunks present" in dry.stdout + dry.stderr
    # a resume may read the store from another place (a node's disk), or run the live teacher: the store's
    # facts are checked against the run's at start, so only the path is free
    moved = tmp_path / "moved"
    shutil.copytree(full_store, moved)
    assert train(image_root, tmp_path / "r", *teacher, f"teacher.soft_labels={full_store}",
                 "run.stop_after=1").returncode == 0
    out = train(image_root, tmp_path / "r", *teacher, f"teacher.soft_labels={moved}", "run.resume=auto")
    assert out.returncode == 0, out.stderr
    assert max_difference(student(tmp_path / "r"), student_of_live(image_root, teacher, tmp_path)) == 0.0
    one_error(usi_main(*train_args(image_root, tmp_path / "r", *teacher, "run.resume=auto", "run.seed=3")),
              "run.seed")  # what the store does not decide stays fixed


def student_of_live(root, teacher, tmp_path):
    assert train(root, tmp_path / "live", *teacher).returncode == 0
    return student(tmp_path / "live")

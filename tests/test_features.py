"""usi/distill/features.py: feature KD: common forms of maps / tokens / vectors, the projection, the loss,
module names, training, resume and compile."""
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from usi.distill import features

from conftest import read_jsonl
from helpers import ensemble_args, teacher_files, train


def test_maps_tokens_and_vectors_take_a_common_form():
    cnn = torch.randn(2, 8, 4, 4)
    assert features.common_form(cnn, 0).shape == (2, 8, 4, 4)
    vit = torch.randn(2, 1 + 9, 16)  # a class token and a 3x3 grid
    grid = features.common_form(vit, 1)
    assert grid.shape == (2, 16, 3, 3) and torch.equal(grid[:, :, 0, 1], vit[:, 2])  # row-major patches
    assert features.common_form(cnn, 0, pool=True).shape == (2, 8)  # the other side is a vector: pool
    assert torch.allclose(features.common_form(cnn, 0, pool=True), cnn.mean(dim=(2, 3)))


def test_the_projection_maps_widths_and_resolutions_to_the_teachers():
    p = features.Projector((2, 8, 8, 8), (2, 16, 4, 4))
    assert isinstance(p.proj, torch.nn.Conv2d) and p(torch.randn(2, 8, 8, 8)).shape == (2, 16, 4, 4)
    up = features.Projector((2, 16, 2, 2), (2, 16, 4, 4))
    assert isinstance(up.proj, torch.nn.Identity) and up(torch.randn(2, 16, 2, 2)).shape == (2, 16, 4, 4)
    assert up.resizes and not features.Projector((2, 16, 2, 2), (2, 32, 2, 2)).resizes
    down = features.Projector((2, 16, 4, 4), (2, 16, 2, 2))
    x = torch.randn(2, 16, 4, 4)
    assert torch.allclose(down(x), F.avg_pool2d(x, 2))  # averaged down, cell by cell
    vec = features.Projector((2, 8), (2, 32))
    assert isinstance(vec.proj, torch.nn.Linear) and vec(torch.randn(2, 8)).shape == (2, 32)


def test_feature_losses():
    a = torch.randn(4, 8, 3, 3)
    assert features.feature_loss(a, a, "mse") == 0
    assert features.feature_loss(a, 2 * a, "cosine").abs() < 1e-6  # scale-free
    assert features.feature_loss(a, -a, "cosine") == pytest.approx(2.0)
    assert features.feature_loss(a, a + 1, "mse") == pytest.approx(1.0)


def test_token_and_channels_last_layouts():
    assert features.layout((2, 17, 8), 1) == "tokens"  # a class token and a 4x4 grid
    assert features.layout((2, 16, 8), 1) == "grid"  # a patch embedding: no class token to drop
    assert features.layout((2, 15, 8), 0) == "row"
    assert features.layout((2, 3, 3, 64), 0) == "nhwc" and features.layout((2, 64, 3, 3), 0) == "nchw"
    assert features.layout((2, 3, 10, 32), 0) is None  # attention internals
    x = torch.randn(2, 3, 3, 64)
    assert torch.equal(features.common_form(x, 0), x.permute(0, 3, 1, 2))
    grid = torch.randn(2, 16, 8)
    assert features.common_form(grid, 1).shape == (2, 8, 4, 4)  # all 16 tokens kept


@pytest.mark.parametrize("student, layer, teacher_layer, form", [
    ("test_resnet", "layer3", "blocks.2", "maps"),
    ("test_vit", "blocks.1", "layer3", "maps"),  # tokens vs a CNN's maps
    ("test_vit", "fc_norm", "global_pool", "pooled vectors"),  # pooled pre-logits
    ("test_resnet", "layer4", "global_pool", "pooled vectors"),  # a map against a vector: pooled
])
def test_feature_kd_trains_cnn_and_vit_students(image_root, tmp_path, student, layer, teacher_layer, form):
    (path,) = teacher_files(tmp_path, ("test_efficientnet" if teacher_layer == "blocks.2" else "test_resnet",))
    kwargs = ["model.kwargs={patch_size: 4}"] if student == "test_vit" else []
    out = train(image_root, tmp_path / "run", f"model.name={student}", *kwargs,
                f"teacher.name={'test_efficientnet' if teacher_layer == 'blocks.2' else 'test_resnet'}",
                f"teacher.weights={path}", f"features.student={layer}", f"features.teacher={teacher_layer}")
    assert out.returncode == 0, out.stderr
    assert f"feature KD: student {layer} -> teacher {teacher_layer}, mse x 1, {form}" in out.stderr
    epochs = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert all(e["train"]["feature_loss"] > 0 for e in epochs)
    saved = torch.load(tmp_path / "run" / "last.pt")
    # the projection is saved for resuming, and is not part of the student's exported weights
    assert saved["projector"] or "(0 params)" in out.stderr
    assert set(load_file(tmp_path / "run" / "best.safetensors")) == set(saved["student"])
    assert not any(k.startswith(("projector", "student.")) for k in saved["student"])


def test_feature_module_names_are_checked_with_a_suggestion(image_root, tmp_path):
    (path,) = teacher_files(tmp_path, ("test_resnet",))
    out = train(image_root, tmp_path / "run", "teacher.name=test_resnet", f"teacher.weights={path}",
                "features.student=layer5", "features.teacher=layer3")
    assert out.returncode == 2 and "features.student='layer5' is not a module of ResNet; did you mean" in out.stderr
    out = train(image_root, tmp_path / "run", "teacher.name=test_resnet", f"teacher.weights={path}",
                "features.student=layer3", "features.teacher=nothing_like_it")
    assert out.returncode == 2 and "features.teacher='nothing_like_it' is not a module of ResNet" in out.stderr
    assert "top-level modules: conv1, bn1" in out.stderr
    assert not (tmp_path / "run").exists()
    dry = train(image_root, tmp_path / "run", "teacher.name=test_resnet", f"teacher.weights={path}",
                "features.student=layer3", "features.teacher=layer4", "--dry-run")
    assert dry.returncode == 0 and "feature KD: student layer3 -> teacher layer4" in dry.stdout


def test_a_feature_module_that_does_not_run_or_gives_no_map_is_one_line(image_root, tmp_path):
    (path,) = teacher_files(tmp_path, ("test_resnet",))
    base = ["model.name=test_vit", "model.kwargs={patch_size: 4}", "teacher.name=test_resnet",
            f"teacher.weights={path}", "features.teacher=layer3"]
    cases = [("blocks.0.attn.attn_drop", "does not run in the model's forward pass"),  # dropout 0: not called
             ("blocks.0.attn.q_norm", "feature KD matches square maps")]  # [B, heads, N, d]
    for module, message in cases:
        out = train(image_root, tmp_path / "run", *base, f"features.student={module}")
        assert out.returncode == 2 and message in out.stderr.splitlines()[-1], out.stderr
        assert out.stderr.splitlines()[-1].startswith("usi: error: features.student=")
    assert not (tmp_path / "run").exists()


def test_feature_kd_resumes_exactly_projection_included(image_root, tmp_path):
    (path,) = teacher_files(tmp_path, ("test_resnet",))
    extra = ["sched.epochs=3", "teacher.name=test_resnet", f"teacher.weights={path}", "features.student=layer3",
             "features.teacher=layer4", "features.loss=cosine", "features.weight=0.5"]
    assert train(image_root, tmp_path / "whole", *extra).returncode == 0
    assert train(image_root, tmp_path / "cut", *extra, "run.stop_after=1").returncode == 0
    assert train(image_root, tmp_path / "cut", *extra, "run.resume=auto").returncode == 0
    a, b = torch.load(tmp_path / "whole" / "last.pt"), torch.load(tmp_path / "cut" / "last.pt")
    for key in ("student", "ema", "projector"):
        assert a[key] and all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    # the projection trained: its weights moved from their initialization
    assert read_jsonl(tmp_path / "whole" / "metrics.jsonl")[-1]["train"]["feature_loss"] > 0
    # a run with feature KD cannot resume a checkpoint trained without it, and says so
    assert train(image_root, tmp_path / "plain", *extra[:3], "run.stop_after=1").returncode == 0
    out = train(image_root, tmp_path / "plain", *extra, "run.resume=auto")
    assert out.returncode == 2 and "features.student was None, now 'layer3'" in out.stderr
    out = train(image_root, tmp_path / "other", *extra, f"run.resume={tmp_path / 'plain' / 'last.pt'}")
    assert out.returncode == 2 and "was trained without feature KD" in out.stderr.splitlines()[-1]
    assert not (tmp_path / "other").exists()


def test_compiled_ensemble_with_feature_kd_and_mean_logits(image_root, tmp_path):
    """run.compile and channels_last: the student's hook and the teachers' taps work inside compiled graphs."""
    paths = teacher_files(tmp_path)
    out = train(image_root, tmp_path / "run", *ensemble_args(paths), "teacher.combine=logits", "run.compile=true",
                "run.channels_last=true", "features.student=layer3", "features.teacher=layer4", "sched.epochs=1",
                "sched.warmup_epochs=0")
    assert out.returncode == 0, out.stderr
    (record,) = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert record["train"]["feature_loss"] > 0 and record["train"]["kd_loss"] > 0
    assert record["train"]["skipped_updates"] == 0 and len(record["ema"]["members"]) == 3

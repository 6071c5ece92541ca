"""Issue 11: teacher ensembles and feature KD, alone and composed with the mixed batch, resume, eval, export,
bf16 and torchrun."""
import json
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import TINY, read_jsonl, usi_cmd, usi_main
from safetensors.torch import load_file, save_file

from usi.distill import features
from usi.distill.teacher import Ensemble, Teacher, combine_logits


def teacher_files(tmp_path, names=("test_resnet", "test_efficientnet", "test_resnet")):
    paths = []
    for i, name in enumerate(names):
        torch.manual_seed(100 + i)
        path = tmp_path / f"teacher{i}.safetensors"
        save_file(timm.create_model(name, num_classes=4).state_dict(), str(path))
        paths.append(path)
    return paths


def ensemble_args(paths, names=("test_resnet", "test_efficientnet", "test_resnet")):
    members = ", ".join(f"{{name: {n}, weights: {p}{', input_size: 24' if i == 1 else ''}}}"
                        for i, (n, p) in enumerate(zip(names[1:], paths[1:]), start=1))
    return [f"teacher.name={names[0]}", f"teacher.weights={paths[0]}", f"teacher.extra=[{members}]"]


def train(root, run_dir, *extra, torchrun=0):
    args = ("train", "quickstart", *TINY, f"data.root={root}", f"run.dir={run_dir}", *extra)
    return usi_cmd(*args, torchrun=torchrun) if torchrun else usi_main(*args)


# ---------------------------------------------------------------- ensembles


def test_ensemble_logits_are_the_log_mean_probability_or_the_mean_logit():
    a, b = torch.randn(5, 7), torch.randn(5, 7) * 3
    probs = combine_logits([a, b], "probs")
    assert torch.allclose(probs.exp(), (a.softmax(1) + b.softmax(1)) / 2, atol=1e-6)
    assert torch.allclose(probs.softmax(1), probs.exp(), atol=1e-6)  # softmax maps it back to the mean
    assert torch.allclose(combine_logits([a, b], "logits"), (a + b) / 2)


def test_at_a_temperature_the_ensemble_target_is_the_mean_of_tempered_probabilities():
    from usi.distill.loss import kd_kl

    torch.manual_seed(0)
    members = [Teacher(torch.nn.Flatten(), student_mean=(0.5,) * 3, student_std=(0.5,) * 3,
                       teacher_mean=(0.5,) * 3, teacher_std=(0.5,) * 3) for _ in range(2)]
    x = torch.randn(4, 3, 1, 1) * 5  # the "logits" are the 3 pixel values
    student = torch.randn(4, 3)
    for how, target in (("probs", ((x / 4).flatten(1).softmax(1) * 2) / 2), ("logits", (x.flatten(1) / 4).softmax(1))):
        ensemble = Ensemble(members, how, temperature=4.0)
        expected = F.kl_div(F.log_softmax(student / 4, 1), target, reduction="batchmean") * 16
        assert torch.allclose(kd_kl(student, ensemble(x), 4.0), expected, atol=1e-5), how


def test_each_member_sees_the_batch_in_its_own_normalization_and_size():
    torch.manual_seed(0)
    models = [timm.create_model("test_resnet", num_classes=4).eval(), timm.create_model("test_vit", num_classes=4,
                                                                                         img_size=32).eval()]
    student = dict(student_mean=(0.5, 0.5, 0.5), student_std=(0.5, 0.5, 0.5))
    members = [Teacher(models[0], teacher_mean=(0.485, 0.456, 0.406), teacher_std=(0.229, 0.224, 0.225), **student),
               Teacher(models[1], teacher_mean=(0.5, 0.5, 0.5), teacher_std=(0.5, 0.5, 0.5), input_size=32,
                       **student)]
    x = torch.randn(3, 3, 24, 24)
    with torch.no_grad():
        by_hand = []
        pixels = x * 0.5 + 0.5
        mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225])
        by_hand.append(models[0]((pixels - mean) / std.view(1, 3, 1, 1)))
        by_hand.append(models[1](F.interpolate(x, size=(32, 32), mode="bilinear", antialias=True)))
        got = Ensemble(members, "probs")(x)
    expected = torch.log((by_hand[0].softmax(1) + by_hand[1].softmax(1)) / 2)
    assert torch.allclose(got, expected, atol=1e-5)
    ensemble = Ensemble(members).train()
    assert not ensemble.training and not any(m.training for m in ensemble.modules())


@pytest.mark.parametrize("extra, message", [
    (["teacher.extra=[resnet50]"], "teacher.extra[0] must be a mapping"),
    (["teacher.extra=[{name: test_resnet, wieghts: x}]"],
     "unknown key teacher.extra[0].wieghts; did you mean 'weights'"),
    (["teacher.extra=[{weights: x}]"], "teacher.extra[0] needs a name"),
    (["teacher.extra=[{name:test_vit}]"], "YAML needs a space after each colon"),
    (["teacher.extra=[{name: resnet5O}]"], "teacher.extra[0].name='resnet5O' is not a timm model; did you mean"),
    (["teacher.extra=[{name: test_resnet, weights: /nonexistent.pth}]"], "teacher.extra[0].weights="),
    (["teacher.extra=[{name: test_resnet, input_size: 2}]"], "teacher.extra[0].input_size=2 is out of range"),
    (["teacher.extra=[{name: test_resnet, fold_bn: maybe}]"], "teacher.extra[0].fold_bn must be bool"),
    (["teacher.name=null", "teacher.extra=[{name: test_resnet}]"], "teacher.name is null"),
    (["teacher.combine=median"], "teacher.combine='median' is not one of probs, logits"),
    (["features.student=layer3"], "features.student is set but features.teacher is not"),
    (["teacher.name=null", "features.student=layer3", "features.teacher=layer3"], "needs a teacher"),
    (["features.loss=l1", "features.student=a", "features.teacher=b"], "features.loss='l1' is not one of mse"),
])
def test_bad_ensemble_and_feature_settings_are_one_line(image_root, tmp_path, extra, message):
    out = train(image_root, tmp_path / "run", "teacher.name=test_resnet", *extra)
    assert out.returncode == 2, out.stderr
    assert out.stderr.count("\n") == 1 and message in out.stderr, out.stderr
    assert not (tmp_path / "run").exists()


def test_an_ensemble_run_reports_fidelity_to_the_ensemble_and_each_member(image_root, tmp_path):
    paths = teacher_files(tmp_path)
    out = train(image_root, tmp_path / "run", *ensemble_args(paths))
    assert out.returncode == 0, out.stderr
    record = read_jsonl(tmp_path / "run" / "metrics.jsonl")[-1]
    assert record["train"]["kd_loss"] > 0
    for variant in ("raw", "ema"):
        members = record[variant]["members"]
        assert len(members) == 3 and all(0 <= m["agreement"] <= 100 and m["kl"] >= 0 for m in members)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    teacher = summary["teacher_metrics"]
    assert teacher["count"] == 12 and len(teacher["members"]) == 3
    assert summary["teacher"] == "test_resnet + test_efficientnet + test_resnet"
    assert [m["name"] for m in teacher["members"]] == ["test_resnet", "test_efficientnet", "test_resnet"]
    # the members are different networks: their KLs to the student differ, and so do their own NLLs
    assert len({round(m["kl"], 6) for m in record["raw"]["members"]}) == 3
    assert len({round(m["nll"], 6) for m in teacher["members"]}) == 3

    # usi eval: the stored recipe's member files are never opened; the command line names the ensemble
    alone = usi_main("eval", str(tmp_path / "run" / "best.safetensors"), f"data.root={image_root}", "--json")
    assert alone.returncode == 0 and "teacher not evaluated" in alone.stderr
    assert "teacher" not in json.loads(alone.stdout)
    again = usi_main("eval", str(tmp_path / "run" / "best.safetensors"), f"data.root={image_root}",
                     *ensemble_args(paths)[1:], "--json")
    assert again.returncode == 0, again.stderr
    # the other members alone would leave the first teacher to timm's hub: refused in one line
    partial = usi_main("eval", str(tmp_path / "run" / "best.safetensors"), f"data.root={image_root}",
                       *ensemble_args(paths)[2:])
    assert partial.returncode == 2 and "pass teacher.weights=... for the first teacher too" in partial.stderr
    report = json.loads(again.stdout)
    assert report["teacher_cached"]  # the training run cached the ensemble's val logits
    assert report["teacher"]["name"] == "test_resnet + test_efficientnet + test_resnet"
    assert [m["name"] for m in report["teacher"]["members"]] == ["test_resnet", "test_efficientnet", "test_resnet"]
    best = summary["best"]["weights"]
    recorded = next(r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl")
                    if r["epoch"] == summary["best"]["epoch"])[best]["members"]
    evaluated = report["students"][best]["members"]
    assert len(evaluated) == len(recorded) == 3
    for got, expected in zip(evaluated, recorded):  # pytest.approx takes no list of dicts (pytest >= 9.1)
        assert got.keys() == expected.keys()
        assert got == pytest.approx(expected)
    text = usi_main("eval", str(tmp_path / "run" / "best.safetensors"), f"data.root={image_root}",
                    *ensemble_args(paths)[1:])
    assert "2: test_efficientnet" in text.stdout and "against" in text.stdout


def test_a_changed_member_is_a_new_cache_entry(image_root, tmp_path):
    paths = teacher_files(tmp_path)
    out = train(image_root, tmp_path / "run", *ensemble_args(paths), "sched.epochs=1", "sched.warmup_epochs=0")
    assert out.returncode == 0, out.stderr
    ckpt = str(tmp_path / "run" / "best.safetensors")
    logits = "teacher.combine=logits"
    for args, hit in (([], True), ([logits], False), ([logits], True)):
        report = usi_main("eval", ckpt, f"data.root={image_root}", *ensemble_args(paths)[1:], *args, "--json")
        assert json.loads(report.stdout)["teacher_cached"] is hit, (args, report.stderr)


# ---------------------------------------------------------------- feature KD: shapes


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


def test_the_ema_copy_carries_no_feature_hook(image_root, tmp_path):
    from usi import recipe as recipe_mod
    from usi.runtime import distributed
    from usi.training import build

    (path,) = teacher_files(tmp_path, ("test_resnet",))
    recipe = recipe_mod.load(None, [*TINY, f"data.root={image_root}", f"run.dir={tmp_path / 'run'}",
                                    "teacher.name=test_resnet", f"teacher.weights={path}",
                                    "features.student=layer3", "features.teacher=layer4"])
    t = build.build_training(recipe, distributed.Dist())
    assert t.state.student.layer3._forward_hooks and not t.state.ema.module.layer3._forward_hooks
    trained = {id(p) for p in t.state.trained_parameters()}
    assert all(id(p) in trained for p in t.state.projector.parameters())
    assert all(id(p) in trained for p in t.state.student.parameters())


# ---------------------------------------------------------------- everything at once


def test_ensemble_feature_kd_and_bf16_under_torchrun_with_shards(image_root, tmp_path):
    """An ensemble with feature KD, bf16 autocast, mixup/cutmix, repeats, shards, two processes, a stop
    and a resume: the whole family composes."""
    import subprocess
    import sys

    from conftest import REPO

    for split in ("train", "val"):
        subprocess.run([sys.executable, "-m", "usi", "shards", str(image_root / split),
                        str(tmp_path / "shards" / split), "--classes-from", str(image_root / "train"),
                        "--shard-size", "8"], cwd=REPO, check=True, capture_output=True)
    paths = teacher_files(tmp_path)
    extra = [*ensemble_args(paths), "features.student=layer3", "features.teacher=layer4", "run.amp_on_cpu=true",
             "data.format=shards", "data.batch_size=4", "optim.global_batch=8"]
    args = ("train", "quickstart", *TINY, f"data.root={tmp_path / 'shards'}", f"run.dir={tmp_path / 'run'}", *extra)
    first = usi_cmd(*args, "run.stop_after=1", torchrun=2)
    assert first.returncode == 0, first.stderr[:3000]
    again = usi_cmd(*args, "run.resume=auto", torchrun=2)
    assert again.returncode == 0, again.stderr[-2000:]
    epochs = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [e["epoch"] for e in epochs] == [1, 2]
    for e in epochs:
        assert e["train"]["kd_loss"] > 0 and math.isfinite(e["train"]["feature_loss"])
        assert e["raw"]["count"] == 12 and len(e["raw"]["members"]) == 3
    assert torch.load(tmp_path / "run" / "last.pt")["projector"]


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


# ---------------------------------------------------------------- found by a hostile review


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


def test_folded_teacher_keeps_timm_module_names(image_root, tmp_path):
    (path,) = teacher_files(tmp_path, ("test_efficientnet",))
    out = train(image_root, tmp_path / "run", "teacher.name=test_efficientnet", f"teacher.weights={path}",
                "features.student=layer4", "features.teacher=bn1.act", "--dry-run")
    assert out.returncode == 0, out.stderr
    assert "teacher bn1.act" in out.stdout


def test_member_errors_name_the_member(image_root, tmp_path):
    (path,) = teacher_files(tmp_path, ("test_resnet",))
    out = train(image_root, tmp_path / "run", "teacher.name=test_resnet", f"teacher.weights={path}",
                f"teacher.extra=[{{name: test_efficientnet, weights: {path}}}]")
    assert out.returncode == 2 and "usi: error: teacher.extra[0].weights=" in out.stderr


def test_a_feature_checkpoint_does_not_resume_a_plain_run(image_root, tmp_path):
    (path,) = teacher_files(tmp_path, ("test_resnet",))
    teacher = ["teacher.name=test_resnet", f"teacher.weights={path}"]
    feature = ["features.student=layer3", "features.teacher=layer4"]
    assert train(image_root, tmp_path / "run", *teacher, *feature, "run.stop_after=1").returncode == 0
    out = train(image_root, tmp_path / "other", *teacher, f"run.resume={tmp_path / 'run' / 'last.pt'}")
    assert out.returncode == 2 and "was trained with feature KD" in out.stderr.splitlines()[-1]


def test_a_finished_study_run_of_another_recipe_is_not_reused(image_root, tmp_path):
    from usi.studies.quickstart import run_once

    small = ["data.batch_size=8", "optim.global_batch=8", "data.input_size=16", "data.workers=0",
             "teacher.name=null", f"data.root={image_root}", "sched.warmup_epochs=0"]
    first = run_once([*small, "sched.epochs=1"], tmp_path / "run", rerun=False)
    assert run_once([*small, "sched.epochs=1"], tmp_path / "run", rerun=False) == first  # reused
    with pytest.raises(Exception, match="finished run of another recipe .*sched.epochs was 1, now 2"):
        run_once([*small, "sched.epochs=2"], tmp_path / "run", rerun=False)
    assert run_once([*small, "sched.epochs=2"], tmp_path / "run", rerun=True)["epochs"] == 2


def test_a_member_with_its_defaults_spelled_out_is_the_same_ensemble(image_root, tmp_path):
    paths = teacher_files(tmp_path, ("test_resnet", "test_resnet"))
    short = ["teacher.name=test_resnet", f"teacher.weights={paths[0]}",
             f"teacher.extra=[{{name: test_resnet, weights: {paths[1]}}}]"]
    spelled = short[:2] + [f"teacher.extra=[{{kwargs: {{}}, input_size: null, fold_bn: true, name: test_resnet, "
                           f"weights: {paths[1]}}}]"]
    assert train(image_root, tmp_path / "run", *short, "run.stop_after=1").returncode == 0
    out = train(image_root, tmp_path / "run", *spelled, "run.resume=auto")
    assert out.returncode == 0, out.stderr

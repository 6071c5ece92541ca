import copy
import json

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from usi.distill.teacher import Ensemble, Teacher, build_teacher, combine_logits, fold_batchnorm
from usi.errors import UsageError
from usi.recipe import TeacherSection as TeacherCfg

from conftest import Payload, usi_main
from helpers import DATA_CLASSES, one_error, teacher_files, train, train_args, usi_weights

SAME = dict(student_mean=(0.5,) * 3, student_std=(0.5,) * 3, teacher_mean=(0.5,) * 3, teacher_std=(0.5,) * 3)
HALF = dict(student_mean=(0.5,) * 3, student_std=(0.5,) * 3, student_size=24, device=torch.device("cpu"))


def randomize_bn(model):
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    return model


class Recorder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = torch.nn.BatchNorm2d(3)
        self.seen = None

    def forward(self, x):
        self.seen = x.clone()
        return self.bn(x).mean((2, 3))


def test_normalization_bridge_is_the_exact_formula():
    s_mean, s_std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    t_mean, t_std = (0.5, 0.4, 0.3), (0.2, 0.3, 0.25)  # std_t != 1: the published code's formula is wrong here
    rec = Recorder()
    teacher = Teacher(rec, student_mean=s_mean, student_std=s_std, teacher_mean=t_mean, teacher_std=t_std)
    x = torch.randn(2, 3, 8, 8)
    teacher(x)
    view = lambda v: torch.tensor(v).view(1, 3, 1, 1)  # noqa: E731
    expected = (x * view(s_std) + view(s_mean) - view(t_mean)) / view(t_std)
    assert torch.allclose(rec.seen, expected, atol=1e-6)
    # the image in [0, 1] that produced x, normalized directly for the teacher, is the same tensor
    pixels = x * view(s_std) + view(s_mean)
    assert torch.allclose(rec.seen, (pixels - view(t_mean)) / view(t_std), atol=1e-6)


def test_teacher_with_the_same_normalization_passes_the_batch_through():
    rec = Recorder()
    Teacher(rec, **SAME)(x := torch.randn(1, 3, 4, 4))
    assert torch.equal(rec.seen, x)


def test_teacher_stays_frozen_in_eval_mode_after_train():
    model = timm.create_model("test_resnet", num_classes=5)
    teacher = Teacher(model, **SAME)
    teacher.train()
    assert not teacher.training and not any(m.training for m in teacher.modules())
    assert not any(p.requires_grad for p in teacher.parameters())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = teacher(torch.randn(4, 3, 16, 16))
    assert not out.requires_grad
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # BN stats untouched


def test_teacher_resizes_to_its_own_input_size():
    rec = Recorder()
    Teacher(rec, **SAME, input_size=12)(torch.randn(1, 3, 20, 20))
    assert rec.seen.shape[-2:] == (12, 12)


@pytest.mark.parametrize("name", ["test_resnet", "test_efficientnet", "resnet10t"])
def test_batchnorm_folding_keeps_outputs(name):
    model = randomize_bn(timm.create_model(name, num_classes=7)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
    folded, n = fold_batchnorm(copy.deepcopy(model), x)
    assert n > 0
    assert not any(type(m) is torch.nn.BatchNorm2d for m in folded.modules())
    with torch.no_grad():
        assert (folded(x) - ref).norm() <= 1e-4 * ref.norm()


def test_folding_is_refused_when_it_would_change_outputs():
    class Shared(torch.nn.Module):  # the conv output feeds the BN *and* the sum: folding would be wrong
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 3, 1)
            self.bn = torch.nn.BatchNorm2d(3)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y

    model = randomize_bn(Shared()).eval()
    folded, n = fold_batchnorm(model, torch.randn(2, 3, 4, 4))
    assert n == 0 and folded is model


def write_teacher(path, num_classes):
    model = timm.create_model("test_resnet", num_classes=num_classes)
    save_file(model.state_dict(), str(path))
    return model


def test_teacher_from_a_local_file_is_folded_and_matches_the_original(tmp_path):
    model = randomize_bn(write_teacher(tmp_path / "t.safetensors", 4)).eval()
    save_file(model.state_dict(), str(tmp_path / "t.safetensors"))
    cfg = TeacherCfg(name="test_resnet", weights=str(tmp_path / "t.safetensors"))
    mean, std = model.pretrained_cfg["mean"], model.pretrained_cfg["std"]
    teacher = build_teacher(cfg, list("abcd"), student_mean=mean, student_std=std, student_size=24,
                            device=torch.device("cpu"))
    x = torch.randn(3, 3, 24, 24)
    with torch.no_grad():
        assert torch.allclose(teacher(x), model(x), atol=1e-4)


def test_teacher_class_count_mismatch_is_a_clear_error(tmp_path):
    write_teacher(tmp_path / "t.safetensors", 1000)
    cfg = TeacherCfg(name="test_resnet", weights=str(tmp_path / "t.safetensors"))
    with pytest.raises(UsageError, match="teacher test_resnet predicts 1000 classes but the dataset has 10"):
        build_teacher(cfg, list("abcdefghij"), **HALF)


def test_teacher_weights_that_do_not_fit_the_architecture(tmp_path):
    save_file(timm.create_model("test_efficientnet", num_classes=4).state_dict(), str(tmp_path / "t.safetensors"))
    cfg = TeacherCfg(name="test_resnet", weights=str(tmp_path / "t.safetensors"))
    with pytest.raises(UsageError, match="do not fit test_resnet"):
        build_teacher(cfg, list("abcd"), **HALF)


def test_teacher_file_with_a_pickle_payload_is_refused_without_running_it(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("USI_PWNED", str(marker))
    torch.save({"model": Payload()}, tmp_path / "evil.pth")
    cfg = TeacherCfg(name="test_resnet", weights=str(tmp_path / "evil.pth"))
    with pytest.raises(UsageError, match="refused to load"):
        build_teacher(cfg, list("abcd"), **HALF)
    assert not marker.exists()


def test_missing_pretrained_weights_say_what_to_do(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("no route to host")

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(UsageError, match="set teacher.weights to a local"):
        build_teacher(TeacherCfg(name="resnet50"), [str(i) for i in range(1000)], **HALF)


def test_folding_falls_back_when_one_batchnorm_follows_two_convolutions():
    class TwoConvs(torch.nn.Module):  # the same BN module after two convs: no single conv to fold it into
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.Conv2d(3, 4, 1)
            self.bn = torch.nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn(self.a(x)) + self.bn(self.b(x))

    model, x = randomize_bn(TwoConvs()).eval(), torch.randn(2, 3, 8, 8)
    folded, n = fold_batchnorm(model, x)
    with torch.no_grad():
        assert torch.allclose(folded(x), model(x))
    assert n == 0 and folded is model


def test_folding_survives_any_failure(monkeypatch):
    import usi.distill.teacher as T
    monkeypatch.setattr(T, "fuse_conv_bn_weights", lambda **kw: (_ for _ in ()).throw(AttributeError("boom")))
    model = randomize_bn(timm.create_model("test_resnet", num_classes=3)).eval()
    folded, n = fold_batchnorm(model, torch.randn(2, 3, 16, 16))
    assert folded is model and n == 0


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


SAME_IN_ANOTHER_ORDER = ["frame", "circle", "ring", "square"]
OTHER_NAMES = ["circle", "frame", "ring", "zebra"]


@pytest.mark.parametrize("form", ["best.safetensors", "last.pt", "export"])
@pytest.mark.parametrize("classes, message", [
    (SAME_IN_ANOTHER_ORDER, "were trained on the same 4 classes in another order (label 0 is 'frame' there and "
                            "'circle' here)"),
    (OTHER_NAMES, "were trained on other classes (4 there, 4 here; label 3 is 'zebra' there and 'square' here)"),
])
def test_teacher_weights_of_classes_in_another_order_or_other_classes_are_refused(image_root, tmp_path, form,
                                                                                   classes, message):
    good = usi_weights(tmp_path / "good", DATA_CLASSES, form)
    teacher = ["teacher.name=test_resnet", f"teacher.weights={good}"]
    assert usi_main(*train_args(image_root, tmp_path / "r", *teacher), "--dry-run").returncode == 0  # same order
    wrong = usi_weights(tmp_path / "wrong", classes, form)
    out = usi_main(*train_args(image_root, tmp_path / "r", "teacher.name=test_resnet", f"teacher.weights={wrong}"),
                   "--dry-run")
    one_error(out, f"teacher.weights={wrong} {message}")  # before: accepted (4 = 4), soft labels silently wrong
    member = f"teacher.extra=[{{name: test_resnet, weights: {wrong}}}]"  # an ensemble member alike
    one_error(usi_main(*train_args(image_root, tmp_path / "r", *teacher, member), "--dry-run"),
              f"teacher.extra[0].weights={wrong} {message}")

import copy

import pytest
import timm
import torch
from conftest import Payload
from safetensors.torch import save_file

from usi.distill.teacher import Ensemble, Teacher, build_teacher, fold_batchnorm
from usi.errors import UsageError
from usi.recipe import TeacherSection as TeacherCfg

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
    teacher = build_teacher(cfg, 4, student_mean=mean, student_std=std, student_size=24, device=torch.device("cpu"))
    x = torch.randn(3, 3, 24, 24)
    with torch.no_grad():
        assert torch.allclose(teacher(x), model(x), atol=1e-4)


def test_teacher_class_count_mismatch_is_a_clear_error(tmp_path):
    write_teacher(tmp_path / "t.safetensors", 1000)
    cfg = TeacherCfg(name="test_resnet", weights=str(tmp_path / "t.safetensors"))
    with pytest.raises(UsageError, match="teacher test_resnet predicts 1000 classes but the dataset has 10"):
        build_teacher(cfg, 10, **HALF)


def test_teacher_weights_that_do_not_fit_the_architecture(tmp_path):
    save_file(timm.create_model("test_efficientnet", num_classes=4).state_dict(), str(tmp_path / "t.safetensors"))
    cfg = TeacherCfg(name="test_resnet", weights=str(tmp_path / "t.safetensors"))
    with pytest.raises(UsageError, match="do not fit test_resnet"):
        build_teacher(cfg, 4, **HALF)



def test_teacher_file_with_a_pickle_payload_is_refused_without_running_it(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("USI_PWNED", str(marker))
    torch.save({"model": Payload()}, tmp_path / "evil.pth")
    cfg = TeacherCfg(name="test_resnet", weights=str(tmp_path / "evil.pth"))
    with pytest.raises(UsageError, match="refused to load"):
        build_teacher(cfg, 4, **HALF)
    assert not marker.exists()


def test_missing_pretrained_weights_say_what_to_do(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("no route to host")

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(UsageError, match="set teacher.weights to a local"):
        build_teacher(TeacherCfg(name="resnet50"), 1000, **HALF)


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


def test_teacher_logit_cache_key_depends_on_the_precision_of_the_pass():
    from usi.evaluation.teacher_logits import cache_key
    from usi.models import Compute
    teacher = Teacher(torch.nn.Identity(), **SAME)
    cfg = TeacherCfg(name="test_resnet")
    cpu = torch.device("cpu")
    computes = [Compute(cpu), Compute(cpu, torch.bfloat16), Compute(cpu, None, True)]
    keys = {cache_key([cfg], "probs", split_identity="files", teacher=teacher, compute=c) for c in computes} | {
        cache_key([cfg], "probs", split_identity="other", teacher=teacher, compute=computes[0])}
    assert len(keys) == 4
    # an ensemble: its members, their order and the way they combine are in the key too
    other = TeacherCfg(name="test_efficientnet")
    pair = Ensemble([teacher, Teacher(torch.nn.Identity(), **SAME)])
    ensembles = {cache_key(cfgs, how, split_identity="files", teacher=pair, compute=computes[0])
                 for cfgs in ([cfg, other], [other, cfg]) for how in ("probs", "logits")}
    assert len(ensembles) == 4 and not ensembles & keys

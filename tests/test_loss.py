import math

import torch

from usi.distill.loss import kd_kl, usi_loss


def softmax(row):
    e = [math.exp(v) for v in row]
    return [v / sum(e) for v in e]


def test_usi_loss_matches_a_hand_computation():
    s = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 1.0]])
    t = torch.tensor([[1.0, 1.0, 0.0], [0.0, 2.0, 0.0]])
    y = torch.tensor([[0.7, 0.3, 0.0], [0.0, 0.0, 1.0]])  # mixed targets
    ce = kl = 0.0
    for si, ti, yi in zip(s.tolist(), t.tolist(), y.tolist()):
        ps, pt = softmax(si), softmax(ti)
        ce += -sum(a * math.log(b) for a, b in zip(yi, ps))
        kl += sum(a * math.log(a / b) for a, b in zip(pt, ps))
    task, kd = usi_loss(s, y, t, kd_weight=5.0, temperature=1.0)
    assert math.isclose(task.item(), ce / 2, rel_tol=1e-6)
    assert math.isclose(kd.item(), 5.0 * kl / 2, rel_tol=1e-6)  # batchmean: sum / batch size


def test_temperature_scales_by_t_squared():
    s, t = torch.randn(4, 7), torch.randn(4, 7)
    T = 3.0
    manual = torch.nn.functional.kl_div((s / T).log_softmax(1), (t / T).softmax(1), reduction="batchmean") * T * T
    assert torch.allclose(kd_kl(s, t, T), manual, atol=1e-6)


def test_kd_only_drops_the_hard_label_term_and_no_teacher_drops_kd():
    s, t, y = torch.randn(2, 3), torch.randn(2, 3), torch.softmax(torch.randn(2, 3), 1)
    task, kd = usi_loss(s, y, t, hard_label=False)
    assert task.item() == 0.0 and kd.item() > 0
    task, kd = usi_loss(s, y, None)
    assert task.item() > 0 and kd.item() == 0.0


def test_kl_is_computed_in_fp32_from_low_precision_logits():
    s, t = torch.randn(4, 10).bfloat16(), torch.randn(4, 10).bfloat16()
    out = kd_kl(s, t)
    assert out.dtype == torch.float32
    assert torch.allclose(out, kd_kl(s.float(), t.float()))


def test_hintons_weighting_is_alpha_ce_plus_one_minus_alpha_t_squared_kl():
    from usi.distill.loss import DistillLoss
    s, t, y = torch.randn(4, 6), torch.randn(4, 6), torch.softmax(torch.randn(4, 6), 1)
    ce, _ = usi_loss(s, y, None)
    T = 4.0
    task, kd = DistillLoss(weighting="hinton", alpha=0.3, temperature=T)(s, y, t)
    assert torch.allclose(task, 0.3 * ce)
    assert torch.allclose(kd, 0.7 * kd_kl(s, t, T))  # kd_kl includes the T^2 factor
    task, kd = DistillLoss(weighting="hinton", alpha=0.3)(s, y, None)  # no teacher: the same baseline as usi's
    assert torch.allclose(task, ce) and kd.item() == 0.0


def test_the_recipe_chooses_the_weighting_and_refuses_mixed_settings():
    import pytest

    from usi import recipe as R
    from usi.errors import UsageError
    from usi.models import Compute
    from usi.training.build import step_config
    recipe = R.load(None, ["loss.weighting=hinton", "loss.alpha=0.9", "loss.temperature=4"])
    loss = step_config(recipe, Compute(torch.device("cpu")), 10, 1).loss
    assert (loss.weighting, loss.alpha, loss.temperature) == ("hinton", 0.9, 4.0)
    for bad in (["loss.weighting=hinton", "loss.kd_weight=2"], ["loss.weighting=hinton", "loss.hard_label=false"]):
        with pytest.raises(UsageError, match="weighs the terms by loss.alpha alone"):
            R.load(None, bad)

"""usi/distill/distance.py: KL(teacher || student) at a temperature, the one distance behind the KD loss and
the KL metric."""
import math

import pytest
import torch
import torch.nn.functional as F

from usi.distill.distance import kl_distance


def test_per_example_kl_by_hand():
    s = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    t = torch.tensor([[math.log(3.0), 0.0], [1.0, 0.0]])  # row 0: p_t = (0.75, 0.25) vs (0.5, 0.5); row 1: equal
    expected = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    kl = kl_distance(s, t)
    assert kl.shape == (2,) and kl[0].item() == pytest.approx(expected, rel=1e-6) and abs(kl[1].item()) < 1e-7


def test_the_batch_mean_agrees_with_the_mean_of_the_rows_and_scales_by_t_squared():
    torch.manual_seed(0)
    s, t = torch.randn(6, 5), torch.randn(6, 5)
    rows = kl_distance(s, t, temperature=2.0)
    mean = kl_distance(s, t, temperature=2.0, reduction="batchmean")
    assert mean.ndim == 0 and mean.item() == pytest.approx(rows.mean().item(), rel=1e-5)
    manual = F.kl_div((s / 2).log_softmax(1), (t / 2).softmax(1), reduction="batchmean") * 4
    assert mean.item() == pytest.approx(manual.item(), rel=1e-5)
    assert (rows >= -1e-7).all()  # a KL is never negative


def test_low_precision_logits_give_fp32_distances_and_an_unknown_reduction_is_refused():
    s, t = torch.randn(3, 4).bfloat16(), torch.randn(3, 4).bfloat16()
    out = kl_distance(s, t)
    assert out.dtype == torch.float32 and torch.equal(out, kl_distance(s.float(), t.float()))
    with pytest.raises(ValueError, match="reduction 'sum'"):
        kl_distance(s, t, reduction="sum")

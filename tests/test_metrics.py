import math

import pytest
import torch

from usi.evaluation import metrics as M


def test_accuracy_topk_by_hand():
    logits = torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2], [0.2, 0.3, 0.5], [0.6, 0.3, 0.1]])
    targets = torch.tensor([1, 1, 0, 0])
    assert M.accuracy(logits, targets, 1) == pytest.approx(50.0)  # rows 0 and 3
    assert M.accuracy(logits, targets, 2) == pytest.approx(75.0)  # row 1 too; row 2's target is last
    assert M.accuracy(logits, targets, 5) == pytest.approx(100.0)  # k larger than classes: all


def test_nll_by_hand():
    logits = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    targets = torch.tensor([0, 1])
    expected = (-math.log(math.exp(2) / (math.exp(2) + 1)) + math.log(2)) / 2
    assert M.nll(logits, targets) == pytest.approx(expected, rel=1e-6)


def test_ece_by_hand_with_empty_bins():
    # confidences 0.9 (correct), 0.9 (wrong), 0.6 (correct): two occupied bins of 10, eight empty
    probs = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.4, 0.6]])
    logits = probs.log()
    targets = torch.tensor([0, 1, 1])
    # bin (0.8, 0.9]: n=2, conf 0.9, acc 0.5 -> |0.4| * 2/3 ; bin (0.5, 0.6]: n=1, conf 0.6, acc 1 -> 0.4 * 1/3
    assert M.ece(logits, targets, n_bins=10) == pytest.approx(100 * (0.4 * 2 / 3 + 0.4 / 3), rel=1e-5)
    bins = M.ece_bins(logits, targets, 10)
    assert bins[0].tolist() == [0, 0, 0, 0, 0, 1, 0, 0, 2, 0]


def test_ece_single_example_and_perfect_calibration():
    assert M.ece(torch.tensor([[0.0, 0.0]]), torch.tensor([0]), 15) == pytest.approx(50.0, rel=1e-6)
    assert M.ece(torch.tensor([[0.0, 0.0]]), torch.tensor([0]), 1) == pytest.approx(50.0, rel=1e-6)
    sure = torch.tensor([[50.0, 0.0], [0.0, 50.0]])
    assert M.ece(sure, torch.tensor([0, 1])) == pytest.approx(0.0, abs=1e-6)


def test_agreement_counts_argmax_matches_with_ties_going_to_the_first_index():
    s = torch.tensor([[1.0, 1.0, 0.0], [0.0, 2.0, 1.0], [3.0, 0.0, 0.0]])
    t = torch.tensor([[5.0, 0.0, 0.0], [0.0, 0.0, 9.0], [1.0, 0.0, 0.0]])
    assert M.agreement(s, t) == pytest.approx(100 * 2 / 3)  # the tie [1, 1, 0] resolves to class 0


def test_predictive_kl_by_hand():
    s = torch.tensor([[0.0, 0.0]])
    t = torch.tensor([[math.log(3.0), 0.0]])  # p_t = (0.75, 0.25), p_s = (0.5, 0.5)
    expected = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert M.predictive_kl(s, t) == pytest.approx(expected, rel=1e-6)
    assert M.predictive_kl(t, t) == pytest.approx(0.0, abs=1e-7)


def test_streaming_sums_equal_the_whole_batch_computation():
    torch.manual_seed(0)
    logits, teacher = torch.randn(37, 6), torch.randn(37, 6)
    targets = torch.randint(0, 6, (37,))
    sums = M.MetricSums(n_bins=15)
    for chunk in (slice(0, 10), slice(10, 11), slice(11, 37)):
        sums.add(logits[chunk], targets[chunk], teacher[chunk])
    r = sums.result()
    assert r["count"] == 37
    assert r["top1"] == pytest.approx(M.accuracy(logits, targets, 1))
    assert r["top5"] == pytest.approx(M.accuracy(logits, targets, 5))
    assert r["nll"] == pytest.approx(M.nll(logits, targets), rel=1e-6)
    assert r["ece"] == pytest.approx(M.ece(logits, targets, 15), rel=1e-6)
    assert r["agreement"] == pytest.approx(M.agreement(logits, teacher))
    assert r["kl"] == pytest.approx(M.predictive_kl(logits, teacher), rel=1e-6)


def test_sums_without_teacher_report_no_fidelity_and_empty_reports_count_zero():
    sums = M.MetricSums()
    assert sums.result() == {"count": 0}
    sums.add(torch.randn(3, 4), torch.tensor([0, 1, 2]))
    assert "agreement" not in sums.result() and "kl" not in sums.result()


def test_better_and_best_of_follow_each_metrics_direction():
    from usi.evaluation.metrics import best_of, better
    assert better("top1", 50.0, 40.0) and not better("top1", 40.0, 50.0)
    assert better("nll", 0.5, 0.9) and not better("nll", 0.9, 0.5)
    assert better("kl", 1.0, None) and better("ece", 3.0, float("nan")) and not better("top1", float("nan"), 1.0)
    assert best_of({"raw": 0.4, "ema": 0.3}, "nll") == "ema"
    assert best_of({"raw": 70.0, "ema": 71.0}, "top1") == "ema"
    assert best_of({"raw": float("nan"), "ema": 1.0}, "top1") == "ema"

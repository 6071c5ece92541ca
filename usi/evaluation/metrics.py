"""Pure functions on logits, and exact sums of them that add up over batches and ranks.

Every metric here is a sum over examples divided by a count, so a distributed evaluation sums the
per-rank numerators (one all_reduce) and gets exactly the single-process number: no padding, no
gathering of logits. ECE is exact too: its per-bin counts, confidence sums and correct counts add.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from usi.distill.distance import kl_distance  # the KD loss's distance: the metric measures what is trained
from usi.recipe.schema import METRICS  # each metric's name and direction, with run.best_metric's choices


def better(metric: str, new: float, old: float | None) -> bool:
    """Whether `new` beats `old` (None or NaN: anything finite beats it)."""
    if math.isnan(new):
        return False
    if old is None or math.isnan(old):
        return True
    return new < old if METRICS[metric] == "lower" else new > old


def best_of(candidates: dict[str, float], metric: str) -> str:
    """The name whose value is best; ties go to the first."""
    best = None
    for name, value in candidates.items():
        if best is None or better(metric, value, candidates[best]):
            best = name
    return best


def topk_correct(logits: torch.Tensor, targets: torch.Tensor, k: int = 1) -> torch.Tensor:
    """Per-example 1.0 if the target is among the k largest logits (ties broken by torch.topk)."""
    k = min(k, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    return (top == targets[:, None]).any(dim=1).float()


def accuracy(logits: torch.Tensor, targets: torch.Tensor, k: int = 1) -> float:
    """Top-k accuracy in percent."""
    return 100.0 * topk_correct(logits, targets, k).mean().item()


def nll_per_example(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), targets, reduction="none")


def nll(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean negative log-likelihood of the true class (nats)."""
    return nll_per_example(logits, targets).mean().item()


def ece_bins(logits: torch.Tensor, targets: torch.Tensor, n_bins: int = 15) -> torch.Tensor:
    """[3, n_bins]: per equal-width confidence bin, the count, the sum of confidences, the correct count.

    A confidence c lands in bin ceil(c * n_bins) - 1, i.e. bins are (lo, hi]; c = 0 goes to the first.
    """
    probs = logits.float().softmax(dim=1)
    conf, pred = probs.max(dim=1)
    correct = (pred == targets).float()
    idx = (torch.ceil(conf * n_bins).long() - 1).clamp(0, n_bins - 1)
    out = torch.zeros(3, n_bins, dtype=torch.float64, device=logits.device)
    out[0].index_add_(0, idx, torch.ones_like(conf, dtype=torch.float64))
    out[1].index_add_(0, idx, conf.double())
    out[2].index_add_(0, idx, correct.double())
    return out


def ece_from_bins(bins: torch.Tensor) -> float:
    """Expected calibration error in percent: sum_b (n_b / N) |acc_b - conf_b|; empty bins add nothing."""
    count, conf_sum, correct_sum = bins
    total = count.sum()
    if total == 0:
        return float("nan")
    return 100.0 * ((conf_sum - correct_sum).abs().sum() / total).item()


def ece(logits: torch.Tensor, targets: torch.Tensor, n_bins: int = 15) -> float:
    return ece_from_bins(ece_bins(logits, targets, n_bins))


def agreement_per_example(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    return (student.argmax(dim=1) == teacher.argmax(dim=1)).float()


def agreement(student: torch.Tensor, teacher: torch.Tensor) -> float:
    """Top-1 agreement in percent: how often the student's argmax equals the teacher's."""
    return 100.0 * agreement_per_example(student, teacher).mean().item()


def kl_per_example(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """KL(p_teacher || p_student) for each example, in nats, computed in fp32."""
    return kl_distance(student, teacher)


def predictive_kl(student: torch.Tensor, teacher: torch.Tensor) -> float:
    """Mean over examples of KL(p_teacher || p_student)."""
    return kl_per_example(student, teacher).mean().item()


class MetricSums:
    """Running numerators for every metric; add batches, sum across ranks, then `result()`.

    Kept on the logits' device so accumulation never syncs with the host.
    """

    def __init__(self, n_bins: int = 15, device: torch.device | str = "cpu"):
        # [count, top1, top5, nll, agree, kl, agree_count, non-finite rows]
        self.sums = torch.zeros(8, dtype=torch.float64, device=device)
        self.bins = torch.zeros(3, n_bins, dtype=torch.float64, device=device)

    def add(self, logits: torch.Tensor, targets: torch.Tensor, teacher: torch.Tensor | None = None) -> None:
        # Per-example values are fp32; their sums are fp64 so that how the examples were split into
        # batches and ranks changes nothing visible.
        logits = logits.float()
        # A row with a NaN or infinite logit has no prediction: argmax would call it class 0 (right by
        # chance, and "agreeing" with a NaN teacher). It counts as wrong, and the count is reported.
        finite = logits.isfinite().all(dim=1)
        row = [
            torch.tensor(float(len(targets)), device=logits.device),
            (topk_correct(logits, targets, 1) * finite).sum(),
            (topk_correct(logits, targets, 5) * finite).sum(),
            nll_per_example(logits, targets).double().sum(),
        ]
        if teacher is not None:
            both = finite & teacher.float().isfinite().all(dim=1)
            row += [(agreement_per_example(logits, teacher) * both).sum(),
                    kl_per_example(logits, teacher).double().sum(),
                    torch.tensor(float(len(targets)), device=logits.device)]
        else:
            row += [torch.zeros((), device=logits.device)] * 3
        row.append((~finite).sum())
        self.sums += torch.stack([v.double() for v in row])
        self.bins += ece_bins(logits, targets, self.bins.shape[1])

    def flat(self) -> torch.Tensor:
        return torch.cat([self.sums, self.bins.flatten()])

    def load_flat(self, flat: torch.Tensor) -> None:
        self.sums.copy_(flat[: len(self.sums)])
        self.bins.copy_(flat[len(self.sums):].view_as(self.bins))

    def result(self) -> dict:
        count, top1, top5, nll_sum, agree, kl, n_teacher, nonfinite = self.sums.tolist()
        if count == 0:
            return {"count": 0}
        out = {
            "count": int(count),
            "top1": 100.0 * top1 / count,
            "top5": 100.0 * top5 / count,
            "nll": nll_sum / count,
            "ece": ece_from_bins(self.bins),
        }
        if n_teacher:
            out["agreement"] = 100.0 * agree / n_teacher
            out["kl"] = kl / n_teacher
        if nonfinite:
            out["nonfinite"] = int(nonfinite)  # rows with a NaN or infinite logit (counted as wrong)
        return out

"""One distance between a student's and a teacher's predictions, for the KD loss and the KL metric alike.

As big_vision's `distance.dist(student, teacher, kind="kl", t=T)`: KL(softmax(t/T) || softmax(s/T)) * T^2,
in fp32 whatever the logits' precision. The loss takes its batch mean, the metric its per-example values
(summed in fp64 over batches and ranks): the same terms, reduced where each needs them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def kl_distance(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
                reduction: str = "none") -> torch.Tensor:
    """KL(softmax(t/T) || softmax(s/T)) * T^2 in nats, fp32: per example ([N], reduction "none") or the
    batch mean (a scalar, "batchmean").

    "batchmean" sums all N x C terms in one reduction and divides by N (torch's kl_div), as the loss always
    has; "none" sums each row. The two agree up to float rounding, not bit for bit, so each caller keeps
    the reduction its numbers were made with.
    """
    if reduction not in ("none", "batchmean"):
        raise ValueError(f"reduction {reduction!r}: expected 'none' or 'batchmean'")
    log_s = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_t = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    if reduction == "batchmean":
        kl = F.kl_div(log_s, log_t, reduction="batchmean", log_target=True)
    else:  # kl_div's terms exp(log_t) * (log_t - log_s), summed per example
        kl = F.kl_div(log_s, log_t, reduction="none", log_target=True).sum(dim=1)
    return kl * temperature ** 2

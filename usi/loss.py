"""USI's distillation loss: soft-target CE on the mixed labels + kd_weight * KL(teacher || student).

timm's LogitDistillationTask computes the same KL, but bundles it with its own teacher wrapper and
returns only the total; usi logs the two terms separately and keeps the KL in fp32 under autocast.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.loss import SoftTargetCrossEntropy

_soft_ce = SoftTargetCrossEntropy()


def kd_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(softmax(t/T) || softmax(s/T)) * T^2, batchmean, in fp32."""
    log_s = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_t = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    return F.kl_div(log_s, log_t, reduction="batchmean", log_target=True) * temperature ** 2


def usi_loss(student_logits: torch.Tensor, soft_targets: torch.Tensor, teacher_logits: torch.Tensor | None,
             kd_weight: float = 5.0, temperature: float = 1.0, hard_label: bool = True,
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (task term, weighted KD term); the training loss is their sum.

    Without a teacher the KD term is zero and the task term is always on (the baseline).
    """
    zero = student_logits.new_zeros((), dtype=torch.float32)
    if teacher_logits is None:
        return _soft_ce(student_logits.float(), soft_targets.float()), zero
    task = _soft_ce(student_logits.float(), soft_targets.float()) if hard_label else zero
    return task, kd_weight * kd_kl(student_logits, teacher_logits, temperature)

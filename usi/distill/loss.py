"""USI's distillation loss: soft-target CE on the mixed labels + kd_weight * KL(teacher || student); or
Hinton et al.'s weighting, alpha * CE + (1 - alpha) * T^2 * KL.

timm's LogitDistillationTask computes the same two terms (and returns them apart), but inside a task
object that owns the student, its DistillationTeacher and the forward pass. usi's step keeps the
teacher (folded, resized, an ensemble) and the forward pass its own, so the loss is a plain function
of logits: these few lines, with both terms computed in fp32 under autocast.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from timm.loss import SoftTargetCrossEntropy

from usi.distill.distance import kl_distance

_soft_ce = SoftTargetCrossEntropy()


def kd_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(softmax(t/T) || softmax(s/T)) * T^2, batchmean, in fp32: the distance the KL metric uses too."""
    return kl_distance(student_logits, teacher_logits, temperature, reduction="batchmean")


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


@dataclass(frozen=True)
class DistillLoss:
    """The recipe's loss settings, applied: (student logits, soft targets, teacher logits) -> (task, kd).

    weighting "hinton": task = alpha * CE and kd = (1 - alpha) * T^2 * KL (kd_kl carries the T^2); without a
    teacher the task term is the plain CE, as for "usi" (the baseline is the same run either way).
    """
    kd_weight: float = 5.0
    temperature: float = 1.0
    hard_label: bool = True
    weighting: str = "usi"
    alpha: float = 0.5

    def __call__(self, student_logits, soft_targets, teacher_logits):
        if self.weighting == "hinton" and teacher_logits is not None:
            task, kd = usi_loss(student_logits, soft_targets, teacher_logits, kd_weight=1.0 - self.alpha,
                                temperature=self.temperature)
            return self.alpha * task, kd
        return usi_loss(student_logits, soft_targets, teacher_logits, kd_weight=self.kd_weight,
                        temperature=self.temperature, hard_label=self.hard_label)

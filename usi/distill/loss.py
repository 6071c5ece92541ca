"""USI's distillation loss: soft-target CE on the mixed labels + kd_weight * KL(teacher || student); or
Hinton et al.'s weighting, alpha * CE + (1 - alpha) * T^2 * KL.

timm's LogitDistillationTask computes the same two terms (and returns them apart), but inside a task
object that owns the student, its DistillationTeacher and the forward pass. usi's step keeps the
teacher (folded, resized, an ensemble) and the forward pass its own, so the loss is a plain function
of logits: these few lines, with both terms computed in fp32 under autocast.

The task term is timm's own criterion: SoftTargetCrossEntropy, or BinaryCrossEntropy (loss.task=bce, as
timm's --bce-loss and "ResNet strikes back"). DeiT's distillation token (loss.distill_token) follows timm's
TokenDistillationTask term for term (soft: the KL below; hard: CE on the teacher's argmax); that task, too,
owns the forward pass and the teacher, so usi takes its two formulas and not the object.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from timm.loss import BinaryCrossEntropy, SoftTargetCrossEntropy

from usi.distill.distance import kl_distance
from usi.errors import UsageError

_soft_ce = SoftTargetCrossEntropy()


def kd_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(softmax(t/T) || softmax(s/T)) * T^2, batchmean, in fp32: the distance the KL metric uses too."""
    return kl_distance(student_logits, teacher_logits, temperature, reduction="batchmean")


def task_criterion(task: str = "ce", bce_target_thresh: float | None = None):
    """The task term on the mixed targets, timm's criterion either way. usi's targets always arrive dense and
    already smoothed (Mixup, or mixup_target with aug.label_smoothing), so BCE gets smoothing=0, as timm's
    train.py builds it under mixup; the threshold binarizes the mixed targets (timm's --bce-target-thresh)."""
    if task == "bce":
        return BinaryCrossEntropy(smoothing=0.0, target_threshold=bce_target_thresh)
    return _soft_ce


def usi_loss(student_logits: torch.Tensor, soft_targets: torch.Tensor, teacher_logits: torch.Tensor | None,
             kd_weight: float = 5.0, temperature: float = 1.0, hard_label: bool = True, criterion=_soft_ce,
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (task term, weighted KD term); the training loss is their sum.

    Without a teacher the KD term is zero and the task term is always on (the baseline).
    """
    zero = student_logits.new_zeros((), dtype=torch.float32)
    if teacher_logits is None:
        return criterion(student_logits.float(), soft_targets.float()), zero
    task = criterion(student_logits.float(), soft_targets.float()) if hard_label else zero
    return task, kd_weight * kd_kl(student_logits, teacher_logits, temperature)


def token_kd(dist_logits: torch.Tensor, teacher_logits: torch.Tensor, mode: str, temperature: float = 1.0,
             ) -> torch.Tensor:
    """DeiT's distillation-token term, as timm's TokenDistillationTask: soft, the KD term's KL at T (T^2
    included); hard, CE against the teacher's top class (no temperature). fp32."""
    if mode == "hard":
        return F.cross_entropy(dist_logits.float(), teacher_logits.argmax(dim=-1))
    return kd_kl(dist_logits, teacher_logits, temperature)


def train_distillation_token(student: torch.nn.Module, name: str, mode: str) -> str:
    """Makes a DeiT distilled student return (class head, distillation head) in training mode; in eval mode
    timm's model returns their mean, as DeiT evaluates. Refuses a student without that head. Returns a line
    saying so."""
    if not hasattr(student, "set_distilled_training"):
        raise UsageError(f"loss.distill_token={mode} needs a student with a distillation head (timm's "
                         f"deit_*_distilled_*); model.name={name} has none")
    student.set_distilled_training(True)
    return (f"distillation token: its head learns the teacher's {mode} label, the class token's the mixed targets; "
            f"evaluation averages the two heads")


@dataclass(frozen=True)
class DistillLoss:
    """The recipe's loss settings, applied: (student logits, soft targets, teacher logits) -> (task, kd).

    weighting "hinton": task = alpha * CE and kd = (1 - alpha) * T^2 * KL (kd_kl carries the T^2); without a
    teacher the task term is the plain CE, as for "usi" (the baseline is the same run either way).
    task "bce": timm's BinaryCrossEntropy stands for the CE wherever it appears. distill_token: the student's
    logits are (class head, distillation head); the task term is the class head's, the KD term (token_kd)
    the distillation head's, weighted as above.
    """
    kd_weight: float = 5.0
    temperature: float = 1.0
    hard_label: bool = True
    weighting: str = "usi"
    alpha: float = 0.5
    task: str = "ce"
    bce_target_thresh: float | None = None
    distill_token: str | None = None  # soft | hard: the student gives (class head, distillation head)
    criterion: object = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "criterion", task_criterion(self.task, self.bce_target_thresh))

    def __call__(self, student_logits, soft_targets, teacher_logits):
        if self.distill_token is not None:  # class token: mixed targets; distillation token: the teacher
            head, dist_head = student_logits
            task = self.criterion(head.float(), soft_targets.float())
            kd = token_kd(dist_head, teacher_logits, self.distill_token, self.temperature)
            if self.weighting == "hinton":
                return self.alpha * task, (1.0 - self.alpha) * kd
            return task, self.kd_weight * kd
        if self.weighting == "hinton" and teacher_logits is not None:
            task, kd = usi_loss(student_logits, soft_targets, teacher_logits, kd_weight=1.0 - self.alpha,
                                temperature=self.temperature, criterion=self.criterion)
            return self.alpha * task, kd
        return usi_loss(student_logits, soft_targets, teacher_logits, kd_weight=self.kd_weight,
                        temperature=self.temperature, hard_label=self.hard_label, criterion=self.criterion)

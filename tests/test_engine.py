import pytest
import torch
from timm.data import Mixup

from usi.engine import Compute, Guard, NonFiniteError, Position, StepConfig, TrainState, train_one_epoch
from usi.loss import DistillLoss
from usi.progress import Progress
from usi.teacher import Teacher


class Spy(torch.nn.Module):
    def __init__(self, classes=4, poison=False):
        super().__init__()
        self.fc = torch.nn.Linear(3, classes)
        self.inputs, self.poison = [], poison

    def forward(self, x):
        self.inputs.append(x.detach().clone())
        out = self.fc(x.mean((2, 3)))
        return out * float("nan") if self.poison else out


def make_parts(student, teacher=None, mixup=True):
    opt = torch.optim.AdamW(student.parameters(), lr=0.1, fused=True)
    sched = type("S", (), {"step_update": lambda self, num_updates: None})()
    state = TrainState(student=student, wrapped=student, optimizer=opt, scheduler=sched, teacher=teacher,
                       mixup=Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, num_classes=4, label_smoothing=0)
                       if mixup else None)
    return state, StepConfig(compute=Compute(torch.device("cpu")), num_classes=4, loss=DistillLoss())


def batches(n, size=8):
    g = torch.Generator().manual_seed(0)
    return iter([(torch.randn(size, 3, 6, 6, generator=g), torch.randint(0, 4, (size,), generator=g))
                 for _ in range(n)])


def run(parts, steps, limit=100):
    state, cfg = parts
    return train_one_epoch(state, cfg, batches(steps), start=Position(0, 0, 0), steps=steps, epochs=1,
                           guard=Guard(torch.device("cpu"), limit), progress=Progress(False), log_interval=1,
                           images_per_step=8)


def test_teacher_and_student_receive_the_same_mixed_batch():
    teacher_model = Spy()
    teacher = Teacher(teacher_model, student_mean=(0.5,) * 3, student_std=(0.5,) * 3, teacher_mean=(0.5,) * 3,
                      teacher_std=(0.5,) * 3)
    student = Spy()
    raw_inputs = [x for x, _ in batches(3)]
    run(make_parts(student, teacher), 3)
    assert len(student.inputs) == len(teacher_model.inputs) == 3
    for s, t, raw in zip(student.inputs, teacher_model.inputs, raw_inputs):
        assert torch.equal(s, t)
        assert not torch.equal(s, raw)  # it was mixed (mixup or cutmix) before either saw it


def test_non_finite_updates_are_skipped_and_counted():
    student = Spy(poison=True)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    stats, updates = run(make_parts(student, mixup=False), 3)
    assert updates == 3 and stats["skipped_updates"] == 3
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())


def test_too_many_non_finite_updates_in_a_row_stop_the_run():
    with pytest.raises(NonFiniteError, match="3 non-finite updates in a row ending at update 3"):
        run(make_parts(Spy(poison=True), mixup=False), 5, limit=3)


def test_finite_updates_change_the_weights():
    student = Spy()
    before = student.fc.weight.clone()
    stats, _ = run(make_parts(student), 2)
    assert stats["skipped_updates"] == 0 and not torch.equal(before, student.fc.weight)

import numpy as np
import pytest
import torch
from timm.data import Mixup

from usi.distill.loss import DistillLoss
from usi.distill.teacher import Teacher
from usi.models import Compute
from usi.runtime.progress import Progress
from usi.training.engine import StepConfig, TrainState, train_one_epoch
from usi.training.feed import Feed, Position
from usi.training.meter import Guard, Meter, NonFiniteError

from helpers import Spy


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


class Loader:
    """An epoch's batches as a loader gives them (`epoch(epoch, step)`)."""

    def __init__(self, batches_):
        self.batches = batches_

    def epoch(self, epoch, step):
        return self.batches


class Stops:
    """StopSignals' answer to every rank's question, from a function of `loader_failed`."""

    def __init__(self, should_stop):
        self.agree = should_stop


def train(parts, batches_, *, start, steps, epochs, limit=100, log_interval, should_stop=None):
    state, cfg = parts
    feed = Feed(Loader(batches_), steps=steps, accum=cfg.accum_steps,
                stops=Stops(should_stop) if should_stop is not None else None)
    meter = Meter(state.optimizer, guard=Guard(torch.device("cpu"), limit), progress=Progress(False),
                  log_interval=log_interval, images_per_step=8, steps=steps, epochs=epochs)
    return train_one_epoch(state, cfg, feed.epoch(start), meter)


def run(parts, steps, limit=100):
    return train(parts, batches(steps), start=Position(0, 0, 0), steps=steps, epochs=1, limit=limit, log_interval=1)


def test_teacher_and_student_receive_the_same_mixed_batch():
    np.random.seed(0)  # timm's Mixup draws lambda and the cutmix box from numpy: unseeded, a box can be empty
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
    result = run(make_parts(student, mixup=False), 3)
    assert result.end.updates == 3 and result.stats["skipped_updates"] == 3
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())


def test_too_many_non_finite_updates_in_a_row_stop_the_run():
    with pytest.raises(NonFiniteError,
                       match=r"3 non-finite updates in a row \(run.max_nonfinite=3 reached at update 3"):
        run(make_parts(Spy(poison=True), mixup=False), 5, limit=3)


def test_finite_updates_change_the_weights():
    student = Spy()
    before = student.fc.weight.clone()
    result = run(make_parts(student), 2)
    assert result.stats["skipped_updates"] == 0 and not torch.equal(before, student.fc.weight)


def epoch(parts, batches_, *, start=Position(0, 0, 0), steps=10, accum=1, should_stop=None):
    state, cfg = parts
    cfg = StepConfig(compute=cfg.compute, num_classes=4, loss=cfg.loss, accum_steps=accum)
    return train((state, cfg), batches_, start=start, steps=steps, epochs=3, log_interval=3, should_stop=should_stop)


def test_a_stop_request_ends_the_epoch_after_the_update_in_progress():
    answers = iter([0, 0, 0, 0, 0, 15, 15])  # the signal arrives during micro-batch 5, mid-update 3
    result = epoch(make_parts(Spy()), batches(10), accum=2, should_stop=lambda failed: (next(answers), failed))
    # update 3 (micro-batches 5 and 6) is finished: the next step to run is 6, nothing half-accumulated
    assert result.stopped_by == 15 and result.end == Position(0, 6, 3)
    assert result.stats["task_loss"] > 0


@pytest.mark.parametrize("first_seen, end", [(4, Position(0, 4, 1)), (8, Position(0, 8, 2)), (5, Position(0, 8, 2))])
def test_a_stop_seen_between_two_updates_starts_no_new_one(first_seen, end):
    """4 micro-batches per update: a signal that arrived during the last micro-batch of an update is seen
    before the next micro-batch, and no further update is begun (a whole extra update could outlast the
    grace period of a preempted job)."""
    calls = iter(range(100))
    result = epoch(make_parts(Spy()), batches(12), steps=12, accum=4,
                   should_stop=lambda failed: (15 if next(calls) >= first_seen else 0, failed))
    assert result.stopped_by == 15 and result.end == end


def test_a_stop_at_the_last_update_ends_the_epoch_as_usual():
    parts = make_parts(Spy())
    result = epoch(parts, batches(4), start=Position(2, 0, 8), steps=4, should_stop=lambda failed: (2, failed))
    assert result.end == Position(2, 0, 8) and result.stopped_by == 2  # already there: no update begun
    answers = iter([0, 2])  # arrives during the last update's first micro-batch
    result = epoch(parts, batches(2), start=Position(2, 2, 9), steps=4, accum=2,
                   should_stop=lambda failed: (next(answers), failed))
    assert result.end == Position(3, 0, 10) and result.stopped_by == 2  # the epoch's last update: a whole epoch


def dying(n):
    """A loader whose workers a SIGTERM killed after n batches."""
    yield from batches(n)
    raise RuntimeError("DataLoader worker (pid(s) 123) exited unexpectedly")


def test_a_loader_killed_by_the_signal_stops_at_the_last_finished_update():
    student = Spy()
    result = epoch(make_parts(student), dying(3), accum=2, should_stop=lambda failed: (15 if failed else 0, failed))
    # updates end at micro-batches 2 and 4; the 4th never came: back to the end of update 1, gradients dropped
    assert result.stopped_by == 15 and result.end == Position(0, 2, 1)
    assert all(p.grad is None for p in student.parameters())


def test_a_loader_failure_without_a_signal_is_an_error():
    with pytest.raises(RuntimeError, match="exited unexpectedly"):
        epoch(make_parts(Spy()), dying(3), should_stop=lambda failed: (0, failed))
    with pytest.raises(RuntimeError, match="exited unexpectedly"):
        epoch(make_parts(Spy()), dying(3))

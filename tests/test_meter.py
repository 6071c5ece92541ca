"""usi/training/meter.py: an epoch's interval statistics, read once per log interval."""
import io

import pytest
import torch

from usi.runtime.progress import Progress
from usi.training.meter import Guard, Meter, NonFiniteError


def meter(*, log_interval=2, steps=5, limit=3, feature_kd=False, logged=None):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.25)
    stream = io.StringIO()
    m = Meter(optimizer, guard=Guard(torch.device("cpu"), limit), progress=Progress(True, stream),
              log_interval=log_interval, images_per_step=8, steps=steps, epochs=3, feature_kd=feature_kd,
              on_log=(lambda updates, values: logged.append((updates, values))) if logged is not None else None)
    return m, stream


def losses(task, kd, feature=0.0):
    return torch.tensor(task), torch.tensor(kd), torch.tensor(feature)


def test_the_epoch_means_count_every_micro_batch_and_the_intervals_reach_the_trackers():
    logged = []
    m, stream = meter(logged=logged, feature_kd=True)
    m.begin(1)
    for step, (task, kd) in enumerate([(1.0, 10.0), (3.0, 20.0), (5.0, 30.0), (7.0, 40.0), (9.0, 50.0)]):
        m.add(losses(task, kd, 0.5), step=step, updates=step + 1, bad=torch.tensor(False))
    stats = m.end(stopped=False)
    assert stats["task_loss"] == pytest.approx(5.0) and stats["kd_loss"] == pytest.approx(30.0)
    assert stats["feature_loss"] == pytest.approx(0.5)
    assert stats["lr"] == 0.25 and stats["images"] == 5 * 8 and stats["skipped_updates"] == 0
    # steps 2 and 4 end an interval of 2, and step 5 is the epoch's last: three reads, three progress lines
    assert [updates for updates, _ in logged] == [2, 4, 5]
    assert logged[0][1]["task_loss"] == pytest.approx(2.0)  # the running mean of the first two steps
    assert stream.getvalue().count("\n") == 3 and "epoch 2/3" in stream.getvalue()


def test_too_many_bad_updates_in_a_row_stop_the_run_at_the_read_and_each_epoch_counts_its_own():
    m, _ = meter(log_interval=100, steps=6, limit=3)
    m.begin(0)
    for step, bad in enumerate([True, False, True, False]):  # never three in a row
        m.add(losses(1.0, 1.0), step=step, updates=step + 1, bad=torch.tensor(bad))
    assert m.end(stopped=True)["skipped_updates"] == 2
    m.begin(1)
    m.add(losses(1.0, 1.0), step=0, updates=5, bad=torch.tensor(True))
    assert m.end(stopped=True)["skipped_updates"] == 1  # this epoch's, not the run's 3
    m.begin(2)
    for step in range(2):
        m.add(losses(1.0, 1.0), step=step, updates=6 + step, bad=torch.tensor(True))
    # updates 5, 6 and 7 in a row: the third reaches the limit
    with pytest.raises(NonFiniteError, match=r"3 non-finite updates in a row \(run.max_nonfinite=3 reached at update 7"):
        m.end(stopped=True)


def test_the_eta_counts_the_evaluations_still_to_come():
    m, _ = meter()  # 3 epochs
    m.val_images, m.eval_every = 80, 2  # evaluated after epochs 2 and 3 (the last)
    m.begin(0)
    # before any evaluation was timed: from the val split's size at this pace (80 images at 8 img/s: 10 s)
    assert m.eval_left(8.0) == (0.0, 2 * 0.5 * 10.0)
    m.eval_s = 7.0  # the loop times each evaluation
    m.begin(1)
    assert m.eval_left(8.0) == (7.0, 14.0)
    m.begin(2)
    assert m.eval_left(1e6) == (7.0, 7.0)


def test_the_progress_line_adds_the_evaluations_to_its_eta():
    m, stream = meter(steps=2, log_interval=2)
    m.eval_s = 60.0
    m.begin(2)  # the last epoch: its evaluation is still to come
    for step in range(2):
        m.add(losses(1.0, 1.0), step=step, updates=step + 1, bad=torch.tensor(False))
    assert "eta 1:00 epoch, 1:00 run" in stream.getvalue()  # no step left, one evaluation of 60 s

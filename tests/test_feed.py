import signal

import pytest

from usi.training.feed import Feed, Position


class Loader:
    def __init__(self, n):
        self.n, self.asked = n, []

    def epoch(self, epoch, step):
        self.asked.append((epoch, step))
        return iter(range(step, self.n))


class Stops:
    def __init__(self, first_seen):
        self.calls, self.first_seen = 0, first_seen

    def agree(self, loader_failed=False):
        self.calls += 1
        return (signal.SIGTERM if self.calls > self.first_seen else 0), loader_failed


def test_a_whole_epoch_counts_its_updates_and_says_it_finished():
    loader = Loader(6)
    feed = Feed(loader, steps=6, accum=2, stops=Stops(first_seen=100))
    seen = [(x, feed.ends_update, feed.at) for x in feed.epoch(Position(1, 2, 5))]
    assert loader.asked == [(1, 2)]  # the loader starts where the epoch resumes
    assert seen == [(2, False, Position(1, 3, 5)), (3, True, Position(1, 4, 6)), (4, False, Position(1, 5, 6)),
                    (5, True, Position(1, 6, 7))]
    assert feed.end == Position(2, 0, 7) and feed.stopped_by == 0 and feed.ending() == "finished"


@pytest.mark.parametrize("first_seen, given, end", [(1, 2, Position(0, 2, 1)), (2, 2, Position(0, 2, 1)),
                                                    (3, 4, Position(0, 4, 2))])
def test_a_signal_ends_the_epoch_between_two_updates_and_the_feed_says_where(first_seen, given, end):
    feed = Feed(Loader(8), steps=8, accum=2, stops=Stops(first_seen))
    assert len(list(feed.epoch(Position(0, 0, 0)))) == given
    assert feed.end == end and feed.stopped_by == signal.SIGTERM and not feed.dropped
    assert feed.ending() == f"stopped by SIGTERM at epoch 1, step {end.step} ({end.updates} updates)"


def test_between_phases_a_broken_loader_without_a_signal_is_raised():
    feed = Feed(Loader(2), steps=2, accum=1, stops=Stops(first_seen=100))
    with pytest.raises(RuntimeError, match="worker"):
        feed.signal(RuntimeError("worker died"))
    assert Feed(Loader(2), steps=2, accum=1, stops=Stops(first_seen=0)).signal(RuntimeError("x")) == signal.SIGTERM

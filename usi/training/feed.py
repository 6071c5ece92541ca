"""The feed: an epoch's batches, ended only between two optimizer updates.

The one place that asks the ranks whether to stop (usi/runtime/preempt.py's StopSignals): before every
micro-batch of an epoch (`for x, y in feed.epoch(start)`), and between the phases outside the training
steps (`feed.signal()`: after the teacher's val pass, an evaluation, an epoch). The training loop never
asks; after the epoch the feed says how it ended (`end`, `stopped_by`, `ending()`).

The rule, every rank at once: a signal ends the epoch once the update in progress is done (no new update
is begun); a loader that a signal killed ends it at once, back at the last finished update, the partial
gradients to be dropped (`dropped`); a loader that broke with no signal is an error on every rank.
"""
from __future__ import annotations

import signal
from collections.abc import Iterator
from dataclasses import dataclass

from usi.data.loader import next_batch


@dataclass(frozen=True)
class Position:
    """Where training stands: `step` is the next step of `epoch`, after `updates` optimizer updates."""
    epoch: int
    step: int
    updates: int


def due(count: int, every: int, last: int | None = None) -> bool:
    """The one predicate for periodic actions: every `every`-th count, and at `last`."""
    return (every > 0 and count % every == 0) or count == last


class Feed:
    """The run's training batches, epoch by epoch. `loader.epoch(epoch, step)` gives an epoch's batches from
    a step on; `stops` answers `agree(loader_failed) -> (signal or 0, any loader failed)` on every rank at
    once (a StopSignals; None: no signal is ever honoured and a loader error is raised as it is)."""

    def __init__(self, loader, *, steps: int, accum: int, stops=None):
        self.loader, self.steps, self.accum, self.stops = loader, steps, accum, stops
        self.start = self.end = self.batches = None
        self.stopped_by, self.dropped = 0, False

    def epoch(self, start: Position) -> Feed:
        """Starts the loader's epoch from `start` (it seeds the epoch's RNGs now, before the step's clock
        starts); iterate the feed for its (x, y) batches."""
        self.start, self.step, self.updates = start, start.step - 1, start.updates
        self.end, self.stopped_by, self.dropped = None, 0, False
        self.boundary = start  # the last position between two updates
        self.batches = self.loader.epoch(start.epoch, start.step)
        return self

    @property
    def ends_update(self) -> bool:
        """The micro-batch just given completes an optimizer update (`updates` already counts it)."""
        return (self.step + 1) % self.accum == 0

    @property
    def at(self) -> Position:
        """Where training stands after the micro-batch just given (a resume point when it ends an update)."""
        return Position(self.start.epoch, self.step + 1, self.updates)

    def __iter__(self) -> Iterator[tuple]:
        for step in range(self.start.step, self.steps):
            batch, error = next_batch(self.batches)
            if not self.go_on(step, error):
                return
            if batch is None:  # the loader ran out: the epoch is over
                break
            self.step = step
            self.updates += self.ends_update
            yield batch
            if self.ends_update:
                self.boundary = self.at
                if self.stopped_by and step + 1 < self.steps:  # at the epoch's last step it ends as usual
                    self.end = self.boundary
                    return
        self.end = Position(self.start.epoch + 1, 0, self.updates)

    def go_on(self, step: int, error: Exception | None) -> bool:
        """Before every micro-batch, on every rank at once; sets `end` when the epoch stops here."""
        if self.stops is None:
            if error is not None:
                raise error
            return True
        self.stopped_by, failed = self.stops.agree(error is not None)
        if failed and not self.stopped_by:  # a loader broke with no signal: a real failure, on every rank
            raise error or RuntimeError("another rank's data loader failed")
        if failed:  # a signal killed the loader: the rest of this update cannot be fetched
            self.dropped, self.end = True, self.boundary
            return False
        if self.stopped_by and step % self.accum == 0:  # between two updates: start no new one
            self.end = self.boundary
            return False
        return True

    def signal(self, broken: Exception | None = None) -> int:
        """Outside the training steps, on every rank at once: the stop signal any rank got, 0 if none.
        `broken`: this phase's loader failed (a LoaderBroken); with no signal to explain it, it is raised."""
        signum = self.stops.agree()[0] if self.stops is not None else 0
        if broken is not None and not signum:
            raise broken
        return signum

    def ending(self) -> str:
        """How the last epoch ended, in words."""
        if not self.stopped_by:
            return "finished"
        end = self.end
        where = f"epoch {end.epoch + 1}, step {end.step}" if end.step else f"the end of epoch {end.epoch}"
        return f"stopped by {signal.Signals(self.stopped_by).name} at {where} ({end.updates} updates)"

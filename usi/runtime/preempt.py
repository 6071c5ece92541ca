"""Preemption: SIGTERM (Slurm, Kubernetes) and SIGINT (Ctrl-C) end a run cleanly.

On a signal, training finishes the optimizer update in progress, every rank agrees to stop after the
same update (also when only one rank got the signal), rank 0 writes the checkpoint, and the run
exits with code 128 + the signal's number (143 for SIGTERM, 130 for SIGINT). `run.resume=auto`
then continues from the next unseen batch. A second signal while stopping is only noted: the
checkpoint write is atomic anyway, so nothing can leave it half-written.

Loader workers ignore SIGINT (Ctrl-C reaches the whole terminal group) and keep serving until the
update is finished. A SIGTERM sent to every process (as Slurm does) kills them: the update in
progress then cannot get its remaining micro-batches, and the run stops at the last finished update
instead, its partial gradients dropped (the resume recomputes them).

The ranks agree before every micro-batch's forward pass, over a gloo group on the CPU: one small
all-reduce, a host-side wait but no GPU sync; no rank can start a backward that another will never
join.
"""
from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(Exception):
    """Raised on every rank once the stop checkpoint is written; the CLI prints it and exits."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


@contextlib.contextmanager
def raising_interrupted(message: Callable[[str], str]):
    """SIGTERM/SIGINT raise Interrupted(signum, message(the signal's name)) wherever the main thread is:
    for phases with no update to finish (waiting on a worker pool, measuring models). A loop that must
    not be cut mid-step notes the signal instead and stops between steps (StopSignals): a raise from the
    handler could land inside a library's own try/except."""
    def stop(signum, _frame):
        raise Interrupted(signum, message(signal.Signals(signum).name))

    previous = {s: signal.signal(s, stop) for s in SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def ignore_interrupts(_worker_id: int | None = None) -> None:
    """DataLoader worker_init_fn: Ctrl-C signals the terminal's whole process group; a worker leaves it
    to its parent, which finishes the update and then shuts the workers down (with SIGTERM, which a
    worker must keep obeying, or the parent's exit would wait on it forever)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def note(line: str) -> None:
    """A line on stderr from inside a signal handler. Not through logging: the handler may interrupt the
    main program in the middle of writing a log line, and the logging stream is not reentrant."""
    os.write(2, f"{time.strftime('%H:%M:%S')} {line}\n".encode())


def ignore_child(_signum: int, _frame) -> None:
    """SIGCHLD while stopping: a dead loader worker is reported by the loader itself."""


class StopSignals:
    """Catches SIGTERM/SIGINT while active (a context manager) and answers when all ranks must stop."""

    def __init__(self, distributed: bool):
        self.received = 0  # the first signal's number, 0 if none
        self.distributed = distributed and dist.is_initialized()
        # The flag travels on the CPU: under NCCL a gloo side group carries it.
        self.group = None
        if self.distributed and dist.get_backend() != "gloo":
            self.group = dist.new_group(backend="gloo")
        self.previous = {}

    def __enter__(self) -> "StopSignals":
        for s in SIGNALS:
            self.previous[s] = signal.signal(s, self.handle)
        return self

    def __exit__(self, *exc) -> None:
        if self.received:
            # Stopping, the checkpoint written: what is left is cleaning up and exiting. Ignore further
            # signals from here (a Python handler would be reset to the default, deadly one while the
            # interpreter shuts down, and a late second signal would turn exit code 143 into a kill).
            for s in SIGNALS:
                signal.signal(s, signal.SIG_IGN)
            self.quiet_children()  # a late SIGTERM to the group still kills the loader workers
            return
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def quiet_children(self) -> None:
        """The same SIGTERM (first or second, or one after the stop) may kill the loader workers. torch's
        SIGCHLD handler would then raise "worker killed" wherever this process happens to be (in a
        backward pass, a checkpoint write, a loader's shutdown); without it, the loader reports the dead
        worker when it is next asked for a batch, where the engine and the evaluation expect it. A Python
        no-op rather than SIG_DFL: a SIGCHLD that arrived just before is still delivered to a Python
        handler, and with SIG_DFL in place Python prints "Signal 17 ignored due to race condition"."""
        if signal.SIGCHLD not in self.previous:
            self.previous[signal.SIGCHLD] = signal.signal(signal.SIGCHLD, ignore_child)

    def handle(self, signum: int, _frame) -> None:
        if signum == signal.SIGTERM:
            self.quiet_children()
        name = signal.Signals(signum).name
        if self.received:
            note(f"received {name} again: already stopping, the checkpoint is being written")
            return
        self.received = signum
        note(f"received {name}: stopping after the current optimizer update, with a checkpoint")

    def agree(self, loader_failed: bool = False) -> tuple[int, bool]:
        """Called by every rank at the same point: (the signal any rank got, 0 if none; whether any
        rank's loader failed after its signal)."""
        if not self.distributed:
            return self.received, loader_failed
        flags = torch.tensor([self.received, int(loader_failed)], dtype=torch.int64)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.group)
        return int(flags[0]), bool(flags[1])

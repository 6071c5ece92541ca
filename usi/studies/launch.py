"""Training runs as child processes: a share of the machine each, and the user's signals passed on.

Every study (quickstart, fidelity, table) trains through `usi train RECIPE` in a child process (under
torchrun when a run has several processes), so a run is the same program a user would start by hand,
its output goes to its log, and its threads and devices are its own:
  - on CPU, the cores are split between the runs at once (OMP_NUM_THREADS of each child);
  - on GPUs, each slot gets its own devices (CUDA_VISIBLE_DEVICES: jobs x nproc GPUs in all).
Each child leads its own process group. SIGTERM or SIGINT to the study reaches every child's group:
each run finishes its update, writes its checkpoint and exits 143/130; the study starts nothing new,
waits for all, and ends with one line. The same command then resumes every run.
"""
from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

from usi.runtime import files
from usi.runtime.preempt import SIGNALS, Interrupted


def cores() -> int:
    """The cores this process may use (a Slurm or taskset limit included)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def launcher(nproc: int) -> list[str]:
    """The command that starts `usi` with nproc processes."""
    if nproc <= 1:
        return [sys.executable, "-m", "usi"]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "usi"]


def slot_envs(jobs: int, nproc: int, gpus: int) -> list[dict]:
    """The environment of each of `jobs` slots: its GPUs, or its share of the cores."""
    if gpus:
        if jobs * nproc > gpus:
            from usi.errors import UsageError
            raise UsageError(f"jobs={jobs} x nproc={nproc} needs {jobs * nproc} GPUs; this machine has {gpus}")
        return [{"CUDA_VISIBLE_DEVICES": ",".join(str(i * nproc + k) for k in range(nproc))} for i in range(jobs)]
    threads = max(1, cores() // (jobs * nproc))
    return [{"OMP_NUM_THREADS": str(threads)} for _ in range(jobs)]


class Children:
    """The study's child processes, slots to run them in, and the signal that stops them all."""

    def __init__(self, envs: list[dict]):
        self.slots = queue.Queue()
        for env in envs:
            self.slots.put(env)
        self.live: set[subprocess.Popen] = set()
        self.lock = threading.RLock()  # the handler may run while this thread holds it
        self.stopping = 0  # the signal received, 0 if none

    def run(self, command: list[str], log: Path, stdout: Path | None = None) -> int:
        """Run `command` in a free slot with its output appended to `log` (its standard output written to
        `stdout` instead, when given); its exit code. Once a signal arrived, nothing new starts (-1)."""
        env = self.slots.get()
        try:
            log.parent.mkdir(parents=True, exist_ok=True)
            # never through a link planted at the log's name (usi.runtime.files.open_own)
            with files.open_own(log) as err, open(stdout or os.devnull, "w") as out, self.lock:
                if self.stopping:
                    return -1
                child = subprocess.Popen(command, stdout=out if stdout else err, stderr=err, stdin=subprocess.DEVNULL,
                                         env={**os.environ, **env}, start_new_session=True)
                self.live.add(child)
            try:
                return child.wait()
            finally:
                with self.lock:
                    self.live.discard(child)
        finally:
            self.slots.put(env)

    def forward(self, signum: int, _frame=None) -> None:
        """A signal handler: pass the signal to every child's process group, once."""
        with self.lock:
            first = not self.stopping
            self.stopping = self.stopping or signum
            for child in self.live:
                try:
                    os.killpg(child.pid, signum)
                except ProcessLookupError:  # ended meanwhile
                    pass
        if first:
            name = signal.Signals(signum).name
            os.write(2, f"received {name}: each run checkpoints and stops; nothing new starts\n".encode())

    @contextmanager
    def forwarding(self):
        """SIGTERM/SIGINT go to the children while inside; on leaving after one, Interrupted is raised."""
        previous = {s: signal.signal(s, self.forward) for s in SIGNALS}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        if self.stopping:
            raise Interrupted(self.stopping, f"stopped by {signal.Signals(self.stopping).name}: every run "
                              f"wrote its checkpoint; the same command resumes them")

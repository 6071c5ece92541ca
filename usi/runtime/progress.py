"""What a run shows: the `usi` logger (console, and the run's log.txt) and a one-line progress display
for rank 0, redrawn in place on a terminal, one line per update in logs.

(tqdm is only a transitive dependency of timm; this is the 20 lines usi needs.)
"""
from __future__ import annotations

import logging
import logging.handlers
import sys
import time
from pathlib import Path

from usi.errors import printable
from usi.runtime import files

log = logging.getLogger("usi")


FORMAT = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
LOG_FILE = "log.txt"


class OwnFileHandler(logging.FileHandler):
    """Appends to log.txt, never through a link planted there (usi/runtime/files.py's open_own)."""

    def _open(self):
        return files.open_own(Path(self.baseFilename))


def setup_logging(run_dir: Path | None, main: bool) -> None:
    """INFO on rank 0 (warnings only on the others) to the console, and to run_dir/log.txt once it exists.

    Before the run directory exists (it is created only after a successful start), rank 0's lines are
    kept in memory; log.txt then begins with them: the batch plan, the model, the data, the teacher, and
    every warning.
    """
    early = next((h for h in log.handlers if isinstance(h, logging.handlers.BufferingHandler)), None)
    log.handlers.clear()
    log.setLevel(logging.INFO if main else logging.WARNING)
    log.propagate = False
    stream = logging.StreamHandler()
    stream.setFormatter(FORMAT)
    log.addHandler(stream)
    if not main:
        return
    if run_dir is None:
        log.addHandler(logging.handlers.BufferingHandler(capacity=100_000))
        return
    file = OwnFileHandler(run_dir / LOG_FILE)
    file.setFormatter(FORMAT)
    for record in early.buffer if early is not None else []:
        file.handle(record)
    log.addHandler(file)


def to_log_file(line: str) -> None:
    """A line for log.txt only (the console already got it): how and why a run ended."""
    for handler in log.handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(log.makeRecord(log.name, logging.ERROR, __file__, 0, line, None, None))


class Progress:
    def __init__(self, enabled: bool, stream=None):
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.tty = self.enabled and self.stream.isatty()
        self.width = 0

    def show(self, text: str) -> None:
        if not self.enabled:
            return
        text = printable(text)  # a line break or \r inside would break the redraw or forge a line
        if self.tty:
            self.stream.write("\r" + text.ljust(self.width))
            self.width = len(text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def done(self) -> None:
        if self.tty and self.width:
            self.stream.write("\n")
            self.stream.flush()
        self.width = 0


def step_line(fields: dict, *, epoch: int, epochs: int, step: int, steps: int,
              seconds_per_step: float | None = None, eval_left_s: tuple[float, float] = (0.0, 0.0)) -> str:
    """One progress line; with the current pace, the time left in the epoch and in the run: the training
    steps left, and the evaluations still to come (eval_left_s: this epoch's, the run's, in seconds)."""
    body = "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in fields.items())
    line = f"epoch {epoch + 1}/{epochs}  step {step}/{steps}  {body}"
    if seconds_per_step:
        left = steps - step
        line += (f"  eta {clock(left * seconds_per_step + eval_left_s[0])} epoch, "
                 f"{clock((left + (epochs - epoch - 1) * steps) * seconds_per_step + eval_left_s[1])} run")
    return line


def clock(seconds: float) -> str:
    """1:02:03, or 2:03 under an hour."""
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Rate:
    """Images per second since the last call."""

    def __init__(self):
        self.t = time.perf_counter()

    def __call__(self, images: int) -> float:
        now = time.perf_counter()
        rate = images / max(now - self.t, 1e-9)
        self.t = now
        return rate

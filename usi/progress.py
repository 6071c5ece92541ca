"""What a run shows: the `usi` logger (console, and the run's log.txt) and a one-line progress display
for rank 0, redrawn in place on a terminal, one line per update in logs.

(tqdm is only a transitive dependency of timm; this is the 20 lines usi needs.)
"""
from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

log = logging.getLogger("usi")


def setup_logging(run_dir: Path | None, main: bool) -> None:
    """INFO on rank 0 (warnings only on the others) to the console, and to run_dir/log.txt once it exists."""
    log.handlers.clear()
    log.setLevel(logging.INFO if main else logging.WARNING)
    log.propagate = False
    fmt = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
    stream = logging.StreamHandler()
    stream.setFormatter(fmt)
    log.addHandler(stream)
    if run_dir is not None and main:
        file = logging.FileHandler(run_dir / "log.txt")
        file.setFormatter(fmt)
        log.addHandler(file)


class Progress:
    def __init__(self, enabled: bool, stream=None):
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.tty = self.enabled and self.stream.isatty()
        self.width = 0

    def show(self, text: str) -> None:
        if not self.enabled:
            return
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


def step_line(fields: dict, *, epoch: int, epochs: int, step: int, steps: int) -> str:
    body = "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in fields.items())
    return f"epoch {epoch + 1}/{epochs}  step {step}/{steps}  {body}"


class Rate:
    """Images per second since the last call."""

    def __init__(self):
        self.t = time.perf_counter()

    def __call__(self, images: int) -> float:
        now = time.perf_counter()
        rate = images / max(now - self.t, 1e-9)
        self.t = now
        return rate

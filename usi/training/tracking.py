"""Experiment trackers beside metrics.jsonl: TensorBoard and Weights & Biases.

Each is imported only when a recipe names it (run.loggers), and only rank 0 writes. At every logging
interval (run.log_interval steps; its values are the interval's means, read at the interval's one host
sync) they get the task and KD losses, the lr and images/s, keyed by the update count; at every epoch,
every metric of metrics.jsonl; at the end, summary.json's numbers (W&B's run summary). A W&B run keeps
its id in the run directory, so a resumed run continues the same W&B run; its project, entity, name and
tags are run.wandb_*.
"""
from __future__ import annotations

import importlib.util
import secrets
from pathlib import Path

from usi.errors import UsageError

PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}  # logger -> the package it needs (its usi extra)


def check_available(names: list[str]) -> None:
    """Before anything is built or written: a missing package is one line naming the extra to install."""
    for name in names:
        if importlib.util.find_spec(PACKAGES[name]) is None:
            raise UsageError(f"run.loggers has {name}, which needs the {PACKAGES[name]} package: "
                             f"pip install 'usi[{name}]'")


def flatten(record: dict, prefix: str = "") -> dict[str, float]:
    """{"raw": {"top1": 71.2}} -> {"raw/top1": 71.2}; numbers only."""
    out = {}
    for key, value in record.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and key != "epoch":
            out[f"{prefix}{key}"] = float(value)
    return out


class Trackers:
    def __init__(self, names: list[str], run_dir: Path, config: dict, enabled: bool):
        self.writers = []
        for name in names if enabled else []:
            try:
                self.writers.append(OPEN[name](run_dir, config))
            except Exception as e:  # no login, no network, a folder it cannot make: one line, the others closed
                self.close()
                first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
                raise UsageError(f"run.loggers: {name} failed to start ({first})") from None

    def interval(self, updates: int, scalars: dict) -> None:
        for writer in self.writers:
            writer.log({f"train/{k}": float(v) for k, v in scalars.items()}, updates)

    def epoch(self, record: dict, updates: int) -> None:
        # the epoch's training means as epoch_train/..., apart from the intervals' train/...
        scalars = flatten({**{k: v for k, v in record.items() if k != "train"}, "epoch_train": record["train"]})
        for writer in self.writers:
            writer.log({"epoch": float(record["epoch"]), **scalars}, updates)

    def summary(self, summary: dict) -> None:
        for writer in self.writers:
            writer.summary(flatten(summary))

    def close(self) -> None:
        for writer in self.writers:
            writer.close()


class TensorBoard:
    def __init__(self, run_dir: Path, config: dict):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def log(self, scalars: dict, step: int) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def summary(self, scalars: dict) -> None:
        pass  # TensorBoard has no run summary: the last epoch's scalars are its record

    def close(self) -> None:
        self.writer.close()


class WandB:
    def __init__(self, run_dir: Path, config: dict):
        import wandb

        id_file = run_dir / "wandb-id"
        # usi makes the id itself: wandb 0.31 removed wandb.util.generate_id, which crashed every start
        run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
        id_file.write_text(run_id + "\n")
        r = config["run"]
        self.run = wandb.init(project=r["wandb_project"], entity=r["wandb_entity"],
                              name=r["wandb_name"] or run_dir.name, tags=r["wandb_tags"], id=run_id,
                              resume="allow", config=config, dir=str(run_dir))

    def log(self, scalars: dict, step: int) -> None:
        self.run.log(scalars, step=step)

    def summary(self, scalars: dict) -> None:
        self.run.summary.update(scalars)

    def close(self) -> None:
        self.run.finish()


OPEN = {"tensorboard": TensorBoard, "wandb": WandB}

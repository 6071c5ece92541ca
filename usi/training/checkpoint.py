"""The training checkpoint (last.pt): everything a resume needs, written atomically, loaded safely.

The file operations (atomic writes, weights-only loads, checksums) are usi/runtime/files.py's; this
module knows what a training state holds: the student, its EMA, the optimizer, scheduler and scaler, the
position. Other trained parts (feature KD's projection) keep their own entries, through the TrainState's
get_task_state / load_task_state, as timm's tasks do.
"""
from __future__ import annotations

from pathlib import Path

import torch

from usi.errors import UsageError
from usi.runtime.files import atomic_write, load_state_file, metadata_problem, mismatch

LAST = "last.pt"
BEST = "best.safetensors"
FORMAT = 1


def save(state: dict, path: Path) -> None:
    atomic_write(path, lambda tmp: torch.save({"format": FORMAT, **state}, tmp))


def load(path: Path) -> dict:
    """A full usi checkpoint, safely loaded to CPU."""
    state = load_state_file(Path(path))
    if state.get("format") != FORMAT or "student" not in state:
        raise UsageError(f"{path} is not a usi training checkpoint (no 'student' state)")
    return state


def check_training_state(saved: dict, path: Path) -> dict:
    """What a resume reads besides the weights: a recipe (a YAML mapping), the class list, the position."""
    problem = metadata_problem(saved.get("recipe"), saved.get("classes"))
    if problem:
        raise UsageError(f"{path} is a damaged usi checkpoint: {problem}")
    for key in ("epoch", "step", "num_updates"):
        if not isinstance(saved.get(key), int):
            raise UsageError(f"{path} is a damaged usi checkpoint: no training position ({key})")
    return saved


def capture(state, *, recipe_yaml: str, classes: list[str], at, best: dict) -> dict:
    """The full training state of a TrainState at Position `at`: everything a resume needs."""
    return {
        "recipe": recipe_yaml,
        "student": state.student.state_dict(),
        "ema": state.ema.module.state_dict() if state.ema is not None else {},
        **state.get_task_state(),  # what the other trained parts keep of themselves
        "optimizer": state.optimizer.state_dict(),
        "scheduler": state.scheduler.state_dict(),
        "scaler": state.scaler.state_dict() if state.scaler is not None else {},
        "classes": classes,
        "epoch": at.epoch,  # the epoch to run next (or the one in progress)
        "step": at.step,  # the next step within it
        "num_updates": at.updates,
        "best": best,
    }


def restore(state, path: Path) -> dict:
    """Load a checkpoint into a TrainState; returns the checkpoint (for its position and best)."""
    saved = check_training_state(load(path), path)
    models = [("student", state.student)] + ([("ema", state.ema.module)] if state.ema is not None and saved["ema"]
                                             else [])
    # the other trained parts first: a checkpoint of another kind of run is refused before any weight moves
    state.load_task_state(saved, f"checkpoint {path}")
    for key, model in models:
        try:
            model.load_state_dict(saved[key])
        except (RuntimeError, KeyError) as e:
            raise UsageError(f"checkpoint {path} does not fit this recipe's model ({key}): "
                             f"{mismatch(model, saved[key]) if key in saved else e}") from None
    try:
        state.optimizer.load_state_dict(saved["optimizer"])
        state.scheduler.load_state_dict(saved["scheduler"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise UsageError(f"checkpoint {path} does not fit this recipe's optimizer: "
                         f"{str(e).strip().splitlines()[0][:200]}") from None
    if state.scaler is not None and saved["scaler"]:
        state.scaler.load_state_dict(saved["scaler"])
    return saved

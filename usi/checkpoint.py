"""Atomic checkpoint writes, safe loads, and the student's exported weights.

A checkpoint is written to a temporary file in the same directory, flushed to disk, then renamed
over the old one: a crash at any point leaves either the old or the new file, never half of one.
Loading uses weights_only=True (or safetensors), so a file carrying a pickled payload is refused
without running it.
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from usi.errors import UsageError

LAST = "last.pt"
BEST = "best.safetensors"
FORMAT = 1


def atomic_write(path: Path, write) -> None:
    """Call write(tmp_path), then rename tmp over path, flushing file and directory to disk."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(state: dict, path: Path) -> None:
    atomic_write(path, lambda tmp: torch.save({"format": FORMAT, **state}, tmp))


def load(path: Path) -> dict:
    """A full usi checkpoint, safely loaded to CPU."""
    state = load_state_file(Path(path))
    if state.get("format") != FORMAT or "student" not in state:
        raise UsageError(f"{path} is not a usi training checkpoint (no 'student' state)")
    return state


def load_state_file(path: Path) -> dict:
    """A dict of tensors (and plain values) from .safetensors or a torch file, without running code."""
    if not path.is_file():
        raise UsageError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise UsageError(f"{path} is not a readable safetensors file ({e})") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0]
        raise UsageError(f"refused to load {path}: it holds objects other than tensors ({first[:160]})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"{path} is not a readable checkpoint (truncated or corrupt: {first[:160]})") from None
    if not isinstance(state, dict):
        raise UsageError(f"{path} does not hold a dict of weights")
    return state


def export_weights(state_dict: dict, path: Path, metadata: dict[str, str]) -> None:
    """The student's weights as safetensors: what leaves the program, and what a teacher loads."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def capture(state, *, recipe_yaml: str, classes: list[str], at, best: dict) -> dict:
    """The full training state of a TrainState at Position `at`: everything a resume needs."""
    return {
        "recipe": recipe_yaml,
        "student": state.student.state_dict(),
        "ema": state.ema.module.state_dict() if state.ema is not None else {},
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
    saved = load(path)
    try:
        state.student.load_state_dict(saved["student"])
        if state.ema is not None and saved["ema"]:
            state.ema.module.load_state_dict(saved["ema"])
        state.optimizer.load_state_dict(saved["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise UsageError(f"checkpoint {path} does not fit this recipe's model/optimizer: "
                         f"{str(e).strip().splitlines()[0][:200]}") from None
    state.scheduler.load_state_dict(saved["scheduler"])
    if state.scaler is not None and saved["scaler"]:
        state.scaler.load_state_dict(saved["scaler"])
    return saved


def read_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}

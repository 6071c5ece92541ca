"""Where images come from, behind one interface: open a recipe's splits, then make their loaders.

The data format (image folders or webdataset shards) is decided here and nowhere else. A split, of
either format, offers:
  classes, len(split)          the labels and the sample count
  train_loader(transform, ...) batches on the device, a fixed number of steps per epoch on every rank
  eval_loader(transform, ...)  every sample exactly once across ranks
  bad_count(device)            unreadable samples met by any rank (a collective call)
  cache_identity(transform)    what the teacher's val logits depend on (files, transform), or None
A folder's train split can also hold out a minival split (data.minival, `hold_out`).
Each loader reads its own view of the split, with its own transform (the loader's `.dataset`, which
knows its cache_identity()): building the val loader never changes the train loader's images.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from usi.data.folder import FolderSplit, class_map
from usi.data.loader import InputSpec, device_randaugment, eval_transform, randaugment_on_device, train_transform
from usi.data.shards import ShardSplit
from usi.errors import UsageError, quote, shorten
from usi.runtime.distributed import Dist

log = logging.getLogger("usi")
Split = FolderSplit | ShardSplit

__all__ = ["InputSpec", "Split", "hold_out", "open_splits", "open_val_split", "train_loader", "val_loader"]


def open_split(cfg, name: str, classes: list[str] | None = None) -> Split:
    """cfg is the recipe's data section; name is 'train' or 'val'."""
    folder = Path(cfg.root) / getattr(cfg, f"{name}_split")
    if cfg.format == "shards":
        split = ShardSplit(folder, getattr(cfg, f"{name}_shards"))
        if classes is not None and split.classes != classes:
            raise UsageError(f"{name} shards' classes differ from the {len(classes)} expected ones; write them "
                             f"with usi shards --classes-from <train folder>")
        return split
    if cfg.class_map is None:
        return FolderSplit(folder, classes=classes)
    if classes is not None:  # val (or eval): the classes are the map's, other folders left out
        return FolderSplit(folder, classes=classes, mapped=True)
    split = FolderSplit(folder, classes=class_map(cfg.class_map, folder), mapped=True)
    split.require_every_class()
    return split


def open_splits(cfg) -> tuple[Split, Split]:
    """The train and val splits of a recipe's data section; val takes train's classes."""
    root = Path(cfg.root)
    if not os.path.isdir(root):  # os.path: False, not OSError, for a name too long
        what = "is a file, not a folder" if os.path.exists(root) else "does not exist"
        raise UsageError(f"data.root={quote(cfg.root)} {what} (expected the folders "
                         f"{shorten(cfg.train_split, 80)}/ and {shorten(cfg.val_split, 80)}/ in it)")
    train = open_split(cfg, "train")
    val = open_split(cfg, "val", classes=train.classes)
    missing = val.missing_classes()
    if missing:
        log.warning(f"val split has no images of {len(missing)} classes (e.g. {train.classes[missing[0]]!r})")
    return train, val


def hold_out(train: Split, cfg) -> tuple[Split, Split | None]:
    """data.minival: (train without the held-out images, the minival split they form); (train, None) when
    it is 0. Only image folders hold out (usi/recipe/checking.py refuses it with shards)."""
    if not cfg.minival:
        return train, None
    return train.hold_out(cfg.minival)


def open_val_split(cfg, classes: list[str]) -> Split:
    """The val split alone, labelled with `classes` (those a checkpoint was trained on)."""
    return open_split(cfg, "val", classes=classes)


def train_loader(split: Split, cfg, aug, spec: InputSpec, *, seed: int, dist: Dist):
    """cfg and aug: the recipe's data and aug sections. RandAugment runs in the loader workers or, batched,
    on the device (aug.randaugment_on)."""
    on_device = randaugment_on_device(aug, dist.device)
    return split.train_loader(train_transform(aug, spec, on_device), batch_size=cfg.batch_size,
                              workers=loader_workers(cfg.workers, "train"), repeats=aug.repeats, seed=seed,
                              spec=spec, dist=dist,
                              augment=device_randaugment(aug, spec) if on_device else None)


def val_loader(split: Split, cfg, aug, spec: InputSpec, *, dist: Dist):
    """The exact (every sample once across ranks) validation loader."""
    return split.eval_loader(eval_transform(aug, spec), batch_size=cfg.eval_batch_size or 2 * cfg.batch_size,
                             workers=loader_workers(cfg.workers, "val"), spec=spec, dist=dist)


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity: a Slurm or container limit), not the machine's."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def loader_workers(requested: int, which: str) -> int:
    """data.workers, at most one per CPU this process may use: each worker is a process of its own, more
    cannot run at once (torch's DataLoader warns above it), and data.workers=100000 would start 100000."""
    cpus = usable_cpus()
    if requested <= cpus:
        return requested
    log.warning(f"data.workers={requested} is more than the {cpus} CPUs this process may use: the {which} loader "
                f"starts {cpus} workers")
    return cpus

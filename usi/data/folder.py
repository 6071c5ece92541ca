"""Image folders: root/<class>/<image>, classes fixed by the training split.

torchvision's ImageFolder and timm's ImageDataset build each split's class list on their own (a val
split missing one class silently shifts every label after it) and crash or silently substitute on
unreadable files. Here the train split's classes define the labels for every split, an unreadable
image is skipped with a warning naming it, and flagged in shared memory (one byte per sample, written
by whichever loader worker met it) so later epochs skip it without reopening it and the trainer can
stop past a threshold of distinct bad files.
"""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import torch
from torch.utils.data import Dataset

from usi.data.images import IMAGE_EXTENSIONS, load_rgb
from usi.data.loader import InputSpec, TrainLoader, eval_loader
from usi.errors import UsageError, quote
from usi.runtime import distributed

log = logging.getLogger("usi")

def find_classes(root: Path) -> list[str]:
    if not root.is_dir():
        raise UsageError(f"image folder {root} {'is a file, not a folder' if root.exists() else 'does not exist'}")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    resolved = root.resolve()
    for name in classes:  # a link back up the tree would hold the whole split again, under another label
        target = (root / name).resolve()
        if target == resolved or target in resolved.parents:
            raise UsageError(f"class folder {root / name} links back to {target}, which holds it: remove the link")
    if not classes:
        raise UsageError(f"image folder {root} has no class folders (expected {root}/<class>/<image>.jpg)")
    return classes


def list_images(root: Path, classes: list[str]) -> list[tuple[str, int]]:
    """(path, label) for every image, labels from `classes`; every class folder under root must be known."""
    index = {name: i for i, name in enumerate(classes)}
    found = find_classes(root)
    unknown = [c for c in found if c not in index]
    if unknown:
        raise UsageError(f"{root} has class folder {quote(unknown[0])} that the training split does not have "
                         f"({len(unknown)} such folders)")
    samples = []
    for name in found:
        # a dangling link named like an image stays in: reading it fails, and it is counted as unreadable
        files = sorted(p for p in (root / name).rglob("*")
                       if p.suffix.lower() in IMAGE_EXTENSIONS and (p.is_file() or p.is_symlink()))
        samples += [(str(p), index[name]) for p in files]
    return samples


class FolderSplit:
    """One split of an image folder: its files and labels, its unreadable-file flags, and its loaders."""

    def __init__(self, root: str | Path, classes: list[str] | None = None):
        self.root = Path(root)
        self.classes = classes or find_classes(self.root)
        self.samples = list_images(self.root, self.classes)
        if not self.samples:
            raise UsageError(f"image folder {self.root} has no images with extensions {', '.join(IMAGE_EXTENSIONS)}")
        if classes is None:  # the split that defines the classes must have each of them
            counts = torch.bincount(torch.tensor(self.targets), minlength=len(self.classes))
            empty = [self.classes[i] for i in (counts == 0).nonzero().flatten().tolist()]
            if empty:
                raise UsageError(f"class folder {self.root / empty[0]} has no images ({len(empty)} empty classes)")
        # One byte per file, shared with loader workers: 1 once the file turned out unreadable.
        self.bad = torch.zeros(len(self.samples), dtype=torch.uint8).share_memory_()

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def targets(self) -> list[int]:
        return [y for _, y in self.samples]

    def missing_classes(self) -> list[int]:
        return sorted(set(range(len(self.classes))) - set(self.targets))

    def dataset(self, transform) -> "FolderDataset":
        """A training view of the split through `transform` (the split itself keeps no transform: each
        loader owns its view, so building one loader never changes another's images)."""
        return FolderDataset(self, transform)

    def train_loader(self, transform, *, batch_size: int, workers: int, repeats: int, seed: int,
                     spec: InputSpec, dist: distributed.Dist, augment=None) -> TrainLoader:
        return TrainLoader(self.dataset(transform), batch_size=batch_size, workers=workers, repeats=repeats,
                           seed=seed, spec=spec, dist=dist, augment=augment)

    def eval_loader(self, transform, *, batch_size: int, workers: int, spec: InputSpec, dist: distributed.Dist):
        """The loader's `.dataset` is its view, which knows its cache identity (files and transform)."""
        view = FolderDataset(self, transform, replace_bad=False, rank=dist.rank, world=dist.world)
        return eval_loader(view, batch_size=batch_size, workers=workers, spec=spec, dist=dist)

    def bad_count(self, device: torch.device) -> int:
        """Distinct unreadable files met by any rank (a file two ranks met counts once). Collective."""
        return int(distributed.max_across(self.bad.to(device, torch.int32)).sum().item())

    def cache_identity(self, transform=None) -> str:
        """What the teacher's logits on this split through `transform` depend on: the files and the transform.
        Not None: a folder split's logits can be cached (its view's cache_identity is the one a cache keys by)."""
        h = hashlib.sha256(f"transform {transform!r}\n".encode())
        for path, label in self.samples:
            stat = os.stat(path)
            h.update(f"{path} {label} {stat.st_size} {stat.st_mtime_ns}\n".encode())
        return h.hexdigest()


class FolderDataset(Dataset):
    """A split's images through one transform.

    Training (replace_bad): an unreadable file is replaced by the next readable one, so batches keep
    their size. Evaluation: an unreadable file gives None (left out of its batch, never counted twice),
    and a readable one (image, label, position), its position in this rank's strided pass.
    """

    def __init__(self, split: FolderSplit, transform=None, replace_bad: bool = True, rank: int = 0, world: int = 1):
        self.split, self.transform, self.replace_bad = split, transform, replace_bad
        self.rank, self.world = rank, world

    def __len__(self) -> int:
        return len(self.split)

    def cache_identity(self) -> str:
        return self.split.cache_identity(self.transform)

    def __getitem__(self, index: int):
        if not self.replace_bad:
            img = self.read(index)
            if img is None:
                return None
            path, target = self.split.samples[index]
            return img, target, (index - self.rank) // self.world
        samples = self.split.samples
        for attempt in range(len(samples)):
            i = (index + attempt) % len(samples)
            img = self.read(i)
            if img is not None:
                return img, samples[i][1]
        raise UsageError(f"no readable image in {self.split.root}")

    def read(self, i: int):
        """Sample i through the transform, or None (flagged, with a warning) if its file is unreadable."""
        if self.split.bad[i]:
            return None
        path = self.split.samples[i][0]
        try:
            if self.transform is None:
                return load_rgb(path)
            with open(path, "rb") as f:  # the transform decodes (see usi/data/images.py)
                return self.transform(f.read())
        except Exception as e:  # truncated, zero bytes, not an image, ...: skip, never crash a worker
            self.split.bad[i] = 1
            log.warning(f"skipped unreadable image {path}: {type(e).__name__}: {str(e)[:120]}")
            return None

"""Image folders: root/<class>/<image>, classes fixed by the training split.

torchvision's ImageFolder and timm's ImageDataset build each split's class list on their own (a val
split missing one class silently shifts every label after it) and crash or silently substitute on
unreadable files. Here the train split's classes define the labels for every split, an unreadable
image is skipped with a warning naming it, and flagged in shared memory (one byte per sample, written
by whichever loader worker met it) so later epochs skip it without reopening it and the trainer can
stop past a threshold of distinct bad files.
"""
from __future__ import annotations

import copy
import hashlib
import logging
import os
from pathlib import Path

import torch
from torch.utils.data import Dataset

from usi.data.images import IMAGE_EXTENSIONS, load_rgb
from usi.data.loader import InputSpec, TrainLoader, eval_loader
from usi.errors import UsageError, quote, suggest
from usi.runtime import distributed
from usi.runtime.files import open_regular

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


def class_map(value: str | list, root: Path) -> list[str]:
    """data.class_map's class names in label order: a list, or a file timm's load_class_map reads (.txt: one
    name per line; .pkl: {name: index}); each must be a class folder of `root` (the train split)."""
    from timm.data.readers.class_map import load_class_map

    where = f"data.class_map={value!r}"
    if isinstance(value, str):
        if not Path(value).is_file():
            raise UsageError(f"{where} is not a file (one class folder name per line) nor a list of names")
        try:
            mapping = load_class_map(value)
        except Exception as e:  # timm asserts on other extensions; a damaged .pkl
            raise UsageError(f"{where}: {e or type(e).__name__} (expected a .txt, one class folder per line)") from None
        names = sorted(mapping, key=mapping.get)
        if sorted(mapping.values()) != list(range(len(mapping))):
            raise UsageError(f"{where}: a class is named twice (its labels must be 0..n-1, each class once)")
    else:
        names = [str(name) for name in value]
        if len(set(names)) != len(names):
            raise UsageError(f"{where}: a class is named twice")
    if not names:
        raise UsageError(f"{where} names no class")
    folders = find_classes(root)
    unknown = [name for name in names if name not in folders]
    if unknown:
        raise UsageError(f"{where} names {unknown[0]!r}, which is not a class folder of {root}"
                         f"{suggest(unknown[0], folders)} ({len(unknown)} unknown names)")
    return names


def list_images(root: Path, classes: list[str], leave_out: bool = False) -> list[tuple[str, int]]:
    """(path, label) for every image, labels from `classes`; every class folder under root must be known,
    unless `leave_out` (a class map): then the folders of other classes are left out."""
    index = {name: i for i, name in enumerate(classes)}
    found = find_classes(root)
    unknown = [c for c in found if c not in index]
    if leave_out:
        found = [c for c in found if c in index]
    elif unknown:
        raise UsageError(f"{root} has class folder {quote(unknown[0])} that the training split does not have "
                         f"({len(unknown)} such folders)")
    samples = []
    for name in found:
        # a dangling link, a named pipe or a device named like an image stays in: reading it is refused at
        # once (usi/runtime/files.py open_regular), and it is counted as unreadable, with its reason
        files = sorted(p for p in (root / name).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and not p.is_dir())
        samples += [(str(p), index[name]) for p in files]
    return samples


def path_hash(path: str, root: Path) -> str:
    """A hash of the path relative to the split's folder (a string cut: Path.relative_to takes a minute on
    ImageNet's 1.28M files)."""
    prefix = str(root) + os.sep
    relative = path[len(prefix):] if path.startswith(prefix) else str(Path(path).relative_to(root))
    return hashlib.sha256(relative.replace(os.sep, "/").encode()).hexdigest()


def held_out_counts(counts: list[int], minival: float, classes: list[str]) -> list[int]:
    """Images held out per class for data.minival (a fraction < 1 of the split, or a count): in proportion to
    each class's size, the total's rounding left to the largest remainders. Every class keeps a train image."""
    total = sum(counts)
    n = round(minival * total) if minival < 1 else int(minival)
    minival = minival if minival < 1 else n  # as the user wrote it: 10000, not 10000.0 or 1e+04
    if n == 0:
        raise UsageError(f"data.minival={minival} holds out no image of the {total} train images")
    if n >= total:
        raise UsageError(f"data.minival={minival} holds out {n} of the {total} train images: leave some to train on")
    quotas = [n * c / total for c in counts]
    held = [int(q) for q in quotas]
    by_remainder = sorted(range(len(counts)), key=lambda i: held[i] - quotas[i])  # stable: ties by class order
    for i in by_remainder[:n - sum(held)]:
        held[i] += 1
    for i, (h, c) in enumerate(zip(held, counts)):
        if h >= c:
            raise UsageError(f"data.minival={minival} holds out all {c} train images of class {classes[i]!r}; "
                             f"hold out fewer")
    return held


class FolderSplit:
    """One split of an image folder: its files and labels, its unreadable-file flags, and its loaders."""

    def __init__(self, root: str | Path, classes: list[str] | None = None, mapped: bool = False):
        """classes: the labels (the train split's, or data.class_map's); None: every class folder, sorted.
        mapped: the classes are a class map's, and the folders of other classes are left out."""
        self.root = Path(root)
        self.classes = classes or find_classes(self.root)
        self.samples = list_images(self.root, self.classes, leave_out=mapped)
        if not self.samples:
            raise UsageError(f"image folder {self.root} has no images with extensions {', '.join(IMAGE_EXTENSIONS)}")
        if classes is None:
            self.require_every_class()
        # One byte per file, shared with loader workers: 1 once the file turned out unreadable.
        self.bad = torch.zeros(len(self.samples), dtype=torch.uint8).share_memory_()

    def require_every_class(self) -> None:
        """The split that defines the classes must have images of each of them."""
        empty = [self.classes[i] for i in self.missing_classes()]
        if empty:
            raise UsageError(f"class folder {self.root / empty[0]} has no images ({len(empty)} empty classes)")

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def targets(self) -> list[int]:
        return [y for _, y in self.samples]

    def missing_classes(self) -> list[int]:
        return sorted(set(range(len(self.classes))) - set(self.targets))

    def subset(self, indices: list[int]) -> "FolderSplit":
        """A view of these samples alone: the same root and classes, its own unreadable-file flags."""
        view = copy.copy(self)
        view.samples = [self.samples[i] for i in indices]
        view.bad = torch.zeros(len(view.samples), dtype=torch.uint8).share_memory_()
        return view

    def hold_out(self, minival: float) -> tuple["FolderSplit", "FolderSplit"]:
        """(the rest, the held-out images) for data.minival: per class, the files whose relative paths hash
        lowest, so the choice depends on the file list alone (the same for every seed, model and resume)."""
        by_class = [[] for _ in self.classes]
        for i, (path, label) in enumerate(self.samples):
            by_class[label].append(i)
        counts = held_out_counts([len(c) for c in by_class], minival, self.classes)
        held = set()
        for indices, n in zip(by_class, counts):
            held.update(sorted(indices, key=lambda i: path_hash(self.samples[i][0], self.root))[:n])
        return (self.subset([i for i in range(len(self)) if i not in held]),
                self.subset([i for i in range(len(self)) if i in held]))

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
            with open_regular(path) as f:  # never blocks on a pipe, never reads a device without end
                # the transform decodes (see usi/data/images.py)
                return load_rgb(f) if self.transform is None else self.transform(f.read())
        except Exception as e:  # truncated, zero bytes, not an image, ...: skip, never crash a worker
            self.split.bad[i] = 1
            log.warning(f"skipped unreadable image {path}: {type(e).__name__}: {str(e)[:120]}")
            return None

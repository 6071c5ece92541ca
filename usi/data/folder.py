"""Image folders: root/<class>/<image>, classes fixed by the training split.

torchvision's ImageFolder and timm's ImageDataset build each split's class list on their own (a val
split missing one class silently shifts every label after it) and crash or silently substitute on
unreadable files. Here the train split's classes define the labels for every split, an unreadable
image is skipped with a warning naming it, and flagged in shared memory (one byte per sample, written
by whichever loader worker met it) so later epochs skip it without reopening it and the trainer can
stop past a threshold of distinct bad files.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset

from usi.errors import UsageError

log = logging.getLogger("usi")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")


def find_classes(root: Path) -> list[str]:
    if not root.is_dir():
        raise UsageError(f"image folder {root} does not exist")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise UsageError(f"image folder {root} has no class folders (expected {root}/<class>/<image>.jpg)")
    return classes


def list_images(root: Path, classes: list[str]) -> list[tuple[str, int]]:
    """(path, label) for every image, labels from `classes`; every class folder under root must be known."""
    index = {name: i for i, name in enumerate(classes)}
    found = find_classes(root)
    unknown = [c for c in found if c not in index]
    if unknown:
        raise UsageError(f"{root} has class folder {unknown[0]!r} that the training split does not have "
                         f"({len(unknown)} such folders)")
    samples = []
    for name in found:
        files = sorted(p for p in (root / name).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        samples += [(str(p), index[name]) for p in files]
    return samples


def load_rgb(path: str) -> Image.Image:
    """Any PIL-readable image as RGB: grayscale, CMYK, palette and alpha images are converted."""
    with Image.open(path) as img:
        return img.convert("RGB")


class ImageFolder(Dataset):
    def __init__(self, root: str | Path, classes: list[str] | None = None, transform=None):
        self.root = Path(root)
        self.classes = classes or find_classes(self.root)
        self.samples = list_images(self.root, self.classes)
        if not self.samples:
            raise UsageError(f"image folder {self.root} has no images with extensions {', '.join(IMAGE_EXTENSIONS)}")
        if classes is None:  # the split that defines the classes must have each of them
            counts = torch.bincount(torch.tensor([y for _, y in self.samples]), minlength=len(self.classes))
            empty = [self.classes[i] for i in (counts == 0).nonzero().flatten().tolist()]
            if empty:
                raise UsageError(f"class folder {self.root / empty[0]} has no images ({len(empty)} empty classes)")
        self.transform = transform
        self.bad = torch.zeros(len(self.samples), dtype=torch.uint8).share_memory_()

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def targets(self) -> list[int]:
        return [y for _, y in self.samples]

    def __getitem__(self, index: int):
        for attempt in range(len(self.samples)):
            i = (index + attempt) % len(self.samples)
            if self.bad[i]:
                continue
            path, target = self.samples[i]
            try:
                img = load_rgb(path)
            except Exception as e:  # truncated, zero bytes, not an image, ...: skip, never crash a worker
                self.bad[i] = 1
                log.warning(f"skipped unreadable image {path}: {type(e).__name__}: {str(e)[:120]}")
                continue
            return (self.transform(img) if self.transform else img), target
        raise UsageError(f"no readable image in {self.root}")

    def bad_count(self) -> int:
        """Distinct unreadable files met so far (by this process and its loader workers)."""
        return int(self.bad.sum())

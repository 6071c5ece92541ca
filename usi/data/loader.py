"""Loaders: timm's transforms, repeated-augmentation sampler and device-side normalization.

timm's create_loader refuses repeated augmentation outside distributed runs, pads validation
(DistributedSampler), and seeds workers once per process (persistent workers), which makes a run
resumed at an epoch boundary see different augmentations. So the loader is assembled here from timm's
parts: create_transform, RepeatAugSampler, fast_collate (uint8 batches) and PrefetchLoader (copy to
the device and normalize there), with every epoch's randomness a function of (seed, epoch, rank).
"""
from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

import numpy as np
import torch
from timm.data import create_transform
from timm.data.distributed_sampler import RepeatAugSampler
from timm.data.loader import PrefetchLoader, fast_collate
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from usi.distributed import Dist


@dataclass(frozen=True)
class InputSpec:
    """What the student expects: its square input size and the mean/std it was normalized with."""
    size: int
    mean: tuple
    std: tuple


def epoch_seed(seed: int, epoch: int, rank: int, step: int = 0) -> int:
    """All randomness of an epoch (from `step` on) derives from this: a checkpoint's (epoch, step)
    fixes it, so no RNG state needs saving and an epoch-boundary resume is exact."""
    return (seed * 1_000_003 + epoch * 1_009 + rank * 7 + step * 1_000_000_007) % 2**31


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train_transform(aug, spec: InputSpec):
    return create_transform(
        spec.size, is_training=True, scale=tuple(aug.scale), ratio=tuple(aug.ratio), hflip=aug.hflip,
        color_jitter=aug.color_jitter or None, auto_augment=aug.auto_augment or None,
        interpolation=aug.interpolation, mean=spec.mean, std=spec.std, re_prob=0.0, use_prefetcher=True)


def eval_transform(aug, spec: InputSpec):
    return create_transform(
        spec.size, is_training=False, interpolation=aug.eval_interpolation, mean=spec.mean, std=spec.std,
        crop_pct=aug.eval_crop_pct, crop_mode="center", use_prefetcher=True)


def to_device(loader: DataLoader, spec: InputSpec, dist: Dist) -> PrefetchLoader:
    """uint8 batches -> normalized float batches on the device (timm's PrefetchLoader)."""
    return PrefetchLoader(loader, mean=spec.mean, std=spec.std, device=dist.device)


class EpochSampler(Sampler):
    """Wraps the training sampler: the epoch's order from (seed, epoch), and skipping to a step on resume."""

    def __init__(self, dataset, *, world: int, rank: int, repeats: int, seed: int):
        if repeats > 1:
            self.inner = RepeatAugSampler(dataset, num_replicas=world, rank=rank, shuffle=True, num_repeats=repeats)
        else:
            self.inner = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed,
                                            drop_last=True)
        self.seed = seed
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        # RepeatAugSampler seeds its shuffle with the epoch alone; fold the recipe's seed in.
        self.inner.set_epoch(self.seed * 10_007 + epoch)
        self.skip = skip

    def __iter__(self):
        return itertools.islice(iter(self.inner), self.skip, None)

    def __len__(self) -> int:
        return len(self.inner) - self.skip

    def epoch_length(self) -> int:
        return len(self.inner)


class StridedSampler(Sampler):
    """Every index exactly once across ranks (rank r takes r, r + world, ...): no padding, no drop."""

    def __init__(self, size: int, world: int, rank: int):
        self.indices = list(range(rank, size, world))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class TrainLoader:
    """Normalized batches on the device, with a fixed number of steps per epoch on every rank."""

    def __init__(self, dataset, *, batch_size: int, workers: int, repeats: int, seed: int, spec: InputSpec,
                 dist: Dist):
        self.sampler = EpochSampler(dataset, world=dist.world, rank=dist.rank, repeats=repeats, seed=seed)
        self.batch_size, self.seed, self.rank = batch_size, seed, dist.rank
        self.generator = torch.Generator()
        # Workers are not persistent: each epoch starts them from a seed of its own, so a resumed
        # run sees the same augmentations as an uninterrupted one.
        self.loader = DataLoader(dataset, batch_size=batch_size, sampler=self.sampler, num_workers=workers,
                                 collate_fn=fast_collate, pin_memory=dist.device.type == "cuda", drop_last=True,
                                 generator=self.generator, persistent_workers=False,
                                 prefetch_factor=4 if workers else None)
        self.prefetch = to_device(self.loader, spec, dist)

    def steps_per_epoch(self) -> int:
        return self.sampler.epoch_length() // self.batch_size

    def epoch(self, epoch: int, start_step: int = 0):
        """Iterate one epoch from `start_step` (a mid-epoch resume skips what was already seen)."""
        seed = epoch_seed(self.seed, epoch, self.rank, start_step)
        seed_everything(seed)  # main-process randomness: mixup, and transforms when workers=0
        self.generator.manual_seed(seed)  # worker seeds
        self.sampler.set_epoch(epoch, skip=start_step * self.batch_size)
        return iter(self.prefetch)


def eval_loader(dataset, *, batch_size: int, workers: int, spec: InputSpec, dist: Dist) -> PrefetchLoader:
    sampler = StridedSampler(len(dataset), dist.world, dist.rank)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                        collate_fn=fast_collate, pin_memory=dist.device.type == "cuda", drop_last=False,
                        persistent_workers=workers > 0)
    return to_device(loader, spec, dist)

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

from usi.data.device_augment import DeviceRandAugment
from usi.data.fast_crop import FastRandomResizedCrop
from usi.data.images import Decoded
from usi.runtime.distributed import Dist
from usi.runtime.preempt import ignore_interrupts


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


def randaugment_on_device(aug, device: torch.device) -> bool:
    """Where RandAugment runs. On the device, batched after the copy, the loader workers only decode, crop,
    resize and flip (about half their work per image on full-size photos); `auto` does so on CUDA. In the
    workers, timm's transform runs as it is (the CPU default: a CPU has no device to spare)."""
    if aug.randaugment_on == "auto":
        return device.type == "cuda" and device_augment_fits(aug)
    return aug.randaugment_on == "device"


def device_augment_fits(aug) -> bool:
    """The device path does timm's RandAugment strings (rand-...) and nothing else of the worker's."""
    return (not aug.auto_augment or aug.auto_augment.startswith("rand")) and not aug.color_jitter


def train_transform(aug, spec: InputSpec, on_device: bool = False):
    """The loader workers' transform: timm's whole train transform, or, when RandAugment runs on the
    device, usi's fast crop (decode at a reduced scale where it loses nothing, crop, resize, flip)."""
    if on_device:
        return Decoded(FastRandomResizedCrop(spec.size, scale=aug.scale, ratio=aug.ratio,
                                             interpolation=aug.interpolation, hflip=aug.hflip), lazy=True)
    return Decoded(create_transform(
        spec.size, is_training=True, scale=tuple(aug.scale), ratio=tuple(aug.ratio), hflip=aug.hflip,
        color_jitter=aug.color_jitter or None, auto_augment=aug.auto_augment or None,
        interpolation=aug.interpolation, mean=fill_mean(aug, spec), std=spec.std, re_prob=0.0, use_prefetcher=True))


def fill_mean(aug, spec: InputSpec) -> tuple:
    """The mean timm's RandAugment fills with (its only use in a prefetcher transform without erasing):
    aug.randaugment_fill when set, so students of other normalizations see the same pixels; else the student's."""
    fill = getattr(aug, "randaugment_fill", None)
    return tuple(v / 255 for v in fill) if fill is not None else tuple(spec.mean)


def device_randaugment(aug, spec: InputSpec) -> DeviceRandAugment | None:
    """timm's RandAugment with create_transform's hparams (translate, fill = the mean), batched."""
    if not aug.auto_augment:
        return None
    return DeviceRandAugment(aug.auto_augment, img_size=spec.size, mean=fill_mean(aug, spec),
                             interpolation=None if aug.interpolation == "random" else aug.interpolation)


def eval_transform(aug, spec: InputSpec):
    return Decoded(create_transform(
        spec.size, is_training=False, interpolation=aug.eval_interpolation, mean=spec.mean, std=spec.std,
        crop_pct=aug.eval_crop_pct, crop_mode="center", use_prefetcher=True))


def to_device(loader: DataLoader, spec: InputSpec, dist: Dist, augment: DeviceRandAugment | None = None):
    """uint8 batches -> normalized float batches on the device (timm's PrefetchLoader), with RandAugment
    on the device in between when given one."""
    if augment is None:
        return PrefetchLoader(loader, mean=spec.mean, std=spec.std, device=dist.device)
    return AugmentOnDevice(loader, augment, spec, dist.device)


class AugmentOnDevice:
    """timm's PrefetchLoader copies each uint8 batch to the device on its side stream (told to leave the
    values 0..255: mean 0, std 1/255); RandAugment runs there on the whole batch, per-sample ops and
    magnitudes drawn from a CPU generator (no device sync), then the batch is normalized."""

    def __init__(self, loader: DataLoader, augment: DeviceRandAugment, spec: InputSpec, device: torch.device):
        self.prefetch = PrefetchLoader(loader, mean=(0.0, 0.0, 0.0), std=(1 / 255,) * 3, device=device)
        self.augment, self.generator = augment, torch.Generator()
        self.mean = torch.tensor([255 * m for m in spec.mean], device=device).view(1, 3, 1, 1)
        self.std = torch.tensor([255 * s for s in spec.std], device=device).view(1, 3, 1, 1)

    def seed(self, seed: int) -> None:
        self.generator.manual_seed(seed)

    def __iter__(self):
        for x, y in self.prefetch:
            yield (self.augment(x, self.generator) - self.mean) / self.std, y


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


class EpochLoader:
    """What every training loader does the same way: its DataLoader, the seeding of an epoch and the
    resume at a step. An epoch's randomness (the main process's: mixup, and transforms when workers=0; the
    workers'; the device's RandAugment) all starts from epoch_seed(seed, epoch, rank, step).

    Subclasses differ only in how they get past the steps a resumed run already trained on (`seeks`):
      True   an index sampler skips their samples unread; the rest of the epoch is seeded from its step.
      False  a stream cannot skip: the epoch is replayed from its start (seeded from step 0) and its first
             batches are dropped, so a mid-epoch resume sees the very batches of an uninterrupted run.
    """
    seeks = False

    def __init__(self, dataset, *, sampler: Sampler | None, batch_size: int, workers: int, seed: int,
                 spec: InputSpec, dist: Dist, augment: DeviceRandAugment | None = None):
        self.batch_size, self.seed, self.rank = batch_size, seed, dist.rank
        self.generator = torch.Generator()
        # Workers are not persistent: each epoch starts them from a seed of its own, so a resumed
        # run sees the same augmentations as an uninterrupted one.
        self.loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                                 collate_fn=fast_collate, pin_memory=dist.device.type == "cuda", drop_last=True,
                                 generator=self.generator, persistent_workers=False,
                                 prefetch_factor=4 if workers else None, worker_init_fn=ignore_interrupts)
        self.prefetch = to_device(self.loader, spec, dist, augment)

    def epoch(self, epoch: int, start_step: int = 0):
        """Iterate one epoch from `start_step` (a mid-epoch resume skips what was already seen)."""
        seek = start_step if self.seeks else 0  # a stream starts at 0 and drops up to start_step
        seed = epoch_seed(self.seed, epoch, self.rank, seek)
        seed_everything(seed)  # main-process randomness: mixup, and transforms when workers=0
        self.generator.manual_seed(seed)  # worker seeds
        if isinstance(self.prefetch, AugmentOnDevice):
            self.prefetch.seed(seed)
        batches = self.batches(epoch, seek)
        return batches if self.seeks else itertools.islice(batches, start_step, None)

    def batches(self, epoch: int, start_step: int):
        """The epoch's batches from `start_step` (always 0 unless the loader seeks)."""
        raise NotImplementedError

    def steps_per_epoch(self) -> int:
        raise NotImplementedError


class TrainLoader(EpochLoader):
    """Image folders: normalized batches on the device, a fixed number of steps per epoch on every rank."""
    seeks = True

    def __init__(self, dataset, *, batch_size: int, workers: int, repeats: int, seed: int, spec: InputSpec,
                 dist: Dist, augment: DeviceRandAugment | None = None):
        self.sampler = EpochSampler(dataset, world=dist.world, rank=dist.rank, repeats=repeats, seed=seed)
        super().__init__(dataset, sampler=self.sampler, batch_size=batch_size, workers=workers, seed=seed,
                         spec=spec, dist=dist, augment=augment)

    def steps_per_epoch(self) -> int:
        return self.sampler.epoch_length() // self.batch_size

    def batches(self, epoch: int, start_step: int):
        self.sampler.set_epoch(epoch, skip=start_step * self.batch_size)
        return iter(self.prefetch)


def eval_collate(samples: list) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 images, int64 [label, position] rows) of the readable samples; unreadable ones come as None
    and are left out, never replaced. The position (the sample's place in this rank's pass) rides in
    the target tensor, so timm's PrefetchLoader carries it to the device unchanged."""
    samples = [s for s in samples if s is not None]
    if not samples:
        return torch.empty(0, 3, 1, 1, dtype=torch.uint8), torch.empty(0, 2, dtype=torch.int64)
    images, _ = fast_collate([(img, 0) for img, _, _ in samples])
    return images, torch.tensor([(label, pos) for _, label, pos in samples], dtype=torch.int64)


def eval_loader(dataset, *, batch_size: int, workers: int, spec: InputSpec, dist: Dist) -> PrefetchLoader:
    """dataset[i] is (image, label, position) or None; every index once across ranks, in order."""
    sampler = StridedSampler(len(dataset), dist.world, dist.rank)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                        collate_fn=eval_collate, pin_memory=dist.device.type == "cuda", drop_last=False,
                        persistent_workers=workers > 0, worker_init_fn=ignore_interrupts)
    return to_device(loader, spec, dist)


def next_batch(batches) -> tuple:
    """(batch or None at the epoch's end, the loader's error or None). A SIGTERM sent to every process
    kills the loader's workers; whether that is a stop or a failure is for all ranks to decide."""
    try:
        return next(batches), None
    except StopIteration:
        return None, None
    except (RuntimeError, OSError, EOFError) as e:  # "DataLoader worker (pid ...) exited unexpectedly", or
        return None, e  # the pipe to a worker that died mid-transfer (ConnectionResetError)


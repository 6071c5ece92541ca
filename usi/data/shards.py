"""Webdataset tar shards (written by usi shards): training and exact validation from them.

A split is a folder with index.json (class names, shard names and sample counts) and its shards, or
index.json plus a URL pattern (`data.train_shards`), brace-expanded, local or `pipe:` (a shell
command that streams the shard, e.g. from an object store: a recipe's pipe: runs that command).

Shards are split by rank, then by loader worker, from an order shuffled per (seed, epoch). Every
rank runs exactly floor(total / world / batch) steps per epoch: a rank whose shards run short starts
another pass over them, one with spare samples stops early, so per epoch and rank at most one
shard's worth of samples is repeated or dropped (the shard sizes differ by at most one shard across
ranks). timm's loader refuses repeated augmentation for webdataset; here each decoded image is
augmented `repeats` times in a row (an epoch then covers 1/repeats of the images, as with
RepeatAugSampler). Validation reads every shard exactly once across ranks and workers.
"""
from __future__ import annotations

import io
import json
import logging
import random
import re
from pathlib import Path

import braceexpand
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset import tariterators

from usi.data.images import IMAGE_EXTENSIONS, load_rgb
from usi.data.loader import EpochLoader, InputSpec, epoch_seed, eval_collate, to_device
from usi.errors import UsageError, file_problem, quote
from usi.runtime import distributed
from usi.runtime.files import open_regular
from usi.runtime.preempt import ignore_interrupts

log = logging.getLogger("usi")
SLOTS = 256  # bad-sample counter slots, one per loader worker
MAX_INDEX_BYTES = 256 << 20
MAX_MEMBER_BYTES = 1 << 30  # a tar member (one image, one label) past this is a damaged or hostile header


class ShardSplit:
    """One sharded split: its shard URLs and sample counts, its classes, its bad-sample counter and loaders."""

    def __init__(self, split_dir: Path, pattern: str | None = None):
        self.urls, self.counts, self.classes = read_index(split_dir, pattern)
        self.bad = torch.zeros(SLOTS, dtype=torch.int64).share_memory_()  # one slot per loader worker

    def __len__(self) -> int:
        return sum(self.counts)

    def missing_classes(self) -> list[int]:
        return []  # an index does not say which classes its samples hold

    def train_loader(self, transform, *, batch_size: int, workers: int, repeats: int, seed: int,
                     spec: InputSpec, dist: distributed.Dist, augment=None) -> "ShardTrainLoader":
        return ShardTrainLoader(self, transform, batch_size=batch_size, workers=workers, repeats=repeats,
                                seed=seed, spec=spec, dist=dist, augment=augment)

    def eval_loader(self, transform, *, batch_size: int, workers: int, spec: InputSpec, dist: distributed.Dist):
        return shard_eval_loader(self, transform, batch_size=batch_size, workers=workers, spec=spec, dist=dist)

    def bad_count(self, device: torch.device) -> int:
        """Corrupt samples read by any rank (summed over ranks). Collective."""
        return int(distributed.sum_across(self.bad.sum().to(device)).item())

    def cache_identity(self, transform=None) -> None:
        """Not cached on disk: the loader order of shards depends on the number of ranks and workers."""
        return None


def read_index(split_dir: Path, pattern: str | None = None) -> tuple[list[str], list[int], list[str]]:
    """(shard URLs, samples per shard, class names)."""
    path = split_dir / "index.json"
    problem = file_problem(path)
    if problem:
        raise UsageError(f"{path} {problem}: shards need the index.json written by usi shards")
    if path.stat().st_size > MAX_INDEX_BYTES:  # not read: an index of a million shards is 100 MB
        raise UsageError(f"{path} is {path.stat().st_size} bytes: not an index written by usi shards")
    try:
        index = json.loads(path.read_text())
        names = [str(s["name"]) for s in index["shards"]]
        counts = [int(s["count"]) for s in index["shards"]]
        classes = [str(c) for c in index["classes"]]
        if not names or min(counts) < 0 or not classes:
            raise ValueError("no shards, a negative count or no classes")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise UsageError(f"{path} is not a usi shard index ({type(e).__name__}: {str(e)[:100]}); "
                         f"write it again with usi shards") from None
    try:
        urls = list(braceexpand.braceexpand(pattern)) if pattern else [str(split_dir / n) for n in names]
    except braceexpand.UnbalancedBracesError as e:
        raise UsageError(f"shard pattern {quote(pattern)}: {e} (a brace pattern is like "
                         f"shard-{{000000..000099}}.tar)") from None
    if len(urls) != len(names):
        raise UsageError(f"shard pattern {quote(pattern)} gives {len(urls)} shards but {path} lists {len(names)}")
    return urls, counts, classes


def open_shards(urls: list[str], handler):
    """webdataset's url_opener, except that a local shard must be a regular file: a named pipe, a device
    or a folder in its place is an error for `handler` at once (never a read that blocks or never ends)."""
    for url in urls:
        if "://" in url or url.startswith("pipe:"):
            yield from tariterators.url_opener([{"url": url}], handler=handler)
            continue
        try:
            stream = open_regular(url.removeprefix("file:"))
        except Exception as e:
            if handler(RuntimeError(f"{url}: {e}")):
                continue
            raise
        yield {"url": url, "stream": stream}


def tar_file_expander(sources, handler):
    """webdataset's tar_file_expander, for plain tar streams: each source's members as {"fname", "data",
    "__url__"}. Python's tarfile, which webdataset uses, spends about 0.3 ms per member on an image shard,
    as much as 10% of the training crop's whole cost; reading the fixed 512-byte headers directly takes
    0.05 ms. A header that fails its checksum or a member cut short is an error for `handler`, which
    skips the rest of that shard (as webdataset does)."""
    for source in sources:
        try:
            for name, data in tar_members(source["stream"]):
                yield {"fname": name, "data": data, "__url__": source["url"]}
        except Exception as e:
            if handler(RuntimeError(f"{source.get('url')}: {e}")):
                continue
            raise
        finally:
            source["stream"].close()


def tar_members(stream):
    """(name, bytes) of each regular file of a ustar/GNU tar stream (GNU long names and pax paths too)."""
    long_name = None
    while True:
        header = stream.read(512)
        if len(header) < 512 or header == b"\0" * 512:
            return  # the end (two zero blocks), or a stream with no end marker
        stored = int(header[148:156].split(b"\0", 1)[0].strip() or b"-1", 8)
        if stored != sum(header[:148]) + 8 * 32 + sum(header[156:]):
            raise ValueError("corrupt tar header (checksum)")
        size = int(header[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
        if size > MAX_MEMBER_BYTES:  # read() would allocate the declared size first
            raise ValueError(f"a tar member declares {size} bytes")
        data = stream.read(size)
        if len(data) < size:
            raise ValueError("truncated tar member")
        stream.read(-size % 512)
        kind = header[156:157]
        if kind == b"L":  # GNU: the next member's long name
            long_name = data.split(b"\0", 1)[0].decode()
        elif kind == b"x":  # pax: the next member's attributes, of which the path
            long_name = next((line.split(b"=", 1)[1].decode() for line in data.split(b"\n")
                              if b" path=" in line), None)
        elif kind in (b"0", b"\0"):
            name = header[:100].split(b"\0", 1)[0].decode()
            prefix = header[345:500].split(b"\0", 1)[0].decode()
            yield long_name or (f"{prefix}/{name}" if prefix else name), data
            long_name = None


def image_bytes(sample: dict) -> bytes:
    """The sample's image file (whatever its format: make_shards keys it by its file extension)."""
    data = next((v for k, v in sample.items() if "." + k in IMAGE_EXTENSIONS), None)
    if data is None:
        raise ValueError(f"no image among its parts {sorted(k for k in sample if not k.startswith('__'))}")
    return data


def label_of(sample: dict, num_classes: int | None = None) -> int:
    """The sample's class index: its .cls part, a decimal integer, within index.json's classes. Anything
    else is a bad sample: a label of 99 in a 10-class index would otherwise end in an index error deep in
    mixup or the loss, naming no shard and no sample."""
    raw = sample.get("cls")
    if raw is None:
        raise ValueError("no .cls part (the class index)")
    text = raw.decode("utf-8", "replace").strip() if isinstance(raw, bytes) else str(raw).strip()
    if not re.fullmatch(r"[+-]?[0-9]{1,18}", text):
        raise ValueError(f"label {quote(text, 40)} is not a class index (an integer)")
    label = int(text)
    if num_classes is not None and not 0 <= label < num_classes:
        raise ValueError(f"label {label} is outside index.json's {num_classes} classes (0..{num_classes - 1})")
    return label


def decode(sample: dict, transform=None, num_classes: int | None = None):
    """(the transformed image, or the decoded RGB image without a transform; the label, checked first)."""
    label = label_of(sample, num_classes)
    data = image_bytes(sample)
    if transform is None:
        return load_rgb(io.BytesIO(data)), label
    return transform(data), label  # the transform decodes (see usi/data/images.py)


class ShardStream(IterableDataset):
    """One rank's share of the shards; each loader worker takes every n-th of those."""

    def __init__(self, urls: list[str], transform, *, rank: int, world: int, repeats: int = 1, train: bool = True,
                 seed: int = 0, shuffle_buffer: int = 1000, bad: torch.Tensor | None = None,
                 counts: list[int] | None = None, num_classes: int | None = None):
        self.urls, self.transform, self.rank, self.world = urls, transform, rank, world
        self.num_classes = num_classes  # index.json's: every label is checked against it where it is read
        # samples per shard (index.json): a shard cut short or missing is counted by what it lacks
        self.counts = dict(zip(urls, counts)) if counts is not None else None
        self.repeats, self.train, self.seed, self.shuffle_buffer = repeats, train, seed, shuffle_buffer
        self.epoch = 0
        self.bad = bad if bad is not None else torch.zeros(SLOTS, dtype=torch.int64).share_memory_()

    def my_shards(self) -> list[str]:
        order = list(self.urls)
        if self.train:
            random.Random(epoch_seed(self.seed, self.epoch, 0)).shuffle(order)  # the same on every rank
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        return order[self.rank::self.world][worker::workers]

    def count_bad(self, n: int) -> None:
        info = get_worker_info()
        self.bad[(info.id + 1) % SLOTS if info else 0] += n

    def handler(self, error: Exception) -> bool:
        """A shard that cannot be opened or read on: with the index's counts, the samples it lacks are
        counted at the end of the pass (short_shards); without, the error counts as one."""
        if self.counts is None:
            self.count_bad(1)
        log.warning(f"skipped a corrupt sample or shard: {type(error).__name__}: {str(error)[:160]}")
        return True  # keep going

    def short_shards(self, seen: dict[str, int]) -> None:
        """Count what each of this worker's shards lacks against index.json (truncated, missing)."""
        for url in self.my_shards() if self.counts is not None else []:
            missing = self.counts[url] - seen.get(url, 0)
            if missing < 0:
                log.warning(f"shard {url} holds {-missing} more samples than index.json says ({self.counts[url]}): "
                            f"the index is not this shard's; write both again with usi shards")
            if missing > 0:
                self.count_bad(missing)
                log.warning(f"shard {url}: {missing} of its {self.counts[url]} samples could not be read")

    def samples(self):
        """(image, label) per decoded sample, `repeats` times; for evaluation (image, label, position),
        the position unique within this rank's pass and the same in every pass."""
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        stream = open_shards(self.my_shards(), handler=self.handler)
        stream = tar_file_expander(stream, handler=self.handler)
        count, seen = 0, {}
        for sample in tariterators.group_by_keys(stream, handler=self.handler):
            url = sample.get("__url__")
            seen[url] = seen.get(url, 0) + 1
            try:
                if self.train and self.repeats > 1:  # decoded once, then augmented anew for each repeat
                    img, label = decode(sample, num_classes=self.num_classes)
                    images = [self.transform(img) if self.transform else img for _ in range(self.repeats)]
                else:  # the transform decodes only what it needs (see usi/data/images.py)
                    img, label = decode(sample, self.transform, num_classes=self.num_classes)
                    images = [img]
            except Exception as e:  # one sample that does not decode
                self.count_bad(1)
                log.warning(f"skipped a bad sample: shard {url}, key {sample.get('__key__')}: {str(e)[:120]}")
                continue
            if not self.train:
                yield img, label, count * workers + worker
                count += 1
                continue
            yield from ((image, label) for image in images)
        self.short_shards(seen)

    def __iter__(self):
        if not self.train or self.shuffle_buffer <= 1:
            yield from self.samples()
            return
        rng, buffer = random.Random(), []  # seeded per epoch through the worker's seed
        rng.seed(torch.initial_seed())
        for item in self.samples():
            buffer.append(item)
            if len(buffer) >= self.shuffle_buffer:
                yield buffer.pop(rng.randrange(len(buffer)))
        rng.shuffle(buffer)
        yield from buffer

    def bad_count(self) -> int:
        return int(self.bad.sum())

    def cache_identity(self) -> None:
        return None  # as ShardSplit's: shards are not cached


class ShardTrainLoader(EpochLoader):
    """The shard counterpart of TrainLoader: exactly steps_per_epoch batches per epoch on every rank. A stream
    cannot seek: a mid-epoch resume replays the epoch and drops what was trained on (see EpochLoader)."""

    def __init__(self, split: ShardSplit, transform, *, batch_size: int, workers: int, repeats: int, seed: int,
                 spec: InputSpec, dist: distributed.Dist, augment=None):
        if len(split.urls) < dist.world * max(workers, 1):
            raise UsageError(f"{len(split.urls)} shards cannot feed {dist.world} processes x {max(workers, 1)} loader "
                             f"workers; write smaller shards (usi shards --shard-size) or lower data.workers")
        self.stream = ShardStream(split.urls, transform, rank=dist.rank, world=dist.world, repeats=repeats,
                                  train=True, seed=seed, bad=split.bad,  # read errors count one each
                                  num_classes=len(split.classes))
        self.total, self.world = len(split), dist.world
        super().__init__(self.stream, sampler=None, batch_size=batch_size, workers=workers, seed=seed, spec=spec,
                         dist=dist, augment=augment)

    def steps_per_epoch(self) -> int:
        return self.total // self.world // self.batch_size

    def batches(self, epoch: int, start_step: int):
        self.stream.epoch = epoch  # now, not on the first batch: the shard order is the epoch's
        return self.passes()

    def passes(self):
        produced, passes = 0, 0
        while True:
            for batch in self.prefetch:
                produced += 1
                yield batch
                if produced >= self.steps_per_epoch():
                    return
            passes += 1  # this rank's shards ran short: another pass (another shard order), bounded by one shard
            self.stream.epoch += 10_000 * passes
            if passes > 2:
                raise UsageError(f"rank {self.rank}'s shards gave {produced} batches over 3 passes, short of the "
                                 f"{self.steps_per_epoch()} per epoch that index.json's counts promise: shards are "
                                 f"missing, corrupt or hold other images than index.json says (see the warnings "
                                 f"above)")


def shard_eval_loader(split: ShardSplit, transform, *, batch_size: int, workers: int, spec: InputSpec,
                      dist: distributed.Dist):
    """Every sample exactly once across ranks and workers, in order."""
    if len(split.urls) < dist.world:
        raise UsageError(f"{len(split.urls)} validation shards cannot be split over {dist.world} processes")
    stream = ShardStream(split.urls, transform, rank=dist.rank, world=dist.world, train=False, bad=split.bad,
                         counts=split.counts, num_classes=len(split.classes))
    usable = max(1, min(workers, len(split.urls[dist.rank::dist.world])))  # no worker left without a shard
    loader = DataLoader(stream, batch_size=batch_size, num_workers=usable if workers else 0, collate_fn=eval_collate,
                        pin_memory=dist.device.type == "cuda", drop_last=False, worker_init_fn=ignore_interrupts)
    return to_device(loader, spec, dist)

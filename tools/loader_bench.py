"""Loader throughput per worker: decode + USI augmentation from shards and from the image folder, and
PIL decode alone on the same images (the ceiling), in one process, median of --runs.

  python tools/make_shards.py /data/imagenette/train /tmp/shards/train --shard-size 500
  python tools/loader_bench.py /data/imagenette/train /tmp/shards/train --workers 1 2 --images 2000

Goals (issue 4): shards >= folder, and shards >= 80% of decode-only, per worker.
"""
from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from timm.data.loader import fast_collate

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from usi.data import InputSpec  # noqa: E402
from usi.data.folder import FolderSplit, load_rgb  # noqa: E402
from usi.data.loader import train_transform  # noqa: E402
from usi.data.shards import ShardStream, read_index  # noqa: E402
from usi.recipe import AugSection  # noqa: E402


class DecodeOnly(torch.utils.data.Dataset):
    def __init__(self, folder: FolderSplit):
        self.paths = [p for p, _ in folder.samples]

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        load_rgb(self.paths[i]).load()
        return torch.zeros(1, dtype=torch.uint8), 0


def rate(dataset, workers: int, images: int, batch: int = 64) -> float:
    loader = DataLoader(dataset, batch_size=batch, num_workers=workers, collate_fn=fast_collate,
                        shuffle=not isinstance(dataset, torch.utils.data.IterableDataset) or None, drop_last=True)
    it = iter(loader)
    next(it)  # worker start-up and the first batch are not measured
    n, t0 = 0, time.perf_counter()
    for x, _ in itertools.islice(it, max(1, images // batch)):
        n += len(x)
    return n / (time.perf_counter() - t0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", type=Path)
    p.add_argument("shards", type=Path)
    p.add_argument("--workers", type=int, nargs="+", default=[1])
    p.add_argument("--images", type=int, default=1500)
    p.add_argument("--input-size", type=int, default=224)
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args(argv)
    transform = train_transform(AugSection(), InputSpec(args.input_size, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)))
    split = FolderSplit(args.folder)
    folder = split.dataset(transform)
    urls, _, _ = read_index(args.shards)
    print(f"{len(folder)} images, {len(urls)} shards, input {args.input_size}, USI train augmentation; "
          f"median of {args.runs}; images/s per worker")
    print("| workers | decode only | folder | shards | shards / folder | shards / decode |\n|---|---|---|---|---|---|")
    for w in args.workers:
        def med(make):
            return statistics.median(rate(make(), w, args.images) for _ in range(args.runs)) / max(w, 1)
        decode = med(lambda: DecodeOnly(split))
        from_folder = med(lambda: folder)
        from_shards = med(lambda: ShardStream(urls, transform, rank=0, world=1, repeats=1, train=True,
                                              shuffle_buffer=256))
        print(f"| {w} | {decode:.0f} | {from_folder:.0f} | {from_shards:.0f} | {from_shards / from_folder:.2f} | "
              f"{from_shards / decode:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

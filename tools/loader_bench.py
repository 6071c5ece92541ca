"""Training loader throughput per core, from an image folder and from shards: decode only, today's path
(timm's transform with RandAugment in the workers) and the new one (the workers decode, crop, resize
and flip; RandAugment runs batched on the device).

  tar xf in1k-val-sample-334.tar -C /tmp/in1k-val
  python tools/loader_bench.py /tmp/in1k-val --workers 1 2 --copies 3 --rounds 3

The images (a flat folder, or class folders) are laid out as an image folder of `--copies` links to each
file (default: the recipe's aug.repeats, 3), as the training sampler hands each image out that often per epoch,
and written as shards of the distinct images once, in a temporary folder; the shard stream repeats each
decoded image aug.repeats times, as in training. Both give the same number of training samples per pass.
Each candidate is a real DataLoader with
`w` workers over the same images; images/s are divided by w (per core). Candidates are timed
round-robin, so drift of a shared machine falls on all alike; medians over rounds; ratios within the run.
The device's part of the new path (RandAugment per batch) is timed by tools/gpu_report.py.
"""
from __future__ import annotations

import argparse
import io
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from timm.data.loader import fast_collate
from torch.utils.data import DataLoader, RandomSampler

from usi.data.folder import FolderSplit
from usi.data.images import IMAGE_EXTENSIONS, load_rgb
from usi.data.loader import InputSpec, train_transform
from usi.data.shards import ShardStream, read_index
from usi.recipe import AugSection

SPEC = InputSpec(224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


class DecodeOnly:
    """Today's decode alone (Pillow, the whole image to RGB; datasets hand transforms the file's bytes)."""

    def __call__(self, data: bytes):
        load_rgb(io.BytesIO(data))
        return torch.zeros(3, 1, 1, dtype=torch.uint8)

    def __repr__(self) -> str:
        return "DecodeOnly()"


def layout(src: Path, work: Path, copies: int) -> Path:
    """An image folder of `copies` links to each image: class folders kept, or one per flat file."""
    files = sorted(p for p in src.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise SystemExit(f"no images under {src}")
    root = work / "folder"
    for f in files:
        cls = f.parent.name if f.parent != src else f.stem.split("_")[0]
        (root / cls).mkdir(parents=True, exist_ok=True)
        for c in range(copies):
            (root / cls / f"{f.stem}-{c}{f.suffix}").symlink_to(f.resolve())
    return root


def rate(dataset, workers: int, batch: int) -> float:
    """Images/s of one pass (after the first batch: worker start-up is not the loader's pace)."""
    sampler = None if isinstance(dataset, torch.utils.data.IterableDataset) else RandomSampler(dataset)
    loader = DataLoader(dataset, batch_size=batch, sampler=sampler, num_workers=workers, collate_fn=fast_collate,
                        drop_last=True)
    it = iter(loader)
    next(it)
    n, t0 = 0, time.perf_counter()
    for x, _ in it:
        n += len(x)
    return n / (time.perf_counter() - t0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", type=Path, help="a folder of images (flat, or class folders)")
    p.add_argument("--workers", type=int, nargs="+", default=[1])
    p.add_argument("--copies", type=int, default=AugSection().repeats,
                   help="links to each image in the folder; the shards repeat each image as often")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--input-size", type=int, default=224)
    p.add_argument("--shard-size", type=int, default=100)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    spec = InputSpec(args.input_size, SPEC.mean, SPEC.std)
    aug = AugSection()  # the published recipe's augmentation
    with tempfile.TemporaryDirectory() as tmp:
        folder = layout(args.images, Path(tmp), args.copies)
        distinct = layout(args.images, Path(tmp) / "distinct", 1)
        subprocess.run([sys.executable, "-m", "usi", "shards", str(distinct),
                        str(Path(tmp) / "shards"), "--shard-size", str(args.shard_size), "--workers", "2"],
                       check=True, capture_output=True)
        urls, _, _ = read_index(Path(tmp) / "shards")
        split = FolderSplit(folder)
        today, new = train_transform(aug, spec, on_device=False), train_transform(aug, spec, on_device=True)
        print(f"{len(split)} images ({args.copies} links to each of {len(split) // args.copies}), {len(urls)} shards, "
              f"input {spec.size}, recipe augmentation {aug.auto_augment}; images/s per worker, median of "
              f"{args.rounds} rounds")
        cols = ["decode only", "folder today", "folder new", "shards today", "shards new"]
        print("| workers | " + " | ".join(cols) + " | new / today (folder) | new / today (shards) |"
              " shards / folder (new) |\n|" + "---|" * (len(cols) + 4))
        for w in args.workers:
            candidates = {
                "decode only": lambda: split.dataset(DecodeOnly()),
                "folder today": lambda: split.dataset(today),
                "folder new": lambda: split.dataset(new),
                "shards today": lambda: ShardStream(urls, today, rank=0, world=1, train=True, shuffle_buffer=64,
                                                    repeats=args.copies),
                "shards new": lambda: ShardStream(urls, new, rank=0, world=1, train=True, shuffle_buffer=64,
                                                  repeats=args.copies),
            }
            times = {name: [] for name in candidates}
            for _ in range(args.rounds):  # round-robin: drift falls on every candidate alike
                for name, make in candidates.items():
                    times[name].append(rate(make(), w, args.batch) / max(w, 1))
            m = {name: statistics.median(v) for name, v in times.items()}
            print(f"| {w} | " + " | ".join(f"{m[c]:.0f}" for c in cols) +
                  f" | {m['folder new'] / m['folder today']:.2f} | {m['shards new'] / m['shards today']:.2f} | "
                  f"{m['shards new'] / m['folder new']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

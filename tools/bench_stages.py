"""Per-image cost of the training input pipeline, stage by stage: today's timm transform against the fast path.

    python tools/bench_stages.py /tmp/in1k-val            # a folder of JPEGs (searched recursively)

In one process, on one core (torch.set_num_threads(1), like a DataLoader worker), over the files held in
memory (no disk I/O), it times:
  - decode only: Image.open + convert('RGB'), what usi's load_rgb does today;
  - today: decode, then timm's create_transform(is_training=True, auto_augment=...) split into its stages
    (RandomResizedCropAndInterpolation, RandomHorizontalFlip, RandAugment, MaybePILToTensor);
  - new: usi.data.fast_crop (draft decode + crop, then torch resize + flip); RandAugment leaves the worker;
  - optionally new with simplejpeg's scaled decode (libjpeg-turbo's M/8 scalings) instead of Image.draft;
  - usi.data.device_augment's batched RandAugment on a CPU batch (the device's work, here on a CPU core).
Candidates are interleaved image by image, each seeded the same way per image so they crop alike, and each
round's per-image means are reduced to their median over rounds: drift of a shared machine falls on all
candidates alike. Prints a markdown table.
"""
from __future__ import annotations

import argparse
import io
import random
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable

import PIL
import torch
from PIL import Image, features
from timm.data import create_transform
from timm.data.auto_augment import RandAugment
from timm.data.transforms import MaybePILToTensor, RandomResizedCropAndInterpolation
from torchvision.transforms import RandomHorizontalFlip

from usi.data import fast_crop
from usi.data.device_augment import DeviceRandAugment
from usi.data.fast_crop import FastRandomResizedCrop, draft_scale

JPEG_SUFFIXES = (".jpg", ".jpeg")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folder", type=Path, help="folder of JPEGs (searched recursively)")
    p.add_argument("--size", type=int, default=224, help="training crop size")
    p.add_argument("--aa", default="rand-m7-mstd0.5-inc1", help="timm RandAugment string")
    p.add_argument("--interpolation", default="bicubic", choices=("bicubic", "bilinear", "random"))
    p.add_argument("--rounds", type=int, default=5, help="passes over the images; the median is reported")
    p.add_argument("--batch", type=int, default=128, help="batch size for the device RandAugment")
    p.add_argument("--limit", type=int, default=0, help="use only the first N images (0: all)")
    p.add_argument("--simplejpeg", action="store_true", help="also time simplejpeg's scaled decode")
    return p.parse_args(argv)


def load_files(folder: Path, limit: int) -> list[bytes]:
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in JPEG_SUFFIXES and p.is_file())
    if not paths:
        raise SystemExit(f"no JPEGs under {folder}")
    return [p.read_bytes() for p in paths[:limit or None]]


def today_stages(size: int, aa: str, interpolation: str) -> dict[str, Callable]:
    """timm's train transform, as usi builds it, taken apart into its stages."""
    compose = create_transform(size, is_training=True, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                               interpolation=interpolation, hflip=0.5, auto_augment=aa, use_prefetcher=True)
    kinds = {RandomResizedCropAndInterpolation: "crop+resize", RandomHorizontalFlip: "flip",
             RandAugment: "randaugment", MaybePILToTensor: "to tensor"}
    stages = {}
    for t in compose.transforms:
        name = next((n for k, n in kinds.items() if isinstance(t, k)), None)
        if name is None:
            raise SystemExit(f"unexpected stage in timm's transform: {t!r}")
        stages[name] = t
    return stages


def decode_rgb(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as img:
        return img.convert("RGB")


class Timer:
    """Seconds per stage, summed over one round."""

    def __init__(self):
        self.total: dict[str, float] = defaultdict(float)

    def run(self, stage: str, fn: Callable, *args):
        start = time.perf_counter()
        out = fn(*args)
        self.total[stage] += time.perf_counter() - start
        return out


def seed(round_: int, index: int) -> None:
    """The same draws for every candidate on one image in one round."""
    random.seed(round_ * 1_000_003 + index)
    torch.manual_seed(round_ * 1_000_003 + index)


def run_today(data: bytes, stages: dict, timer: Timer) -> torch.Tensor:
    img = timer.run("today: decode", decode_rgb, data)
    for name, fn in stages.items():
        img = timer.run(f"today: {name}", fn, img)
    return img


def run_fast(data: bytes, fast: FastRandomResizedCrop, timer: Timer) -> torch.Tensor:
    """FastRandomResizedCrop.__call__, its two halves timed apart."""
    def decode_crop():
        img = Image.open(io.BytesIO(data))
        crop = fast.draw(img)
        return fast.decode_crop(img, crop), crop
    pixels, crop = timer.run("new: decode (draft) + crop", decode_crop)
    return timer.run("new: resize + flip (torch)", fast.resize_flip, pixels, crop)


def run_simplejpeg(data: bytes, fast: FastRandomResizedCrop, timer: Timer) -> torch.Tensor:
    """FastRandomResizedCrop.from_jpeg (libjpeg-turbo's M/8 scalings via simplejpeg, in place of Image.draft's
    1/2^k: what the loader workers run when simplejpeg is installed), its two halves timed apart."""
    pixels, crop = timer.run("simplejpeg: decode (scaled) + crop", fast.decode_crop_jpeg, data)
    return timer.run("simplejpeg: resize + flip (torch)", fast.resize_flip, pixels, crop)


def draft_share(files: list[bytes], fast: FastRandomResizedCrop, draws: int = 20) -> float:
    """Share of crops that get a DCT-reduced decode, over a few draws per image."""
    hits = total = 0
    random.seed(0)
    for data in files:
        img = Image.open(io.BytesIO(data))
        for _ in range(draws):
            crop = fast.draw(img)
            hits += draft_scale(crop.width, crop.height, fast.size[1], fast.size[0]) > 1
            total += 1
    return hits / total


def bench_images(files, args) -> list[dict[str, float]]:
    """Per round: mean ms per image of each stage."""
    stages = today_stages(args.size, args.aa, args.interpolation)
    fast = FastRandomResizedCrop(args.size, interpolation=args.interpolation, hflip=0.5)
    candidates = [("decode", lambda d, t: t.run("decode only (PIL, full, convert RGB)", decode_rgb, d)),
                  ("today", lambda d, t: run_today(d, stages, t)),
                  ("new", lambda d, t: run_fast(d, fast, t))]
    if args.simplejpeg:
        candidates.append(("simplejpeg", lambda d, t: run_simplejpeg(d, fast, t)))
    rounds = []
    for r in range(args.rounds):
        timer = Timer()
        for i, data in enumerate(files):
            shift = (i + r) % len(candidates)  # rotate who goes first: cache warmth falls on all alike
            for _, run in candidates[shift:] + candidates[:shift]:
                seed(r, i)
                run(data, timer)
        rounds.append({k: v / len(files) * 1e3 for k, v in timer.total.items()})
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {v:.2f}" for k, v in rounds[-1].items()
                                                          if k.startswith(("today: decode", "new:"))),
              file=sys.stderr)
    return rounds


def bench_device(files, args) -> list[float]:
    """ms per batch of DeviceRandAugment on a CPU uint8 batch of fast-path outputs."""
    fast = FastRandomResizedCrop(args.size, interpolation=args.interpolation)
    random.seed(0)
    torch.manual_seed(0)
    images = [fast(Image.open(io.BytesIO(files[i % len(files)]))) for i in range(args.batch)]
    batch = torch.stack(images)
    augment = DeviceRandAugment(args.aa, args.size, interpolation=args.interpolation)
    generator = torch.Generator().manual_seed(0)
    times = []
    for _ in range(args.rounds):
        start = time.perf_counter()
        augment(batch, generator)
        times.append((time.perf_counter() - start) * 1e3)
    return times


def median_of(rounds: list[dict[str, float]], keys) -> float:
    return statistics.median(sum(r[k] for k in keys) for r in rounds)


def table(rounds, device_ms, args, draft: float) -> str:
    keys = list(rounds[0])
    today = [k for k in keys if k.startswith("today:")]
    new = [k for k in keys if k.startswith("new:")]
    sj = [k for k in keys if k.startswith("simplejpeg:")]
    lines = ["| stage | ms/image | images/s per core |", "|---|---:|---:|"]

    def row(name: str, ms: float, bold: bool = False):
        name = f"**{name}**" if bold else name
        lines.append(f"| {name} | {ms:.2f} | {1000 / ms:.0f} |")

    for k in keys:
        if k not in today + new + sj:
            row(k, median_of(rounds, [k]))
    for k in today:
        row(k, median_of(rounds, [k]))
    today_ms = median_of(rounds, today)
    row("today: total (CPU worker)", today_ms, bold=True)
    for k in new:
        row(k, median_of(rounds, [k]))
    new_ms = median_of(rounds, new)
    row("new: total (CPU worker)", new_ms, bold=True)
    if sj:
        for k in sj:
            row(k, median_of(rounds, [k]))
        row("simplejpeg: total (CPU worker)", median_of(rounds, sj), bold=True)
    device = statistics.median(device_ms)
    lines.append(f"| device RandAugment on CPU tensors, batch {args.batch} ({device:.0f} ms/batch) | "
                 f"{device / args.batch:.2f} | {1000 * args.batch / device:.0f} |")
    # ratios per round, then the median: both sides of a ratio come from the same round
    ratio = statistics.median(sum(r[k] for k in today) / sum(r[k] for k in new) for r in rounds)
    lines.append("")
    lines.append(f"new / today, images/s per CPU core: **{ratio:.2f}x** (median over rounds of the per-round ratio)")
    without_ra = statistics.median(sum(r[k] for k in today if "randaugment" not in k) / sum(r[k] for k in new)
                                   for r in rounds)
    lines.append(f"new / today without RandAugment (crop, resize, flip only): {without_ra:.2f}x")
    if sj:
        ratio_sj = statistics.median(sum(r[k] for k in new) / sum(r[k] for k in sj) for r in rounds)
        lines.append(f"simplejpeg / PIL-draft fast path, images/s: {ratio_sj:.2f}x")
    lines.append(f"crops decoded DCT-reduced (Image.draft): {100 * draft:.1f}%")
    return "\n".join(lines)


def environment(n: int, args) -> str:
    simd = "post" in PIL.__version__  # Pillow-SIMD versions end in .postN
    return (f"{n} JPEGs, size {args.size}, {args.aa}, {args.interpolation}, {args.rounds} rounds; "
            f"Pillow {PIL.__version__} ({'SIMD' if simd else 'no SIMD'}), "
            f"libjpeg-turbo {features.version('libjpeg_turbo') or 'absent'}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} torch thread")


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.simplejpeg and fast_crop.simplejpeg is None:
        raise SystemExit("--simplejpeg: simplejpeg is not installed (pip install simplejpeg)")
    torch.set_num_threads(1)
    files = load_files(args.folder, args.limit)
    fast = FastRandomResizedCrop(args.size, interpolation=args.interpolation)
    rounds = bench_images(files, args)
    device_ms = bench_device(files, args)
    print(environment(len(files), args))
    print()
    print(table(rounds, device_ms, args, draft_share(files, fast)))


if __name__ == "__main__":
    main()

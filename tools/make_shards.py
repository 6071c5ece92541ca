"""Image folders -> webdataset tar shards of the original image bytes plus the class index.

  python tools/make_shards.py /data/imagenet/train /data/shards/train --shard-size 1000 --workers 16
  python tools/make_shards.py /data/imagenet/val /data/shards/val --classes-from /data/imagenet/train

Samples are shuffled (seeded) across shards. Each shard is written as a temporary file and renamed
when complete, so a crash never leaves a half-written shard under a final name; re-running skips
shards that already exist. Every image is decoded once to check it: a bad one is reported by path
and, with --skip-bad, left out, else the writer stops with exit code 1 (shards already complete
are kept). index.json lists the shards with their sample counts, the class names and the total.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import random
import sys
import tarfile
import time
from multiprocessing import Pool
from pathlib import Path

import webdataset as wds
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from usi.data.folder import find_classes, list_images  # noqa: E402


def check_image(data: bytes) -> None:
    with Image.open(io.BytesIO(data)) as img:
        img.convert("RGB").load()


def write_shard(job) -> tuple[str, int, list[str]]:
    """Writes one shard; returns (name, samples written, bad paths)."""
    path, samples, skip_bad = job
    path = Path(path)
    if path.is_file():  # finished by an earlier run (complete: it was renamed into place)
        with tarfile.open(path) as tar:
            return path.name, sum(m.name.endswith(".cls") for m in tar.getmembers()), []
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    bad, written = [], 0
    try:
        with wds.TarWriter(str(tmp)) as sink:
            for key, file, label in samples:
                data = Path(file).read_bytes()
                try:
                    check_image(data)
                except Exception as e:
                    bad.append(f"{file}: {type(e).__name__}: {str(e)[:80]}")
                    if not skip_bad:
                        return path.name, -1, bad
                    continue
                ext = Path(file).suffix.lower().lstrip(".").replace("jpeg", "jpg")
                sink.write({"__key__": key, ext: data, "cls": label})
                written += 1
        os.replace(tmp, path)
        return path.name, written, bad
    finally:
        tmp.unlink(missing_ok=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", type=Path, help="an image folder: src/<class>/<image>")
    p.add_argument("out", type=Path)
    p.add_argument("--classes-from", type=Path, help="take class names (labels) from this folder, e.g. train/")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    p.add_argument("--workers", type=int, default=os.cpu_count())
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prefix", default="shard")
    p.add_argument("--skip-bad", action="store_true", help="leave out images that do not decode, instead of stopping")
    args = p.parse_args(argv)
    classes = find_classes(args.classes_from or args.src)
    samples = list_images(args.src, classes)
    random.Random(args.seed).shuffle(samples)
    args.out.mkdir(parents=True, exist_ok=True)
    jobs = []
    for i in range(0, len(samples), args.shard_size):
        chunk = [(f"{j:09d}", f, y) for j, (f, y) in enumerate(samples[i:i + args.shard_size], start=i)]
        jobs.append((str(args.out / f"{args.prefix}-{i // args.shard_size:06d}.tar"), chunk, args.skip_bad))
    shards, bad_all, start = [], [], time.time()
    with Pool(max(1, min(args.workers, len(jobs)))) as pool:
        for done, (name, count, bad) in enumerate(pool.imap(write_shard, jobs), start=1):
            bad_all += bad
            for line in bad:
                print(f"bad image: {line}", file=sys.stderr)
            if count < 0:
                pool.terminate()
                print(f"make_shards: stopped at an unreadable image (use --skip-bad to leave such images out); "
                      f"{len(shards)} complete shards kept", file=sys.stderr)
                return 1
            shards.append({"name": name, "count": count})
            rate = sum(s["count"] for s in shards) / max(time.time() - start, 1e-9)
            print(f"\rshards {done}/{len(jobs)}  {rate:.0f} img/s", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    index = {"classes": classes, "shards": shards, "total": sum(s["count"] for s in shards),
             "skipped": len(bad_all)}
    (args.out / "index.json").write_text(json.dumps(index, indent=1))
    print(f"{index['total']} samples in {len(shards)} shards -> {args.out} ({len(bad_all)} bad images skipped)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

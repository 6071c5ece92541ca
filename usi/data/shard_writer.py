"""Image folders -> webdataset tar shards of the original image bytes plus the class index.

  usi shards /data/imagenet/train /data/shards/train --shard-size 1000 --workers 16
  usi shards /data/imagenet/val /data/shards/val --classes-from /data/imagenet/train
(or python -m usi shards ...)

Samples are shuffled (seeded) across shards. Each shard is written as a temporary file and renamed
when complete, so a crash never leaves a half-written shard under a final name; re-running skips
shards that already exist, but only if they were written from the same source files with the same
settings (recorded in .make_shards.json; anything else in the folder is refused). Every image is
decoded once to check it: a bad one is reported by path and, with --skip-bad, left out, else the
writer stops with exit code 1 (shards already complete are kept). index.json, written atomically at
the end, lists the shards with their sample counts, the class names and the total.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import io
import json
import os
import random
import signal
import sys
import tarfile
import time
from multiprocessing import Pool
from pathlib import Path

import webdataset as wds

from usi.data.folder import find_classes, list_images
from usi.data.images import load_rgb
from usi.errors import UsageError, one_line, printable
from usi.runtime.files import atomic_write, open_own, open_regular, temporary_beside
from usi.runtime.preempt import SIGNALS, Interrupted, raising_interrupted

MANIFEST = ".make_shards.json"  # the settings and source the shards here were written from


def check_image(data: bytes) -> None:
    load_rgb(io.BytesIO(data)).load()  # exactly what training does with the sample


def write_shard(job) -> tuple[str, int, list[str]]:
    """Writes one shard; returns (name, samples written, bad paths)."""
    path, samples, skip_bad = job
    path = Path(path)
    if path.is_file():  # finished by an earlier run (complete: it was renamed into place)
        with tarfile.open(path) as tar:
            return path.name, sum(m.name.endswith(".cls") for m in tar.getmembers()), []
    tmp = temporary_beside(path)  # a new file: never a link planted at a temporary name
    bad, written = [], 0
    try:
        with wds.TarWriter(str(tmp)) as sink:
            for key, file, label in samples:
                try:
                    with open_regular(file) as f:  # a pipe or a device named like an image is refused at once
                        data = f.read()
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


def settings_of(args, samples: list, classes: list[str]) -> dict:
    """What the shards in a folder were written from: a re-run may reuse them only if this matches."""
    h = hashlib.sha256()
    for file, label in samples:
        h.update(f"{file} {label}\n".encode())
    return {"source": str(args.src.resolve()), "files": h.hexdigest(), "classes": len(classes),
            "shard_size": args.shard_size, "seed": args.seed, "prefix": args.prefix, "skip_bad": args.skip_bad}


def claim(out: Path, settings: dict):
    """Lock `out` for this writer, refuse a folder of shards written from anything else, and remove
    temporary files that a killed writer left behind."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock = open_own(out / ".make_shards.lock")  # never through a link
    except OSError as e:
        raise UsageError(f"the output folder {out} cannot be created or written ({e.strerror})") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise UsageError(f"{out} is being written by another make_shards process") from None
    manifest = out / MANIFEST
    if manifest.is_file():
        try:
            before = json.loads(manifest.read_text())
        except ValueError:
            before = {}
        changed = [k for k in settings if before.get(k) != settings[k]]
        if changed:
            raise UsageError(f"{out} already holds shards written with other {', '.join(changed)}; write into an "
                             f"empty folder (each split in its own)")
    else:
        foreign = sorted(p.name for p in out.iterdir() if p.name != ".make_shards.lock")
        if foreign:
            raise UsageError(f"{out} already holds files this tool did not write ({', '.join(foreign[:3])}"
                             f"{', ...' if len(foreign) > 3 else ''}); write into an empty folder")
    for stale in out.glob(".*.tmp-*"):  # we hold the lock: no other writer owns them
        stale.unlink(missing_ok=True)
    atomic_write(manifest, lambda tmp: Path(tmp).write_text(json.dumps(settings, indent=1)))
    return lock


def main(argv=None) -> int:
    try:
        return write_shards(argv)
    except UsageError as e:
        print(f"usi: error: {one_line(e)}", file=sys.stderr)
        return 2


def prefix_name(text: str) -> str:
    """A shard file name prefix: a plain name, so every shard lands inside the output folder."""
    if not text or "/" in text or "\\" in text or text in (".", "..") or text.startswith("."):
        raise argparse.ArgumentTypeError(f"must be a plain file name (no '/', not hidden), got {text!r}")
    return text


def check_source(src: Path) -> None:
    """A split's folder (src/<class>/<image>), not the data root above it (src/train, src/val)."""
    names = {p.name for p in src.iterdir() if p.is_dir()} if src.is_dir() else set()
    splits = names & {"train", "val", "validation", "test"}
    if len(splits) >= 2:
        raise UsageError(f"{src} holds the splits {', '.join(sorted(splits))}, not class folders: give one split, "
                         f"e.g. {src / 'train'}")


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def leave_interrupts_to_the_parent() -> None:
    """Pool initializer: Ctrl-C reaches the terminal's whole group; a worker leaves it to the parent, which
    stops the pool (SIGTERM, whose default action ends a worker without a traceback)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextlib.contextmanager
def stopping_on_signals(pool, shards: list):
    """SIGTERM or SIGINT to the writer: the workers are stopped (a shard half-written stays a temporary
    file, removed by the next run; finished shards were renamed into place), one line says what was kept,
    and Interrupted ends the command with 128 + the signal. The same command resumes: finished shards are
    kept, the rest written."""
    try:
        with raising_interrupted(lambda name: f"stopped by {name}: {len(shards)} shards finished and kept; the "
                                              f"same command writes the rest"):
            yield
    except Interrupted:
        for s in SIGNALS:  # a second signal while the workers stop is only noted
            signal.signal(s, signal.SIG_IGN)
        pool.terminate()
        print(file=sys.stderr)
        raise


def write_shards(argv=None) -> int:
    p = argparse.ArgumentParser(prog="usi shards", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", type=Path, help="an image folder: src/<class>/<image>")
    p.add_argument("out", type=Path)
    p.add_argument("--classes-from", type=Path, help="take class names (labels) from this folder, e.g. train/")
    p.add_argument("--shard-size", type=positive, default=1000, help="samples per shard")
    p.add_argument("--workers", type=positive, default=os.cpu_count())
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prefix", default="shard", type=prefix_name, help="shard file names: PREFIX-000000.tar")
    p.add_argument("--skip-bad", action="store_true", help="leave out images that do not decode, instead of stopping")
    args = p.parse_args(argv)
    check_source(args.src)
    classes = find_classes(args.classes_from or args.src)
    samples = list_images(args.src, classes)
    lock = claim(args.out, settings_of(args, samples, classes))  # held until the process ends
    random.Random(args.seed).shuffle(samples)
    jobs = []
    for i in range(0, len(samples), args.shard_size):
        chunk = [(f"{j:09d}", f, y) for j, (f, y) in enumerate(samples[i:i + args.shard_size], start=i)]
        jobs.append((str(args.out / f"{args.prefix}-{i // args.shard_size:06d}.tar"), chunk, args.skip_bad))
    shards, bad_all, start = [], [], time.time()
    with Pool(max(1, min(args.workers, len(jobs))), initializer=leave_interrupts_to_the_parent) as pool, \
            stopping_on_signals(pool, shards):
        for done, (name, count, bad) in enumerate(pool.imap(write_shard, jobs), start=1):
            bad_all += bad
            for line in bad:
                print(f"bad image: {printable(line)}", file=sys.stderr)
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
    atomic_write(args.out / "index.json", lambda tmp: Path(tmp).write_text(json.dumps(index, indent=1)))
    lock.close()
    print(printable(f"{index['total']} samples in {len(shards)} shards -> {args.out} ({len(bad_all)} bad images "
                    f"skipped)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Webdataset shards: writer, rank/worker split, repeats, corruption, exact validation."""
import collections
import hashlib
import io
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from usi.data import shards as shards_module
from usi.data.folder import FolderSplit
from usi.data.images import Decoded
from usi.data.loader import InputSpec
from usi.data.shards import ShardSplit, ShardStream, ShardTrainLoader, read_index, tar_members
from usi.errors import UsageError
from usi.runtime.distributed import Dist

from conftest import REPO, TINY, usi_cmd, usi_main
from helpers import one_error, strict_json, train_args


def make_shards(src, out, *extra):
    return subprocess.run([sys.executable, "-m", "usi", "shards", str(src), str(out), "--workers", "2", *extra],
                          cwd=REPO, capture_output=True, text=True)


def digest(img):
    return hashlib.sha1(np.asarray(img).tobytes()).hexdigest()


@pytest.fixture(scope="module")
def shards(image_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    assert make_shards(image_root / "train", out / "train", "--shard-size", "6").returncode == 0
    assert make_shards(image_root / "val", out / "val", "--classes-from", str(image_root / "train"),
                       "--shard-size", "5").returncode == 0
    return out


def read_all(urls, rank=0, world=1, **kw):
    return list(ShardStream(urls, None, rank=rank, world=world, train=False, **kw))


SPEC = InputSpec(8, (0.5,) * 3, (0.5,) * 3)


def test_folder_to_shards_keeps_every_image_and_label(image_root, shards):
    folder = FolderSplit(image_root / "train")
    urls, counts, classes = read_index(shards / "train")
    assert classes == folder.classes and sum(counts) == len(folder) == 64 and len(urls) == 11
    images = folder.dataset(None)
    want = collections.Counter((digest(img), y) for img, y in (images[i] for i in range(len(images))))
    got = collections.Counter((digest(img), y) for img, y, _ in read_all(urls))
    assert got == want


def test_brace_patterns_and_pipe_commands_read_the_same_samples(shards):
    urls, counts, _ = read_index(shards / "train")
    pattern = f"pipe:cat {shards}/train/shard-{{000000..{len(urls) - 1:06d}}}.tar"
    piped, _, _ = read_index(shards / "train", pattern)
    assert piped[0] == f"pipe:cat {urls[0]}"
    assert sorted(digest(i) for i, *_ in read_all(piped)) == sorted(digest(i) for i, *_ in read_all(urls))
    with pytest.raises(UsageError, match="gives 2 shards but"):
        read_index(shards / "train", f"{shards}/train/shard-{{000000..000001}}.tar")


def test_two_ranks_cover_an_epoch_exactly_once_and_run_the_same_steps(shards):
    split = ShardSplit(shards / "train")
    urls, counts = split.urls, split.counts
    seen = [digest(img) for r in range(2) for img, *_ in read_all(urls, rank=r, world=2)]
    assert len(seen) == sum(counts) == len(set(seen))
    steps = []
    for rank in range(2):
        loader = ShardTrainLoader(split, Decoded(lambda im: torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)),
                                  batch_size=4, workers=1, repeats=1, seed=0, spec=SPEC,
                                  dist=Dist(rank=rank, world=2))
        steps.append(sum(1 for _ in loader.epoch(0)))
    assert steps == [64 // 2 // 4] * 2


def test_repeated_augmentation_yields_each_image_repeats_times(shards):
    urls, counts, _ = read_index(shards / "train")
    stream = ShardStream(urls, None, rank=0, world=1, repeats=3, train=True, shuffle_buffer=0)
    copies = collections.Counter(digest(img) for img, _ in stream)
    assert set(copies.values()) == {3} and len(copies) == sum(counts)


def test_too_few_shards_for_ranks_and_workers_is_refused(shards):
    split = ShardSplit(shards / "train")
    with pytest.raises(UsageError, match="11 shards cannot feed 4 processes x 4 loader workers"):
        ShardTrainLoader(split, None, batch_size=4, workers=4, repeats=1, seed=0, spec=SPEC, dist=Dist(rank=0, world=4))


def test_corrupt_samples_and_truncated_shards_are_skipped_and_counted(shards, tmp_path):
    import webdataset as wds
    urls, _, _ = read_index(shards / "train")
    bad = tmp_path / "bad.tar"
    with wds.TarWriter(str(bad)) as sink:
        good = io.BytesIO()
        Image.new("RGB", (8, 8), (1, 2, 3)).save(good, "JPEG")
        sink.write({"__key__": "a", "jpg": good.getvalue(), "cls": 0})
        sink.write({"__key__": "b", "jpg": b"not a jpeg", "cls": 1})
    cut = tmp_path / "cut.tar"
    data = open(urls[0], "rb").read()
    cut.write_bytes(data[: len(data) // 2])
    stream = ShardStream([str(bad), str(cut)], None, rank=0, world=1, train=False)
    items = list(stream)
    assert stream.bad_count() >= 2  # the bad jpeg and the truncated shard, each with a warning
    assert 1 <= len(items) < 1 + 6


@pytest.mark.parametrize("train", [True, False])
def test_every_label_is_checked_against_the_index_where_it_is_read(tmp_path, caplog, train):
    """A label outside index.json's classes, or not an integer, is a bad sample: skipped, counted, and the
    warning names the shard, the sample's key and the range (it used to end in 'index 99 out of bounds'
    in mixup, naming neither)."""
    import webdataset as wds
    jpeg = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(jpeg, "JPEG")
    labels = {"ok": b"3", "spaced": b" 2\n", "high": b"99", "four": b"4", "neg": b"-1", "word": b"abc",
              "half": b"3.5", "empty": b"", "huge": b"9" * 500}
    shard = tmp_path / "labels.tar"
    with wds.TarWriter(str(shard)) as sink:
        for key, cls in labels.items():
            sink.write({"__key__": key, "jpg": jpeg.getvalue(), "cls": cls})
        sink.write({"__key__": "nolabel", "jpg": jpeg.getvalue()})
    log = logging.getLogger("usi")
    log.addHandler(caplog.handler)
    try:
        stream = ShardStream([str(shard)], None, rank=0, world=1, train=train, shuffle_buffer=0, num_classes=4)
        items = list(stream)
    finally:
        log.removeHandler(caplog.handler)
    assert sorted(item[1] for item in items) == [2, 3] and stream.bad_count() == 8
    warnings = {r.getMessage() for r in caplog.records if "skipped a bad sample" in r.getMessage()}  # once each
    assert len(warnings) == 8 and all(str(shard) in w for w in warnings)
    assert any("key high: label 99 is outside index.json's 4 classes (0..3)" in w for w in warnings)
    assert any("key neg: label -1 is outside" in w for w in warnings)
    assert any("key half: label '3.5' is not a class index" in w for w in warnings)
    assert any("key nolabel: no .cls part" in w for w in warnings)
    assert all(len(w) < 400 for w in warnings)


def test_a_split_checks_labels_against_its_own_index(shards):
    split = ShardSplit(shards / "train")
    loader = split.train_loader(None, batch_size=4, workers=0, repeats=1, seed=0, spec=SPEC, dist=Dist())
    assert loader.stream.num_classes == len(split.classes) == 4


def test_shard_writer_reports_bad_images_and_never_leaves_half_shards(image_root, tmp_path):
    import shutil
    src = tmp_path / "src"
    shutil.copytree(image_root / "train", src)
    broken = sorted(src.rglob("*.jpg"))[5]
    broken.write_bytes(b"broken")
    out = make_shards(src, tmp_path / "a", "--shard-size", "64")
    assert out.returncode == 1 and str(broken) in out.stderr
    assert not list((tmp_path / "a").glob("*.tar")) and not list((tmp_path / "a").glob(".*tmp*"))
    ok = make_shards(src, tmp_path / "b", "--shard-size", "16", "--skip-bad")
    assert ok.returncode == 0 and str(broken) in ok.stderr
    assert json.loads((tmp_path / "b" / "index.json").read_text())["total"] == 63
    again = make_shards(src, tmp_path / "b", "--shard-size", "16", "--skip-bad")  # re-run: safe, same index
    assert again.returncode == 0 and json.loads((tmp_path / "b" / "index.json").read_text())["total"] == 63


def test_training_and_validation_from_shards_match_the_folder(image_root, shards, tmp_path):
    run = tmp_path / "run"
    out = usi_main("train", "quickstart", *TINY, f"data.root={shards}", "data.format=shards", f"run.dir={run}",
                  "sched.epochs=1", "sched.warmup_epochs=0")
    assert out.returncode == 0, out.stderr[-2000:]
    ckpt = str(run / "last.pt")
    from_shards = usi_main("eval", ckpt, f"data.root={shards}", "data.format=shards", "--json")
    from_folder = usi_main("eval", ckpt, f"data.root={image_root}", "data.format=folder", "--json")
    two_ranks = usi_cmd("eval", ckpt, f"data.root={shards}", "data.format=shards", "--json", torchrun=2)
    reports = [json.loads(o.stdout)["students"] for o in (from_shards, from_folder, two_ranks)]
    for r in reports[1:]:
        for name in ("raw", "ema"):
            assert r[name]["count"] == reports[0][name]["count"] == 12
            assert r[name]["top1"] == reports[0][name]["top1"]
            assert r[name]["nll"] == pytest.approx(reports[0][name]["nll"], rel=1e-5)


@pytest.mark.parametrize("fmt", ["ustar", "gnu", "pax"])
def test_the_tar_reader_reads_what_tarfile_writes(tmp_path, fmt):
    import tarfile

    from usi.data.shards import tar_members
    files = {"a.jpg": b"x" * 700, "dir/" + "long" * 40 + ".cls": b"3", "empty.txt": b""}
    path = tmp_path / "t.tar"
    formats = {"ustar": tarfile.USTAR_FORMAT, "gnu": tarfile.GNU_FORMAT, "pax": tarfile.PAX_FORMAT}
    if fmt == "ustar":
        files = {k: v for k, v in files.items() if len(k) <= 100}
    with tarfile.open(path, "w", format=formats[fmt]) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with open(path, "rb") as f:
        assert dict(tar_members(f)) == files
    broken = bytearray(path.read_bytes())
    broken[10] ^= 0xFF  # inside the first header's name
    with pytest.raises(ValueError, match="checksum"):
        list(tar_members(io.BytesIO(bytes(broken))))
    with pytest.raises(ValueError, match="truncated"):
        list(tar_members(io.BytesIO(path.read_bytes()[:700])))


@pytest.mark.parametrize("index", ['{"classes": ["a"], "shards": [{"name": "s.tar", "cou', "[]", "{}",
                                   '{"classes": ["a"], "shards": [{"name": "s.tar", "count": -3}]}',
                                   '{"classes": [], "shards": []}', "\xff\xfe"])
def test_a_corrupt_shard_index_ends_in_one_line(image_root, tmp_path, index):
    for split in ("train", "val"):
        (tmp_path / "shards" / split).mkdir(parents=True)
        (tmp_path / "shards" / split / "index.json").write_text(index, encoding="latin-1")
    out = usi_main(*train_args(tmp_path / "shards", tmp_path / "r", "data.format=shards"))
    one_error(out, "is not a usi shard index")


def test_truncated_or_missing_val_shards_are_counted_by_what_they_lack(image_root, tmp_path):
    from usi.data.shard_writer import main as make_shards
    shards = tmp_path / "sh"
    assert make_shards([str(image_root / "train"), str(shards / "train"), "--shard-size", "16"]) == 0
    assert make_shards([str(image_root / "val"), str(shards / "val"), "--classes-from", str(image_root / "train"),
                        "--shard-size", "4"]) == 0
    run = tmp_path / "r"
    assert usi_main(*train_args(image_root, run, "sched.epochs=1", "sched.warmup_epochs=0")).returncode == 0
    cut = shards / "val" / "shard-000000.tar"
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2 + 100])
    (shards / "val" / "shard-000002.tar").unlink()
    out = usi_main("eval", str(run / "best.safetensors"), "data.format=shards", f"data.root={shards}", "--json")
    assert out.returncode == 0, out.stderr
    report = strict_json(out.stdout)
    assert report["images"] + report["unreadable"] == 12 and report["unreadable"] >= 5  # every one accounted for


def test_a_shard_index_that_undercounts_its_shard_is_reported(image_root, tmp_path):
    from usi.data.shard_writer import main as make_shards
    shards = tmp_path / "sh"
    assert make_shards([str(image_root / "train"), str(shards / "train"), "--shard-size", "16"]) == 0
    assert make_shards([str(image_root / "val"), str(shards / "val"), "--classes-from", str(image_root / "train"),
                        "--shard-size", "4"]) == 0
    index = json.loads((shards / "val" / "index.json").read_text())
    index["shards"][0]["count"] -= 2
    index["total"] -= 2
    (shards / "val" / "index.json").write_text(json.dumps(index))
    run = tmp_path / "r"
    assert usi_main(*train_args(image_root, run, "sched.epochs=1", "sched.warmup_epochs=0")).returncode == 0
    out = usi_main("eval", str(run / "best.safetensors"), "data.format=shards", f"data.root={shards}")
    assert out.returncode == 0 and "holds 2 more samples than index.json says" in out.stderr, out.stderr


def test_shards_indexes_and_images_that_are_not_regular_files_never_block(image_root, shards, tmp_path):
    signal.alarm(120)  # a blocking open fails the test instead of hanging it
    try:
        pipe, zero, folder = tmp_path / "pipe.tar", tmp_path / "zero.tar", tmp_path / "folder.tar"
        os.mkfifo(pipe)
        zero.symlink_to("/dev/zero")
        folder.mkdir()
        urls, _, _ = read_index(shards / "val")
        stream = ShardStream([str(pipe), str(zero), str(folder), urls[0]], None, rank=0, world=1, train=False)
        assert len(list(stream)) == 5 and stream.bad_count() == 3  # each refused at once, counted; the real one read
        (tmp_path / "split").mkdir()
        os.mkfifo(tmp_path / "split" / "index.json")
        with pytest.raises(UsageError, match=r"index.json is not a regular file \(a named pipe\)"):
            read_index(tmp_path / "split")
        src = tmp_path / "src"
        shutil.copytree(image_root / "train", src)
        os.mkfifo(src / "circle" / "pipe.jpg")
        out = make_shards(src, tmp_path / "out", "--shard-size", "64", "--skip-bad")
        assert out.returncode == 0 and "pipe.jpg: OSError: is not a regular file (a named pipe)" in out.stderr
    finally:
        signal.alarm(0)


def test_a_tar_member_declaring_more_than_a_sane_size_is_refused_before_it_is_read(monkeypatch):
    member = tarfile.TarInfo("a.jpg")
    member.size = 10
    data = io.BytesIO(member.tobuf(format=tarfile.USTAR_FORMAT) + b"0123456789" + b"\0" * 1526)
    assert list(tar_members(data)) == [("a.jpg", b"0123456789")]
    monkeypatch.setattr(shards_module, "MAX_MEMBER_BYTES", 9)
    with pytest.raises(ValueError, match="a tar member declares 10 bytes"):
        list(tar_members(io.BytesIO(data.getvalue())))

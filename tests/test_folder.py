"""usi/data/folder.py: image folders: classes, odd and unreadable images flagged, skipped and counted, each
loader's own view."""
import itertools
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from usi.data.folder import FolderSplit
from usi.errors import UsageError

from conftest import read_jsonl, usi_cmd, usi_main
from helpers import one_error, strict_json, train_args


def image(path, mode="RGB", size=(12, 12), fmt="JPEG"):
    path.parent.mkdir(parents=True, exist_ok=True)
    color = {"RGB": (200, 10, 10), "L": 128, "CMYK": (0, 255, 255, 0), "RGBA": (1, 2, 3, 100)}[mode]
    Image.new(mode, size, color).save(path, fmt)


def test_odd_images_are_converted_and_broken_ones_skipped_and_counted(tmp_path):
    image(tmp_path / "a" / "rgb.jpg")
    image(tmp_path / "a" / "gray.jpg", "L")
    image(tmp_path / "a" / "cmyk.jpg", "CMYK")
    image(tmp_path / "b" / "alpha.png", "RGBA", fmt="PNG")
    (tmp_path / "b" / "empty.jpg").write_bytes(b"")
    (tmp_path / "b" / "text.jpg").write_text("not an image at all")
    full = tmp_path / "b" / "full.jpg"
    image(full, size=(64, 64))
    (tmp_path / "b" / "truncated.jpg").write_bytes(full.read_bytes()[:200])
    split = FolderSplit(tmp_path)
    ds = split.dataset(None)
    assert split.classes == ["a", "b"] and len(ds) == 8
    loaded = [ds[i] for i in range(len(ds))]
    assert all(img.mode == "RGB" for img, _ in loaded)
    cpu = torch.device("cpu")
    assert split.bad_count(cpu) == 3  # empty, text, truncated: each replaced by the next readable image
    again = [ds[i] for i in range(len(ds))]  # a second epoch: the same 3 files, not 6
    assert split.bad_count(cpu) == 3 and [y for _, y in again] == [y for _, y in loaded]


def test_empty_class_folder_is_refused(tmp_path):
    image(tmp_path / "a" / "x.jpg")
    (tmp_path / "b").mkdir()
    with pytest.raises(UsageError, match=r"class folder .*b has no images"):
        FolderSplit(tmp_path)


def test_val_class_missing_from_train_is_refused_and_labels_follow_train(tmp_path):
    for c in ("a", "b", "c"):
        image(tmp_path / "train" / c / "x.jpg")
    image(tmp_path / "val" / "c" / "x.jpg")  # a and b missing: c must keep label 2
    train = FolderSplit(tmp_path / "train")
    assert FolderSplit(tmp_path / "val", classes=train.classes).targets == [2]
    image(tmp_path / "val" / "zebra" / "x.jpg")
    with pytest.raises(UsageError, match="class folder 'zebra' that the training split does not have"):
        FolderSplit(tmp_path / "val", classes=train.classes)


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        FolderSplit(tmp_path / "nope")


def test_each_loader_reads_its_own_view_and_building_one_changes_no_other(image_root):
    from usi.data.loader import InputSpec
    from usi.runtime.distributed import Dist

    def train_t(img):
        return torch.zeros(3, 8, 8, dtype=torch.uint8)

    def eval_t(img):
        return torch.ones(3, 8, 8, dtype=torch.uint8)

    split, spec = FolderSplit(image_root / "train"), InputSpec(8, (0.5,) * 3, (0.5,) * 3)
    train = split.train_loader(train_t, batch_size=8, workers=0, repeats=1, seed=0, spec=spec, dist=Dist())
    val = split.eval_loader(eval_t, batch_size=8, workers=0, spec=spec, dist=Dist())
    assert train.loader.dataset.transform is train_t and val.dataset.transform is eval_t
    assert not hasattr(split, "transform")  # the split holds no transform for a later loader to overwrite
    assert val.dataset.cache_identity() == split.cache_identity(eval_t) != split.cache_identity(train_t)
    assert all(torch.equal(x, torch.full_like(x, -1.0)) for x, _ in itertools.islice(train.epoch(0), 2))


def test_all_unreadable_images_with_loader_workers_end_in_one_line(tmp_path):
    for cls in ("a", "b"):
        (tmp_path / "data" / "train" / cls).mkdir(parents=True)
        (tmp_path / "data" / "val" / cls).mkdir(parents=True)
        for i in range(8):
            (tmp_path / "data" / "train" / cls / f"{i}.jpg").write_bytes(b"not a jpeg")
        (tmp_path / "data" / "val" / cls / "0.jpg").write_bytes(b"")
    out = usi_main(*train_args(tmp_path / "data", tmp_path / "r", "data.workers=2"))
    one_error(out, "no readable image in")


def test_an_unreadable_val_image_is_left_out_and_reported_never_duplicated(image_root, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(image_root, data)
    sorted((data / "val").rglob("*.jpg"))[4].write_bytes(b"broken")
    out = usi_main(*train_args(data, tmp_path / "r", "sched.epochs=1", "sched.warmup_epochs=0", "data.workers=1"))
    assert out.returncode == 0, out.stderr[-2000:]
    (record,) = read_jsonl(tmp_path / "r" / "metrics.jsonl")
    assert record["raw"]["count"] == record["ema"]["count"] == 11
    assert record["val_bad_images"] == 1 and record["train"]["bad_images"] == 0  # this epoch's evaluation met it
    report = strict_json(usi_main("eval", str(tmp_path / "r" / "last.pt"), f"data.root={data}", "--json").stdout)
    assert report["images"] == 11 and report["unreadable"] == 1
    assert all(m["count"] == 11 for m in report["students"].values())
    split = FolderSplit(data / "val", classes=FolderSplit(data / "train").classes)
    assert len(split) == 12  # the file is still listed: reported as unreadable, not silently dropped


def test_odd_links_and_pixels_in_data_folders_are_refused_or_counted(image_root, tmp_path):
    loop = tmp_path / "loop"
    shutil.copytree(image_root, loop)
    (loop / "train" / "zzloop").symlink_to(loop / "train")  # a class folder that is its own split
    one_error(usi_main(*train_args(loop, tmp_path / "r")), "links back to")
    odd = tmp_path / "odd"
    shutil.copytree(image_root, odd)
    (odd / "val" / "circle" / "dangling.jpg").symlink_to(tmp_path / "nowhere.jpg")
    Image.fromarray(np.full((20, 20), np.nan, np.float32)).save(odd / "val" / "circle" / "nan.tiff")
    (odd / "val" / "circle" / "x\nusi: error: forged \x1b[2J.jpg").write_bytes(b"broken")  # names from outside
    out = usi_main(*train_args(odd, tmp_path / "r2", "sched.epochs=1", "sched.warmup_epochs=0"))
    assert out.returncode == 0, out.stderr
    (record,) = read_jsonl(tmp_path / "r2" / "metrics.jsonl")
    assert record["raw"]["count"] == 12 and record["val_bad_images"] == 3  # all listed, all unreadable
    assert "RuntimeWarning" not in out.stderr
    # the file's name is shown escaped: it forges no error line and sends the terminal no escape sequence
    assert "x\\nusi: error: forged \\x1b[2J.jpg" in out.stderr and "\x1b" not in out.stderr
    assert not any(line.startswith("usi: error") for line in out.stderr.splitlines())
    assert "\\nusi: error: forged" in (tmp_path / "r2" / "log.txt").read_text()


def test_unreadable_images_are_skipped_counted_and_stop_past_the_limit(image_root, tmp_path):
    import shutil
    data = tmp_path / "data"
    shutil.copytree(image_root, data)
    for i, path in enumerate(sorted((data / "train").rglob("*.jpg"))[:3]):
        path.write_bytes(b"" if i == 0 else b"junk")
    # a process of its own: the loader workers' warnings go to its stderr (this process's capture misses them)
    ok = usi_cmd(*train_args(data, tmp_path / "ok", "data.workers=2"))
    assert ok.returncode == 0, ok.stderr
    rows = read_jsonl(tmp_path / "ok" / "metrics.jsonl")
    assert rows[-1]["train"]["bad_images"] == 3  # distinct files, over both loader workers and epochs
    assert "skipped unreadable image" in ok.stderr
    stop = usi_main(*train_args(data, tmp_path / "stop", "data.max_bad_samples=2"))
    assert stop.returncode == 2 and "3 unreadable images so far exceeds data.max_bad_samples=2" in stop.stderr

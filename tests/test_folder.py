"""usi/data/folder.py: image folders: classes, odd and unreadable images flagged, skipped and counted, each
loader's own view."""
import itertools
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from usi.data.folder import FolderDataset, FolderSplit, held_out_counts
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


def test_minival_is_held_out_of_train_per_class_chosen_by_relative_path_alone(image_root, tmp_path):
    train = FolderSplit(image_root / "train")
    rest, held = train.hold_out(0.25)
    assert len(held) == 16 and len(rest) == 48 and rest.classes == held.classes == train.classes
    assert not set(rest.samples) & set(held.samples) and sorted(rest.samples + held.samples) == sorted(train.samples)
    assert torch.bincount(torch.tensor(held.targets)).tolist() == [4, 4, 4, 4]  # stratified
    assert held.bad is not rest.bad and len(held.bad) == 16  # each view flags its own files
    # the same files from a copy elsewhere: the choice depends on the relative paths, nothing else
    shutil.copytree(image_root / "train", tmp_path / "copy")
    again = FolderSplit(tmp_path / "copy").hold_out(0.25)[1]
    relative = lambda split: sorted(Path(p).relative_to(split.root) for p, _ in split.samples)  # noqa: E731
    assert relative(again) == relative(held)
    # a count: in proportion to each class's size, the rounding to the largest remainders, in class order
    assert held_out_counts([10, 10, 5], 6, ["a", "b", "c"]) == [3, 2, 1]
    assert held_out_counts([100, 50], 0.1, ["a", "b"]) == [10, 5]


@pytest.mark.parametrize("value, message", [
    ("0.99", "data.minival=0.99 holds out all 16 train images of class 'circle'; hold out fewer"),
    ("64", "data.minival=64 holds out 64 of the 64 train images: leave some to train on"),
    ("0.001", "data.minival=0.001 holds out no image of the 64 train images"),
])
def test_a_minival_the_train_split_cannot_give_is_one_line_before_any_run_directory(image_root, tmp_path, value,
                                                                                    message):
    one_error(usi_main(*train_args(image_root, tmp_path / "r", f"data.minival={value}")), message)


def test_a_class_map_picks_and_orders_the_classes_and_leaves_the_others_out(image_root, tmp_path):
    from usi import data
    from usi import recipe as R

    listed = (tmp_path / "map.txt")
    listed.write_text("ring\ncircle\n")
    for value in ("[ring, circle]", str(listed)):
        train, val = data.open_splits(R.load(None, [f"data.root={image_root}", f"data.class_map={value}"]).data)
        assert train.classes == val.classes == ["ring", "circle"]
        for split, per_class in ((train, 16), (val, 3)):
            assert len(split) == 2 * per_class and split.targets.count(0) == per_class
            assert all(f"/{['ring', 'circle'][y]}/" in path for path, y in split.samples)
    # usi eval opens val with the checkpoint's classes: the other folders are left out there too
    val = data.open_val_split(R.load(None, [f"data.root={image_root}", "data.class_map=[ring]"]).data, ["ring"])
    assert len(val) == 3


@pytest.mark.parametrize("value, message", [
    ("[ring, rign]", "data.class_map=['ring', 'rign'] names 'rign', which is not a class folder of "),
    ("[ring, ring]", "data.class_map=['ring', 'ring']: a class is named twice"),
    ("[]", "data.class_map=[] names no class"),
    ("{tmp}/nothing.txt", "nothing.txt' is not a file (one class folder name per line) nor a list of names"),
    ("{tmp}/twice.txt", "twice.txt': a class is named twice"),
    ("{tmp}/map.csv", "map.csv': Unsupported class map file extension (.csv)"),
])
def test_class_map_mistakes_are_one_line_before_any_run_directory(image_root, tmp_path, value, message):
    (tmp_path / "twice.txt").write_text("ring\ncircle\nring\n")
    (tmp_path / "map.csv").write_text("ring\n")
    out = usi_main(*train_args(image_root, tmp_path / "r", f"data.class_map={value.format(tmp=tmp_path)}"))
    one_error(out, message)
    if "rign" in value:
        assert "did you mean 'ring'?" in out.stderr
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("decode", ["pillow", "transform"])
def test_images_that_are_not_regular_files_are_counted_with_their_reason_and_never_block(tmp_path, caplog, decode):
    image(tmp_path / "a" / "x.jpg")
    image(tmp_path / "b" / "y.jpg")
    (tmp_path / "a" / "zero.jpg").symlink_to("/dev/zero")  # read whole, it never ends
    os.mkfifo(tmp_path / "b" / "pipe.jpg")  # opened for reading, it waits for a writer forever
    (tmp_path / "b" / "folder.jpg").mkdir()  # a folder named like an image is no image at all
    split = FolderSplit(tmp_path)
    assert len(split) == 4  # before: the pipe was not even listed (silently dropped)
    view = FolderDataset(split, None if decode == "pillow" else len, replace_bad=False)
    signal.alarm(30)  # a blocking open fails the test instead of hanging it
    try:
        read = [view[i] for i in range(len(view))]
    finally:
        signal.alarm(0)
    assert sum(item is None for item in read) == 2 and split.bad_count(torch.device("cpu")) == 2
    assert "pipe.jpg: OSError: is not a regular file (a named pipe)" in caplog.text
    assert "zero.jpg: OSError: is not a regular file (a character device)" in caplog.text

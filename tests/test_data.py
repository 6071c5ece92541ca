import collections
import itertools

import pytest
import torch
from PIL import Image

from usi.data.folder import FolderSplit
from usi.data.loader import EpochSampler, StridedSampler
from usi.errors import UsageError


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


def test_repeated_augmentation_repeats_each_sample_three_times_across_ranks():
    data = list(range(512))
    ranks = [EpochSampler(data, world=2, rank=r, repeats=3, seed=42) for r in range(2)]
    for s in ranks:
        s.set_epoch(0)
    seen = [i for s in ranks for i in s]
    assert len(seen) == 512  # an epoch is as long as the dataset, as in DeiT/timm
    counts = collections.Counter(seen)
    assert max(counts.values()) <= 3
    assert sum(1 for c in counts.values() if c == 3) >= 512 // 3 - 2
    assert len(ranks[0]) == len(ranks[1])  # every rank runs the same number of steps


def test_sampler_order_depends_on_seed_and_epoch_and_skips_on_resume():
    s = EpochSampler(list(range(300)), world=1, rank=0, repeats=3, seed=1)
    s.set_epoch(0)
    a = list(s)
    s.set_epoch(1)
    assert list(s) != a
    s.set_epoch(0, skip=10)
    assert list(s) == a[10:]
    other = EpochSampler(list(range(300)), world=1, rank=0, repeats=3, seed=2)
    other.set_epoch(0)
    assert list(other) != a


def test_strided_sampler_covers_every_index_exactly_once():
    shards = [list(StridedSampler(15, 4, r)) for r in range(4)]
    assert sorted(i for s in shards for i in s) == list(range(15))


def test_device_randaugment_batches_are_normalized_augmented_and_seeded(image_root):
    from usi import data
    from usi import recipe as R
    from usi.data.loader import AugmentOnDevice
    from usi.runtime.distributed import Dist

    recipe = R.load(None, [f"data.root={image_root}", "data.batch_size=8", "data.workers=0",
                           "aug.randaugment_on=device", "aug.repeats=1"])
    spec = data.InputSpec(16, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    train, _ = data.open_splits(recipe.data)
    loader = data.train_loader(train, recipe.data, recipe.aug, spec, seed=3, dist=Dist())
    assert isinstance(loader.prefetch, AugmentOnDevice)
    first = [x.clone() for x, _ in loader.epoch(0)]
    again = [x.clone() for x, _ in loader.epoch(0)]
    other = [x.clone() for x, _ in loader.epoch(1)]
    assert len(first) == 64 // 8 and first[0].shape == (8, 3, 16, 16) and first[0].dtype == torch.float32
    assert all(torch.equal(a, b) for a, b in zip(first, again))  # (seed, epoch) fixes every draw
    assert not torch.equal(first[0], other[0])
    pixels = torch.cat(first) * torch.tensor(spec.std).view(1, 3, 1, 1) + torch.tensor(spec.mean).view(1, 3, 1, 1)
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5  # normalized from 0..255 with the student's mean/std


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

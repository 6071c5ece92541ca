"""usi/data/loader.py: samplers (repeats, seeding, resume skip, strided validation) and device RandAugment batches."""
import collections

import torch

from usi.data import loader_workers, usable_cpus
from usi.data.loader import EpochSampler, StridedSampler

from conftest import usi_cmd
from helpers import train_args


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


def test_randaugment_fill_is_a_recipe_fact_not_the_students_mean():
    from types import SimpleNamespace

    from usi.data.loader import InputSpec, device_randaugment, fill_mean

    spec = InputSpec(24, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    aug = SimpleNamespace(auto_augment="rand-m7-mstd0.5-inc1", interpolation="bicubic", randaugment_fill=[124, 116, 104])
    assert device_randaugment(aug, spec).fill == (124, 116, 104)
    assert tuple(round(255 * v) for v in fill_mean(aug, spec)) == (124, 116, 104)  # timm's img_mean from it
    assert device_randaugment(SimpleNamespace(**{**vars(aug), "randaugment_fill": None}), spec).fill == (128,) * 3


def test_loader_workers_beyond_the_cpus_are_capped_with_a_line(image_root, tmp_path):
    """data.workers=100000 would start 100000 processes; each loader starts one per usable CPU, and says so,
    in the dry run as in a run."""
    cpus = usable_cpus()
    assert loader_workers(0, "train") == 0 and loader_workers(cpus, "train") == cpus
    assert loader_workers(100_000, "train") == cpus
    out = usi_cmd(*train_args(image_root, tmp_path / "r", "data.workers=100000"), "--dry-run")  # the real console
    assert out.returncode == 0, out.stderr[-2000:]
    for which in ("train", "val"):
        assert (f"data.workers=100000 is more than the {cpus} CPUs this process may use: the {which} loader "
                f"starts {cpus} workers") in out.stderr

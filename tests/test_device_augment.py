"""usi/data/device_augment.py: timm's RandAugment policy on the device (the config string, the per-sample
draw of op, magnitude, sign and interpolation, the batch dispatch) against timm's RandAugment."""
from __future__ import annotations

import math

import numpy as np
import pytest
import timm.data.auto_augment as timm_aa
import torch
from PIL import Image

from usi.data.device_augment import (
    BICUBIC,
    BILINEAR,
    NEAREST,
    DeviceRandAugment,
    apply_op,
    level_to_arg,
    parse_rand_config,
)

from helpers import FILL, as_batch

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: small tensors, one thread


def test_op_set_matches_timm():
    assert DeviceRandAugment("rand-m7-mstd0.5-inc1").names == timm_aa._RAND_INCREASING_TRANSFORMS
    assert DeviceRandAugment("rand-m9-mstd0.5").names == timm_aa._RAND_TRANSFORMS
    assert DeviceRandAugment("rand-m9-tweights").names == list(timm_aa._RAND_WEIGHTED_0)


def record_timm(config: str, draws: int) -> tuple[list, list, int]:
    """Run timm's RandAugment on a tiny image `draws` times, recording each applied op and its magnitude."""
    ra = timm_aa.rand_augment_transform(config, dict(translate_const=100, img_mean=FILL))
    applied, magnitudes = [], []
    for op in ra.ops:
        def level(magnitude, hparams, _name=op.name, _inner=op.level_fn):
            magnitudes.append(magnitude)
            return _inner(magnitude, hparams) if _inner else ()
        op.level_fn = level
        op.aug_fn = (lambda img, *a, _name=op.name, **k: applied.append(_name) or img)
    img = Image.new("RGB", (4, 4))
    np.random.seed(0)
    timm_aa.random.seed(0)
    for _ in range(draws):
        ra(img)
    return applied, magnitudes, draws * ra.num_layers


def test_choice_probability_and_magnitude_match_timm():
    config, draws = "rand-m7-mstd0.5-inc1", 4000
    applied, timm_magnitudes, slots = record_timm(config, draws)
    augment = DeviceRandAugment(config)
    draw = augment.draw(draws, torch.Generator().manual_seed(0))
    ours_applied = draw.op[draw.apply]
    assert abs(draw.apply.float().mean().item() - 0.5) < 0.015
    assert abs(len(applied) / slots - 0.5) < 0.015
    counts = torch.bincount(draw.op.flatten(), minlength=15).double() / draw.op.numel()
    assert counts.sub(1 / 15).abs().max() < 0.012  # uniform choice, with replacement
    for k, name in enumerate(augment.names):
        share_ours = (ours_applied == k).double().mean().item()
        share_timm = applied.count(name) / len(applied)
        assert abs(share_ours - share_timm) < 0.02, name
    ours_m = draw.magnitude[draw.apply].numpy()
    assert abs(ours_m.mean() - 7.0) < 0.03 and abs(ours_m.std() - 0.5) < 0.03
    timm_m = np.array(timm_magnitudes)
    assert abs(ours_m.mean() - timm_m.mean()) < 0.04 and abs(ours_m.std() - timm_m.std()) < 0.04
    assert (draw.negate.double().mean() - 0.5).abs() < 0.015
    assert set(draw.resample.unique().tolist()) == {BICUBIC}


def test_magnitude_clipping_uniform_and_mmax():
    g = torch.Generator().manual_seed(1)
    clipped = DeviceRandAugment("rand-m9-mstd2").draw(20000, g).magnitude
    assert clipped.min() >= 0 and clipped.max() == 10.0
    assert abs((clipped == 10).double().mean().item() - 0.5 * math.erfc(0.5 / math.sqrt(2))) < 0.01
    uniform = DeviceRandAugment("rand-m8-mstd101").draw(20000, g).magnitude
    assert abs(uniform.mean().item() - 4.0) < 0.05 and abs(uniform.std().item() - 8 / math.sqrt(12)) < 0.05
    high = DeviceRandAugment("rand-m12-mmax15").draw(2000, g).magnitude
    assert torch.all(high == 12.0)
    fixed = DeviceRandAugment("rand-m12").draw(2000, g).magnitude
    assert torch.all(fixed == 10.0)  # timm clips at 10 unless mmax says otherwise


def test_weighted_choice_without_replacement():
    draw = DeviceRandAugment("rand-n2-tweights").draw(6000, torch.Generator().manual_seed(0))
    assert torch.all(draw.op[0] != draw.op[1])
    ops, weights = timm_aa._get_weighted_transforms(timm_aa._RAND_WEIGHTED_0)
    rng = np.random.default_rng(0)
    timm_first = np.array([rng.choice(len(ops), 2, replace=False, p=weights) for _ in range(6000)])
    ours = torch.bincount(draw.op.flatten(), minlength=len(ops)).double() / draw.op.numel()
    theirs = np.bincount(timm_first.ravel(), minlength=len(ops)) / timm_first.size
    assert np.abs(ours.numpy() - theirs).max() < 0.02


def test_random_interpolation_mixes_bilinear_and_bicubic():
    draw = DeviceRandAugment("rand-m9", interpolation="random").draw(4000, torch.Generator().manual_seed(0))
    assert abs((draw.resample == BILINEAR).double().mean().item() - 0.5) < 0.02
    assert set(draw.resample.unique().tolist()) == {BILINEAR, BICUBIC}
    assert NEAREST not in draw.resample


def test_batch_dispatch_applies_the_drawn_op(images):
    """p=1, n=1: every sample gets exactly the op and magnitude drawn for it."""
    augment = DeviceRandAugment("rand-m6-n1-p1.0-mstd1", img_size=56, mean=(0.485, 0.456, 0.406))
    batch = as_batch(images * 5).to(torch.uint8)
    out = augment(batch, torch.Generator().manual_seed(3))
    draw = augment.draw(len(batch), torch.Generator().manual_seed(3))
    assert augment.fill == FILL
    for i in range(len(batch)):
        name = augment.names[draw.op[0, i]]
        arg = level_to_arg(name, draw.magnitude[0, i:i + 1], draw.negate[0, i:i + 1], augment.hparams)
        want = apply_op(name, batch[i:i + 1].float(), arg, fill=FILL, interpolation="bicubic")
        assert torch.equal(out[i:i + 1].float(), want), name


def test_same_seed_same_output(images):
    augment = DeviceRandAugment("rand-m9-mstd0.5-inc1")
    batch = as_batch(images * 4).to(torch.uint8)
    a = augment(batch, torch.Generator().manual_seed(5))
    b = augment(batch, torch.Generator().manual_seed(5))
    c = augment(batch, torch.Generator().manual_seed(6))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a, batch)


def test_dtypes_and_batch_sizes(images):
    augment = DeviceRandAugment("rand-m9-n3-mstd0.5-inc1")
    batch = as_batch(images).to(torch.uint8)
    out_u8 = augment(batch, torch.Generator().manual_seed(0))
    out_f = augment(batch.float(), torch.Generator().manual_seed(0))
    assert out_u8.dtype == torch.uint8 and out_f.dtype == torch.float32
    assert torch.equal(out_u8.float(), out_f)
    one = augment(batch[:1], torch.Generator().manual_seed(0))
    assert one.shape == (1, 3, 56, 72) and one.dtype == torch.uint8
    empty = augment(batch[:0], torch.Generator().manual_seed(0))
    assert empty.shape == (0, 3, 56, 72)
    with pytest.raises(ValueError, match="shape"):
        augment(batch[0])


GOOD = ["rand-m9-mstd0.5", "rand-m7-mstd0.5-inc1", "rand-m9-n3-mstd1-p0.7", "rand-mstd101", "rand-m9-mmax15",
        "rand-tweights-m5", "rand-m9-foo", "rand"]
BAD = ["rnd-m9", "rand-m9-x5", "rand-m9.5", "rand-n1.5", "rand-mstd0.5x", "rand-inc1-foo3", "rand-m9-7"]


@pytest.mark.parametrize("config", GOOD)
def test_config_parsed_like_timm(config):
    ra = timm_aa.rand_augment_transform(config, dict(translate_const=100, img_mean=FILL))
    ours = parse_rand_config(config)
    op = ra.ops[0]
    assert ours.num_layers == ra.num_layers
    assert ours.magnitude == op.magnitude and ours.prob == op.prob
    assert ours.magnitude_std == op.magnitude_std
    assert ours.magnitude_max == (op.magnitude_max or 10)
    assert DeviceRandAugment(config).names == [o.name for o in ra.ops]


@pytest.mark.parametrize("config", BAD)
def test_bad_config_raises_like_timm(config):
    with pytest.raises((AssertionError, ValueError)):
        timm_aa.rand_augment_transform(config, dict(translate_const=100, img_mean=FILL))
    with pytest.raises(ValueError, match="RandAugment config") as info:
        DeviceRandAugment(config)
    assert "\n" not in str(info.value)


def test_unsupported_op_set_raises():
    with pytest.raises(ValueError, match="GaussianBlur"):
        DeviceRandAugment("rand-t3a")

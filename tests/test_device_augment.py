"""Batched device RandAugment against timm's RandAugment on PIL.

Per-op tolerances (mean absolute error, 0..255 units, against timm's op functions called on PIL with the
same argument and fill; measured on these synthetic images and on ImageNet val photos at 224 px):
  - AutoContrast, Equalize, Invert, Posterize*, Solarize*, SolarizeAdd, Color*, Contrast*, Brightness*,
    Sharpness*: identical (MAE 0, every pixel equal); asserted MAE 0.
  - Rotate, ShearX/Y, TranslateX/YRel, bicubic: MAE <= 0.002, no pixel off by more than 1 (float32 vs
    Pillow's double truncating differently); asserted MAE < 0.01, max 1.
  - the same with bilinear: MAE <= 0.0001, max 1 (computed in float64); asserted MAE < 0.01, max 1.
  - Rotate with nearest: MAE <= 0.007 (Pillow uses 16.16 fixed point for nearest affine, a few edge pixels
    swap between fill and image); asserted < 0.05.
Pillow 13 rejects Posterize with 0 bits (timm's Posterize below magnitude 2.5, PosterizeIncreasing at 10);
the device op keeps the older Pillow result, black, which is checked on its own.
"""
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
    SUPPORTED_OPS,
    DeviceRandAugment,
    apply_op,
    level_to_arg,
    parse_rand_config,
)

FILL = (124, 116, 104)  # timm's img_mean for the ImageNet mean
HPARAMS = dict(translate_const=100, translate_pct=0.45, img_mean=FILL)
GEOMETRIC = ("Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY", "TranslateXRel", "TranslateYRel")
PIL_MODES = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small tensors: one thread is faster, and far faster on a machine whose cores are busy elsewhere."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def photo(width: int, height: int, seed: int) -> np.ndarray:
    """A photo-like uint8 RGB image: soft colour blobs, a texture, noise, and a dark and a bright corner."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    img = np.full((height, width, 3), 110.0 + 30 * seed)
    for _ in range(10):
        cx, cy = rng.random(2)
        weight = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * (0.05 + 0.25 * rng.random()) ** 2))[..., None]
        img = img * (1 - weight) + rng.random(3) * 255 * weight
    img += 15 * np.sin(50 * x + 30 * y)[..., None] + rng.normal(0, 4, img.shape)
    img[:6, :6] -= 90 * (seed % 2)
    img[-6:, -6:] += 90 * (seed % 3 == 0)
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    return [photo(72, 56, seed) for seed in range(6)]  # not square: width and height must not be swapped


def as_batch(arrays) -> torch.Tensor:
    return torch.stack([torch.from_numpy(a.copy()).permute(2, 0, 1) for a in arrays]).float()


def timm_op(name: str, array: np.ndarray, magnitude: float, negate: bool, interpolation: str) -> np.ndarray:
    """timm's own level function and op on PIL, with the sign forced."""
    original = timm_aa._randomly_negate
    timm_aa._randomly_negate = (lambda v: -v) if negate else (lambda v: v)
    try:
        level = timm_aa.LEVEL_TO_ARG[name]
        args = level(magnitude, HPARAMS) if level else ()
    finally:
        timm_aa._randomly_negate = original
    out = timm_aa.NAME_TO_OP[name](Image.fromarray(array), *args, fillcolor=FILL, resample=PIL_MODES[interpolation])
    return np.asarray(out)


def device_op(name: str, arrays, magnitude: float, negate: bool, interpolation: str) -> torch.Tensor:
    n = len(arrays)
    arg = level_to_arg(name, torch.full((n,), magnitude, dtype=torch.float64), torch.full((n,), negate), HPARAMS)
    return apply_op(name, as_batch(arrays), arg, fill=FILL, interpolation=interpolation)


def posterize_bits(name: str, magnitude: float) -> int:
    return timm_aa.LEVEL_TO_ARG[name](magnitude, HPARAMS)[0] if "Posterize" in name else 8


MAGNITUDES = (0.0, 2.6, 5.0, 7.3, 10.0)


@pytest.mark.parametrize("name", SUPPORTED_OPS)
def test_op_matches_timm_pil(images, name):
    for magnitude in MAGNITUDES:
        if posterize_bits(name, magnitude) < 1:
            continue  # Pillow 13 raises; see test_posterize_zero_bits_is_black
        for negate in (False, True):
            got = device_op(name, images, magnitude, negate, "bicubic")
            want = as_batch([timm_op(name, a, magnitude, negate, "bicubic") for a in images])
            diff = (got - want).abs()
            if name in GEOMETRIC:
                assert diff.mean() < 0.01 and diff.max() <= 1, (magnitude, negate, diff.mean(), diff.max())
            else:
                assert diff.max() == 0, (magnitude, negate, diff.mean(), diff.max())


@pytest.mark.parametrize("name", ["Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"])
@pytest.mark.parametrize("interpolation,tolerance", [("bilinear", 0.01), ("nearest", 0.05)])
def test_geometric_op_other_interpolations(images, name, interpolation, tolerance):
    for magnitude, negate in ((4.1, False), (9.0, True)):
        got = device_op(name, images, magnitude, negate, interpolation)
        want = as_batch([timm_op(name, a, magnitude, negate, interpolation) for a in images])
        diff = (got - want).abs()
        assert diff.mean() < tolerance, (magnitude, diff.mean())
        if interpolation == "bilinear":
            assert diff.max() <= 1


def test_posterize_zero_bits_is_black(images):
    """Pillow 13 refuses 0 bits; older Pillow (and this op) keep none: the image turns black."""
    assert posterize_bits("Posterize", 2.0) == 0 and posterize_bits("PosterizeIncreasing", 10.0) == 0
    assert device_op("Posterize", images, 2.0, False, "bicubic").max() == 0
    assert device_op("PosterizeIncreasing", images, 10.0, False, "bicubic").max() == 0


def test_level_args_match_timm():
    magnitudes = np.concatenate([np.linspace(0, 10, 41), np.random.default_rng(0).uniform(0, 10, 40)])
    for name in SUPPORTED_OPS:
        level = timm_aa.LEVEL_TO_ARG[name]
        if level is None:
            continue
        for negate in (False, True):
            got = level_to_arg(name, torch.tensor(magnitudes), torch.full((len(magnitudes),), negate), HPARAMS)
            original = timm_aa._randomly_negate
            timm_aa._randomly_negate = (lambda v: -v) if negate else (lambda v: v)
            try:
                want = [level(float(m), HPARAMS)[0] for m in magnitudes]
            finally:
                timm_aa._randomly_negate = original
            assert got.tolist() == pytest.approx(want, abs=1e-12), name


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

"""usi/data/augment_ops.py: timm's RandAugment ops, batched, against timm's RandAugment on PIL.

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
the device op keeps the older Pillow result, black, which is checked on its own."""
from __future__ import annotations

import numpy as np
import pytest
import timm.data.auto_augment as timm_aa
import torch
from PIL import Image

from usi.data.augment_ops import SUPPORTED_OPS, apply_op, level_to_arg

from helpers import FILL, as_batch

HPARAMS = dict(translate_const=100, translate_pct=0.45, img_mean=FILL)
GEOMETRIC = ("Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY", "TranslateXRel", "TranslateYRel")
PIL_MODES = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: small tensors, one thread


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

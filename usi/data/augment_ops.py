"""timm's RandAugment ops on uint8-valued NCHW batches, on the device: the arithmetic, op by op.


timm's RandAugment costs about 1.75 ms an image on one loader core (PIL, one image at a time). Here the
same policy runs on the uint8 NCHW batch after it reached the device, before normalization, with each
sample's ops, magnitudes, signs and application drawn independently, as timm draws them per image.

Each op reproduces the Pillow arithmetic that timm's op calls, not just its intent, so that a model
trained with it sees what it saw before:
  - AutoContrast, Equalize: Pillow's lookup tables (double-precision scale, integer histogram steps);
  - Color, Contrast, Brightness, Sharpness: Image.blend in float32 truncated toward zero, Pillow's
    integer RGB->L weights, the rounded 3x3 SMOOTH kernel with an unfiltered one-pixel border;
  - Rotate, Shear*, Translate*: Pillow's inverse affine sampling at pixel centres, its a=-1 cubic
    (not grid_sample's a=-0.75), edge-clamped neighbours, and timm's img_mean fill for any output pixel
    whose source point falls outside the image.
Every op leaves integer values in 0..255, as a PIL image would between ops.

Per-sample parameters are drawn from the torch.Generator passed in, on that generator's device. A CPU
generator (the default) keeps the per-op sample selection on the host, so the device never has to be
synchronized to find out which samples an op applies to (the small index and argument tensors are copied
to the device without blocking). Ops loop in Python over the op set, never over samples.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor

LEVEL_DENOM = 10.0  # timm's _LEVEL_DENOM: magnitude M maps to the fraction M / 10 of an op's range
NEAREST, BILINEAR, BICUBIC = 0, 1, 2
INTERPOLATIONS = {"nearest": (NEAREST,), "bilinear": (BILINEAR,), "bicubic": (BICUBIC,),
                  "random": (BILINEAR, BICUBIC)}  # timm's _RANDOM_INTERPOLATION


# ----------------------------------------------------------------------------------------------
# Level -> op argument, per sample (timm's LEVEL_TO_ARG on tensors; float64 keeps timm's int() cuts)


def _negated(value: Tensor, negate: Tensor) -> Tensor:
    return torch.where(negate, -value, value)


def _rotate_level(m: Tensor, negate: Tensor, hp: dict) -> Tensor:
    return _negated((m / LEVEL_DENOM) * 30.0, negate)


def _enhance_level(m: Tensor, negate: Tensor, hp: dict) -> Tensor:
    return (m / LEVEL_DENOM) * 1.8 + 0.1


def _enhance_increasing_level(m: Tensor, negate: Tensor, hp: dict) -> Tensor:
    return (1.0 + _negated((m / LEVEL_DENOM) * 0.9, negate)).clamp(min=0.1)


def _shear_level(m: Tensor, negate: Tensor, hp: dict) -> Tensor:
    return _negated((m / LEVEL_DENOM) * 0.3, negate)


def _translate_abs_level(m: Tensor, negate: Tensor, hp: dict) -> Tensor:
    return _negated((m / LEVEL_DENOM) * float(hp["translate_const"]), negate)


def _translate_rel_level(m: Tensor, negate: Tensor, hp: dict) -> Tensor:
    return _negated((m / LEVEL_DENOM) * hp["translate_pct"], negate)


def _posterize_level(m: Tensor, negate: Tensor, hp: dict) -> Tensor:
    return torch.trunc((m / LEVEL_DENOM) * 4)


def _posterize_increasing_level(m: Tensor, negate: Tensor, hp: dict) -> Tensor:
    return 4 - _posterize_level(m, negate, hp)


def _posterize_original_level(m: Tensor, negate: Tensor, hp: dict) -> Tensor:
    return _posterize_level(m, negate, hp) + 4


def _solarize_level(m: Tensor, negate: Tensor, hp: dict) -> Tensor:
    return torch.trunc((m / LEVEL_DENOM) * 256).clamp(max=256)


def _solarize_increasing_level(m: Tensor, negate: Tensor, hp: dict) -> Tensor:
    return 256 - _solarize_level(m, negate, hp)


def _solarize_add_level(m: Tensor, negate: Tensor, hp: dict) -> Tensor:
    return torch.trunc((m / LEVEL_DENOM) * 110).clamp(max=128)


def _desaturate_level(m: Tensor, negate: Tensor, hp: dict) -> Tensor:
    return (0.5 + 0.5 * (m / LEVEL_DENOM)).clamp(0.5, 1.0)


# ----------------------------------------------------------------------------------------------
# Ops on float32 (b, 3, H, W) batches holding integers 0..255; `arg` is (b,) on the batch's device


def _per_sample(value: Tensor) -> Tensor:
    return value.to(torch.float32).view(-1, 1, 1, 1)


def _apply_lut(x: Tensor, lut: Tensor) -> Tensor:
    """x (b, c, H, W) through a per-sample, per-channel table lut (b, c, 256)."""
    b, c = x.shape[:2]
    index = x.reshape(b, c, -1).long()
    return torch.gather(lut.to(x.dtype), 2, index).view_as(x)


def _blend(degenerate: Tensor, x: Tensor, factor: Tensor) -> Tensor:
    """Image.blend(degenerate, x, factor): float32 `a + f * (b - a)`, clipped, truncated toward zero."""
    return torch.trunc((degenerate + _per_sample(factor) * (x - degenerate)).clamp(0, 255))


def _luma(x: Tensor) -> Tensor:
    """Pillow's RGB -> L, (b, 1, H, W): fixed-point ITU-R 601 weights, rounded (exact in float32)."""
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    return torch.floor((r * 19595 + g * 38470 + b * 7471 + 32768) / 65536)


def auto_contrast(x: Tensor, arg: Tensor, resample: Tensor, fill: Tensor) -> Tensor:
    lo = x.amin(dim=(2, 3)).double()
    hi = x.amax(dim=(2, 3)).double()
    levels = torch.arange(256, device=x.device, dtype=torch.float64)
    span = (hi - lo).clamp(min=1)
    scale = torch.full_like(span, 255.0) / span  # not `255.0 / span`: torch computes that as 255 * (1 / span)
    offset = -lo * scale
    lut = torch.trunc(levels * scale[..., None] + offset[..., None]).clamp(0, 255)
    lut = torch.where((hi > lo)[..., None], lut, levels)  # a flat channel is left alone
    return _apply_lut(x, lut)


def equalize(x: Tensor, arg: Tensor, resample: Tensor, fill: Tensor) -> Tensor:
    """ImageOps.equalize per channel, in Pillow's integer arithmetic."""
    b, c, h, w = x.shape
    values = x.reshape(b * c, h * w).long()
    hist = torch.zeros(b * c, 256, dtype=torch.int64, device=x.device)
    hist.scatter_add_(1, values, torch.ones_like(values))
    last = hist.gather(1, values.amax(dim=1, keepdim=True)).squeeze(1)  # count of the highest level present
    step = (h * w - last) // 255
    below = torch.cumsum(hist, dim=1) - hist  # pixels strictly below each level
    lut = ((step // 2)[:, None] + below) // step.clamp(min=1)[:, None]
    levels = torch.arange(256, device=x.device).expand_as(lut)
    keep = ((hist > 0).sum(dim=1) <= 1) | (step == 0)
    lut = torch.where(keep[:, None], levels, lut.clamp(max=255))  # Image.point clips the table to 255
    return _apply_lut(x, lut.view(b, c, 256))


def invert(x: Tensor, arg: Tensor, resample: Tensor, fill: Tensor) -> Tensor:
    return 255 - x


def posterize(x: Tensor, bits: Tensor, resample: Tensor, fill: Tensor) -> Tensor:
    step = _per_sample(torch.exp2((8 - bits).clamp(min=0)))  # keep `bits` high bits; 8 or more: unchanged
    return torch.floor(x / step) * step


def solarize(x: Tensor, threshold: Tensor, resample: Tensor, fill: Tensor) -> Tensor:
    return torch.where(x < _per_sample(threshold), x, 255 - x)


def solarize_add(x: Tensor, add: Tensor, resample: Tensor, fill: Tensor) -> Tensor:
    return torch.where(x < 128, (x + _per_sample(add)).clamp(max=255), x)


def color(x: Tensor, factor: Tensor, resample: Tensor, fill: Tensor) -> Tensor:
    return _blend(_luma(x), x, factor)


def desaturate(x: Tensor, amount: Tensor, resample: Tensor, fill: Tensor) -> Tensor:
    return color(x, (1.0 - amount).clamp(0.0, 1.0), resample, fill)


def contrast(x: Tensor, factor: Tensor, resample: Tensor, fill: Tensor) -> Tensor:
    luma = _luma(x).double()
    pixels = luma.shape[2] * luma.shape[3]
    mean = torch.floor(luma.sum(dim=(1, 2, 3)) / pixels + 0.5)  # int(ImageStat mean + 0.5)
    return _blend(_per_sample(mean), x, factor)


def brightness(x: Tensor, factor: Tensor, resample: Tensor, fill: Tensor) -> Tensor:
    return _blend(torch.zeros_like(x), x, factor)


def sharpness(x: Tensor, factor: Tensor, resample: Tensor, fill: Tensor) -> Tensor:
    """Blend with ImageFilter.SMOOTH ([[1,1,1],[1,5,1],[1,1,1]] / 13, rounded), whose one-pixel border
    Pillow leaves unfiltered. Integer sums by slicing: exact on every device (no TF32 convolutions)."""
    h, w = x.shape[2:]
    total = 4 * x[:, :, 1:-1, 1:-1]
    for dy in range(3):
        for dx in range(3):
            total = total + x[:, :, dy:dy + h - 2, dx:dx + w - 2]
    smooth = x.clone()
    smooth[:, :, 1:-1, 1:-1] = torch.floor(total / 13 + 0.5)
    return _blend(smooth, x, factor)


# ---------------------------------------------------------------------- geometric ops


def _rotation_matrix(degrees: Tensor, width: int, height: int) -> Tensor:
    """Image.rotate's inverse matrix about the image centre, (b, 6)."""
    angle = -torch.deg2rad(degrees.double())
    cos, sin = torch.cos(angle), torch.sin(angle)
    cx, cy = width / 2.0, height / 2.0
    return torch.stack([cos, sin, cos * -cx + sin * -cy + cx, -sin, cos, -sin * -cx + cos * -cy + cy], dim=1)


def _matrix(*coefficients: Union[Tensor, float]) -> Tensor:
    """Stack six per-sample coefficients (tensors or numbers) into (n, 6) affine matrices."""
    ref = next(v for v in coefficients if isinstance(v, Tensor))
    cols = [v.double() if isinstance(v, Tensor) else torch.full_like(ref, v, dtype=torch.float64)
            for v in coefficients]
    return torch.stack(cols, dim=1)


def _cubic(v1: Tensor, v2: Tensor, v3: Tensor, v4: Tensor, d: Tensor) -> Tensor:
    """Pillow's BICUBIC macro (the a = -1 cubic), in its operation order."""
    p2 = -v1 + v3
    p3 = 2 * (v1 - v2) + v3 - v4
    p4 = -v1 + v2 - v3 + v4
    return v2 + d * (p2 + d * (p3 + d * p4))


def _linear(v1: Tensor, v2: Tensor, d: Tensor) -> Tensor:
    return v1 + (v2 - v1) * d  # Pillow's BILINEAR macro


def affine_sample(x: Tensor, matrix: Tensor, fill: Tensor, *, mode: int,
                  axis: Optional[str] = None) -> Tensor:
    """Image.transform(size, AFFINE, matrix, resample, fillcolor) for a batch x (b, C, H, W), matrix (b, 6).

    Output pixel (x, y) reads the input at matrix @ (x + 0.5, y + 0.5, 1): a source point outside the image
    gives `fill`, neighbours past the edge repeat the edge pixel, the result is clipped and truncated as
    Pillow does for 8-bit images. Coordinates are float64, as Pillow's.
    axis 'x' ('y'): the matrix keeps every row (column) in place, so only horizontal (vertical) taps can
    have weight; skipping the others is exact (the a = -1 cubic at offset 0 is the centre tap) and 4x cheaper.
    """
    b, c, h, w = x.shape
    m = matrix.to(device=x.device, dtype=torch.float64).view(b, 6, 1, 1)
    ys = (torch.arange(h, device=x.device, dtype=torch.float64) + 0.5).view(1, h, 1)
    xs = (torch.arange(w, device=x.device, dtype=torch.float64) + 0.5).view(1, 1, w)
    src_x = m[:, 0] * xs + m[:, 1] * ys + m[:, 2]
    src_y = m[:, 3] * xs + m[:, 4] * ys + m[:, 5]
    inside = (src_x >= 0) & (src_x < w) & (src_y >= 0) & (src_y < h)
    # channels last, one row of c values per pixel: one index_select fetches all channels of a tap.
    # Bilinear blends in float64 like Pillow (float32 flips a truncation on ~3% of pixels of a fractional
    # translation); bicubic stays float32 (its 16 taps cost 2x in float64, for <0.2% pixels off by one).
    values = torch.float64 if mode == BILINEAR else x.dtype
    pixels = x.permute(0, 2, 3, 1).reshape(b * h * w, c).to(values)
    first = (torch.arange(b, device=x.device) * (h * w)).view(b, 1, 1)

    def fetch(row_start: Tensor, col: Tensor) -> Tensor:
        return pixels.index_select(0, (row_start + col).view(-1)).view(b, h, w, c)

    if mode == NEAREST:
        # inside the image truncation is floor; outside points are clamped only to stay addressable
        out = fetch(first + src_y.long().clamp_(0, h - 1) * w, src_x.long().clamp_(0, w - 1))
    else:
        offsets, combine = ((0, 1), _linear) if mode == BILINEAR else ((-1, 0, 1, 2), _cubic)
        fx, fy = src_x - 0.5, src_y - 0.5
        x0, y0 = torch.floor(fx), torch.floor(fy)
        dx, dy = (fx - x0).to(values).unsqueeze(-1), (fy - y0).to(values).unsqueeze(-1)
        x0, y0 = x0.long(), y0.long()
        cols = [(x0 + dc).clamp_(0, w - 1) for dc in ((0,) if axis == "y" else offsets)]
        row_starts = [first + (y0 + dr).clamp_(0, h - 1) * w for dr in ((0,) if axis == "x" else offsets)]
        rows = []
        for row_start in row_starts:
            taps = [fetch(row_start, col) for col in cols]
            rows.append(taps[0] if axis == "y" else combine(*taps, dx))
        out = rows[0] if axis == "x" else combine(*rows, dy)
        out = torch.trunc(out.clamp(0, 255))
    out = out.permute(0, 3, 1, 2).to(x.dtype)
    return torch.where(inside.unsqueeze(1), out, fill.view(1, c, 1, 1).to(x.dtype))


def _geometric(make_matrix: Callable, axis: Optional[str] = None) -> Callable:
    """An op from a function (arg, width, height) -> (b, 6) inverse matrices; per-sample resample codes."""
    def op(x: Tensor, arg: Tensor, resample: Tensor, fill: Tensor) -> Tensor:
        matrix = make_matrix(arg, x.shape[3], x.shape[2])
        out = torch.empty_like(x)
        for mode in resample.unique().tolist():  # resample lives with the generator: no device sync here
            idx = (resample == mode).nonzero().squeeze(1).to(x.device, non_blocking=True)
            out[idx] = affine_sample(x[idx], matrix[idx], fill, mode=int(mode), axis=axis)
        return out
    return op


rotate = _geometric(_rotation_matrix)
shear_x = _geometric(lambda f, w, h: _matrix(1, f, 0, 0, 1, 0), axis="x")
shear_y = _geometric(lambda f, w, h: _matrix(1, 0, 0, f, 1, 0), axis="y")
translate_x_abs = _geometric(lambda px, w, h: _matrix(1, 0, px, 0, 1, 0), axis="x")
translate_y_abs = _geometric(lambda px, w, h: _matrix(1, 0, 0, 0, 1, px), axis="y")
translate_x_rel = _geometric(lambda pct, w, h: _matrix(1, 0, pct.double() * w, 0, 1, 0), axis="x")
translate_y_rel = _geometric(lambda pct, w, h: _matrix(1, 0, 0, 0, 1, pct.double() * h), axis="y")


@dataclass(frozen=True)
class Op:
    level: Optional[Callable]  # (magnitude, negate, hparams) -> arg, all (b,); None: the op takes no argument
    apply: Callable  # (x, arg, resample, fill) -> x


OPS = {
    "AutoContrast": Op(None, auto_contrast),
    "Equalize": Op(None, equalize),
    "Invert": Op(None, invert),
    "Rotate": Op(_rotate_level, rotate),
    "Posterize": Op(_posterize_level, posterize),
    "PosterizeIncreasing": Op(_posterize_increasing_level, posterize),
    "PosterizeOriginal": Op(_posterize_original_level, posterize),
    "Solarize": Op(_solarize_level, solarize),
    "SolarizeIncreasing": Op(_solarize_increasing_level, solarize),
    "SolarizeAdd": Op(_solarize_add_level, solarize_add),
    "Color": Op(_enhance_level, color),
    "ColorIncreasing": Op(_enhance_increasing_level, color),
    "Contrast": Op(_enhance_level, contrast),
    "ContrastIncreasing": Op(_enhance_increasing_level, contrast),
    "Brightness": Op(_enhance_level, brightness),
    "BrightnessIncreasing": Op(_enhance_increasing_level, brightness),
    "Sharpness": Op(_enhance_level, sharpness),
    "SharpnessIncreasing": Op(_enhance_increasing_level, sharpness),
    "ShearX": Op(_shear_level, shear_x),
    "ShearY": Op(_shear_level, shear_y),
    "TranslateX": Op(_translate_abs_level, translate_x_abs),
    "TranslateY": Op(_translate_abs_level, translate_y_abs),
    "TranslateXRel": Op(_translate_rel_level, translate_x_rel),
    "TranslateYRel": Op(_translate_rel_level, translate_y_rel),
    "Desaturate": Op(_desaturate_level, desaturate),
}
SUPPORTED_OPS = tuple(OPS)


def level_to_arg(name: str, magnitude: Tensor, negate: Tensor, hparams: dict) -> Tensor:
    """timm's LEVEL_TO_ARG[name] for a batch of (already clipped) magnitudes; `negate` replaces timm's
    coin flip. Ops without an argument give zeros."""
    op = OPS[name]
    magnitude = magnitude.double()
    if op.level is None:
        return torch.zeros_like(magnitude)
    return op.level(magnitude, negate, hparams).double()


def apply_op(name: str, x: Tensor, arg: Tensor, *, fill: Sequence[float] = (128, 128, 128),
             interpolation: Union[str, Tensor] = "bicubic") -> Tensor:
    """Op `name` (timm's NAME_TO_OP) on float32 x (b, 3, H, W) with per-sample argument arg (b,), as returned
    by level_to_arg; `interpolation` names one mode or holds per-sample codes (NEAREST/BILINEAR/BICUBIC)."""
    if isinstance(interpolation, str):
        interpolation = torch.full((x.shape[0],), INTERPOLATIONS[interpolation][0], dtype=torch.int64)
    fill_t = torch.tensor(fill, dtype=torch.float32, device=x.device)
    return OPS[name].apply(x, arg.to(x.device), interpolation.cpu(), fill_t)



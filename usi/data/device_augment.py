"""timm's RandAugment policy, batched on the device: the config string, the per-sample draw, and the
transform that applies the ops of usi/data/augment_ops.py to a whole batch. The CPU loader workers only
decode, crop, resize and flip.

timm's RandAugment costs about 1.75 ms an image on one loader core (PIL, one image at a time). Here the
same policy runs on the uint8 NCHW batch after it reached the device, before normalization, with each
sample's ops, magnitudes, signs and application drawn independently, as timm draws them per image.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from timm.data.auto_augment import rand_augment_choices
from timm.data.constants import IMAGENET_DEFAULT_MEAN
from torch import Tensor

from usi.data.augment_ops import (
    BICUBIC,
    BILINEAR,
    INTERPOLATIONS,
    LEVEL_DENOM,
    NEAREST,
    OPS,
    SUPPORTED_OPS,
    apply_op,
    level_to_arg,
)

__all__ = ["DeviceRandAugment", "RandAugmentConfig", "parse_rand_config", "apply_op", "level_to_arg", "OPS",
           "SUPPORTED_OPS", "INTERPOLATIONS", "NEAREST", "BILINEAR", "BICUBIC"]


# ----------------------------------------------------------------------------------------------
# Config strings


@dataclass(frozen=True)
class RandAugmentConfig:
    """A parsed 'rand-...' string, with timm's defaults."""
    magnitude: float = 10.0
    num_layers: int = 2
    prob: float = 0.5
    magnitude_std: float = 0.0  # inf: magnitude uniform in [0, magnitude]
    magnitude_max: float = LEVEL_DENOM  # magnitudes are clipped to [0, magnitude_max]
    increasing: bool = False
    transforms: Optional[str] = None  # the 't' section: a named op set ('weights', ...)


def parse_rand_config(config_str: str) -> RandAugmentConfig:
    """Parse the way timm's rand_augment_transform does: sections without a digit are ignored, the
    first 'mstd', 'mmax' and 't' count, the last 'm', 'n', 'p', 'inc'. What timm rejects raises ValueError."""
    parts = config_str.split("-")
    if parts[0] != "rand":
        raise ValueError(f"RandAugment config {config_str!r}: must start with 'rand', not {parts[0]!r}")
    found: dict = {}
    for part in parts[1:]:
        if part.startswith("t"):
            found.setdefault("transforms", part[1:])
            continue
        pieces = re.split(r"(\d.*)", part)
        if len(pieces) < 2:
            continue  # timm skips a section with no number in it
        key, text = pieces[:2]
        if key not in _SECTIONS:
            raise ValueError(f"RandAugment config {config_str!r}: unknown section {part!r}")
        field, parse, first_wins = _SECTIONS[key]
        try:
            value = parse(text)
        except ValueError:
            raise ValueError(f"RandAugment config {config_str!r}: bad number in section {part!r}") from None
        if first_wins:
            found.setdefault(field, value)
        else:
            found[field] = value
    if found.get("magnitude_max") == 0:
        found["magnitude_max"] = LEVEL_DENOM  # timm: `magnitude_max or _LEVEL_DENOM`
    return RandAugmentConfig(**found)


def _parse_mstd(text: str) -> float:
    value = float(text)
    return math.inf if value > 100 else value  # timm: mstd > 100 means uniform sampling


# section key -> (config field, parser, first occurrence wins); timm uses hparams.setdefault for mstd/mmax
_SECTIONS = {
    "mstd": ("magnitude_std", _parse_mstd, True),
    "mmax": ("magnitude_max", int, True),
    "inc": ("increasing", lambda text: bool(int(text)), False),
    "m": ("magnitude", int, False),
    "n": ("num_layers", int, False),
    "p": ("prob", float, False),
}


# ----------------------------------------------------------------------------------------------
# The policy


@dataclass
class RandAugmentDraw:
    """Per-layer, per-sample random choices, each (num_layers, batch)."""
    op: Tensor  # index into DeviceRandAugment.names
    apply: Tensor  # bool: the op runs (probability prob)
    magnitude: Tensor  # float64, noise added and clipped
    negate: Tensor  # bool: timm's _randomly_negate coin
    resample: Tensor  # NEAREST / BILINEAR / BICUBIC for geometric ops


class DeviceRandAugment:
    """timm's `rand_augment_transform(config_str, hparams)` as create_transform builds it, on NCHW batches.

    img_size and mean are create_transform's: they set translate_const (int(0.45 * min size)) and the fill
    colour of geometric ops (the mean in 0..255). interpolation: the training recipe's ('random' picks
    bilinear or bicubic per op, as timm does when create_transform passes no interpolation).
    Call with a uint8 or float batch (float: integer values 0..255) and a torch.Generator; the result has
    the input's dtype.
    """

    def __init__(self, config_str: str, img_size: Union[int, Sequence[int]] = 224,
                 mean: Sequence[float] = IMAGENET_DEFAULT_MEAN, interpolation: Optional[str] = "bicubic",
                 translate_pct: float = 0.45, transforms: Optional[Union[Sequence[str], dict]] = None):
        self.config = parse_rand_config(config_str)
        self.config_str = config_str
        size_min = min(img_size) if isinstance(img_size, (tuple, list)) else img_size
        self.hparams = dict(translate_const=int(size_min * 0.45), translate_pct=translate_pct)
        self.fill = tuple(min(255, round(255 * v)) for v in mean)
        interpolation = interpolation or "random"
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation {interpolation!r}: expected one of {', '.join(INTERPOLATIONS)}")
        self.interpolation = interpolation
        self.names, self.weights = self._op_set(transforms)
        if self.weights is not None and self.config.num_layers > len(self.names):
            raise ValueError(f"RandAugment config {config_str!r}: n{self.config.num_layers} exceeds the "
                             f"{len(self.names)} ops of a weighted set (chosen without replacement)")
        self._fills: dict = {}

    def _op_set(self, transforms) -> tuple[list[str], Optional[Tensor]]:
        """The op names and, for a weighted set, their choice probabilities (timm's rules)."""
        if transforms is None:
            transforms = rand_augment_choices(self.config.transforms or "", increasing=self.config.increasing)
        weights = None
        if isinstance(transforms, dict):
            names = list(transforms)
            weights = torch.tensor([transforms[n] for n in names], dtype=torch.float64)
            weights = weights / weights.sum()
        else:
            names = list(transforms)
        missing = [n for n in names if n not in OPS]
        if missing:
            raise ValueError(f"RandAugment config {self.config_str!r}: op {missing[0]} is not implemented on the "
                             f"device (supported: {', '.join(SUPPORTED_OPS)})")
        return names, weights

    def draw(self, batch: int, generator: Optional[torch.Generator] = None) -> RandAugmentDraw:
        """All random choices for a batch, on the generator's device, in a fixed order (reproducible)."""
        generator = generator or torch.default_generator
        cfg, device = self.config, generator.device
        shape = (cfg.num_layers, batch)
        if self.weights is not None and batch > 0 and cfg.num_layers > 0:  # timm: weighted, without replacement
            probs = self.weights.to(device).expand(batch, -1)
            op = torch.multinomial(probs, cfg.num_layers, replacement=False, generator=generator).T
        else:
            op = torch.randint(len(self.names), shape, generator=generator, device=device)
        apply = torch.rand(shape, generator=generator, device=device, dtype=torch.float64) <= cfg.prob
        noise = torch.randn(shape, generator=generator, device=device, dtype=torch.float64)
        uniform = torch.rand(shape, generator=generator, device=device, dtype=torch.float64)
        if cfg.magnitude_std == math.inf:
            magnitude = uniform * cfg.magnitude
        else:
            magnitude = cfg.magnitude + cfg.magnitude_std * noise
        magnitude = magnitude.clamp(0.0, cfg.magnitude_max)
        negate = torch.rand(shape, generator=generator, device=device, dtype=torch.float64) > 0.5
        modes = torch.tensor(INTERPOLATIONS[self.interpolation], dtype=torch.int64, device=device)
        pick = torch.randint(len(modes), shape, generator=generator, device=device)
        return RandAugmentDraw(op=op.contiguous(), apply=apply, magnitude=magnitude, negate=negate,
                               resample=modes[pick])

    def _fill_on(self, device: torch.device) -> Tensor:
        if device not in self._fills:
            self._fills[device] = torch.tensor(self.fill, dtype=torch.float32, device=device)
        return self._fills[device]

    def __call__(self, x: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected an (N, 3, H, W) batch, got shape {tuple(x.shape)}")
        work = x.to(torch.float32, copy=True)
        if x.is_floating_point():
            work = work.round_().clamp_(0, 255)
        draw = self.draw(x.shape[0], generator)
        fill = self._fill_on(x.device)
        for layer in range(self.config.num_layers):
            for k, name in enumerate(self.names):
                idx = ((draw.op[layer] == k) & draw.apply[layer]).nonzero().squeeze(1)
                if idx.numel() == 0:
                    continue
                arg = level_to_arg(name, draw.magnitude[layer, idx], draw.negate[layer, idx], self.hparams)
                # non_blocking: a plain host-to-device copy would wait for the device's stream
                idx_x = idx.to(x.device, non_blocking=True)
                arg = arg.to(x.device, non_blocking=True)
                work[idx_x] = OPS[name].apply(work[idx_x], arg, draw.resample[layer, idx], fill)
        return work.to(x.dtype)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.config_str!r}, ops={len(self.names)}, fill={self.fill}, "
                f"interpolation={self.interpolation!r}, translate_const={self.hparams['translate_const']})")

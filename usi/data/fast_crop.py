"""The loader workers' share of timm's training transform, cheaper: decode, crop, resize, flip.

timm's train transform (RandomResizedCropAndInterpolation, RandomHorizontalFlip, then RandAugment and
MaybePILToTensor) decodes the whole JPEG at full size, copies the crop out, resizes it with Pillow (no
SIMD in plain Pillow) and runs RandAugment on PIL, all on the loader's CPU cores. Here, per image:

  - the crop is drawn by timm's own RandomResizedCropAndInterpolation.get_params on the image's
    full-resolution size (read from the header, before any decoding), so the crop geometry is timm's;
  - the JPEG is decoded with libjpeg's DCT-domain scaling (Image.draft) at 1/2, 1/4 or 1/8 when the crop,
    so reduced, is still larger than the output: the image is then only ever downscaled, as it would be
    from the full decode, and the scaled IDCT costs less than decoding every full-size pixel;
  - only the crop is copied out, and resized by torch's antialiased uint8 resampler (a port of
    Pillow-SIMD: the same filters and weights as Pillow, vectorized, about 4x faster than plain Pillow);
  - the flip is drawn with torch's RNG as torchvision's RandomHorizontalFlip does.
RandAugment moves to the device (usi.data.device_augment), after the uint8 batch arrives.

Pillow's reducing_gap (a box pre-reduction before the filter) is not needed: after the DCT reduction the
remaining scale factor is below about 2.7 unless the crop exceeds 16x the output size, and torch's
vectorized resampler is cheaper at such factors than Pillow's reduce + resample would be.
"""
from __future__ import annotations

import io
import math
import random
from dataclasses import dataclass
from typing import Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from timm.data.transforms import RandomResizedCropAndInterpolation

from usi.data.images import to_rgb

try:
    import simplejpeg  # libjpeg-turbo in a wheel of its own; without it, Pillow's path does the same work
except ImportError:
    simplejpeg = None

DRAFT_SCALES = (8, 4, 2)  # libjpeg's DCT scalings that Image.draft can ask for, largest first
# recipe interpolation -> torch modes; 'random' is timm's _RANDOM_INTERPOLATION (bilinear, bicubic)
TORCH_MODES = {"bicubic": ("bicubic",), "bilinear": ("bilinear",), "nearest": ("nearest-exact",),
               "random": ("bilinear", "bicubic")}


def draft_scale(crop_w: int, crop_h: int, out_w: int, out_h: int) -> int:
    """The largest DCT reduction (8, 4, 2 or 1) that keeps the crop larger than the output size, by one
    reduced pixel to spare for rounding the crop box to whole reduced pixels (see reduced_box)."""
    for scale in DRAFT_SCALES:
        if crop_w >= scale * (out_w + 1) and crop_h >= scale * (out_h + 1):
            return scale
    return 1


def reduced_box(crop: tuple[int, int, int, int], scale: float, size: tuple[int, int]) -> tuple[int, int, int, int]:
    """The crop (top, left, height, width) of the full image as an integer (left, top, right, bottom) box of the
    image decoded at 1/scale, of `size` (w, h). Reduced pixel k covers full pixels [k * scale, (k + 1) * scale);
    each edge is rounded to the nearest reduced pixel edge (off by at most scale / 2 full pixels), so with
    draft_scale's spare pixel the box is never smaller than the output: the image is only ever downscaled."""
    top, left, height, width = crop

    def edge(x: float) -> int:
        return math.floor(x / scale + 0.5)
    return edge(left), edge(top), min(edge(left + width), size[0]), min(edge(top + height), size[1])


def rgb_or_gray(img: Image.Image) -> Image.Image:
    """RGB and L stay (L is widened to RGB after the resize, which is the same as before it); any other mode
    (CMYK, P, RGBA, LA, I;16, ...) goes through to_rgb, as load_rgb's does (never clipped)."""
    return img if img.mode in ("RGB", "L") else to_rgb(img)


@dataclass(frozen=True)
class CropDraw:
    """One image's random choices: timm's crop (full-resolution pixels), the resize mode, the flip."""
    top: int
    left: int
    height: int
    width: int
    mode: str  # a torch interpolation mode
    flip: bool

    @property
    def box(self) -> tuple[int, int, int, int]:
        return self.top, self.left, self.height, self.width


class FastRandomResizedCrop:
    """Lazily opened PIL image -> uint8 CHW tensor (3, size, size): timm's RandomResizedCropAndInterpolation and
    RandomHorizontalFlip(hflip), with a DCT-scaled JPEG decode and torch's resize. Picklable.

    The output is what timm's train transform gives with use_prefetcher=True before RandAugment (a uint8 CHW
    tensor, as MaybePILToTensor returns); timm's fast_collate stacks it. Pass the image straight from
    Image.open (not loaded, so the decode can be scaled); a loaded image, or a non-JPEG, is used at full size.
    """

    def __init__(self, size: Union[int, Sequence[int]], scale: Sequence[float] = (0.08, 1.0),
                 ratio: Sequence[float] = (3.0 / 4.0, 4.0 / 3.0), interpolation: str = "bicubic",
                 hflip: float = 0.5):
        self.size = (size, size) if isinstance(size, int) else tuple(size)  # (h, w), like timm
        self.scale, self.ratio = tuple(scale), tuple(ratio)
        if interpolation not in TORCH_MODES:
            raise ValueError(f"interpolation {interpolation!r}: expected one of {', '.join(TORCH_MODES)}")
        self.interpolation = interpolation
        self.hflip = hflip

    def __call__(self, img: Image.Image) -> torch.Tensor:
        crop = self.draw(img)
        return self.resize_flip(self.decode_crop(img, crop), crop)

    def from_bytes(self, data: bytes) -> torch.Tensor:
        """An image file's bytes -> uint8 (3, size, size). A JPEG goes through libjpeg-turbo directly
        (simplejpeg: no PIL image object, and M/8 scalings, finer than draft's 1/2^k); anything else, or a
        JPEG it cannot convert to RGB (CMYK), through Pillow."""
        if simplejpeg is not None and data[:2] == b"\xff\xd8":
            try:
                return self.from_jpeg(data)
            except (ValueError, RuntimeError):
                pass  # e.g. CMYK: Pillow converts it
        with Image.open(io.BytesIO(data)) as img:
            return self(rgb_or_gray(img))

    def from_jpeg(self, data: bytes) -> torch.Tensor:
        return self.resize_flip(*self.decode_crop_jpeg(data))

    def decode_crop_jpeg(self, data: bytes) -> tuple[np.ndarray, CropDraw]:
        """from_jpeg's first half, as decode_crop is __call__'s: the drawn crop, as uint8 HWC (HW for a
        grayscale JPEG), from the JPEG decoded at the smallest harmless M/8 scaling; and the draw."""
        full_h, full_w, colorspace, _ = simplejpeg.decode_jpeg_header(data)
        crop = self.draw(torch.empty(0, full_h, full_w))  # draw reads only the size
        out_h, out_w = self.size
        # the smallest M/8 scaling that keeps the crop larger than the output (by a pixel, as draft_scale)
        pixels = simplejpeg.decode_jpeg(data, colorspace="GRAY" if colorspace == "Gray" else "RGB",
                                        min_height=math.ceil(full_h * (out_h + 1) / crop.height),
                                        min_width=math.ceil(full_w * (out_w + 1) / crop.width))
        scale = full_w / pixels.shape[1]
        left, top, right, bottom = reduced_box(crop.box, scale, (pixels.shape[1], pixels.shape[0]))
        return np.ascontiguousarray(pixels[top:bottom, left:right]), crop

    def draw(self, img: Union[Image.Image, torch.Tensor]) -> CropDraw:
        """The random choices, in timm's order: get_params, then (for 'random') random.choice of the
        interpolation, then torchvision's flip coin from torch's RNG. Only the image's size is read."""
        top, left, height, width = RandomResizedCropAndInterpolation.get_params(img, self.scale, self.ratio)
        modes = TORCH_MODES[self.interpolation]
        mode = random.choice(modes) if len(modes) > 1 else modes[0]
        flip = self.hflip > 0 and torch.rand(1).item() < self.hflip
        return CropDraw(top=top, left=left, height=height, width=width, mode=mode, flip=flip)

    def decode_crop(self, img: Image.Image, crop: CropDraw) -> np.ndarray:
        """The crop, as uint8 HWC (HW for grayscale), from the image decoded at the largest harmless DCT
        reduction."""
        full_w, full_h = img.size
        scale = draft_scale(crop.width, crop.height, self.size[1], self.size[0])
        if scale > 1:
            # ask for the reduced size itself: draft picks the largest power of two that keeps the image at
            # least that size, i.e. exactly `scale`; it returns None for a loaded image or a non-JPEG.
            drafted = img.draft("RGB", (full_w // scale, full_h // scale))
            scale = full_w / drafted[1][2] if drafted else 1
        img = rgb_or_gray(img)
        box = reduced_box(crop.box, scale, img.size)
        # np.array copies (writable, which torch.from_numpy wants); only the crop is copied
        return np.array(img.crop(box))

    def resize_flip(self, pixels: np.ndarray, crop: CropDraw) -> torch.Tensor:
        """uint8 HWC or HW crop -> uint8 (3, h, w), resized with torch's antialiased filters and maybe flipped."""
        tensor = torch.from_numpy(pixels)
        tensor = tensor.unsqueeze(-1) if tensor.ndim == 2 else tensor
        batch = tensor.permute(2, 0, 1).unsqueeze(0)  # a channels-last view: the layout torch's SIMD path wants
        if tuple(batch.shape[2:]) != self.size:
            antialias = crop.mode != "nearest-exact"
            batch = F.interpolate(batch, size=self.size, mode=crop.mode, antialias=antialias)
        out = batch[0].flip(-1) if crop.flip else batch[0]
        return out.expand(3, -1, -1).contiguous()  # grayscale -> RGB, as convert('RGB') would

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(size={self.size}, scale={self.scale}, ratio={self.ratio}, "
                f"interpolation={self.interpolation}, hflip={self.hflip})")

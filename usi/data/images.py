"""How an image file becomes pixels: every mode to 8-bit RGB, and transforms handed the file's bytes.

Datasets hand their transform the file's bytes, not decoded pixels: usi's fast training crop decodes
only what its crop needs (libjpeg-turbo's scaled decode). Every other transform gets the decoded 8-bit
RGB image it expects.
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")
LAZY_MODES = ("RGB", "L")  # modes a lazy transform can take undecoded (JPEG's; DCT scaling works on them)


def load_rgb(source) -> Image.Image:
    """Any PIL-readable image (a path or a file object) as 8-bit RGB (see to_rgb). EXIF orientation is
    not applied, as in timm's and torchvision's ImageNet loaders: the pretrained teachers were trained on
    images read that way."""
    with Image.open(source) as img:
        return to_rgb(img)


def to_8bit(img: Image.Image) -> Image.Image:
    """16-bit, 32-bit integer and float images as 8-bit L, never clipped (convert("RGB") clips: a 16-bit
    gradient comes out almost all white). 16-bit: 0..65535 to 0..255. 32-bit integer: values within
    0..255 stay (some PNG encoders), within 0..65535 are 16-bit; float: within 0..1 or 0..255 so scaled.
    Anything beyond (32-bit counts, HDR floats, negative values) is scaled by the image's own range: 0, or
    its lowest value if that is negative, to black, its highest to white. A float image with NaN or
    infinity is refused (the file is skipped and counted as unreadable): no scale shows it. Other modes
    are returned as they are."""
    if not (img.mode.startswith("I;16") or img.mode in ("I", "F")):
        return img
    values = np.asarray(img, dtype=np.float64)
    if not np.isfinite(values).all():
        raise ValueError(f"a {img.mode} image with NaN or infinite pixels")
    low, high = values.min(initial=0), values.max(initial=0)  # 0 within: non-negative data keeps its ratios
    if img.mode.startswith("I;16") or (img.mode == "I" and low >= 0 and 255 < high <= 65535):
        values = values * (255 / 65535)
    elif img.mode == "F" and low >= 0 and high <= 1:
        values = values * 255
    elif low < 0 or high > 255:  # beyond every fixed range: the image's own range
        values = (values - low) * (255 / (high - low) if high > low else 0)
    return Image.fromarray(values.round().clip(0, 255).astype(np.uint8), "L")  # clip: rounding only


def to_rgb(img: Image.Image) -> Image.Image:
    """A decoded 8-bit RGB copy of an opened image, whatever its mode: 16-bit, 32-bit and float images
    through to_8bit; premultiplied alpha (La, RGBa) undone; alpha dropped, as timm's loaders do; CMYK,
    YCbCr, LAB, HSV, palette and 1-bit images converted by Pillow. A mode Pillow cannot convert raises
    ValueError: the image is skipped and counted as unreadable."""
    if img.mode == "La":  # Pillow converts La to LA only
        img = img.convert("LA")
    return to_8bit(img).convert("RGB")


class Decoded:
    """Hands a transform its image: the file's bytes go to a lazy transform (usi's fast crop) that decodes
    only what it needs; others (timm's transforms) get them decoded to 8-bit RGB. A decoded image (a
    shard sample decoded once for its repeats) is handed on as it is."""

    def __init__(self, transform, lazy: bool = False):
        self.transform, self.lazy = transform, lazy

    def __call__(self, source: bytes | Image.Image):
        if isinstance(source, bytes):
            if self.lazy:
                return self.transform.from_bytes(source)
            with Image.open(io.BytesIO(source)) as img:
                return self.transform(to_rgb(img))
        return self.transform(source if self.lazy and source.mode in LAZY_MODES else to_rgb(source))

    def __repr__(self) -> str:  # the eval transform's repr is part of the teacher-logit cache key
        return repr(self.transform)

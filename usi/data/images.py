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
    """Any PIL-readable image (a path or a file object) as 8-bit RGB.

    Grayscale, CMYK, palette and alpha images are converted. 16-bit and float images are scaled to 8
    bits first: convert("RGB") would clip them (a 16-bit gradient comes out almost all white). EXIF
    orientation is not applied, as in timm's and torchvision's ImageNet loaders: the pretrained
    teachers were trained on images read that way.
    """
    with Image.open(source) as img:
        return to_rgb(img)


def to_8bit(img: Image.Image) -> Image.Image:
    if img.mode.startswith("I;16") or img.mode == "I":
        values = np.asarray(img, dtype=np.float64)
        # 16-bit range; a 32-bit "I" image holding 8-bit values (some PNG encoders) stays as it is
        scale = 1.0 if img.mode == "I" and values.max(initial=0) <= 255 else 255 / 65535
        return Image.fromarray(np.clip(values * scale, 0, 255).round().astype(np.uint8), "L")
    if img.mode == "F":
        values = np.asarray(img, dtype=np.float64)
        if not np.isfinite(values).all():
            raise ValueError("a float image with NaN or infinite pixels")
        scale = 255.0 if values.min(initial=0) >= 0 and values.max(initial=0) <= 1 else 1.0  # [0, 1] or [0, 255]
        return Image.fromarray(np.clip(values * scale, 0, 255).round().astype(np.uint8), "L")
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    """A decoded 8-bit RGB copy of an opened image."""
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

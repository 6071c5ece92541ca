"""The quickstart's dataset: ten classes of drawn shapes on noisy, textured backgrounds, as JPEG files.

Learnable by a small network in a few CPU minutes, yet hard enough under RandomResizedCrop and
mixup that a teacher's soft labels carry information (a crop may cut the shape away).
"""
from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

CLASSES = ("circle", "ring", "square", "frame", "triangle", "diamond", "cross", "star", "hexagon", "bar")
DONE = ".complete"


def polygon(cx, cy, r, *, n, rot, inner=None):
    """A regular n-gon, or an n-pointed star when `inner` (the inner radius) is given."""
    corners = n * 2 if inner else n
    pts = []
    for i in range(corners):
        radius = inner if inner and i % 2 else r
        a = rot + 2 * math.pi * i / corners
        pts.append((cx + radius * math.cos(a), cy + radius * math.sin(a)))
    return pts


def draw_shape(draw: ImageDraw.ImageDraw, kind: str, cx, cy, *, r, rot, color, width):
    if kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
    elif kind == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=color, width=width)
    elif kind == "square":
        draw.polygon(polygon(cx, cy, r, n=4, rot=rot), fill=color)
    elif kind == "frame":
        draw.polygon(polygon(cx, cy, r, n=4, rot=rot), outline=color, width=width)
    elif kind == "triangle":
        draw.polygon(polygon(cx, cy, r, n=3, rot=rot), fill=color)
    elif kind == "diamond":
        draw.polygon([(cx, cy - r), (cx + 0.6 * r, cy), (cx, cy + r), (cx - 0.6 * r, cy)], fill=color)
    elif kind == "cross":
        for a in (rot, rot + math.pi / 2):
            dx, dy = r * math.cos(a), r * math.sin(a)
            draw.line([(cx - dx, cy - dy), (cx + dx, cy + dy)], fill=color, width=width)
    elif kind == "star":
        draw.polygon(polygon(cx, cy, r, n=5, rot=rot, inner=0.45 * r), fill=color)
    elif kind == "hexagon":
        draw.polygon(polygon(cx, cy, r, n=6, rot=rot), fill=color)
    elif kind == "bar":
        dx, dy = r * math.cos(rot), r * math.sin(rot)
        draw.line([(cx - dx, cy - dy), (cx + dx, cy + dy)], fill=color, width=max(2, width))


def make_image(kind: str, rng: np.random.RandomState, size: int) -> Image.Image:
    scale = 2  # draw large, then downsample: anti-aliased edges like a photo's
    s = size * scale
    bg = rng.randint(0, 256, 3)
    fg = (bg + rng.randint(70, 186, 3)) % 256  # far enough from the background in every channel
    noise = rng.normal(0, rng.uniform(2, 8), (s // 4, s // 4, 3))
    texture = np.clip(bg + np.kron(noise, np.ones((4, 4, 1))), 0, 255).astype(np.uint8)
    img = Image.fromarray(texture)
    draw = ImageDraw.Draw(img)
    for _ in range(rng.randint(0, 2)):  # distractor lines
        pts = [tuple(rng.randint(0, s, 2)) for _ in range(2)]
        draw.line(pts, fill=tuple(rng.randint(0, 256, 3)), width=int(rng.randint(1, 3)) * scale)
    r = rng.uniform(0.34, 0.48) * s
    cx, cy = rng.uniform(r * 0.8, s - r * 0.8, 2)
    # keyword order = the order of the random draws
    draw_shape(draw, kind, cx, cy, r=r, rot=rng.uniform(0, 2 * math.pi), color=tuple(int(v) for v in fg),
               width=int(max(2, r * rng.uniform(0.15, 0.3))))
    img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0, 0.8) * scale))
    return img.resize((size, size), Image.BICUBIC)


def make_dataset(root: str | Path, train_per_class: int = 200, val_per_class: int = 50, size: int = 40,
                 seed: int = 0, num_classes: int = len(CLASSES)) -> Path:
    """Write root/train/<class>/*.jpg and root/val/<class>/*.jpg; a finished dataset is reused."""
    root = Path(root)
    marker = root / DONE
    want = f"{train_per_class} {val_per_class} {size} {seed} {num_classes}"
    if marker.is_file() and marker.read_text() == want:
        return root
    for split, per_class, offset in (("train", train_per_class, 0), ("val", val_per_class, 1)):
        for label, kind in enumerate(CLASSES[:num_classes]):
            folder = root / split / kind
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                rng = np.random.RandomState([seed, offset, label, i])
                make_image(kind, rng, size).save(folder / f"{kind}_{i:05d}.jpg", quality=90)
    marker.write_text(want)
    return root


def digest(root: str | Path) -> str:
    """sha256 of every file's path and bytes under root, in order: whether two machines trained on the same
    generated images (the JPEG encoder's version could change them)."""
    h = hashlib.sha256()
    for path in sorted(p for p in Path(root).rglob("*") if p.is_file()):
        h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


"""The fast crop path against timm's RandomResizedCropAndInterpolation + RandomHorizontalFlip.

Images are synthetic and photo-like (soft colour blobs, a texture, sensor noise, JPEG quality 90).
Tolerances, measured on these images and on 334 ImageNet val photos:
  - no DCT reduction: the output matches timm's, seeded alike, to MAE <= 0.09 (0.025 mean on the photos;
    torch's resampler is a port of Pillow-SIMD's, so only rounding differs), asserted < 0.15;
  - DCT-reduced decode (crop aligned to the reduction): MAE 0.3-0.4 against full decode + Pillow bicubic
    (1.5 on the photos, about as far as Pillow's own bilinear is from its bicubic there), asserted < 1.0;
  - geometry: each effective crop edge within scale/2 full pixels of timm's; two-sample KS statistics of
    area, aspect and centre against timm's own draws below 0.045 (the 0.1% critical value at n = 4000).
"""
from __future__ import annotations

import io
import pickle
import random

import numpy as np
import pytest
import torch
from PIL import Image, JpegImagePlugin
from timm.data import create_transform
from timm.data.transforms import RandomResizedCropAndInterpolation

from usi.data.fast_crop import CropDraw, FastRandomResizedCrop, draft_scale, reduced_box

SIZE = 224


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: small tensors, one thread


def photo(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A smooth, photo-like RGB image: soft colour blobs, a sinusoidal texture and a little noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    img = np.full((height, width, 3), 128.0)
    for _ in range(14):
        cx, cy = rng.random(2)
        radius = 0.05 + 0.3 * rng.random()
        weight = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * radius ** 2))[..., None]
        img = img * (1 - weight) + rng.random(3) * 255 * weight
    img += 18 * np.sin(60 * x + 35 * y)[..., None] + rng.normal(0, 3, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def encode(array: np.ndarray, mode: str | None = None, fmt: str = "JPEG") -> bytes:
    img = Image.fromarray(array)
    if mode:
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


@pytest.fixture(scope="module")
def small_jpeg() -> bytes:
    return encode(photo(500, 375, seed=1))  # ImageNet's typical size: no crop is big enough for a reduction


@pytest.fixture(scope="module")
def large_jpeg() -> bytes:
    return encode(photo(1600, 1200, seed=2))


def lazy(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data))


def seeded(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def timm_crop_flip(interpolation: str = "bicubic", hflip: float = 0.5):
    """Today's transform without RandAugment (and without colour jitter, which RandAugment turns off)."""
    return create_transform(SIZE, is_training=True, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                            interpolation=interpolation, hflip=hflip, color_jitter=None, use_prefetcher=True)


def mae(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().mean().item()


@pytest.mark.parametrize("interpolation", ["bicubic", "random"])
def test_matches_timm_seeded_alike(small_jpeg, interpolation):
    """Same seeds, same crop, interpolation and flip as timm's transform; pixels equal up to rounding."""
    reference, fast = timm_crop_flip(interpolation), FastRandomResizedCrop(SIZE, interpolation=interpolation)
    errors = []
    for seed in range(24):
        seeded(seed)
        want = reference(lazy(small_jpeg).convert("RGB"))
        seeded(seed)
        got = fast(lazy(small_jpeg))
        assert got.shape == want.shape == (3, SIZE, SIZE) and got.dtype == want.dtype == torch.uint8
        errors.append(mae(got, want))
    assert max(errors) < 0.15, errors


def test_crop_drawn_on_full_resolution_size(large_jpeg, monkeypatch):
    sizes = []
    original = RandomResizedCropAndInterpolation.get_params

    def spy(img, scale, ratio):
        sizes.append(tuple(img.size))
        return original(img, scale, ratio)
    monkeypatch.setattr(RandomResizedCropAndInterpolation, "get_params", staticmethod(spy))
    fast = FastRandomResizedCrop(SIZE)
    for seed in range(5):
        seeded(seed)
        fast(lazy(large_jpeg))
    assert sizes == [(1600, 1200)] * 5


def test_draft_decode_close_to_full_decode(large_jpeg, monkeypatch):
    """A crop aligned to the DCT reduction: the reduced decode loses little against full decode + bicubic."""
    scales = []
    original = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        result = original(self, mode, size)
        scales.append(self.size)
        return result
    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    fast = FastRandomResizedCrop(SIZE)
    cases = [(0, 0, 1200, 1600, 4), (64, 96, 960, 912, 4), (200, 400, 640, 560, 2)]  # top, left, h, w, scale
    for top, left, height, width, scale in cases:
        assert draft_scale(width, height, SIZE, SIZE) == scale
        crop = CropDraw(top, left, height, width, "bicubic", False)
        got = fast.resize_flip(fast.decode_crop(lazy(large_jpeg), crop), crop)
        full = lazy(large_jpeg).convert("RGB").crop((left, top, left + width, top + height))
        want = torch.from_numpy(np.array(full.resize((SIZE, SIZE), Image.BICUBIC))).permute(2, 0, 1)
        assert mae(got, want) < 1.0, (top, left, height, width)
    assert scales == [(400, 300), (400, 300), (800, 600)]  # the decode really was reduced


def ks_statistic(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the empirical CDFs."""
    grid = np.concatenate([a, b])
    cdf_a = np.searchsorted(np.sort(a), grid, side="right") / len(a)
    cdf_b = np.searchsorted(np.sort(b), grid, side="right") / len(b)
    return float(np.abs(cdf_a - cdf_b).max())


def effective_box(fast: FastRandomResizedCrop, crop: CropDraw, full: tuple[int, int]) -> np.ndarray:
    """The region of the full image the fast path actually resizes: (left, top, right, bottom), full pixels."""
    scale = draft_scale(crop.width, crop.height, SIZE, SIZE)
    reduced = (-(-full[0] // scale), -(-full[1] // scale))  # the size Image.draft decodes to
    return np.array(reduced_box(crop.box, scale, reduced), float) * scale


def geometry(boxes: np.ndarray, full: tuple[int, int]) -> dict[str, np.ndarray]:
    width, height = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    return {"area": width * height / (full[0] * full[1]), "log aspect": np.log(width / height),
            "centre x": (boxes[:, 0] + boxes[:, 2]) / 2 / full[0],
            "centre y": (boxes[:, 1] + boxes[:, 3]) / 2 / full[1]}


def test_crop_geometry_distribution_is_timms(large_jpeg):
    full, draws = (1600, 1200), 4000
    img = lazy(large_jpeg)  # only the header is read: draw() needs the size alone
    fast = FastRandomResizedCrop(SIZE)
    random.seed(0)
    ours, edge_errors, reduced = [], [], 0
    for _ in range(draws):
        crop = fast.draw(img)
        box = effective_box(fast, crop, full)
        timm_box = np.array([crop.left, crop.top, crop.left + crop.width, crop.top + crop.height])
        scale = draft_scale(crop.width, crop.height, SIZE, SIZE)
        edge_errors.append(np.abs(box - timm_box).max() / scale)
        reduced += scale > 1
        ours.append(box)
    random.seed(1)  # timm's own draws, an independent stream
    theirs = []
    for _ in range(draws):
        top, left, height, width = RandomResizedCropAndInterpolation.get_params(img, (0.08, 1.0), (3 / 4, 4 / 3))
        theirs.append([left, top, left + width, top + height])
    assert max(edge_errors) <= 0.5  # every edge within half a reduced pixel of timm's
    assert reduced > draws // 4  # the reduction was exercised
    ours_g, theirs_g = geometry(np.array(ours), full), geometry(np.array(theirs, float), full)
    for name in ours_g:
        assert ks_statistic(ours_g[name], theirs_g[name]) < 0.045, name
        assert abs(np.median(ours_g[name]) - np.median(theirs_g[name])) < 0.03, name


def test_flip_rate_and_mirror(small_jpeg):
    img = lazy(small_jpeg)
    seeded(0)
    flips = [FastRandomResizedCrop(SIZE, hflip=0.5).draw(img).flip for _ in range(3000)]
    assert abs(np.mean(flips) - 0.5) < 0.03
    assert not any(FastRandomResizedCrop(SIZE, hflip=0.0).draw(img).flip for _ in range(200))
    fast = FastRandomResizedCrop(SIZE)
    plain = CropDraw(40, 60, 300, 280, "bicubic", False)
    mirrored = CropDraw(40, 60, 300, 280, "bicubic", True)
    a = fast.resize_flip(fast.decode_crop(lazy(small_jpeg), plain), plain)
    b = fast.resize_flip(fast.decode_crop(lazy(small_jpeg), mirrored), mirrored)
    assert torch.equal(a.flip(-1), b)


def test_draft_scale_keeps_crop_larger_than_output():
    assert draft_scale(2 * (SIZE + 1), 2 * (SIZE + 1), SIZE, SIZE) == 2
    assert draft_scale(2 * (SIZE + 1) - 1, 4000, SIZE, SIZE) == 1
    assert draft_scale(8 * (SIZE + 1), 8 * (SIZE + 1), SIZE, SIZE) == 8
    assert draft_scale(8 * (SIZE + 1), 8 * (SIZE + 1) - 1, SIZE, SIZE) == 4
    rng = np.random.default_rng(0)
    for _ in range(2000):
        width, height = rng.integers(SIZE, 3000, size=2)
        left, top = rng.integers(0, 500, size=2)
        scale = draft_scale(width, height, SIZE, SIZE)
        box = reduced_box((top, left, height, width), scale, (10_000, 10_000))
        assert box[2] - box[0] >= SIZE and box[3] - box[1] >= SIZE  # never an upscale


@pytest.mark.parametrize("mode,fmt", [("L", "JPEG"), ("CMYK", "JPEG"), ("P", "PNG"), ("RGBA", "PNG"),
                                      ("LA", "PNG"), ("RGB", "PNG")])
def test_any_mode_becomes_rgb(mode, fmt):
    """Grayscale, CMYK, palette and alpha images give RGB, as convert('RGB') then timm's crop would."""
    data = encode(photo(320, 240, seed=3), mode, fmt)
    fast = FastRandomResizedCrop(SIZE)
    reference = timm_crop_flip()
    for seed in range(3):
        seeded(seed)
        got = fast(lazy(data))
        seeded(seed)
        want = reference(lazy(data).convert("RGB"))
        assert got.shape == (3, SIZE, SIZE) and got.dtype == torch.uint8
        assert mae(got, want) < 0.15, (mode, seed)
    if mode == "L":
        assert torch.equal(got[0], got[1]) and torch.equal(got[1], got[2])


def test_large_grayscale_jpeg_reduced():
    data = encode(photo(1200, 1000, seed=4), "L")
    crop = CropDraw(0, 0, 1000, 1200, "bicubic", False)
    fast = FastRandomResizedCrop(SIZE)
    got = fast.resize_flip(fast.decode_crop(lazy(data), crop), crop)
    want = np.array(lazy(data).convert("RGB").resize((SIZE, SIZE), Image.BICUBIC))
    assert mae(got, torch.from_numpy(want).permute(2, 0, 1)) < 1.0


def test_loaded_image_uses_full_decode(large_jpeg):
    """An image already loaded cannot be decoded reduced: it is cropped at full resolution instead."""
    loaded = lazy(large_jpeg)
    loaded.load()
    crop = CropDraw(0, 0, 1200, 1600, "bicubic", False)
    fast = FastRandomResizedCrop(SIZE)
    full = fast.resize_flip(fast.decode_crop(loaded, crop), crop)
    want = torch.from_numpy(np.array(loaded.resize((SIZE, SIZE), Image.BICUBIC))).permute(2, 0, 1)
    assert mae(full, want) < 0.15


def test_non_square_output_and_pickle(small_jpeg):
    fast = pickle.loads(pickle.dumps(FastRandomResizedCrop((160, 192), interpolation="bilinear", hflip=0.0)))
    seeded(3)
    got = fast(lazy(small_jpeg))
    seeded(3)
    want = create_transform((160, 192), is_training=True, interpolation="bilinear", hflip=0.0, color_jitter=None,
                            use_prefetcher=True)(lazy(small_jpeg).convert("RGB"))
    assert got.shape == (3, 160, 192)
    assert mae(got, want) < 0.15


def test_rejects_unknown_interpolation():
    with pytest.raises(ValueError, match="lanczos"):
        FastRandomResizedCrop(SIZE, interpolation="lanczos")


# ---------------------------------------------------------------- the file's bytes: libjpeg-turbo's scaled decode


@pytest.mark.parametrize("fixture", ["small_jpeg", "large_jpeg"])
def test_scaled_decode_from_bytes_matches_timm_seeded_alike(fixture, request):
    """What the loader workers run (datasets hand the transform the file's bytes): simplejpeg decodes at
    the smallest M/8 scaling that keeps the crop larger than the output, so crops only a little larger
    than the output are reduced too (draft's 1/2^k cannot). Against timm's full decode + Pillow bicubic,
    seeded alike: MAE 0.002-0.07 without a reduction, 0.6-1.5 with one (measured), the size of Pillow's
    own bilinear-vs-bicubic difference on photos."""
    pytest.importorskip("simplejpeg")
    data = request.getfixturevalue(fixture)
    fast, timm_t = FastRandomResizedCrop(SIZE), timm_crop_flip()
    errors = []
    for seed in range(12):
        seeded(seed)
        got = fast.from_bytes(data)
        seeded(seed)
        want = timm_t(lazy(data).convert("RGB"))
        assert got.shape == want.shape == (3, SIZE, SIZE) and got.dtype == torch.uint8
        errors.append(mae(got, want))
    assert np.median(errors) < 1.0 and max(errors) < 2.5, errors
    assert min(errors) < 0.1 or fixture == "large_jpeg", errors  # unreduced crops match to rounding


@pytest.mark.parametrize("mode", ["L", "CMYK"])
def test_scaled_decode_from_bytes_of_gray_and_cmyk_jpegs(mode):
    """Grayscale decodes as one channel widened to three; CMYK, which libjpeg-turbo does not turn into
    RGB, goes through Pillow as today."""
    data = encode(photo(640, 480, seed=3), mode=mode)
    seeded(0)
    got = FastRandomResizedCrop(SIZE).from_bytes(data)
    seeded(0)
    want = timm_crop_flip()(lazy(data).convert("RGB"))
    assert got.shape == (3, SIZE, SIZE) and mae(got, want) < 2.5
    if mode == "L":
        assert torch.equal(got[0], got[1]) and torch.equal(got[1], got[2])


def test_bytes_of_other_formats_go_through_pillow():
    data = encode(photo(300, 200, seed=4), fmt="PNG")
    seeded(0)
    got = FastRandomResizedCrop(SIZE).from_bytes(data)
    seeded(0)
    want = timm_crop_flip()(lazy(data).convert("RGB"))
    assert mae(got, want) < 0.2

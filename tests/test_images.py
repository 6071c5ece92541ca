"""usi/data/images.py: every image mode to 8-bit RGB without clipping."""
import numpy as np
import pytest
from PIL import Image

from usi.data.folder import load_rgb
from usi.data.images import to_rgb


@pytest.mark.parametrize("mode, values, scale", [
    ("I;16", np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16), 255 / 65535),
    ("I", np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.int32), 255 / 65535),
    ("I", np.linspace(0, 255, 64 * 64).reshape(64, 64).astype(np.int32), 1.0),  # 8-bit values in 32 bits
    ("F", np.linspace(0, 1, 64 * 64).reshape(64, 64).astype(np.float32), 255.0),
    ("F", np.linspace(0, 255, 64 * 64).reshape(64, 64).astype(np.float32), 1.0),
])
def test_16_bit_and_float_images_keep_their_range(tmp_path, mode, values, scale):
    img = Image.fromarray(values)  # the dtype gives the mode
    assert img.mode == mode
    path = tmp_path / "img.tif"
    img.save(path)
    rgb = np.asarray(load_rgb(str(path))).astype(np.float64)
    expected = np.clip(values.astype(np.float64) * scale, 0, 255)
    assert rgb.shape == (64, 64, 3) and np.abs(rgb[..., 0] - expected).max() <= 1
    assert (rgb == 255).mean() < 0.02  # a plain convert("RGB") made 99.6% of a 16-bit gradient white


def test_a_16_bit_png_reads_as_its_gradient(tmp_path):
    values = (np.arange(256, dtype=np.uint16) * 257)[None].repeat(8, 0)
    Image.fromarray(values).save(tmp_path / "g.png")
    rgb = np.asarray(load_rgb(str(tmp_path / "g.png")))
    assert np.abs(rgb[0, :, 0].astype(int) - np.arange(256)).max() <= 1


def gradient_rgb() -> Image.Image:
    """Every hue and brightness a 32 x 32 image holds: red along x, green along y, blue across."""
    x, y = np.meshgrid(np.linspace(0, 255, 32), np.linspace(0, 255, 32))
    return Image.fromarray(np.stack([x, y, 255 - (x + y) / 2], -1).round().astype(np.uint8), "RGB")


COLOR_MODES = ["RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV", "P", "PA"]
GRAY_MODES = ["1", "L", "LA", "I;16", "I;16L", "I;16B", "I", "F"]
FORMATS = {"PNG": "png", "TIFF": "tif", "WEBP": "webp", "BMP": "bmp", "PPM": "ppm", "JPEG": "jpg"}
LOSSY = ("WEBP", "JPEG")
WIDE = ("I;16", "I;16L", "I;16B", "I", "F")


def in_mode(mode: str) -> tuple[Image.Image, np.ndarray]:
    """(an image in `mode`, the RGB a faithful reading gives back)."""
    rgb = gradient_rgb()
    if mode in COLOR_MODES:
        return rgb.convert(mode), np.asarray(rgb)
    gray = np.asarray(rgb.convert("L"))
    if mode in ("I;16", "I;16L", "I;16B"):  # from bytes: Pillow's convert() to I;16B clips at 255
        wide = (gray.astype(np.uint16) * 257).astype(">u2" if mode == "I;16B" else "<u2")
        return Image.frombytes(mode, (32, 32), wide.tobytes()), np.repeat(gray[..., None], 3, -1)
    if mode == "1":
        bits = gray > 127
        return Image.fromarray(bits), np.repeat(bits[..., None] * np.uint8(255), 3, -1)
    return Image.fromarray(gray).convert(mode), np.repeat(gray[..., None], 3, -1)


@pytest.mark.parametrize("mode", COLOR_MODES + GRAY_MODES)
def test_every_mode_pillow_saves_reads_back_as_its_own_picture(tmp_path, mode):
    """Each mode through every format Pillow writes it in, then read as training reads a file."""
    img, expected = in_mode(mode)
    read = 0
    for fmt, ext in FORMATS.items():
        path = tmp_path / f"img.{ext}"
        try:
            img.save(path, fmt)
            stored = Image.open(path).mode
        except (OSError, ValueError, KeyError):
            continue  # a format that cannot hold this mode
        if mode in WIDE and stored not in WIDE:
            continue  # the writer made it 8-bit (Pillow's WEBP writer clips 16-bit): not the reader's doing
        rgb = np.asarray(load_rgb(str(path))).astype(int)
        assert rgb.shape == (32, 32, 3), (fmt, rgb.shape)
        diff = np.abs(rgb - expected)
        # lossless formats give the picture back (LAB, YCbCr and palette round within a few levels);
        # lossy ones within their compression error
        limit = 12 if fmt in LOSSY else 20 if mode in ("P", "PA") else 6  # P: Pillow's dithered web palette
        assert diff.mean() <= limit, (fmt, diff.mean())
        read += 1
    assert read, f"no format held mode {mode}"


@pytest.mark.parametrize("mode", ["La", "RGBa", "I;16N", "RGBA", "PA", "LA"])
def test_premultiplied_and_in_memory_modes_convert(mode):
    """Modes that only exist in memory (a decoded shard sample is handed on as an image) convert too:
    Pillow has no La -> RGB conversion, and premultiplied alpha is undone."""
    base = Image.fromarray(np.full((4, 4, 4), (200, 100, 50, 128), np.uint8), "RGBA")
    img = {"La": base.convert("LA").convert("La"), "RGBa": base.convert("RGBa"),
           "I;16N": Image.frombytes("I;16N", (4, 4), np.full(16, 51400, np.uint16).tobytes())}.get(mode) or \
        base.convert(mode)
    rgb = np.asarray(to_rgb(img)).astype(int)
    expected = {"La": 124, "I;16N": 200, "LA": 124}.get(mode, None)  # 124: the luma of (200, 100, 50)
    if expected is not None:
        assert np.abs(rgb - expected).max() <= 1
    elif mode == "RGBa":  # premultiplied 100, 50, 25 at alpha 128 undone: the stored colour, not a darker one
        assert np.abs(rgb[0, 0] - (200, 100, 50)).max() <= 2
    assert img.mode == mode


@pytest.mark.parametrize("values, expected", [
    (np.array([[-1.0, 0.0, 3.0]], np.float32), [0, 64, 255]),  # beyond 0..1 and 0..255: its own range
    (np.array([[0.0, 500.0, 1000.0]], np.float32), [0, 128, 255]),  # HDR-like: was all white above 255
    (np.array([[0, 500_000, 1_000_000]], np.int32), [0, 128, 255]),  # 32-bit counts: were all white
    (np.array([[250_000, 500_000, 1_000_000]], np.int32), [64, 128, 255]),  # by its max: ratios kept
    (np.array([[-100, 0, 100]], np.int32), [0, 128, 255]),  # negative: were black
    (np.array([[7, 7, 7]], np.int32) * 100_000, [255, 255, 255]),  # flat and bright: white
    (np.array([[-7, -7, -7]], np.int32), [0, 0, 0]),  # flat and negative: black
    (np.array([[0.0, 0.5, 1.0]], np.float32), [0, 128, 255]),
    (np.array([[0.0, 100.0, 200.0]], np.float32), [0, 100, 200]),
])
def test_values_beyond_every_fixed_range_are_stretched_never_clipped(tmp_path, values, expected):
    Image.fromarray(values).save(tmp_path / "v.tif")
    rgb = np.asarray(load_rgb(str(tmp_path / "v.tif")))
    assert np.abs(rgb[0, :, 0].astype(int) - expected).max() <= 1 and (rgb[..., 0] == rgb[..., 2]).all()


def test_a_float_image_with_nan_is_refused_so_it_is_counted_unreadable(tmp_path):
    Image.fromarray(np.array([[0.0, np.nan]], np.float32)).save(tmp_path / "nan.tif")
    with pytest.raises(ValueError, match="NaN or infinite"):
        load_rgb(str(tmp_path / "nan.tif"))

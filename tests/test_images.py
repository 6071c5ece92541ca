"""usi/data/images.py: every image mode to 8-bit RGB without clipping."""
import numpy as np
import pytest
from PIL import Image

from usi.data.folder import load_rgb


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

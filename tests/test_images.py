"""Reading arbitrary image files: modes, bit depths and sizes; clear errors for bad files."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from explainkit.errors import ImageReadError
from explainkit.runtime.images import read_image, to_rgb_uint8

SIZE = (32, 32)


def test_grayscale_becomes_three_equal_channels(tmp_path):
    path = tmp_path / "g.png"
    Image.fromarray(np.full((32, 32), 120, dtype=np.uint8), mode="L").save(path)
    array = read_image(path, SIZE)
    assert array.shape == (32, 32, 3) and array.dtype == np.uint8
    assert (array == 120).all()


def test_16_bit_is_rescaled_not_clipped(tmp_path):
    path = tmp_path / "deep.png"
    values = np.array([[0, 16384], [32768, 65535]], dtype=np.uint16).repeat(16, 0).repeat(16, 1)
    Image.fromarray(values).save(path)  # a 16-bit PNG
    array = read_image(path, SIZE)[..., 0]
    assert array[0, 0] == 0 and array[-1, -1] == 255
    assert 120 <= array[20, 0] <= 135  # 32768 -> ~128, not clipped to 255
    assert 60 <= array[0, 20] <= 68


def test_rgba_is_composited_on_white(tmp_path):
    path = tmp_path / "a.png"
    pixels = np.zeros((32, 32, 4), dtype=np.uint8)
    pixels[..., 0] = 255
    pixels[:16, :, 3] = 255  # top half opaque red, bottom transparent
    Image.fromarray(pixels, mode="RGBA").save(path)
    array = read_image(path, SIZE)
    assert tuple(array[0, 0]) == (255, 0, 0)
    assert tuple(array[-1, -1]) == (255, 255, 255)


def test_palette_image(tmp_path):
    path = tmp_path / "p.gif"
    Image.new("P", (40, 30), color=3).save(path)
    assert read_image(path, SIZE).shape == (32, 32, 3)


@pytest.mark.parametrize("size", [(1, 1), (3, 5), (1200, 900)])
def test_tiny_and_large_images_are_resized(tmp_path, size):
    path = tmp_path / "x.jpg"
    Image.new("RGB", size, color=(10, 200, 30)).save(path)
    array = read_image(path, SIZE)
    assert array.shape == (32, 32, 3)
    assert abs(int(array[16, 16, 1]) - 200) < 8


def test_unreadable_and_missing_files_name_the_file(tmp_path):
    bad = tmp_path / "notes.jpg"
    bad.write_text("this is not an image")
    with pytest.raises(ImageReadError, match="notes.jpg"):
        read_image(bad, SIZE)
    with pytest.raises(ImageReadError, match="missing.png"):
        read_image(tmp_path / "missing.png", SIZE)
    with pytest.raises(ImageReadError, match="directory"):
        read_image(tmp_path, SIZE)


def test_uint8_array_shapes():
    assert to_rgb_uint8(np.zeros((10, 10, 1), np.uint8), SIZE).shape == (32, 32, 3)
    with pytest.raises(ValueError):
        to_rgb_uint8(np.zeros((10, 10, 2), np.uint8), SIZE)
    with pytest.raises(ValueError):
        to_rgb_uint8(np.zeros((10, 10), np.float32), SIZE)

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


def test_images_over_the_pixel_limit_are_refused_before_decoding(tmp_path, monkeypatch):
    from PIL import Image

    from explainkit.runtime.images import read_image

    path = tmp_path / "wide.png"
    Image.new("RGB", (40, 30)).save(path)
    with pytest.raises(ImageReadError, match=r"40 x 30 pixels is over the limit of 0.001 megapixels"):
        read_image(path, (32, 32), max_pixels=1000)
    assert read_image(path, (8, 8), max_pixels=1200).shape == (8, 8, 3)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # PIL's own bomb guard, at twice this
    with pytest.raises(ImageReadError, match="decompression bomb"):
        read_image(path, (32, 32))


def test_animated_images_are_refused_when_a_single_frame_is_asked_for(tmp_path):
    from PIL import Image

    from explainkit.runtime.images import read_image

    path = tmp_path / "anim.gif"
    frames = [Image.new("RGB", (16, 16), colour) for colour in ("red", "blue", "green")]
    frames[0].save(path, save_all=True, append_images=frames[1:])
    assert read_image(path, (8, 8)).shape == (8, 8, 3)  # the first frame
    with pytest.raises(ImageReadError, match=r"multi-frame image \(3 frames\)"):
        read_image(path, (8, 8), single_frame=True)

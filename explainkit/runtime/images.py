"""Reading arbitrary image files into the RGB uint8 arrays a model card preprocesses."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from explainkit.errors import ImageReadError


def to_rgb_image(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB. 16/32-bit integer images are rescaled to 8 bits, never clipped;
    transparency is composited onto white."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        high: float | None
        if image.mode.startswith("I;16"):
            high = 65535.0
        else:
            high = 65535.0 if values.max(initial=0) <= 65535 and values.min(initial=0) >= 0 else None
        if high is None:  # arbitrary range: min-max
            low, top = values.min(), values.max()
            values = (values - low) / (top - low if top > low else 1.0)
        else:
            values = values / high
        image = Image.fromarray(np.clip(np.round(values * 255), 0, 255).astype(np.uint8), mode="L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    return image.convert("RGB")


RESAMPLING = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
}


def fit_image(
    image: Image.Image, size: tuple[int, int], resize: int | None = None, interpolation: str = "bilinear"
) -> Image.Image:
    """``image`` as the model sees it: resized straight to ``size`` (h, w), or with ``resize``,
    its shorter side resized to ``resize`` and then centre-cropped to ``size`` (torchvision's
    ``Resize`` + ``CenterCrop``, as ImageNet models are evaluated)."""
    height, width = size
    method = RESAMPLING[interpolation]
    if resize is None:
        if image.size != (width, height):
            image = image.resize((width, height), method, reducing_gap=None)
        return image
    w, h = image.size
    scale = resize / min(w, h)
    new = (max(width, round(w * scale)), max(height, round(h * scale)))
    if image.size != new:
        image = image.resize(new, method, reducing_gap=None)
    left, top = round((new[0] - width) / 2), round((new[1] - height) / 2)
    return image.crop((left, top, left + width, top + height))


def to_rgb_uint8(item: Any, size: tuple[int, int], resize: int | None = None, interpolation: str = "bilinear") -> np.ndarray:
    """A PIL image or uint8 array (``HxW``, ``HxWx1/3/4``) -> ``(H, W, 3)`` uint8 at ``size`` (h, w),
    fitted by :func:`fit_image`."""
    if isinstance(item, np.ndarray):
        array = item
        if array.dtype == np.uint16:
            array = np.round(array.astype(np.float64) / 65535 * 255).astype(np.uint8)
        if array.dtype != np.uint8:
            raise ValueError(f"arrays must be uint8 (or uint16), got {array.dtype}")
        if array.ndim == 3 and array.shape[2] == 1:
            array = array[:, :, 0]
        if array.ndim == 2:
            image = Image.fromarray(array, mode="L")
        elif array.ndim == 3 and array.shape[2] in (3, 4):
            image = Image.fromarray(array, mode="RGB" if array.shape[2] == 3 else "RGBA")
        else:
            raise ValueError(f"cannot read an image array of shape {array.shape}")
    elif isinstance(item, Image.Image):
        image = item
    else:
        raise TypeError(f"expected a PIL image or a numpy array, got {type(item).__name__}")
    return np.asarray(fit_image(to_rgb_image(image), size, resize, interpolation), dtype=np.uint8)


MAX_PIXELS = 40_000_000  # 40 megapixels (e.g. 8000 x 5000): a larger file is refused before it is decoded


def read_image(
    path: str | Path,
    size: tuple[int, int],
    resize: int | None = None,
    interpolation: str = "bilinear",
    *,
    max_pixels: int = MAX_PIXELS,
    single_frame: bool = False,
) -> np.ndarray:
    """Read an image file (any PIL format/mode) as ``(H, W, 3)`` uint8 at ``size`` (see :func:`fit_image`).

    Safe on hostile files: an image over ``max_pixels`` (read from its header: a decompression bomb
    is refused, never decoded), an empty, truncated or mislabelled file, and with ``single_frame``
    an animated one, are each an :class:`ImageReadError` with one line. Multi-frame files are read
    at their first frame otherwise.
    """
    path = Path(path)
    try:
        with Image.open(path) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise ImageReadError(f"{path}: {width} x {height} pixels is over the limit of {max_pixels / 1e6:g} megapixels")
            frames = getattr(image, "n_frames", 1)
            if single_frame and frames > 1:
                raise ImageReadError(f"{path}: an animated or multi-frame image ({frames} frames); give a single frame")
            image.load()
            return to_rgb_uint8(image, size, resize, interpolation)
    except FileNotFoundError:
        raise ImageReadError(f"image not found: {path}") from None
    except IsADirectoryError:
        raise ImageReadError(f"image path is a directory: {path}") from None
    except Image.DecompressionBombError as exc:  # PIL's own guard, above twice its MAX_IMAGE_PIXELS
        raise ImageReadError(f"{path}: refused as a decompression bomb ({exc})") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise ImageReadError(f"cannot read image {path}: {type(exc).__name__}: {exc}") from None

"""Training augmentation with albumentations (written for albumentations 2.x argument names:
``num_holes_range``/``hole_height_range``/``hole_width_range``/``fill``; the 1.x names only warn
and silently fall back to other holes).

The course's pipeline (``reference``), measured under albumentations 1.3.1 and 1.4.18 in a scratch
environment (``docs/training.md`` has the numbers)::

    PadIfNeeded(40, 40, border_mode=0) -> RandomCrop(32, 32) -> PadIfNeeded(64, 64, border_mode=0)
    -> CoarseDropout(1 hole of 16x16, fill_value=(0.4914, 0.4822, 0.4465), p=0.2) -> CenterCrop(32, 32)
    -> Normalize(mean, std)

* ``border_mode=0`` is ``cv2.BORDER_CONSTANT`` with ``value=None``: a black (0) border (1.x's default
  border mode would have been ``BORDER_REFLECT_101``; 1.4.18 even refuses ``border_mode=0`` without a value);
* ``fill_value`` is the float mean in [0, 1], written into a uint8 image by numpy assignment: it casts to
  **(0, 0, 0)**, so the course's holes are black, not the mean;
* the hole's top-left corner is uniform on ``{0, ..., 48}`` on the 64x64 canvas, so after the centre crop
  it is often partly (88% of holes) or wholly (8%) outside the 32x32 image: 10.7% of the output's
  pixels per applied hole, 2.1% on average at p=0.2 (1.8% of the image's own pixels, the rest falls on
  the black pad border), against 5% for a hole placed fully inside the image (``cutout="inside"``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

from explainkit.training.recipes import Recipe

if TYPE_CHECKING:  # albumentations (and opencv under it) loads only when the CPU path runs
    import albumentations as A

CUTOUT_SIZE = 16
PADDED_SIZE = 40
CANVAS_SIZE = 64  # the course's cutout canvas for 32x32 images


def cutout_fill(recipe: Recipe, mean: Sequence[float]) -> tuple[int, int, int]:
    """The uint8 value a hole is filled with: the dataset mean as albumentations casts it, or 0 (the course's)."""
    if recipe.cutout_fill == "black":
        return (0, 0, 0)
    return tuple(int(255 * float(m)) for m in mean)  # type: ignore[return-value]


def train_augmentation(recipe: Recipe, mean: Sequence[float], std: Sequence[float], size: int = 32) -> "A.Compose":
    """pad to 40 (black border) -> random crop 32 -> [flip] -> one 16x16 hole -> normalise; with
    ``cutout="canvas"`` the hole is placed on a 64x64 black canvas around the crop, then centre-cropped."""
    import albumentations as A

    steps: list = [
        A.PadIfNeeded(min_height=PADDED_SIZE * size // 32, min_width=PADDED_SIZE * size // 32, border_mode=0, fill=0),
        A.RandomCrop(height=size, width=size),
    ]
    if recipe.horizontal_flip:
        steps.append(A.HorizontalFlip(p=0.5))
    if recipe.cutout_p > 0:
        canvas = recipe.cutout == "canvas"
        if canvas:
            side = CANVAS_SIZE * size // 32
            steps.append(A.PadIfNeeded(min_height=side, min_width=side, border_mode=0, fill=0))
        hole = CUTOUT_SIZE * size // 32
        steps.append(
            A.CoarseDropout(
                num_holes_range=(1, 1),
                hole_height_range=(hole, hole),
                hole_width_range=(hole, hole),
                fill=tuple(float(v) for v in cutout_fill(recipe, mean)),
                p=recipe.cutout_p,
            )
        )
        if canvas:
            steps.append(A.CenterCrop(height=size, width=size))
    steps.append(A.Normalize(mean=tuple(mean), std=tuple(std), max_pixel_value=255.0))
    return A.Compose(steps)


class AlbumentationsTransform:
    """PIL image -> augmented, normalised ``(3, H, W)`` float tensor (picklable for DataLoader workers)."""

    def __init__(self, compose: "A.Compose") -> None:
        self.compose = compose

    def __call__(self, image) -> torch.Tensor:
        array = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image, dtype=np.uint8)
        return torch.from_numpy(self.compose(image=array)["image"].transpose(2, 0, 1).copy())

    def reseed(self, seed: int) -> None:
        """Give each DataLoader worker (and epoch) its own augmentation stream."""
        self.compose.set_random_seed(seed)

"""Training augmentation with albumentations (written for albumentations 2.x argument names:
``num_holes_range``/``hole_height_range``/``hole_width_range``/``fill``; the 1.x names only warn
and silently fall back to other holes)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

from explainkit.training.recipes import Recipe

if TYPE_CHECKING:  # albumentations (and opencv under it) loads only when the CPU path runs
    import albumentations as A

CUTOUT_SIZE = 16
PADDED_SIZE = 40


def train_augmentation(recipe: Recipe, mean: Sequence[float], std: Sequence[float], size: int = 32) -> "A.Compose":
    """pad to 40 (black border) -> random crop 32 -> [flip] -> one 16x16 hole filled with the mean -> normalise."""
    import albumentations as A

    steps: list = [
        A.PadIfNeeded(min_height=PADDED_SIZE * size // 32, min_width=PADDED_SIZE * size // 32, border_mode=0, fill=0),
        A.RandomCrop(height=size, width=size),
    ]
    if recipe.horizontal_flip:
        steps.append(A.HorizontalFlip(p=0.5))
    if recipe.cutout_p > 0:
        steps.append(
            A.CoarseDropout(
                num_holes_range=(1, 1),
                hole_height_range=(CUTOUT_SIZE, CUTOUT_SIZE),
                hole_width_range=(CUTOUT_SIZE, CUTOUT_SIZE),
                fill=tuple(float(m) * 255 for m in mean),
                p=recipe.cutout_p,
            )
        )
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

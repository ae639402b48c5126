"""The augmentation does what the recipe says (albumentations 2.x argument names); the reference
recipe is the course's albumentations 1.x pipeline (holes on a 64x64 canvas, black)."""

from __future__ import annotations

import warnings

import numpy as np
import torch
from PIL import Image

from explainkit.models.card import CIFAR10_MEAN, CIFAR10_STD
from explainkit.training.augment import AlbumentationsTransform, train_augmentation
from explainkit.training.recipes import RECIPES, resolve_recipe

WHITE = Image.fromarray(np.full((32, 32, 3), 255, dtype=np.uint8))


def _hole_mask(tensor: torch.Tensor) -> torch.Tensor:
    """Pixels filled with the dataset mean normalise to ~0 in every channel."""
    return tensor.abs().amax(0) < 0.02


def test_builds_without_deprecation_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train_augmentation(RECIPES["reference"], CIFAR10_MEAN, CIFAR10_STD)


def test_one_16x16_hole_filled_with_the_mean():
    recipe = resolve_recipe("default", cutout_p=1.0, horizontal_flip=False)
    transform = AlbumentationsTransform(train_augmentation(recipe, CIFAR10_MEAN, CIFAR10_STD))
    transform.reseed(0)
    for _ in range(20):
        out = transform(WHITE)
        assert out.shape == (3, 32, 32) and out.dtype == torch.float32
        mask = _hole_mask(out)
        rows, cols = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
        assert mask.sum() == 256  # exactly one 16x16 hole
        assert rows.max() - rows.min() == 15 and cols.max() - cols.min() == 15


def test_hole_rate_matches_p():
    recipe = resolve_recipe("default", cutout_p=0.2)
    transform = AlbumentationsTransform(train_augmentation(recipe, CIFAR10_MEAN, CIFAR10_STD))
    transform.reseed(1)
    rate = np.mean([bool(_hole_mask(transform(WHITE)).any()) for _ in range(1000)])
    assert 0.16 < rate < 0.24  # p = 0.2


def test_pad_and_crop_shift_with_a_black_border():
    recipe = resolve_recipe("reference", cutout_p=0.0)
    transform = AlbumentationsTransform(train_augmentation(recipe, CIFAR10_MEAN, CIFAR10_STD))
    transform.reseed(2)
    black = -torch.tensor(CIFAR10_MEAN) / torch.tensor(CIFAR10_STD)
    shifted = 0
    for _ in range(50):
        out = transform(WHITE)
        border = (out - black.view(3, 1, 1)).abs().amax(0) < 1e-3
        shifted += bool(border.any())
        assert border.sum() <= 32 * 32 - 24 * 24  # at most a 4-pixel pad on two sides... within 8
    assert shifted > 30  # most crops include part of the 4-pixel border


def test_reference_holes_are_black_on_the_64_canvas():
    """The course's call: a black 16x16 hole placed on the 64x64 canvas, so often only partly inside
    the 32x32 image or not at all; on a white image without crop shift every black pixel is the hole."""
    recipe = resolve_recipe("reference", cutout_p=1.0)
    compose = train_augmentation(recipe, CIFAR10_MEAN, CIFAR10_STD)
    names = [type(t).__name__ for t in compose.transforms]
    assert names == ["PadIfNeeded", "RandomCrop", "PadIfNeeded", "CoarseDropout", "CenterCrop", "Normalize"]
    compose.transforms[0].p = 0.0  # no pad: the crop of a 32x32 image is the image, no black border
    transform = AlbumentationsTransform(compose)
    transform.reseed(3)
    black = -torch.tensor(CIFAR10_MEAN) / torch.tensor(CIFAR10_STD)
    areas = []
    for _ in range(400):
        out = transform(WHITE)
        hole = (out - black.view(3, 1, 1)).abs().amax(0) < 1e-3
        rows, cols = hole.any(1).nonzero().flatten(), hole.any(0).nonzero().flatten()
        if len(rows):
            assert hole.sum() == len(rows) * len(cols) and len(rows) <= 16 and len(cols) <= 16
        areas.append(int(hole.sum()))
    areas = np.array(areas)
    assert 0.03 < (areas == 0).mean() < 0.14  # 8% of the holes miss the image
    assert 0.5 < ((areas > 0) & (areas < 256)).mean()  # most are cut by the image's edge
    assert abs(areas.mean() / 1024 - 0.1066) < 0.02  # (512/49)^2 / 1024: 10.7% per applied hole

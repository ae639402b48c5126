"""The device-resident data path: the torch-op augmentation draws the same transforms, with the same
probabilities, as the albumentations pipeline it restates; batches cover every image once."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import chi2_contingency

from explainkit.models.card import CIFAR10_MEAN, CIFAR10_STD
from explainkit.training.augment import AlbumentationsTransform, train_augmentation
from explainkit.training.device_data import DeviceAugment, DeviceBatches, DeviceSplit, Shard, decode_image_folder, normalize
from explainkit.training.recipes import resolve_recipe

SAMPLES = 3000
FILL = np.array([int(255 * m) for m in CIFAR10_MEAN])


def coordinate_image() -> np.ndarray:
    """R = 8 * row, G = 8 * column, B = 255: each pixel names its source; never the fill, never black."""
    rows, cols = np.meshgrid(np.arange(32), np.arange(32), indexing="ij")
    return np.stack([rows * 8, cols * 8, np.full_like(rows, 255)], axis=-1).astype(np.uint8)


def decode(out: np.ndarray) -> tuple[int, int, bool, int, int]:
    """(crop_y, crop_x, flipped, hole_y, hole_x) of one uint8 HWC output; hole -1 when none."""
    hole = (out == FILL).all(-1)
    source = (out[..., 2] == 255) & ~hole  # a pixel of the original image (not border, not hole)
    i, j = np.argwhere(source)[0]
    crop_y = out[i, j, 0] // 8 - i + 4
    same_row = np.flatnonzero(source[i])
    flipped = len(same_row) > 1 and out[i, same_row[0], 1] > out[i, same_row[-1], 1]
    crop_x = (out[i, j, 1] // 8 - (31 - j) + 4) if flipped else (out[i, j, 1] // 8 - j + 4)
    if hole.any():
        ys, xs = np.nonzero(hole)
        assert hole.sum() == 256 and ys.max() - ys.min() == 15 and xs.max() - xs.min() == 15
        return int(crop_y), int(crop_x), bool(flipped), int(ys.min()), int(xs.min())
    return int(crop_y), int(crop_x), bool(flipped), -1, -1


def albumentations_params(recipe) -> np.ndarray:
    transform = AlbumentationsTransform(train_augmentation(recipe, CIFAR10_MEAN, CIFAR10_STD))
    transform.reseed(0)
    image = coordinate_image()
    std, mean = np.array(CIFAR10_STD) * 255, np.array(CIFAR10_MEAN) * 255
    decoded = []
    for _ in range(SAMPLES):
        out = transform(image).numpy().transpose(1, 2, 0) * std + mean
        decoded.append(decode(np.rint(out).astype(np.int64)))
    return np.array(decoded)


def torch_params(recipe) -> np.ndarray:
    augment = DeviceAugment(recipe, CIFAR10_MEAN)
    images = torch.from_numpy(coordinate_image()).permute(2, 0, 1)[None].repeat(SAMPLES, 1, 1, 1)
    out = augment(images, torch.Generator().manual_seed(0)).permute(0, 2, 3, 1).numpy().astype(np.int64)
    return np.array([decode(o) for o in out])


def same_distribution(a: np.ndarray, b: np.ndarray, values) -> None:
    """Same support, and a chi-squared test of homogeneity that does not reject at 0.1%."""
    counts = np.array([[np.sum(a == v) for v in values], [np.sum(b == v) for v in values]])
    assert set(np.unique(a)) == set(np.unique(b)) == set(values)
    _, p_value, _, _ = chi2_contingency(counts)
    assert p_value > 1e-3, counts


@pytest.mark.parametrize("recipe_name", ["reference", "default"])
def test_torch_ops_draw_the_albumentations_distribution(recipe_name):
    recipe = resolve_recipe(recipe_name)
    ours, theirs = torch_params(recipe), albumentations_params(recipe)
    for column in (0, 1):  # crop offsets: uniform on 0..8
        same_distribution(ours[:, column], theirs[:, column], range(9))
    same_distribution(ours[:, 2], theirs[:, 2], [False, True] if recipe.horizontal_flip else [False])
    holes_ours, holes_theirs = ours[:, 3] >= 0, theirs[:, 3] >= 0
    assert abs(holes_ours.mean() - recipe.cutout_p) < 0.03 and abs(holes_theirs.mean() - recipe.cutout_p) < 0.03
    for column in (3, 4):  # hole corner: uniform on 0..16
        same_distribution(ours[holes_ours, column], theirs[holes_theirs, column], range(17))


def test_hole_fill_is_the_uint8_mean_and_normalize_matches_albumentations():
    recipe = resolve_recipe("reference", cutout_p=1.0)
    out = DeviceAugment(recipe, CIFAR10_MEAN)(torch.zeros(4, 3, 32, 32, dtype=torch.uint8), torch.Generator().manual_seed(1))
    filled = (out == torch.tensor(FILL, dtype=torch.uint8).view(1, 3, 1, 1)).all(1)
    assert filled.flatten(1).sum(1).tolist() == [256] * 4
    image = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    expected = (image.float() / 255 - torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)) / torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(normalize(image, CIFAR10_MEAN, CIFAR10_STD), expected)


def test_same_seed_same_batches_other_epoch_other_order():
    split = DeviceSplit(torch.randint(0, 256, (50, 3, 32, 32), dtype=torch.uint8), torch.arange(50), ["a"])
    augment = DeviceAugment(resolve_recipe("default"), CIFAR10_MEAN)
    batches = DeviceBatches(split, 16, CIFAR10_MEAN, CIFAR10_STD, augment, shuffle=True, seed=3)
    first = [(x.clone(), y.clone()) for x, y in batches]
    again = list(batches)
    assert len(first) == len(batches) == 4
    for (x1, y1), (x2, y2) in zip(first, again):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert sorted(torch.cat([y for _, y in first]).tolist()) == list(range(50))
    batches.set_epoch(1)
    assert not torch.equal(torch.cat([y for _, y in batches]), torch.cat([y for _, y in first]))


def test_ranks_share_the_split_without_padding():
    split = DeviceSplit(torch.zeros(19, 3, 32, 32, dtype=torch.uint8), torch.arange(19), ["a"])
    seen = []
    for rank in range(2):
        batches = DeviceBatches(split, 4, CIFAR10_MEAN, CIFAR10_STD, shard=Shard(rank, 2))
        seen += [int(v) for _, y in batches for v in y]
        assert len(batches) == (len(range(rank, 19, 2)) + 3) // 4
    assert sorted(seen) == list(range(19))


def test_decode_image_folder_reads_every_image(color_folder):
    split = decode_image_folder(color_folder / "train")
    assert split.images.dtype == torch.uint8 and split.images.shape[1:] == (3, 32, 32)
    assert len(split) == len(split.labels) > 0 and split.classes == sorted(split.classes)
    assert set(split.labels.tolist()) == set(range(len(split.classes)))

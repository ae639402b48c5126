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


def decode(out: np.ndarray, fill=FILL) -> tuple[int, int, bool, int, int, int, int]:
    """(crop_y, crop_x, flipped, top, left, bottom, right) of one uint8 HWC output; the last four are
    the visible part of the hole (-1 when none is visible). ``fill`` must differ from black and the image."""
    hole = (out == fill).all(-1)
    source = (out[..., 2] == 255) & ~hole  # a pixel of the original image (not border, not hole)
    i, j = np.argwhere(source)[0]
    crop_y = out[i, j, 0] // 8 - i + 4
    same_row = np.flatnonzero(source[i])
    flipped = len(same_row) > 1 and out[i, same_row[0], 1] > out[i, same_row[-1], 1]
    crop_x = (out[i, j, 1] // 8 - (31 - j) + 4) if flipped else (out[i, j, 1] // 8 - j + 4)
    if hole.any():
        ys, xs = np.nonzero(hole)
        top, bottom, left, right = ys.min(), ys.max(), xs.min(), xs.max()
        assert hole.sum() == (bottom - top + 1) * (right - left + 1)  # one rectangle
        return int(crop_y), int(crop_x), bool(flipped), int(top), int(left), int(bottom), int(right)
    return int(crop_y), int(crop_x), bool(flipped), -1, -1, -1, -1


def albumentations_outputs(recipe, samples=SAMPLES) -> np.ndarray:
    transform = AlbumentationsTransform(train_augmentation(recipe, CIFAR10_MEAN, CIFAR10_STD))
    transform.reseed(0)
    image = coordinate_image()
    std, mean = np.array(CIFAR10_STD) * 255, np.array(CIFAR10_MEAN) * 255
    return np.stack([np.rint(transform(image).numpy().transpose(1, 2, 0) * std + mean).astype(np.int64) for _ in range(samples)])


def torch_outputs(recipe, samples=SAMPLES) -> np.ndarray:
    augment = DeviceAugment(recipe, CIFAR10_MEAN)
    images = torch.from_numpy(coordinate_image()).permute(2, 0, 1)[None].repeat(samples, 1, 1, 1)
    return augment(images, torch.Generator().manual_seed(0)).permute(0, 2, 3, 1).numpy().astype(np.int64)


def albumentations_params(recipe) -> np.ndarray:
    return np.array([decode(o) for o in albumentations_outputs(recipe)])


def torch_params(recipe) -> np.ndarray:
    return np.array([decode(o) for o in torch_outputs(recipe)])


def same_distribution(a: np.ndarray, b: np.ndarray, values) -> None:
    """Same support, and a chi-squared test of homogeneity that does not reject at 0.1%."""
    counts = np.array([[np.sum(a == v) for v in values], [np.sum(b == v) for v in values]])
    assert set(np.unique(a)) == set(np.unique(b)) == set(values)
    _, p_value, _, _ = chi2_contingency(counts)
    assert p_value > 1e-3, counts


def _check_crops_and_flips(recipe, ours: np.ndarray, theirs: np.ndarray) -> None:
    for column in (0, 1):  # crop offsets: uniform on 0..8
        same_distribution(ours[:, column], theirs[:, column], range(9))
    same_distribution(ours[:, 2], theirs[:, 2], [False, True] if recipe.horizontal_flip else [False])


@pytest.mark.parametrize("recipe_name", ["default", "quick"])
def test_torch_ops_draw_the_albumentations_distribution(recipe_name):
    recipe = resolve_recipe(recipe_name, cutout_p=0.5)
    assert recipe.cutout == "inside" and recipe.cutout_fill == "mean"
    ours, theirs = torch_params(recipe), albumentations_params(recipe)
    _check_crops_and_flips(recipe, ours, theirs)
    holes_ours, holes_theirs = ours[:, 3] >= 0, theirs[:, 3] >= 0
    assert abs(holes_ours.mean() - recipe.cutout_p) < 0.03 and abs(holes_theirs.mean() - recipe.cutout_p) < 0.03
    for result, holes in ((ours, holes_ours), (theirs, holes_theirs)):  # always a whole 16x16 hole
        assert (result[holes, 5:] - result[holes, 3:5] == 15).all()
    for column in (3, 4):  # hole corner: uniform on 0..16
        same_distribution(ours[holes_ours, column], theirs[holes_theirs, column], range(17))


def _canvas_corner(params: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The hole's corner in image coordinates, from its visible part: the top/left edge when it is
    inside the image, else 15 above/left of the bottom/right edge; visible holes only."""
    visible = params[:, 3] >= 0
    top, left, bottom, right = (params[visible, k] for k in (3, 4, 5, 6))
    return np.where(top > 0, top, bottom - 15), np.where(left > 0, left, right - 15)


def test_course_canvas_geometry_matches_albumentations():
    """``cutout="canvas"``: corner uniform on -16..32 of the image (0..48 of the 64x64 canvas); the
    visible ones are compared (a corner at -16 or 32 leaves nothing in the image). A mean fill here so
    the hole stands out from the black border; the reference's black fill is checked below."""
    recipe = resolve_recipe("reference", cutout_p=1.0, cutout_fill="mean")
    ours, theirs = torch_params(recipe), albumentations_params(recipe)
    _check_crops_and_flips(recipe, ours, theirs)
    for result in (ours, theirs):  # 8% of the holes (1 - (47/49)^2) miss the image entirely
        assert abs((result[:, 3] < 0).mean() - (1 - (47 / 49) ** 2)) < 0.02
    (y_ours, x_ours), (y_theirs, x_theirs) = _canvas_corner(ours), _canvas_corner(theirs)
    same_distribution(y_ours, y_theirs, range(-15, 32))
    same_distribution(x_ours, x_theirs, range(-15, 32))
    area = lambda p: np.where(p[:, 3] >= 0, (p[:, 5] - p[:, 3] + 1) * (p[:, 6] - p[:, 4] + 1), 0)  # noqa: E731
    # albumentations 1.3.1 measured 10.7% of the output per applied hole: (512/49)^2 / 1024 = 10.66% exactly
    for result in (ours, theirs):
        assert abs(area(result).mean() / 1024 - (512 / 49) ** 2 / 1024) < 0.006


def _erased_pixels(out: np.ndarray, crops: np.ndarray) -> np.ndarray:
    """Black pixels that are not the pad border: the image pixels a black hole erased."""
    black = (out == 0).all(-1).reshape(len(out), -1).sum(1)
    border = 1024 - (32 - np.abs(crops[:, 0] - 4)) * (32 - np.abs(crops[:, 1] - 4))
    return black - border


def test_reference_is_the_course_pipeline_on_both_paths():
    """The reference recipe as the course ran it: black holes on the 64x64 canvas, p=0.2, no flip.
    albumentations 1.3.1 erased 18.3 of each image's 1,024 pixels on average (1.79%) in the course's call."""
    recipe = resolve_recipe("reference")
    outputs = {"ours": torch_outputs(recipe), "theirs": albumentations_outputs(recipe)}
    erased = {}
    for key, out in outputs.items():
        params = np.array([decode(o, fill=(-1, -1, -1)) for o in out])  # crops only: nothing has that fill
        assert not params[:, 2].any()
        erased[key] = _erased_pixels(out, params)
        assert 0.0140 < erased[key].mean() / 1024 < 0.0220, erased[key].mean()
        assert (erased[key] > 0).mean() < 0.2  # p = 0.2, and some holes miss the image
    bins = [0, 1, 64, 128, 256, 257]
    same_distribution(np.digitize(erased["ours"], bins), np.digitize(erased["theirs"], bins), range(1, 6))


def test_hole_fill_is_the_uint8_mean_and_normalize_matches_albumentations():
    recipe = resolve_recipe("default", cutout_p=1.0, horizontal_flip=False)
    out = DeviceAugment(recipe, CIFAR10_MEAN)(torch.zeros(4, 3, 32, 32, dtype=torch.uint8), torch.Generator().manual_seed(1))
    filled = (out == torch.tensor(FILL, dtype=torch.uint8).view(1, 3, 1, 1)).all(1)
    assert filled.flatten(1).sum(1).tolist() == [256] * 4
    image = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    expected = (image.float() / 255 - torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)) / torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(normalize(image, CIFAR10_MEAN, CIFAR10_STD), expected)


def test_the_course_fill_is_black():
    """albumentations 1.x wrote ``fill_value=(0.4914, 0.4822, 0.4465)`` into a uint8 image as (0, 0, 0)."""
    recipe = resolve_recipe("reference", cutout_p=1.0)
    assert (recipe.cutout, recipe.cutout_fill) == ("canvas", "black")
    white = torch.full((64, 3, 32, 32), 255, dtype=torch.uint8)
    out = DeviceAugment(resolve_recipe("reference", cutout_p=1.0, cutout="inside"), CIFAR10_MEAN)(
        white, torch.Generator().manual_seed(1)
    )
    border = out.flatten(2).float().std(1) == 0  # grey-free: a pixel is white, or black (border or hole)
    assert border.all() and ((out == 0).all(1).flatten(1).sum(1) >= 256).all()


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

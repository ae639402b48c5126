"""The GPU-resident training data path: each split decoded once into a uint8 tensor on the device,
augmented there with batched torch ops, seeded.

Why by hand rather than albumentations: albumentations works per image on the CPU with numpy, and
an H100 trains ResNet18-CIFAR several times faster than a DataLoader of PIL images can feed it.
The ops below are the recipe's albumentations pipeline (``training/augment.py``, still the CPU
path and the definition of what a recipe means) restated for a whole batch at once; the
distributions match it (``tests/test_device_data.py`` compares them):

* ``PadIfNeeded(40, black) -> RandomCrop(32)``: both crop offsets uniform on ``{0, ..., 8}``;
* ``HorizontalFlip(p=0.5)`` when the recipe flips;
* ``CoarseDropout`` with one 16x16 hole, applied with probability ``cutout_p``, filled with the
  dataset mean as uint8 (``int(255 * mean)``, as albumentations casts it) or, ``cutout_fill="black"``,
  with 0 (what albumentations 1.x wrote for the course's float mean). ``cutout="inside"``: top-left
  corner uniform on ``{0, ..., 16}`` in each axis (the hole always lies inside the image);
  ``cutout="canvas"`` (the course's ``PadIfNeeded(64) -> CoarseDropout -> CenterCrop(32)``): corner
  uniform on ``{0, ..., 48}`` of the 64x64 canvas, i.e. ``{-16, ..., 32}`` in image coordinates, the
  part outside the image dropped;
* ``Normalize(mean, std)`` last, in float.
"""

from __future__ import annotations

import concurrent.futures
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from explainkit.errors import DataError
from explainkit.training.augment import CANVAS_SIZE, CUTOUT_SIZE, PADDED_SIZE, cutout_fill
from explainkit.training.recipes import Recipe


@dataclass(frozen=True)
class Shard:
    """One process's share of a split under DDP: every ``world_size``-th item from ``rank`` (no padding)."""

    rank: int = 0
    world_size: int = 1

    def indices(self, count: int) -> range:
        return range(self.rank, count, self.world_size)


@dataclass
class DeviceSplit:
    """One split as tensors: ``images`` uint8 ``(N, 3, H, W)`` and ``labels`` int64 ``(N,)``."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def to(self, device: torch.device) -> "DeviceSplit":
        return DeviceSplit(self.images.to(device), self.labels.to(device), self.classes)

    def subset(self, indices: torch.Tensor | Sequence[int]) -> "DeviceSplit":
        index = torch.as_tensor(indices, dtype=torch.long, device=self.labels.device)
        return DeviceSplit(self.images[index], self.labels[index], self.classes)


def _decode(path: str) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.uint8)


def decode_image_folder(root: Path, workers: int | None = None) -> DeviceSplit:
    """Every image of an ImageFolder split, decoded with a thread pool (PIL releases the GIL)."""
    from torchvision.datasets import ImageFolder

    folder = ImageFolder(str(root))
    if not folder.samples:
        raise DataError(f"{root} holds no images")
    paths = [path for path, _ in folder.samples]
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers or min(16, os.cpu_count() or 1)) as pool:
        arrays = list(pool.map(_decode, paths, chunksize=256))
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise DataError(f"{root}: images differ in size ({sorted(shapes)[:3]}...); the device data path needs one size")
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    return DeviceSplit(images, torch.tensor(folder.targets, dtype=torch.long), list(folder.classes))


def split_from_dataset(dataset) -> DeviceSplit:
    """torchvision's CIFAR10 (its ``.data`` is already a uint8 NHWC array) as a :class:`DeviceSplit`."""
    images = torch.from_numpy(np.asarray(dataset.data, dtype=np.uint8)).permute(0, 3, 1, 2).contiguous()
    return DeviceSplit(images, torch.as_tensor(dataset.targets, dtype=torch.long), list(dataset.classes))


class DeviceAugment:
    """The recipe's augmentation as batched torch ops on uint8 ``(B, 3, H, W)`` images (see module doc)."""

    def __init__(self, recipe: Recipe, mean: Sequence[float], size: int = 32) -> None:
        self.pad = (PADDED_SIZE * size // 32 - size) // 2
        self.flip = recipe.horizontal_flip
        self.cutout_p = recipe.cutout_p
        self.hole = CUTOUT_SIZE * size // 32
        # canvas: the hole's corner is drawn on a (CANVAS_SIZE * size / 32)-pixel canvas centred on the image
        self.margin = (CANVAS_SIZE * size // 32 - size) // 2 if recipe.cutout == "canvas" else 0
        self.fill = torch.tensor(cutout_fill(recipe, mean), dtype=torch.uint8)

    def sample(self, batch: int, size: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """The random parameters of one batch (exposed so tests can compare distributions)."""
        device = generator.device
        span = 2 * self.pad + 1
        params = {
            "crop_y": torch.randint(0, span, (batch,), device=device, generator=generator),
            "crop_x": torch.randint(0, span, (batch,), device=device, generator=generator),
            "flip": torch.rand(batch, device=device, generator=generator) < (0.5 if self.flip else 0.0),
            "cutout": torch.rand(batch, device=device, generator=generator) < self.cutout_p,
            # image coordinates of the corner: {0..size-hole} inside, {-margin..size+margin-hole} on the canvas
            "hole_y": torch.randint(0, size + 2 * self.margin - self.hole + 1, (batch,), device=device, generator=generator)
            - self.margin,
            "hole_x": torch.randint(0, size + 2 * self.margin - self.hole + 1, (batch,), device=device, generator=generator)
            - self.margin,
        }
        return params

    def apply(self, images: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        batch, _, height, width = images.shape
        device = images.device
        padded = torch.nn.functional.pad(images, (self.pad,) * 4)  # zeros: PadIfNeeded's black border
        rows = params["crop_y"][:, None] + torch.arange(height, device=device)  # (B, H)
        cols = params["crop_x"][:, None] + torch.arange(width, device=device)  # (B, W)
        cols = torch.where(params["flip"][:, None], cols.flip(1), cols)  # a flip is a reversed column index
        batch_index = torch.arange(batch, device=device)[:, None, None]
        out = padded.permute(0, 2, 3, 1)[batch_index, rows[:, :, None], cols[:, None, :]]  # (B, H, W, 3)
        y = torch.arange(height, device=device)
        x = torch.arange(width, device=device)
        inside_y = (y >= params["hole_y"][:, None]) & (y < params["hole_y"][:, None] + self.hole)
        inside_x = (x >= params["hole_x"][:, None]) & (x < params["hole_x"][:, None] + self.hole)
        hole = inside_y[:, :, None] & inside_x[:, None, :] & params["cutout"][:, None, None]  # (B, H, W)
        if self.fill.device != device:  # moved once, not per batch
            self.fill = self.fill.to(device)
        out = torch.where(hole[..., None], self.fill, out)
        return out.permute(0, 3, 1, 2)

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return self.apply(images, self.sample(images.shape[0], images.shape[-1], generator))


def _affine(mean: Sequence[float], std: Sequence[float], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(shift, scale) with ``(x - shift) / scale == (x / 255 - mean) / std``, shaped to broadcast."""
    return torch.tensor(mean, device=device).mul(255.0).view(1, -1, 1, 1), torch.tensor(std, device=device).mul(255.0).view(
        1, -1, 1, 1
    )


def normalize(
    images: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    channels_last: bool = False,
    affine: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """uint8 ``(B, 3, H, W)`` -> float32 ``(x / 255 - mean) / std`` (``affine``: precomputed on the device)."""
    shift, scale = affine if affine is not None else _affine(mean, std, images.device)
    out = (images.float() - shift) / scale
    return out.contiguous(memory_format=torch.channels_last) if channels_last else out


class DeviceBatches:
    """Shuffled (or, for evaluation, in-order) batches of a :class:`DeviceSplit` on its device.

    Under DDP each rank takes its ``shard`` (every ``world_size``-th index from ``rank``) of the
    epoch's permutation (train) or of the split (test): every image once, no padding. Iterating
    twice without :meth:`set_epoch` repeats the same order and augmentation.
    """

    def __init__(
        self,
        split: DeviceSplit,
        batch_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        augment: DeviceAugment | None = None,
        shuffle: bool = False,
        seed: int = 0,
        shard: Shard = Shard(),
    ) -> None:
        self.split, self.batch_size, self.mean, self.std = split, batch_size, mean, std
        self.augment, self.shuffle, self.seed, self.shard = augment, shuffle, seed, shard
        self.epoch = 0
        self.channels_last = split.images.device.type == "cuda"
        self.affine = _affine(mean, std, split.images.device)  # once: no host-to-device copy per batch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _indices(self, generator: torch.Generator) -> torch.Tensor:
        device = self.split.labels.device
        count = len(self.split)
        order = torch.randperm(count, device=device, generator=generator) if self.shuffle else torch.arange(count, device=device)
        return order[self.shard.rank :: self.shard.world_size]

    def __len__(self) -> int:
        mine = len(self.shard.indices(len(self.split)))
        return (mine + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        generator = torch.Generator(device=self.split.labels.device)
        generator.manual_seed(self.seed * 1000 + self.epoch)
        indices = self._indices(generator)
        for start in range(0, len(indices), self.batch_size):
            index = indices[start : start + self.batch_size]
            images = self.split.images[index]
            if self.augment is not None:
                images = self.augment(images, generator)
            yield normalize(images, self.mean, self.std, self.channels_last, self.affine), self.split.labels[index]


class SplitDataset(torch.utils.data.Dataset):
    """Map-style, normalised view of a split for the reports' figures; with ``augment``, item ``i``
    is augmented with a generator seeded by ``(seed, i)``, so the view is deterministic."""

    def __init__(
        self, split: DeviceSplit, mean: Sequence[float], std: Sequence[float], augment: DeviceAugment | None = None, seed: int = 0
    ) -> None:
        self.split, self.mean, self.std, self.augment, self.seed = split, mean, std, augment, seed
        self.targets = split.labels.tolist()

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.split.images[index : index + 1]
        if self.augment is not None:
            generator = torch.Generator(device=image.device).manual_seed(self.seed * 1_000_003 + index)
            image = self.augment(image, generator)
        return normalize(image, self.mean, self.std)[0].cpu(), self.targets[index]

"""Datasets: CIFAR-10 through torchvision (downloaded once into a cache), or any ImageFolder
tree with ``train/`` and ``test/`` splits (``data_dir``, ``$EXPLAINKIT_DATA_DIR``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import datasets, transforms

from explainkit.errors import DataError
from explainkit.models.card import CIFAR10_CLASSES, ModelCard

SPLITS = ("train", "test")


def dataset_size(dataset: Dataset) -> int:
    """``len(dataset)``: every map-style dataset has one, though torch's ``Dataset`` type omits it."""
    return len(dataset)  # type: ignore[arg-type]


def evenly_spaced(size: int, count: int) -> list[int]:
    """``min(count, size)`` indices spread evenly over ``range(size)``, first and last included, so
    a limited pass over a class-sorted ImageFolder still spans every class."""
    if count >= size:
        return list(range(size))
    return torch.linspace(0, size - 1, count).long().tolist()


def limit_evenly(dataset: Dataset, limit: int | None) -> Dataset:
    """``dataset``, or a :class:`~torch.utils.data.Subset` of ``limit`` evenly spaced items."""
    if limit is None or limit >= dataset_size(dataset):
        return dataset
    return Subset(dataset, evenly_spaced(dataset_size(dataset), limit))


def cache_dir() -> Path:
    return Path(os.environ.get("EXPLAINKIT_CACHE_DIR") or Path.home() / ".cache" / "explainkit")


def data_dir_from_env(data_dir: str | Path | None) -> Path | None:
    value = data_dir or os.environ.get("EXPLAINKIT_DATA_DIR")
    return Path(value) if value else None


def eval_transform(card: ModelCard) -> Callable[..., torch.Tensor]:
    """PIL image -> normalised tensor at the card's input size (no augmentation): resized to the
    input size, or for ImageNet-style cards (``card.resize``) shorter side resized, centre-cropped."""
    interpolation = transforms.InterpolationMode(card.interpolation)
    fit: list[Callable] = (
        [transforms.Resize(card.resize, interpolation=interpolation, antialias=True), transforms.CenterCrop(card.image_size)]
        if card.resize
        else [transforms.Resize(card.image_size, interpolation=interpolation, antialias=True)]
    )
    transform: Callable[..., torch.Tensor] = transforms.Compose(
        [*fit, transforms.ToTensor(), transforms.Normalize(card.mean, card.std)]
    )
    return transform


def check_image_folder(root: Path, splits: tuple[str, ...] = ("test",)) -> None:
    if not root.is_dir():
        raise DataError(f"data_dir={root} does not exist or is not a directory")
    for split in splits:
        split_dir = root / split
        if not split_dir.is_dir() or not any(p.is_dir() for p in split_dir.iterdir()):
            raise DataError(
                f"data_dir={root} has no {split}/<class>/ folders; expected an ImageFolder tree "
                f"with {' and '.join(f'{s}/' for s in SPLITS)} splits"
            )


def open_split(
    split: str, transform: Callable[..., Any] | None, data_dir: str | Path | None = None, download: bool = True
) -> tuple[Dataset, list[str]]:
    """``(dataset, class names)`` for ``split`` of an ImageFolder tree or of torchvision's CIFAR-10."""
    root = data_dir_from_env(data_dir)
    if root is not None:
        check_image_folder(root, (split,))
        dataset = datasets.ImageFolder(str(root / split), transform=transform)
        return dataset, list(dataset.classes)
    target = cache_dir() / "cifar10"
    try:
        dataset = datasets.CIFAR10(str(target), train=split == "train", transform=transform, download=download)
    except Exception as exc:  # no network, partial download, ...
        raise DataError(
            f"CIFAR-10 is not in {target} and could not be downloaded ({type(exc).__name__}); "
            "pass data_dir=DIR (an ImageFolder tree of train/ and test/ splits)"
        ) from None
    return dataset, list(CIFAR10_CLASSES)


def load_split(
    split: str,
    card: ModelCard,
    data_dir: str | Path | None = None,
    transform: Callable | None = None,
    download: bool = True,
) -> Dataset:
    """The ``split`` ("train"/"test") of the data, with classes checked against the model card.

    The data's classes must be the model's, or (an ImageFolder of a few of an ImageNet model's
    classes, say) a subset of them by name: labels are then mapped to the model's indices.
    """
    dataset, classes = open_split(split, transform or eval_transform(card), data_dir, download)
    if classes == list(card.classes):
        return dataset
    index = {name: i for i, name in enumerate(card.classes)}
    unknown = [name for name in classes if name not in index]
    if unknown:
        shown = ", ".join(unknown[:5]) + ("..." if len(unknown) > 5 else "")
        raise DataError(
            f"the data's class folders {shown} are not classes of the model ({len(card.classes)} classes: "
            f"{', '.join(list(card.classes)[:5])}...); name the folders after the model's classes or pass classes=FILE"
        )
    if isinstance(dataset, datasets.ImageFolder):
        dataset.target_transform = ToModelClass([index[name] for name in classes])
    return dataset


class ToModelClass:
    """Folder label -> the model's class index (a picklable ``target_transform`` for workers)."""

    def __init__(self, mapping: list[int]) -> None:
        self.mapping = mapping

    def __call__(self, label: int) -> int:
        return self.mapping[label]


def make_loader(
    dataset: Dataset,
    batch_size: int,
    device: torch.device,
    shuffle: bool = False,
    workers: int | None = None,
    batch_sampler: Sequence[list[int]] | None = None,
) -> DataLoader:
    """A DataLoader with worker processes and, on CUDA, pinned memory; ``batch_sampler`` (lists of
    indices) fixes each batch's rows instead of ``batch_size``/``shuffle``."""
    size = sum(len(b) for b in batch_sampler) if batch_sampler is not None else dataset_size(dataset)
    if workers is None:
        workers = min(8, os.cpu_count() or 1) if size > batch_size else 0
    common: dict[str, Any] = dict(num_workers=workers, pin_memory=device.type == "cuda", persistent_workers=False)
    if batch_sampler is not None:
        return DataLoader(dataset, batch_sampler=batch_sampler, **common)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, **common)

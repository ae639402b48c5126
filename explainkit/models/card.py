"""Model cards: the JSON written beside a model's weights (same stem, ``.json``), and the
preprocessing they imply."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from explainkit.errors import CheckpointError

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.247, 0.243, 0.261)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATIONS = ("nearest", "bilinear", "bicubic")


@dataclass
class ModelCard:
    """What explainkit needs to know to use a model; unknown JSON fields are kept in ``extra``."""

    architecture: str = "resnet18-cifar"
    num_classes: int = 10
    classes: list[str] = field(default_factory=lambda: list(CIFAR10_CLASSES))
    mean: list[float] = field(default_factory=lambda: list(CIFAR10_MEAN))
    std: list[float] = field(default_factory=lambda: list(CIFAR10_STD))
    input_size: list[int] = field(default_factory=lambda: [3, 32, 32])
    #: ImageNet-style preprocessing: resize the shorter side to ``resize``, then centre-crop to
    #: ``input_size``; ``None`` resizes straight to ``input_size`` (CIFAR).
    resize: int | None = None
    interpolation: str = "bilinear"
    test_accuracy: float | None = None
    epochs: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelCard":
        known = {name for name in cls.__dataclass_fields__ if name != "extra"}
        card = cls(**{k: v for k, v in data.items() if k in known})
        card.extra = {k: v for k, v in data.items() if k not in known}
        card.validate()
        return card

    @classmethod
    def read(cls, path: str | Path) -> "ModelCard":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"cannot read model card {path}: {exc}") from None
        if not isinstance(data, dict):
            raise CheckpointError(f"model card {path} must hold a JSON object")
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"invalid model card {path}: {exc}") from None

    def validate(self) -> None:
        if len(self.classes) != self.num_classes:
            raise ValueError(f"{len(self.classes)} class names for num_classes={self.num_classes}")
        if len(self.mean) != self.input_size[0] or len(self.std) != self.input_size[0]:
            raise ValueError("mean/std need one value per input channel")
        if len(self.input_size) != 3:
            raise ValueError("input_size must be [channels, height, width]")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, not {self.interpolation!r}")
        if self.resize is not None and self.resize < min(self.image_size):
            raise ValueError(f"resize {self.resize} is smaller than the input size {self.image_size}")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(data.pop("extra"))
        return data

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.input_size[1]), int(self.input_size[2])

    def describe_preprocessing(self) -> str:
        size = "x".join(map(str, self.image_size))
        fit = f"resize {self.resize} + centre crop {size}" if self.resize else f"resize to {size}"
        mean = ", ".join(f"{v:.3g}" for v in self.mean)
        std = ", ".join(f"{v:.3g}" for v in self.std)
        return f"{fit} ({self.interpolation}), mean ({mean}), std ({std})"

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """``(N, C, H, W)`` floats in [0, 1] -> normalised model input."""
        mean = torch.tensor(self.mean, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
        return (images - mean) / std

    def denormalize(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised model input -> floats in [0, 1] (clamped), for display."""
        mean = torch.tensor(self.mean, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
        return (images * std + mean).clamp(0, 1)

    def preprocess(self, images: Any | Sequence[Any]) -> torch.Tensor:
        """PIL images or ``uint8`` arrays (``HxW``, ``HxWx3`` or ``NxHxWx3``) -> normalised ``(N, 3, H, W)``.

        Images are converted to RGB and fitted to the card's input size (:meth:`fit`).

        Example:
            >>> batch = model.card.preprocess(PIL.Image.open("cat.jpg"))
        """
        from explainkit.runtime.images import to_rgb_uint8

        items: Iterable[Any]
        if isinstance(images, np.ndarray) and images.ndim == 4:
            items = list(images)
        elif isinstance(images, (list, tuple)):
            items = images
        else:
            items = [images]
        arrays = [to_rgb_uint8(item, self.image_size, self.resize, self.interpolation) for item in items]
        batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div_(255)
        return self.normalize(batch)

"""Building, loading and saving classifiers, and the local model store.

Loading never executes code from the file: weights are read with ``safetensors`` or
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn
import torchvision

from explainkit.errors import CheckpointError, ExplainkitError, first_line
from explainkit.models.card import ModelCard
from explainkit.runtime.io import atomic_path, write_json

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth")


def resnet18_cifar(num_classes: int = 10) -> nn.Module:
    """torchvision's ResNet18 with the CIFAR stem: a 3x3 stride-1 ``conv1`` and no max-pool."""
    model: nn.Module = torchvision.models.resnet18(weights=None, num_classes=num_classes)
    model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


ARCHITECTURES = {"resnet18-cifar": resnet18_cifar}


def build_model(architecture: str, num_classes: int) -> nn.Module:
    """An untrained model: ``"resnet18-cifar"`` or any ``torchvision.models`` name (e.g. ``"resnet50"``)."""
    if architecture in ARCHITECTURES:
        return ARCHITECTURES[architecture](num_classes)
    name = architecture.removeprefix("torchvision:")
    if name in torchvision.models.list_models(module=torchvision.models):
        model: nn.Module = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
        return model
    raise CheckpointError(
        f"unknown architecture {architecture!r}; use one of {', '.join(ARCHITECTURES)} or a torchvision.models name"
    )


def card_path(weights_path: str | Path) -> Path:
    return Path(weights_path).with_suffix(".json")


def state_mismatch(error: RuntimeError, limit: int = 240) -> str:
    """What a failed ``load_state_dict`` says is wrong (its first detail line: missing or unexpected
    keys, or a size mismatch), shortened to ``limit`` characters."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    detail = lines[1] if len(lines) > 1 else first_line(error)
    return detail if len(detail) <= limit else detail[:limit].rsplit(",", 1)[0] + ", ..."


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint not found: {path}") from None
    except IsADirectoryError:
        raise CheckpointError(f"checkpoint path is a directory: {path}") from None
    except Exception as exc:  # torch raises many types for a corrupt or unsafe file
        raise CheckpointError(f"cannot read checkpoint {path} (corrupt, or not a weights file): {first_line(exc)}") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):  # a training checkpoint
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"checkpoint {path} does not hold a state_dict of tensors")
    return state


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> nn.Module:
    """Load a model from weights plus the model card beside them (same stem, ``.json``).

    Args:
        path: a ``.pt``/``.pth`` state_dict or a ``.safetensors`` file.
        map_location: device for the returned model.

    Returns:
        The model in eval mode, with its :class:`~explainkit.models.card.ModelCard` as ``model.card``.
        Without a card, the CIFAR-10 ResNet18 card is assumed (with a warning).

    Example:
        >>> model = explainkit.load_model("models/resnet18-cifar10/model.pt")
        >>> model.card.classes[:2]
        ['airplane', 'automobile']
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    meta = card_path(path)
    if meta.exists():
        card = ModelCard.read(meta)
    else:
        import warnings

        warnings.warn(f"no model card {meta}; assuming a CIFAR-10 resnet18-cifar", RuntimeWarning, stacklevel=2)
        card = ModelCard()
    state = _read_state_dict(path)
    model = build_model(card.architecture, card.num_classes)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(
            f"checkpoint {path} does not fit architecture {card.architecture!r} with {card.num_classes} classes: "
            f"{state_mismatch(exc)}"
        ) from None
    model.card = card  # type: ignore[assignment]  # read it back with model_card(model)
    return model.to(map_location).eval()


def model_card(model: nn.Module) -> ModelCard:
    """The :class:`ModelCard` that :func:`load_model` attached to ``model``."""
    card = getattr(model, "card", None)
    if not isinstance(card, ModelCard):
        raise ExplainkitError(f"{type(model).__name__} has no model card; load it with explainkit.load_model")
    return card


def save_model(model: nn.Module, card: ModelCard, path: str | Path) -> Path:
    """Write weights (``.safetensors`` or ``.pt`` by suffix) and the card, each atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(state, str(tmp))
        else:
            torch.save(state, tmp)
    write_json(card_path(path), card.to_dict())
    return path


def models_dir(override: str | Path | None = None) -> Path:
    """The local model store: ``override``, else ``$EXPLAINKIT_MODELS_DIR``, else ``./models``."""
    return Path(override or os.environ.get("EXPLAINKIT_MODELS_DIR") or "models")


def newest_model(directory: str | Path | None = None) -> Path | None:
    """The most recently written weights file with a model card under the store, or None."""
    root = models_dir(directory)
    if not root.is_dir():
        return None
    found = [p for p in root.rglob("*") if p.suffix in WEIGHT_SUFFIXES and p.is_file() and card_path(p).is_file()]
    return max(found, key=lambda p: p.stat().st_mtime, default=None)


def require_model_path(checkpoint: str | Path | None, directory: str | Path | None = None) -> Path:
    """``checkpoint`` if given, else the newest model in the store; a clear error when there is none."""
    if checkpoint:
        return Path(checkpoint)
    found = newest_model(directory)
    if found is None:
        raise ExplainkitError(
            f"no model given and none found under {models_dir(directory)}/; pass checkpoint=PATH, or train one with: "
            "python -m explainkit train --recipe quick --data-dir DIR"
        )
    return found

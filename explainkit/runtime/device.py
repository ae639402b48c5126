"""Choosing the torch device."""

from __future__ import annotations

from typing import TypeVar

import torch

from explainkit.errors import ExplainkitError

DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")


def select_device(name: str = "auto") -> torch.device:
    """``auto`` picks cuda, then mps, then cpu; asking for an absent accelerator is an error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ExplainkitError("device=cuda requested but CUDA is not available; use device=auto or cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ExplainkitError("device=mps requested but MPS is not available; use device=auto or cpu")
    if name not in DEVICE_CHOICES:
        raise ExplainkitError(f"unknown device {name!r}; choose from {', '.join(DEVICE_CHOICES)}")
    return torch.device(name)


Movable = TypeVar("Movable", torch.Tensor, torch.nn.Module)


def device_layout(tensor_or_model: Movable, device: torch.device) -> Movable:
    """``channels_last`` on CUDA (convolutions run faster in it), unchanged elsewhere; for a batch
    of images or a model alike."""
    if device.type != "cuda":
        return tensor_or_model
    if isinstance(tensor_or_model, torch.Tensor):
        return tensor_or_model.contiguous(memory_format=torch.channels_last)
    return tensor_or_model.to(memory_format=torch.channels_last)

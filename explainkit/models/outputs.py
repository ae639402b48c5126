"""Finding the logits in whatever a classifier's forward returns."""

from __future__ import annotations

from typing import Any

import torch

from explainkit.errors import ExplainkitError


def logits_of(output: Any) -> torch.Tensor:
    """The ``(N, K)`` logits in a model's output: the tensor itself, the first element of a
    tuple/list, ``output["logits"]`` of a dict, or ``output.logits`` (Hugging Face's
    ``ImageClassifierOutput`` and friends)."""
    found: Any = output
    if isinstance(output, (tuple, list)) and output:
        found = output[0]
    elif isinstance(output, dict):
        found = output.get("logits")
    elif not isinstance(output, torch.Tensor) and hasattr(output, "logits"):
        found = output.logits
    if not isinstance(found, torch.Tensor) or found.ndim != 2:
        shape = tuple(found.shape) if isinstance(found, torch.Tensor) else type(found).__name__
        raise ExplainkitError(
            f"cannot find (N, classes) logits in the model's output ({type(output).__name__}, got {shape}); "
            "return a tensor, a tuple whose first element is the logits, a dict with 'logits', or an object with .logits"
        )
    return found


class LogitsOnly(torch.nn.Module):
    """``model`` with its forward reduced to the logits, for code that needs a plain tensor output
    (pytorch-grad-cam's ROAD metric, say). The model is a submodule: parameters are shared."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return logits_of(self.model(images))

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


def describe_output(output: Any) -> str:
    """A model's output in words, for errors: "a (2, 10) tensor", "a list of 2 dicts with keys
    boxes, labels, scores", "a dict with 'out' (2, 21, 64, 64)"."""
    if isinstance(output, torch.Tensor):
        return f"a {tuple(output.shape)} tensor"
    if isinstance(output, dict):
        parts = [
            f"{key!r} {tuple(value.shape)}" if isinstance(value, torch.Tensor) else repr(key) for key, value in output.items()
        ]
        kind = "dict" if type(output).__name__ in ("dict", "OrderedDict") else type(output).__name__  # ModelOutput
        return f"a {kind} with {', '.join(parts[:6])}"
    if isinstance(output, (list, tuple)):
        kinds = {type(item).__name__ for item in output}
        if output and all(isinstance(item, dict) for item in output):
            return f"a {type(output).__name__} of {len(output)} dicts with keys {', '.join(map(str, output[0]))}"
        if len(output) and all(isinstance(item, torch.Tensor) for item in output):
            return f"a {type(output).__name__} of tensors starting with {tuple(output[0].shape)}"
        return f"a {type(output).__name__} of {len(output)} ({', '.join(sorted(kinds))})"
    return f"a {type(output).__name__}"

"""The explainer base class and what every CAM method shares: target resolution, model-state
preservation and post-processing (ReLU, bilinear upsampling, per-map [0, 1] scaling).

Design after torch-cam's ``_CAM``: a method implements one small piece
(:meth:`Explainer.compute`, or :meth:`GradientCAM.channel_weights` for gradient CAMs) and
the base guarantees the contract users rely on.
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Protocol, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from explainkit.errors import ExplainkitError
from explainkit.models.layers import resolve_layer
from explainkit.models.modes import evaluation_mode

Targets = Union[None, int, str, Sequence[int], torch.Tensor, tuple[str, int]]
ALL = "all"
TOPK = "topk"


class ExplainerFn(Protocol):
    """What a registered factory returns: ``explainer(images, targets=None, normalize=True) -> maps``.

    :class:`Explainer` subclasses are such callables (and add :meth:`Explainer.explain`); a plugin
    may return any function of this shape.
    """

    def __call__(self, images: torch.Tensor, targets: Targets = None, normalize: bool = True) -> torch.Tensor: ...


@dataclass
class Explanation:
    """What one explainer call produced.

    maps: float32 on the images' device, ``(N, H, W)`` for single targets, ``(N, K, H, W)``
        for ``targets="all"`` and ``(N, J, H, W)`` for top-k and class sets.
    logits: the model's ``(N, K)`` output for the images.
    targets: the class indices explained: ``(N,)``, ``(N, J)`` for top-k and class sets, ``None`` for ``"all"``.
    """

    maps: torch.Tensor
    logits: torch.Tensor
    targets: torch.Tensor | None

    @property
    def probabilities(self) -> torch.Tensor:
        return self.logits.float().softmax(dim=1)


def parse_topk(targets: object) -> int | None:
    """``k`` for a top-k request (``("topk", k)`` or ``"topk:k"``), else ``None``."""
    if isinstance(targets, tuple) and len(targets) == 2 and targets[0] == TOPK:
        k = targets[1]
    elif isinstance(targets, str) and targets.startswith(TOPK + ":"):
        k = targets.split(":", 1)[1]
    else:
        return None
    try:
        value = int(k)
    except (TypeError, ValueError):
        raise ExplainkitError(f"top-k targets need an integer k, e.g. ('topk', 5) or 'topk:5'; got {targets!r}") from None
    if value < 1:
        raise ExplainkitError(f"top-k targets need k >= 1, got {value}")
    return value


def resolve_targets(targets: Targets, logits: torch.Tensor) -> torch.Tensor | str:
    """Turn the user's ``targets`` into class indices on the logits' device.

    Returns ``"all"``, an ``(N,)`` long tensor (one class per image) or an ``(N, J)`` one (several
    classes per image): for top-k (``("topk", k)`` / ``"topk:k"``) each image's ``k`` most
    probable classes, most probable first, or the rows of an ``(N, J)`` tensor/nested list given.
    ``None`` means each image's predicted class. Targets must have one row per image (a short list
    is an error, never a silently truncated batch).
    """
    n, num_classes = logits.shape
    if isinstance(targets, torch.Tensor) and targets.is_inference():
        targets = targets.clone()  # made under inference_mode: unusable where autograd records
    if targets is None:
        return logits.argmax(dim=1)
    k = parse_topk(targets)
    if k is not None:
        return logits.topk(min(k, num_classes), dim=1).indices
    if isinstance(targets, str):
        if targets != ALL:
            raise ExplainkitError(f"targets must be None, an int, a sequence of ints, 'all' or 'topk:K', not {targets!r}")
        return ALL
    if isinstance(targets, bool):
        raise ExplainkitError("targets must be class indices, not a bool")
    if isinstance(targets, int) or (isinstance(targets, torch.Tensor) and targets.ndim == 0):
        index = int(targets)
        if not 0 <= index < num_classes:
            raise ExplainkitError(f"target class {index} is out of range for a model with {num_classes} classes")
        return torch.full((n,), index, dtype=torch.long, device=logits.device)
    tensor = torch.as_tensor(targets, device=logits.device)
    if tensor.ndim not in (1, 2) or tensor.shape[0] != n or tensor.dtype.is_floating_point or tensor.numel() == 0:
        raise ExplainkitError(
            f"targets must hold one integer class per image ({n},) or a row of classes per image ({n}, J); "
            f"got shape {tuple(tensor.shape)}"
        )
    tensor = tensor.long()
    # One host sync to validate user input: a bad index would otherwise surface as a cryptic
    # device-side assert.
    low, high = torch.aminmax(tensor)
    if int(low) < 0 or int(high) >= num_classes:
        raise ExplainkitError(f"target classes must lie in [0, {num_classes - 1}], got {int(low)}..{int(high)}")
    return tensor


def class_sets(resolved: torch.Tensor | str, logits: torch.Tensor) -> torch.Tensor | None:
    """``(N, J)``: the classes each image is explained for when there are several (``"all"``:
    every class, top-k: its ``k``); ``None`` for one target per image."""
    if isinstance(resolved, str):
        return torch.arange(logits.shape[1], device=logits.device).expand(logits.shape[0], -1)
    return resolved if resolved.ndim == 2 else None


def normalize_maps(maps: torch.Tensor) -> torch.Tensor:
    """Min-max scale each ``(H, W)`` map to [0, 1]; a constant map (e.g. all zero) becomes 0."""
    flat = maps.flatten(-2)
    low = flat.amin(dim=-1, keepdim=True)
    span = flat.amax(dim=-1, keepdim=True) - low
    scaled = (flat - low) / torch.where(span > 0, span, torch.ones_like(span))
    return scaled.view_as(maps)


@functools.lru_cache(maxsize=64)
def _linear_resize_matrix(source: int, target: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``(target, source)`` weights of 1-D linear resizing (``align_corners=False``), so that
    ``matrix @ x`` equals ``F.interpolate(x, target, mode="linear")`` along that axis."""
    identity = torch.eye(source, device=device, dtype=dtype)[None]  # (1, source channels, source length)
    return F.interpolate(identity, size=target, mode="linear", align_corners=False)[0].T.contiguous()


def upsample_bilinear(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of the trailing ``(h, w)`` of ``maps`` to ``size`` (``align_corners=False``,
    no antialiasing): the values of ``F.interpolate(..., mode="bilinear")``.

    Why not ``F.interpolate``: its CUDA kernel parallelises over output pixels and loops over
    batch x channels inside each thread, so the 10,240 maps of an all-classes call at batch 1,024
    (4x4 -> 32x32) took 4.5 ms of a 12.8 ms call on an H200 (``benchmarks/recipe_sweep.py``'s
    profile). Bilinear resizing is separable and linear: ``R_h @ map @ R_w^T`` with two small
    interpolation matrices is the same arithmetic as one batched matmul, parallel over maps.
    """
    height, width = maps.shape[-2:]
    rows = _linear_resize_matrix(height, size[0], maps.device, maps.dtype)
    cols = _linear_resize_matrix(width, size[1], maps.device, maps.dtype)
    return rows @ maps @ cols.T


def postprocess(raw: torch.Tensor, size: tuple[int, int], normalize: bool = True) -> torch.Tensor:
    """ReLU, bilinear upsampling of the trailing ``(h, w)`` to ``size``, optional [0, 1] scaling.

    Works on ``(N, h, w)`` and ``(N, K, h, w)`` alike; always returns float32.
    """
    maps = F.relu(raw.float())
    if tuple(maps.shape[-2:]) != tuple(size):
        maps = upsample_bilinear(maps, (int(size[0]), int(size[1])))
    return normalize_maps(maps) if normalize else maps


def check_images(images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or not images.dtype.is_floating_point:
        got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ExplainkitError(f"images must be a normalised float tensor of shape (N, C, H, W), got {got}")
    if images.shape[0] == 0:
        raise ExplainkitError("images is an empty batch")
    if torch.is_inference_mode_enabled():
        raise ExplainkitError(
            "explainers need autograd, which torch.inference_mode() disables; "
            "call the explainer outside inference_mode (torch.no_grad() is fine)"
        )
    # One reduction and one sync per batch: NaN or Inf pixels would give maps full of NaN from
    # every gradient method, silently (pytorch-grad-cam's #42/#108); better a clear refusal.
    finite = torch.isfinite(images).flatten(1).all(dim=1)
    if not bool(finite.all()):
        bad = (~finite).nonzero().flatten().tolist()
        shown = ", ".join(map(str, bad[:10])) + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")
        raise ExplainkitError(f"images {shown} (0-based) contain NaN or Inf values; explainers need finite inputs")


def as_model_dtype(images: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """``images`` cast to the dtype of the model's floating-point parameters (a float64 or float16
    batch for a float32 model, a float32 batch for a bfloat16 model); unchanged when they agree."""
    dtype = next((p.dtype for p in model.parameters() if p.dtype.is_floating_point), images.dtype)
    return images if images.dtype == dtype else images.to(dtype)


class Explainer(ABC):
    """Base of every explainer: ``explainer(images, targets=None, normalize=True) -> maps``.

    Args:
        model: the classifier; it is run in eval mode during a call and its modes restored after.
        layer: dotted submodule path or module; ``None`` = :func:`explainkit.models.layers.default_layer`.

    ``images`` must be finite (NaN or Inf is an :class:`~explainkit.errors.ExplainkitError` naming
    the images) and are cast to the dtype of the model's parameters.

    ``targets`` is ``None`` (each image's predicted class), an ``int``, a sequence or tensor of
    ``N`` ints, ``"all"`` (every class, maps shaped ``(N, K, H, W)``), ``("topk", k)`` /
    ``"topk:k"`` (each image's ``k`` most probable classes, ``(N, k, H, W)``) or an ``(N, J)``
    tensor of classes per image (``(N, J, H, W)``).
    """

    #: human-readable name for titles and tables; subclasses override.
    name = "explainer"

    def __init__(self, model: nn.Module, layer: str | nn.Module | None = None) -> None:
        self.model = model
        self.layer_name, self.layer = resolve_layer(model, layer)

    def __call__(self, images: torch.Tensor, targets: Targets = None, normalize: bool = True) -> torch.Tensor:
        return self.explain(images, targets, normalize=normalize).maps

    def explain(self, images: torch.Tensor, targets: Targets = None, normalize: bool = True) -> Explanation:
        """Like calling the explainer, but also returns the logits and the targets explained."""
        check_images(images)
        images = as_model_dtype(images, self.model)
        if images.is_inference():  # e.g. a batch prepared under inference_mode
            images = images.clone()
        with evaluation_mode(self.model):
            raw, logits, resolved = self.compute(images, targets)
        maps = postprocess(raw, (images.shape[-2], images.shape[-1]), normalize)
        return Explanation(maps, logits.detach(), None if isinstance(resolved, str) else resolved)

    @abstractmethod
    def compute(self, images: torch.Tensor, targets: Targets) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | str]:
        """Return ``(raw_maps, logits, resolved_targets)`` for a batch, the model already in eval mode.

        ``raw_maps`` is ``(N, h, w)`` for one target per image, or ``(N, J, h, w)`` where
        :func:`class_sets` gives ``(N, J)`` classes (``"all"``, top-k), at any resolution; the base
        applies ReLU, upsampling and scaling. ``resolved_targets`` comes from :func:`resolve_targets`.
        """

    def __repr__(self) -> str:
        return f"{type(self).__name__}(layer={self.layer_name!r})"

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
from typing import Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from explainkit.errors import ExplainkitError
from explainkit.models.layers import resolve_layer
from explainkit.models.modes import evaluation_mode
from explainkit.targets import (
    ALL,
    TOPK,
    BoundTarget,
    Target,
    Targets,
    as_target,
    bound_classes,
    class_sets,
    parse_topk,
    resolve_targets,
)


class ExplainerFn(Protocol):
    """What a registered factory returns: ``explainer(images, targets=None, normalize=True) -> maps``.

    :class:`Explainer` subclasses are such callables (and add :meth:`Explainer.explain`); a plugin
    may return any function of this shape.
    """

    def __call__(self, images: torch.Tensor, targets: Targets = None, normalize: bool = True) -> torch.Tensor: ...


@dataclass
class Computed:
    """What :meth:`Explainer.compute` returns.

    raw: ``(N, h, w)`` maps for one score per image or ``(N, J, h, w)`` for ``J``, at any resolution.
    target: the target bound to the unperturbed forward (:meth:`~explainkit.targets.Target.bind`).
    scores: that forward's target scores, ``(N,)`` or ``(N, J)``.
    """

    raw: torch.Tensor
    target: BoundTarget
    scores: torch.Tensor


@dataclass
class Explanation:
    """What one explainer call produced.

    maps: float32 on the images' device, ``(N, H, W)`` for one score per image, ``(N, K, H, W)``
        for ``targets="all"`` and ``(N, J, H, W)`` for top-k, class sets and targets with ``J``
        scores per image (boxes, labels). Padding columns (:attr:`valid` ``False``) are zero.
    logits: the model's ``(N, K)`` output for classifiers; ``None`` for other outputs.
    targets: the class indices explained: ``(N,)``, ``(N, J)`` for top-k and class sets, ``None``
        for ``"all"`` and for targets that are not classes.
    scores: the target's scores on the unperturbed forward, ``(N,)`` or ``(N, J)``.
    target: the bound target (its ``details`` hold boxes, masks, references for figures).
    """

    maps: torch.Tensor
    logits: torch.Tensor | None
    targets: torch.Tensor | None
    scores: torch.Tensor | None = None
    target: BoundTarget | None = None

    @property
    def probabilities(self) -> torch.Tensor:
        if self.logits is None:
            raise ExplainkitError("this model's output has no class logits, so no probabilities")
        return self.logits.float().softmax(dim=1)

    @property
    def valid(self) -> torch.Tensor | None:
        """``(N, J)`` bool: which columns are real (``None``: all)."""
        return None if self.target is None else self.target.valid


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
    _refuse_non_finite(images, "contain NaN or Inf values; explainers need finite inputs")


def _refuse_non_finite(images: torch.Tensor, problem: str) -> None:
    """An :class:`ExplainkitError` naming the images of the batch that are not all finite."""
    finite = torch.isfinite(images).flatten(1).all(dim=1)
    if not bool(finite.all()):
        bad = (~finite).nonzero().flatten().tolist()
        shown = ", ".join(map(str, bad[:10])) + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")
        raise ExplainkitError(f"images {shown} (0-based) {problem}")


def as_model_dtype(images: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """``images`` cast to the dtype of the model's floating-point parameters (a float64 or float16
    batch for a float32 model, a float32 batch for a bfloat16 model); unchanged when they agree.
    Finite values beyond the model dtype's range (1e300 in float64 for a float32 model) would
    become Inf and silently give NaN maps: an :class:`ExplainkitError` naming those images."""
    dtype = next((p.dtype for p in model.parameters() if p.dtype.is_floating_point), images.dtype)
    if images.dtype == dtype:
        return images
    cast = images.to(dtype)
    if torch.finfo(dtype).max < torch.finfo(images.dtype).max:  # only a narrowing cast can overflow
        _refuse_non_finite(cast, f"overflow the model's {dtype} when cast to it; explainers need values it can hold")
    return cast


class Explainer(ABC):
    """Base of every explainer: ``explainer(images, targets=None, normalize=True) -> maps``.

    Args:
        model: the classifier; it is run in eval mode during a call and its modes restored after.
        layer: dotted submodule path or module; ``None`` = :func:`explainkit.models.layers.default_layer`.

    ``images`` must be finite (NaN or Inf is an :class:`~explainkit.errors.ExplainkitError` naming
    the images) and are cast to the dtype of the model's parameters.

    ``targets`` is ``None`` (each image's predicted class), an ``int``, a sequence or tensor of
    ``N`` ints, ``"all"`` (every class, maps shaped ``(N, K, H, W)``), ``("topk", k)`` /
    ``"topk:k"`` (each image's ``k`` most probable classes, ``(N, k, H, W)``), an ``(N, J)``
    tensor of classes per image (``(N, J, H, W)``), or a target object from
    :mod:`explainkit.targets` (segmentation regions, detected boxes, multi-label, similarity, a
    class against its look-alikes) or a plain callable ``fn(output) -> (N,) or (N, J) scores``.
    """

    #: human-readable name for titles and tables; subclasses override.
    name = "explainer"
    #: what the method reads, for ``explainkit methods``: "gradient", "perturbation",
    #: "class-agnostic", "attention", "fusion" (several layers), or "other".
    family = "other"
    #: whether the maps come from the ``layer`` given (False: the method reads the whole model,
    #: e.g. FullGrad or the attention methods, and ignores ``layer``; fusion refuses it).
    reads_layer = True

    def __init__(self, model: nn.Module, layer: str | nn.Module | None = None) -> None:
        self.model = model
        self.layer_name, self.layer = resolve_layer(model, layer)

    def __call__(self, images: torch.Tensor, targets: Targets = None, normalize: bool = True) -> torch.Tensor:
        return self.explain(images, targets, normalize=normalize).maps

    def explain(self, images: torch.Tensor, targets: Targets = None, normalize: bool = True) -> Explanation:
        """Like calling the explainer, but also returns the logits, the target and its scores."""
        check_images(images)
        images = as_model_dtype(images, self.model)
        if images.is_inference():  # e.g. a batch prepared under inference_mode
            images = images.clone()
        return self.explain_checked(images, targets, normalize)

    def explain_checked(self, images: torch.Tensor, targets: Targets = None, normalize: bool = True) -> Explanation:
        """:meth:`explain` for ``images`` already checked and cast (what a captured CUDA graph
        replays, :mod:`explainkit.explainers.graphs`): compute in eval mode, zero padding
        columns, post-process."""
        with evaluation_mode(self.model):
            computed = _as_computed(self.compute(images, as_target(targets)), self.name)
        bound, raw = computed.target, computed.raw
        if bound.valid is not None and raw.ndim == 4:  # padding columns: zero maps, not noise
            raw = raw * bound.valid[:, : raw.shape[1], None, None].to(raw.dtype)
        maps = postprocess(raw, (images.shape[-2], images.shape[-1]), normalize)
        classes = bound.classes if isinstance(bound.classes, torch.Tensor) else None
        return Explanation(maps, bound.logits, classes, computed.scores.detach(), bound)

    @abstractmethod
    def compute(self, images: torch.Tensor, target: Target) -> Computed:
        """The raw maps of a batch for ``target`` (not yet bound), the model already in eval mode.

        Bind the target to the unperturbed forward's output (``bound = target.bind(output)``),
        score it (``bound(output)``: ``(N,)`` or ``(N, J)``) and return :class:`Computed`;
        ``raw`` is ``(N, h, w)`` or ``(N, J, h, w)`` at any resolution; the base applies ReLU,
        upsampling and scaling. (A ``(raw, logits, resolved_classes)`` tuple, the contract before
        target objects, is still accepted from class-only plugins.)
        """

    def __repr__(self) -> str:
        return f"{type(self).__name__}(layer={self.layer_name!r})"


def _as_computed(result: Computed | tuple, name: str) -> Computed:
    """``result``, or the ``(raw, logits, resolved)`` of a class-only plugin as :class:`Computed`."""
    if isinstance(result, Computed):
        return result
    if isinstance(result, tuple) and len(result) == 3 and isinstance(result[1], torch.Tensor):
        raw, logits, resolved = result
        bound = bound_classes(resolved, logits.detach())
        return Computed(raw, bound, bound(logits))
    raise ExplainkitError(f"explainer {name!r}: compute() returned {type(result).__name__}, not Computed")


def class_target(target: Target, logits: torch.Tensor, method: str) -> torch.Tensor | str:
    """The classes of a class target (for methods that explain class logits only), resolved on
    ``logits``; any other target is a one-line error naming the method."""
    from explainkit.targets import ClassScores

    if not isinstance(target, ClassScores):
        raise ExplainkitError(f"{method} explains class scores only; it cannot take {target!r}")
    return resolve_targets(target.classes, logits)


__all__ = [
    "ALL",
    "TOPK",
    "Computed",
    "Explainer",
    "ExplainerFn",
    "Explanation",
    "Targets",
    "as_model_dtype",
    "check_images",
    "class_sets",
    "class_target",
    "normalize_maps",
    "parse_topk",
    "postprocess",
    "resolve_targets",
    "upsample_bilinear",
]

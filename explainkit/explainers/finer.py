"""Finer-CAM: a gradient CAM of each class against the classes most like it."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from explainkit.errors import ExplainkitError
from explainkit.explainers.base import Computed
from explainkit.explainers.gradient import (
    GradCAM,
    GradCAMElementWise,
    GradCAMPlusPlus,
    GradientCAM,
    HiResCAM,
    LayerCAM,
    XGradCAM,
)
from explainkit.models.layouts import Layout
from explainkit.targets import ClassDifference, ClassDifferences, ClassScores, Target

#: the gradient CAMs whose weighting Finer-CAM can use, by registry name
BASES: dict[str, type[GradientCAM]] = {
    cls.name: cls for cls in (GradCAM, GradCAMPlusPlus, XGradCAM, HiResCAM, LayerCAM, GradCAMElementWise)
}


class FinerCAM(GradientCAM):
    r"""Finer-CAM (Zhang et al., "Finer-CAM: Spotting the Difference Reveals Finer Details for Visual
    Explanation", CVPR 2025, https://arxiv.org/abs/2501.11309).

    A gradient CAM (Grad-CAM by default) whose score is the explained class *against* the classes
    the model finds most like it, so the map keeps the details that tell them apart and drops the
    evidence they share. With ``y`` the logits, ``t`` the class, ``S`` its ``comparisons`` nearest
    classes (smallest ``|y_k - y_t|``) and ``p = softmax(y)`` (pytorch-grad-cam's
    ``FinerWeightedTarget``, :class:`~explainkit.targets.ClassDifferences`):

    .. math:: s^t = \frac{\sum_{k \in S} p_k \, (y_t - \alpha\, y_k)}{\sum_{k \in S} p_k + 10^{-9}},
              \qquad L = \mathrm{ReLU}\Big(\sum_c w_c(\partial s^t / \partial A) \, A_c\Big)

    with ``w`` the base method's weighting (Grad-CAM: the spatial mean of the gradient).
    ``alpha = 0`` gives the base method's map of the plain logit (the softmax weights cancel, up to the 1e-9).

    Targets: class forms (``None``, ints, per-image tensors, ``"all"``, top-k, ``(N, J)`` class
    sets, :class:`~explainkit.targets.ClassScores`) become "that class minus its look-alikes",
    one column per class, all columns from one forward and one batched backward. A
    :class:`~explainkit.targets.ClassDifference` or
    :class:`~explainkit.targets.ClassDifferences` given explicitly is used as it is (its own
    ``comparisons`` and ``alpha``). Any other target (regions, boxes, labels, similarity, a
    callable) has no look-alike classes and is an :class:`~explainkit.errors.ExplainkitError`:
    use the base method for those.

    Differences from torch-cam's ``FinerCAM``: torch-cam subtracts the plain mean of the
    references' logits, ``y_t - \gamma \cdot \mathrm{mean}_{k \in S} y_k`` (``γ = 0.6``); we follow
    pytorch-grad-cam and the paper's reference code (softmax-weighted, ``α = 1``).

    Cost: as the base method, one forward and one backward above the layer (a batched one for
    several classes). Prefer it for fine-grained classes (bird species, car models) or whenever
    the plain CAM highlights the whole object for every similar class; prefer the plain method
    when the question is "where is the object" rather than "why this class and not that one".

    Args:
        model, layer, autocast, layout, class_chunk: see :class:`~explainkit.explainers.gradient.GradientCAM`.
        base: the gradient CAM whose weighting is used: ``"gradcam"`` (default), ``"gradcam++"``,
            ``"xgradcam"``, ``"hirescam"``, ``"layercam"``, ``"gradcam-elementwise"``.
        comparisons: how many look-alike classes each class is contrasted with (default 3, as
            pytorch-grad-cam; fewer when the model has fewer classes).
        alpha: how strongly the look-alikes are subtracted (default 1, as pytorch-grad-cam).
    """

    name = "finercam"
    family = "gradient"

    def __init__(
        self,
        model: nn.Module,
        layer: str | nn.Module | None = None,
        *,
        base: str = "gradcam",
        comparisons: int = 3,
        alpha: float = 1.0,
        autocast: torch.dtype | None = None,
        layout: Layout | None = None,
        class_chunk: int = 64,
    ):
        super().__init__(model, layer, autocast=autocast, layout=layout, class_chunk=class_chunk)
        if base not in BASES:
            raise ExplainkitError(f"base must be one of {', '.join(BASES)}; got {base!r}")
        if isinstance(comparisons, bool) or not isinstance(comparisons, int) or comparisons < 1:
            raise ExplainkitError(f"comparisons must be an integer of at least 1, got {comparisons!r}")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
            raise ExplainkitError(f"alpha must be a finite number, got {alpha!r}")
        self.base, self.comparisons, self.alpha = base, comparisons, float(alpha)
        # The base method's own weighting (channel_weights or contributions), not a copy of it.
        self.weighting = BASES[base](model, self.layer, autocast=autocast, layout=layout, class_chunk=class_chunk)

    def _cam(self, activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
        return self.weighting._cam(activations, gradients)

    def contrast(self, target: Target) -> Target:
        """The look-alike target for ``target``: class forms become
        :class:`~explainkit.targets.ClassDifferences`; explicit class differences pass through."""
        if isinstance(target, (ClassDifference, ClassDifferences)):
            return target
        if isinstance(target, ClassScores):
            return ClassDifferences(target.classes, comparisons=self.comparisons, alpha=self.alpha)
        raise ExplainkitError(
            f"finercam contrasts classes with their look-alikes; targets must be classes or a ClassDifference, not {target!r}"
        )

    def compute(self, images: torch.Tensor, target: Target) -> Computed:
        return super().compute(images, self.contrast(target))

    def __repr__(self) -> str:
        return f"FinerCAM(layer={self.layer_name!r}, base={self.base!r}, comparisons={self.comparisons}, alpha={self.alpha})"


__all__ = ["BASES", "FinerCAM"]

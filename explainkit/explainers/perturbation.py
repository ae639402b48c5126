"""The base of perturbation CAMs (Score-CAM, Ablation-CAM): channel weights from the model's
scores on perturbed copies of each image, one perturbation per channel of the target layer.

What the base does once: one forward to the layer (no autograd), the layout, target resolution,
turning the ``(N, C, K)`` scores of every class into maps for one target per image or for
``targets="all"`` (the same perturbed forwards serve every class), and chunking: a method's
perturbed forwards run in chunks of ``batch_size`` (image, channel) pairs on the images' device,
so memory stays bounded whatever the number of images and channels.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn

from explainkit.errors import ExplainkitError
from explainkit.explainers.base import Computed, Explainer
from explainkit.explainers.gradient import forward_with_activations
from explainkit.models.layouts import Layout, resolve_layout
from explainkit.targets import BoundTarget, Target

AboveLayer = Callable[[torch.Tensor, torch.Tensor], Any]


@dataclass
class LayerPass:
    """One batch's unperturbed forward, as a perturbation method sees it.

    images: the input ``(N, C_in, H, W)``. target: the target bound to the unperturbed forward.
    output: the layer's output in its own layout. layout: how ``output`` maps to channels-first.
    activations: ``(N, C, h, w)`` float32. above: when the method ran the model as two parts
    (:mod:`explainkit.models.split`), ``above(layer_outputs, owners) -> model output`` runs only
    the part above the layer for layer outputs of the images ``owners``; else ``None``.
    """

    images: torch.Tensor
    target: BoundTarget
    output: torch.Tensor
    layout: Layout
    activations: torch.Tensor
    above: AboveLayer | None = None

    def scores(self, model_output: Any, owners: torch.Tensor) -> torch.Tensor:
        """``(M, J)``: the target's scores for perturbed forwards of the images ``owners``."""
        scores = self.target(model_output, owners).float()
        return scores[:, None] if scores.ndim == 1 else scores


class PerturbationCAM(Explainer):
    """``L = ReLU(Σ_c w_c A_c)`` with ``w`` from scores on perturbed inputs; subclasses give
    :meth:`channel_scores` (the perturbed forwards) and :meth:`weights_from_scores`.

    Args:
        model, layer: see :class:`~explainkit.explainers.base.Explainer`.
        batch_size: (image, channel) pairs per perturbed forward; lower it to save memory. The
            default, 64, is the fastest full-forward batch on a CPU (ResNet18-CIFAR: 161 images/s
            at 64, 123 at 256: larger batches fall out of cache); raise it on a GPU.
        layout: how the layer's output maps to ``(N, C, h, w)`` (default: read off the model).
    """

    family = "perturbation"

    def __init__(
        self, model: nn.Module, layer: str | nn.Module | None = None, *, batch_size: int = 64, layout: Layout | None = None
    ) -> None:
        super().__init__(model, layer)
        if batch_size < 1:
            raise ExplainkitError(f"batch_size must be at least 1, got {batch_size}")
        self.batch_size = batch_size
        self.layout = layout

    def forward(self, images: torch.Tensor) -> tuple[Any, torch.Tensor, AboveLayer | None]:
        """``(model output, layer output, above)`` of the unperturbed forward, without autograd
        (``above`` as in :class:`LayerPass`; the base runs the whole model: ``None``)."""
        output, activations = forward_with_activations(self.model, self.layer, self.layer_name, images)
        return output, activations, None

    def pair_chunks(self, images: int, channels: int, device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(image index, channel index)`` tensors for chunks of ``batch_size`` of the ``images x
        channels`` pairs, image-major (so ``torch.cat`` of per-chunk results views as ``(N, C, ...)``)."""
        total = images * channels
        for start in range(0, total, self.batch_size):
            pairs = torch.arange(start, min(start + self.batch_size, total), device=device)
            yield pairs // channels, pairs % channels

    @abstractmethod
    def channel_scores(self, run: LayerPass) -> torch.Tensor:
        """``(N, C, J)``: the target's ``J`` scores with each channel's perturbation
        (:meth:`LayerPass.scores` of each chunk's output)."""

    @abstractmethod
    def weights_from_scores(self, scores: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        """``(N, C, J)`` channel weights from the perturbed ``scores (N, C, J)`` and the
        unperturbed ``reference (N, J)``."""

    def compute(self, images: torch.Tensor, target: Target) -> Computed:
        with torch.no_grad():
            model_output, output, above = self.forward(images)
            layout = resolve_layout(self.layout, output, images, self.model, self.layer_name)
            activations = layout.to_channels_first(output.float())  # (N, C, h, w)
            bound = target.bind(model_output)
            reference = bound(model_output)  # (N,) or (N, J): every column from the same perturbed forwards
            scores = self.channel_scores(LayerPass(images, bound, output, layout, activations, above))
            weights = self.weights_from_scores(scores, reference.float().view(len(images), -1))  # (N, C, J)
        maps = torch.einsum("ncj,nchw->njhw", weights, activations)
        return Computed(maps[:, 0] if reference.ndim == 1 else maps, bound, reference)

"""EigenCAM: the first principal component of the layer's activations, no gradients."""

from __future__ import annotations

import torch
import torch.nn as nn

from explainkit.explainers.base import Computed, Explainer
from explainkit.explainers.gradient import forward_with_activations
from explainkit.models.layouts import Layout, resolve_layout
from explainkit.targets import BoundTarget, Target


def positive_dominant(maps: torch.Tensor) -> torch.Tensor:
    """Each ``(h, w)`` map flipped when its most negative value outweighs its most positive one:
    a principal component's sign is arbitrary; this makes the salient side positive (Chung & Ying
    2025, eq. 13; the same rule as scikit-learn's ``svd_flip``, which makes an eigenvector's
    largest-magnitude entry positive)."""
    flat = maps.flatten(-2)
    flip = flat.amin(dim=-1).abs() > flat.amax(dim=-1).abs()
    return torch.where(flip[..., None, None], -maps, maps)


def repeat_for_columns(maps: torch.Tensor, bound: BoundTarget, model_output: object) -> Computed:
    """A class-agnostic method's ``(N, h, w)`` maps as :class:`Computed` for any target: the same
    map for every column when the target has ``J`` scores per image (``"all"``, top-k, boxes)."""
    scores = bound(model_output).detach()
    if scores.ndim == 2:
        return Computed(maps[:, None].expand(-1, scores.shape[1], -1, -1), bound, scores)
    return Computed(maps, bound, scores)


class EigenCAM(Explainer):
    r"""Eigen-CAM (Muhammad & Yeasin, IJCNN 2020, https://arxiv.org/abs/2008.00299).

    With ``X`` the ``(hw, C)`` activations of one image, centred per channel, and ``v_1`` its first
    right singular vector:

    .. math:: L = \mathrm{reshape}_{h \times w}(X v_1) = \sigma_1 u_1

    The sign of a singular vector is arbitrary; the map is flipped when its most negative value
    outweighs its most positive one (the correction of Chung & Ying 2025, eq. 13), so salient
    regions come out positive. pytorch-grad-cam's ``EigenCAM`` leaves the sign to LAPACK; the maps
    agree up to that sign.

    Class-agnostic: every target gets the same map (``targets="all"`` repeats it). Cost: one
    forward without autograd and one small batched SVD on the device (``hw x C`` per image), no
    backward. Prefer it for a quick look at what a layer attends to, or where gradients are
    unavailable or noisy; prefer gradient CAMs to tell classes apart.
    """

    name = "eigencam"
    family = "class-agnostic"

    def __init__(self, model: nn.Module, layer: str | nn.Module | None = None, *, layout: Layout | None = None) -> None:
        super().__init__(model, layer)
        self.layout = layout

    def compute(self, images: torch.Tensor, target: Target) -> Computed:
        model_output, output = forward_with_activations(self.model, self.layer, self.layer_name, images)
        layout = resolve_layout(self.layout, output, images, self.model, self.layer_name)
        activations = torch.nan_to_num(layout.to_channels_first(output.float()))  # (N, C, h, w)
        flat = activations.flatten(2).transpose(1, 2)  # (N, hw, C)
        flat = flat - flat.mean(dim=1, keepdim=True)
        u, s, _ = torch.linalg.svd(flat, full_matrices=False)  # batched, on the device
        projection = (u[..., 0] * s[..., :1]).unflatten(1, activations.shape[-2:])  # X v_1 = sigma_1 u_1
        return repeat_for_columns(positive_dominant(projection), target.bind(model_output), model_output)

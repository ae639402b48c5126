"""KPCA-CAM: the first kernel principal component of the layer's activations, no gradients."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from explainkit.errors import ExplainkitError
from explainkit.explainers.base import Computed, Explainer
from explainkit.explainers.eigen import positive_dominant, repeat_for_columns
from explainkit.explainers.gradient import forward_with_activations
from explainkit.models.layouts import Layout, resolve_layout
from explainkit.targets import Target

KERNELS = ("sigmoid", "rbf", "poly", "linear", "cosine")  # scikit-learn KernelPCA's


def kernel_matrix(points: torch.Tensor, kernel: str, gamma: float, degree: float = 3, coef0: float = 1.0) -> torch.Tensor:
    """``(..., n, n)`` kernel of the rows of ``points (..., n, d)``, batched over the leading dims,
    as scikit-learn's ``pairwise_kernels`` defines each ``kernel``."""
    if kernel in ("linear", "poly", "sigmoid"):
        gram = points @ points.transpose(-1, -2)
        if kernel == "linear":
            return gram
        if kernel == "poly":
            return (gamma * gram + coef0) ** degree
        return torch.tanh(gamma * gram + coef0)
    if kernel == "cosine":
        unit = F.normalize(points, dim=-1)  # zero rows stay zero, as in scikit-learn
        return unit @ unit.transpose(-1, -2)
    if kernel == "rbf":
        return torch.exp(-gamma * torch.cdist(points, points).square())
    raise ExplainkitError(f"kernel must be one of {', '.join(KERNELS)}, got {kernel!r}")


def center_kernel(matrix: torch.Tensor) -> torch.Tensor:
    """``K - 1K/n - K1/n + 1K1/n^2``: the kernel of the feature-space points centred on their mean
    (scikit-learn's ``KernelCenterer``), batched over the leading dims."""
    rows = matrix.mean(dim=-1, keepdim=True)
    cols = matrix.mean(dim=-2, keepdim=True)
    return matrix - rows - cols + rows.mean(dim=-2, keepdim=True)


class KPCACAM(Explainer):
    r"""KPCA-CAM (Karmani, Sivakaran, Prasad, Ali, Yang & Tang, arXiv 2024,
    https://arxiv.org/abs/2410.00267): Eigen-CAM with the kernel trick.

    With ``x_1 ... x_n`` the ``C``-channel activations at the ``n = hw`` positions of one image,
    centred per channel, ``K_{ij} = k(x_i, x_j)`` their kernel matrix, ``\tilde K`` its centring
    (``K - 1K/n - K1/n + 1K1/n^2``) and ``(\lambda_1, v_1)`` its largest eigenpair:

    .. math:: L = \mathrm{reshape}_{h \times w}\big(\sqrt{\lambda_1}\, v_1\big)

    the positions' coordinates on the first principal component in the kernel's feature space.
    The kernel is pytorch-grad-cam's default, ``sigmoid``: ``k(x, y) = \tanh(\gamma x^\top y + c_0)``
    with scikit-learn's defaults ``\gamma = 1/C``, ``c_0 = 1``; ``rbf``
    (``\exp(-\gamma \lVert x - y\rVert^2)``), ``poly`` (``(\gamma x^\top y + c_0)^d``, ``d = 3``),
    ``linear`` (Eigen-CAM's map) and ``cosine`` are options. The sign is
    made positive-dominant (:func:`positive_dominant`), which is also scikit-learn's choice, so the
    maps equal pytorch-grad-cam's ``KPCA_CAM`` (which runs scikit-learn's ``KernelPCA`` image by
    image on the CPU); here every image's kernel and ``eigh`` run batched on the images' device.

    Class-agnostic: every target gets the same map (``targets="all"`` repeats it). Cost: one
    forward without autograd, an ``(hw x hw)`` kernel per image and one batched symmetric
    eigendecomposition (``O((hw)^3)``: cheap at ``7 x 7``, heavy beyond ``~40 x 40`` positions);
    no backward. Prefer it to Eigen-CAM when the activations' structure is not linear (the
    paper reports tighter maps on ImageNet CNNs); like Eigen-CAM it cannot tell classes apart.

    Args:
        model, layer: see :class:`~explainkit.explainers.base.Explainer`.
        kernel: one of ``sigmoid`` (default), ``rbf``, ``poly``, ``linear``, ``cosine``.
        gamma: the kernel's scale (``None``: ``1 / channels``); degree, coef0: of ``poly``/``sigmoid``.
        layout: how the layer's output maps to ``(N, C, h, w)`` (default: read off the model).
    """

    name = "kpcacam"
    family = "class-agnostic"

    def __init__(
        self,
        model: nn.Module,
        layer: str | nn.Module | None = None,
        *,
        kernel: str = "sigmoid",
        gamma: float | None = None,
        degree: float = 3,
        coef0: float = 1.0,
        layout: Layout | None = None,
    ) -> None:
        super().__init__(model, layer)
        if kernel not in KERNELS:
            raise ExplainkitError(f"kernel must be one of {', '.join(KERNELS)}, got {kernel!r}")
        if gamma is not None and not gamma > 0:
            raise ExplainkitError(f"gamma must be positive (or None for 1 / channels), got {gamma}")
        if kernel == "poly" and not degree > 0:
            raise ExplainkitError(f"degree must be positive, got {degree}")
        self.kernel, self.gamma, self.degree, self.coef0 = kernel, gamma, degree, coef0
        self.layout = layout

    def compute(self, images: torch.Tensor, target: Target) -> Computed:
        model_output, output = forward_with_activations(self.model, self.layer, self.layer_name, images)
        layout = resolve_layout(self.layout, output, images, self.model, self.layer_name)
        activations = torch.nan_to_num(layout.to_channels_first(output.float()))  # (N, C, h, w)
        points = activations.flatten(2).transpose(1, 2)  # (N, hw, C)
        points = points - points.mean(dim=1, keepdim=True)
        gamma = 1.0 / points.shape[-1] if self.gamma is None else self.gamma
        matrix = kernel_matrix(points, self.kernel, gamma, self.degree, self.coef0)
        values, vectors = torch.linalg.eigh(center_kernel(matrix))  # ascending, batched on the device
        # Rounding noise is no component: a constant kernel (a zero layer) centres to entries of a
        # few ulps, an eigenvalue up to hw times that, whose eigenvector would become a noise map.
        noise = 16 * torch.finfo(matrix.dtype).eps * matrix.shape[-1] * matrix.flatten(1).abs().amax(dim=1)
        top_value = torch.where(values[..., -1] > noise, values[..., -1], 0)
        top = vectors[..., -1] * top_value[:, None].sqrt()  # (N, hw)
        projection = positive_dominant(top.unflatten(1, activations.shape[-2:]))
        return repeat_for_columns(projection, target.bind(model_output), model_output)


__all__ = ["KERNELS", "KPCACAM", "center_kernel", "kernel_matrix"]

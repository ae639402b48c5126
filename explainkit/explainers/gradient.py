"""Gradient-weighted CAMs with forward hooks: GradCAM and GradCAM++.

Why our own instead of pytorch-grad-cam: it runs ``loss.backward()`` through the whole model
(filling, and clobbering, every parameter's ``.grad``), copies activations and gradients to the
CPU in its hooks and does the maths in numpy, one target per call. Here the forward below the
target layer runs without autograd, the layer output becomes a fresh leaf, and
``torch.autograd.grad`` differentiates back to that leaf only — one inference-cost forward plus
a backward through the layers above. ``targets="all"`` gets every class from the same forward
with one batched backward (``is_grads_batched``). Everything stays on the images' device.
"""

from __future__ import annotations

import threading
import warnings
from contextlib import contextmanager
from typing import Any, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from explainkit.errors import ExplainkitError
from explainkit.explainers.base import ALL, Computed, Explainer
from explainkit.models.layouts import Layout, resolve_layout
from explainkit.targets import Target


@contextmanager
def layer_output_as_leaf(layer: nn.Module, *, gradients: bool = True) -> Iterator[dict[str, torch.Tensor]]:
    """Run the model's forward inside this block to get the layer output as a grad-requiring leaf.

    Autograd is off until ``layer`` has run (nothing below it is recorded, so no memory is
    kept for a backward we will not do) and on from there. The hook is removed and the
    caller's grad mode restored on exit, also after an exception.

    Thread-safe: the hook acts only on forwards run by the thread that entered the block, so
    several threads may explain with one shared model at once (grad mode is per thread too).

    ``gradients=False`` (methods that need activations only, like EigenCAM): the output is
    captured detached and autograd stays off for the whole forward.
    """
    captured: dict[str, torch.Tensor] = {}
    owner = threading.get_ident()

    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor | None:
        if threading.get_ident() != owner:  # another thread's forward through the shared model
            return None
        if not isinstance(output, torch.Tensor):
            raise ExplainkitError(
                f"layer {type(module).__name__} returns {type(output).__name__}, not a tensor; pick another layer"
            )
        if not gradients:
            # A copy: a following in-place op (ReLU(inplace=True)) would overwrite a detached view.
            captured["activations"] = output.detach().clone()
            return None
        torch.set_grad_enabled(True)
        leaf = output.detach().requires_grad_(True)
        captured["activations"] = leaf
        # A clone, so a following in-place op (ReLU(inplace=True)) does not modify the leaf.
        return leaf.clone()

    grad_enabled = torch.is_grad_enabled()
    handle = layer.register_forward_hook(hook)
    torch.set_grad_enabled(False)
    try:
        yield captured
    finally:
        handle.remove()
        torch.set_grad_enabled(grad_enabled)


def forward_with_activations(
    model: nn.Module, layer: nn.Module, layer_name: str, images: torch.Tensor
) -> tuple[Any, torch.Tensor]:
    """``(the model's output, the layer's detached output)`` from one forward without autograd
    (for methods that need activations only: EigenCAM, Score-CAM)."""
    with torch.no_grad(), layer_output_as_leaf(layer, gradients=False) as captured:
        output = model(images)
    if "activations" not in captured:
        raise ExplainkitError(f"layer {layer_name!r} did not run in the model's forward pass")
    return output, captured["activations"]


class GradientCAM(Explainer):
    """A CAM ``relu(Σ_c w_c · A_c)`` whose weights come from gradients.

    Two override levels, both given ``activations (N, C, h, w)`` and ``gradients`` of shape
    ``(N, C, h, w)`` (one target per image) or ``(K, N, C, h, w)`` (``targets="all"``):

    * :meth:`channel_weights` returns one weight per channel, ``(N, C)`` / ``(K, N, C)``
      (Grad-CAM, Grad-CAM++, XGrad-CAM); the map is then an ``einsum``;
    * :meth:`contributions` returns every activation's contribution, broadcastable to the
      gradients' shape, summed over channels (HiResCAM, LayerCAM, element-wise Grad-CAM).

    The base does the rest once: the leaf hook, target resolution, the batched all-classes
    backward, layouts, autocast and leaving the model as it found it.

    Args:
        model, layer: see :class:`~explainkit.explainers.base.Explainer`.
        autocast: optional dtype (e.g. ``torch.bfloat16``) to run the model under
            ``torch.autocast`` on the images' device; the CAM itself is computed in float32.
        layout: how the layer's output maps to ``(N, C, h, w)``
            (:class:`~explainkit.models.layouts.Layout`); default: read off the model or inferred, so
            ViT token sequences and Swin's channels-last stages work without a reshape function.
        class_chunk: classes per batched backward for ``"all"`` and top-k: the gradients held at
            once are ``class_chunk x N x`` the layer's output, so a 1000-class model's
            ``targets="all"`` runs in bounded memory (16 backwards of 64 classes).
    """

    family = "gradient"

    def __init__(
        self,
        model: nn.Module,
        layer: str | nn.Module | None = None,
        *,
        autocast: torch.dtype | None = None,
        layout: Layout | None = None,
        class_chunk: int = 64,
    ):
        super().__init__(model, layer)
        if not isinstance(class_chunk, int) or isinstance(class_chunk, bool) or class_chunk < 1:
            raise ExplainkitError(f"class_chunk must be a positive integer, got {class_chunk!r}")
        self.autocast = autocast
        self.layout = layout
        self.class_chunk = class_chunk

    def channel_weights(self, activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
        """Return ``(..., N, C)`` weights from ``activations (N, C, h, w)`` and ``gradients (..., N, C, h, w)``."""
        raise NotImplementedError

    def contributions(self, activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
        """Return ``(..., N, C, h, w)``: each activation's contribution to the map (summed over ``C``).
        Default: ``channel_weights · A``."""
        return self.channel_weights(activations, gradients)[..., None, None] * activations

    def _cam(self, activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
        """``(..., N, h, w)`` from either override level (the channel level as one einsum)."""
        if type(self).contributions is GradientCAM.contributions:
            weights = self.channel_weights(activations, gradients)  # (..., N, C)
            return torch.einsum("...nc,nchw->...nhw", weights, activations)
        return self.contributions(activations, gradients).sum(dim=-3)

    def compute(self, images: torch.Tensor, target: Target) -> Computed:
        autocast = torch.autocast(images.device.type, dtype=self.autocast, enabled=self.autocast is not None)
        with target.forward_context(), layer_output_as_leaf(self.layer) as captured, autocast:
            output = self.model(images)
            if "activations" not in captured:
                raise ExplainkitError(f"layer {self.layer_name!r} did not run in the model's forward pass")
            bound = target.bind(output)
            scores = bound(output)  # (N,) or (N, J), recorded by autograd from the layer up
        leaf = captured["activations"]  # the layer's own layout: (N, C, h, w), (N, h, w, C) or (N, L, C)
        layout = resolve_layout(self.layout, leaf, images, self.model, self.layer_name)
        activations = layout.to_channels_first(leaf.detach().float())  # (N, C, h, w), prefix tokens dropped
        if scores.ndim == 1:
            gradients = _gradients(scores, leaf, torch.ones_like(scores))
            return Computed(self._cam(activations, layout.to_channels_first(gradients.float())), bound, scores)  # (N, h, w)
        # Several scores per image (every class, top-k, boxes, labels): batched backwards over the
        # columns, class_chunk at a time so 1000-class models stay within bounded memory.
        cams = []
        columns = scores.shape[1]
        basis = torch.eye(columns, dtype=scores.dtype, device=scores.device)
        for start in range(0, columns, self.class_chunk):
            chunk = basis[start : start + self.class_chunk, None, :].expand(-1, scores.shape[0], -1)  # (J', N, J)
            last = start + self.class_chunk >= columns
            gradients = _batched_gradients(scores, leaf, chunk, retain_graph=not last, batched=bound.batched)
            cams.append(self._cam(activations, layout.to_channels_first(gradients.float())))  # (J', N, h, w)
        return Computed(torch.cat(cams).transpose(0, 1), bound, scores)  # (N, J, h, w)


def _gradients(scores: torch.Tensor, leaf: torch.Tensor, grad_outputs: torch.Tensor, retain_graph: bool = False) -> torch.Tensor:
    """``d(scores . grad_outputs)/d leaf``; zeros when the scores do not depend on the layer (a
    detector that lost every box, a constant user target)."""
    if not scores.requires_grad:
        return torch.zeros_like(leaf)
    (gradients,) = torch.autograd.grad(scores, leaf, grad_outputs, retain_graph=retain_graph, allow_unused=True)
    return torch.zeros_like(leaf) if gradients is None else gradients


def _batched_gradients(
    scores: torch.Tensor, activations: torch.Tensor, grad_outputs: torch.Tensor, retain_graph: bool = False, batched: bool = True
) -> torch.Tensor:
    """``(J', *activations.shape)``: one gradient per row of ``grad_outputs``, in one vmap-batched
    backward when ``batched`` and every op on the path has a batching rule, else column by column."""
    if not scores.requires_grad:
        return activations.new_zeros(grad_outputs.shape[0], *activations.shape)
    if batched:
        try:
            # The graph is kept even for the last chunk: if vmap fails part-way, the column
            # fallback below still needs it.
            (gradients,) = torch.autograd.grad(
                scores, activations, grad_outputs, is_grads_batched=True, retain_graph=True, allow_unused=True
            )
            return activations.new_zeros(grad_outputs.shape[0], *activations.shape) if gradients is None else gradients
        except RuntimeError as exc:  # an op without a batching rule
            warnings.warn(f"batched gradients unavailable ({exc}); computing columns one by one", RuntimeWarning, stacklevel=3)
    last = grad_outputs.shape[0] - 1
    return torch.stack(
        [_gradients(scores, activations, g, retain_graph=retain_graph or k < last) for k, g in enumerate(grad_outputs)]
    )


class GradCAM(GradientCAM):
    """Grad-CAM (Selvaraju et al., ICCV 2017, https://arxiv.org/abs/1610.02391).

    .. math:: w_c = \\frac{1}{hw} \\sum_{ij} \\frac{\\partial y^t}{\\partial A_{c,ij}}, \\qquad
              L = \\mathrm{ReLU}\\Big(\\sum_c w_c A_c\\Big)

    with ``A`` the target layer's activations and ``y^t`` the target class's logit.
    """

    name = "gradcam"

    def channel_weights(self, activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
        return gradients.mean(dim=(-2, -1))


class GradCAMPlusPlus(GradientCAM):
    """Grad-CAM++ (Chattopadhay et al., WACV 2018, https://arxiv.org/abs/1710.11063), eq. 19.

    With ``g = ∂y^t/∂A`` (the exponential in the paper folded into ``y``, as pytorch-grad-cam does):

    .. math:: \\alpha_{c,ij} = \\frac{g_{c,ij}^2}{2 g_{c,ij}^2 + \\sum_{ab} A_{c,ab} \\, g_{c,ij}^3}
              \\;(0 \\text{ where the denominator is } 0), \\qquad
              w_c = \\sum_{ij} \\alpha_{c,ij} \\, \\mathrm{ReLU}(g_{c,ij})
    """

    name = "gradcam++"

    def channel_weights(self, activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
        squared = gradients.square()
        denominator = 2 * squared + activations.sum(dim=(-2, -1), keepdim=True) * squared * gradients
        alpha = torch.where(denominator != 0, squared / torch.where(denominator != 0, denominator, 1), 0)
        return (alpha * F.relu(gradients)).sum(dim=(-2, -1))


class XGradCAM(GradientCAM):
    r"""XGrad-CAM (Fu et al., BMVC 2020, https://arxiv.org/abs/2008.02312).

    .. math:: w_c = \sum_{ij} \frac{A_{c,ij}}{\sum_{ab} A_{c,ab} + \epsilon} \frac{\partial y^t}{\partial A_{c,ij}}

    (``ε = 1e-7`` as in pytorch-grad-cam). Cost: one forward, one backward above the layer.
    Prefer it where activations vary a lot in scale across channels.
    """

    name = "xgradcam"

    def channel_weights(self, activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
        totals = activations.sum(dim=(-2, -1), keepdim=True) + 1e-7
        return (gradients * activations / totals).sum(dim=(-2, -1))


class HiResCAM(GradientCAM):
    r"""HiResCAM (Draelos & Carin 2020, https://arxiv.org/abs/2011.08891).

    .. math:: L = \mathrm{ReLU}\Big(\sum_c \frac{\partial y^t}{\partial A_c} \odot A_c\Big)

    Gradient-times-activation without Grad-CAM's spatial averaging, so the map reflects the
    locations the score actually used (provably, for a CNN ending in global average pooling and
    a linear layer, where it equals the class activation). Cost: as Grad-CAM.
    """

    name = "hirescam"

    def contributions(self, activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
        return gradients * activations


class GradCAMElementWise(GradientCAM):
    r"""Element-wise Grad-CAM (pytorch-grad-cam's ``GradCAMElementWise``).

    .. math:: L = \sum_c \mathrm{ReLU}\Big(\frac{\partial y^t}{\partial A_c} \odot A_c\Big)

    HiResCAM with the ReLU before the channel sum: negative evidence in one channel cannot cancel
    positive evidence in another. Cost: as Grad-CAM.
    """

    name = "gradcam-elementwise"

    def contributions(self, activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
        return F.relu(gradients * activations)


class LayerCAM(GradientCAM):
    r"""LayerCAM (Jiang et al., IEEE TIP 2021, https://ieeexplore.ieee.org/document/9462463).

    .. math:: L = \mathrm{ReLU}\Big(\sum_c \mathrm{ReLU}\Big(\frac{\partial y^t}{\partial A_c}\Big) \odot A_c\Big)

    Each location weighted by its own positive gradient, which keeps fine detail at shallow layers
    (``layer2``/``layer3``) where Grad-CAM's averaged weights blur. Cost: as Grad-CAM.
    """

    name = "layercam"

    def contributions(self, activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
        return F.relu(gradients) * activations


__all__ = [
    "ALL",
    "GradCAM",
    "GradCAMElementWise",
    "GradCAMPlusPlus",
    "GradientCAM",
    "HiResCAM",
    "LayerCAM",
    "XGradCAM",
    "layer_output_as_leaf",
]

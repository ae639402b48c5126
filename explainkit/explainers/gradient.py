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
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from explainkit.errors import ExplainkitError
from explainkit.explainers.base import ALL, Explainer, Targets, resolve_targets
from explainkit.layouts import Layout, infer_layout
from explainkit.outputs import logits_of


@contextmanager
def layer_output_as_leaf(layer: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """Run the model's forward inside this block to get the layer output as a grad-requiring leaf.

    Autograd is off until ``layer`` has run (nothing below it is recorded, so no memory is
    kept for a backward we will not do) and on from there. The hook is removed and the
    caller's grad mode restored on exit, also after an exception.

    Thread-safe: the hook acts only on forwards run by the thread that entered the block, so
    several threads may explain with one shared model at once (grad mode is per thread too).
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


class GradientCAM(Explainer):
    """A CAM ``relu(Σ_c w_c · A_c)`` whose channel weights ``w`` come from gradients.

    Subclasses implement :meth:`channel_weights` only.

    Args:
        model, layer: see :class:`~explainkit.explainers.base.Explainer`.
        autocast: optional dtype (e.g. ``torch.bfloat16``) to run the model under
            ``torch.autocast`` on the images' device; the CAM itself is computed in float32.
        layout: how the layer's output maps to ``(N, C, h, w)``
            (:class:`~explainkit.layouts.Layout`); default: read off the model or inferred, so
            ViT token sequences and Swin's channels-last stages work without a reshape function.
    """

    def __init__(
        self,
        model: nn.Module,
        layer: str | nn.Module | None = None,
        *,
        autocast: torch.dtype | None = None,
        layout: Layout | None = None,
    ):
        super().__init__(model, layer)
        self.autocast = autocast
        self.layout = layout

    def channel_weights(self, activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
        """Return ``(..., N, C)`` weights from ``activations (N, C, h, w)`` and ``gradients (..., N, C, h, w)``."""
        raise NotImplementedError

    def compute(self, images: torch.Tensor, targets: Targets):
        autocast = torch.autocast(images.device.type, dtype=self.autocast, enabled=self.autocast is not None)
        with layer_output_as_leaf(self.layer) as captured, autocast:
            logits = logits_of(self.model(images))
        if "activations" not in captured:
            raise ExplainkitError(f"layer {self.layer_name!r} did not run in the model's forward pass")
        leaf = captured["activations"]  # the layer's own layout: (N, C, h, w), (N, h, w, C) or (N, L, C)
        layout = self.layout or infer_layout(tuple(leaf.shape), (images.shape[-2], images.shape[-1]), self.model, self.layer_name)
        activations = layout.to_channels_first(leaf.detach().float())  # (N, C, h, w), prefix tokens dropped
        resolved = resolve_targets(targets, logits)
        num_classes = logits.shape[1]
        if isinstance(resolved, str):  # ALL: one batched backward over the class dimension
            grad_outputs = torch.eye(num_classes, device=logits.device, dtype=logits.dtype)
            grad_outputs = grad_outputs[:, None, :].expand(num_classes, *logits.shape)
            gradients = layout.to_channels_first(_batched_gradients(logits, leaf, grad_outputs).float())  # (K, N, C, h, w)
            weights = self.channel_weights(activations, gradients)  # (K, N, C)
            cams = torch.einsum("knc,nchw->nkhw", weights, activations)
        else:
            grad_outputs = F.one_hot(resolved, num_classes).to(logits.dtype)
            (gradients,) = torch.autograd.grad(logits, leaf, grad_outputs)
            weights = self.channel_weights(activations, layout.to_channels_first(gradients.float()))  # (N, C)
            cams = torch.einsum("nc,nchw->nhw", weights, activations)
        return cams, logits, resolved


def _batched_gradients(logits: torch.Tensor, activations: torch.Tensor, grad_outputs: torch.Tensor) -> torch.Tensor:
    try:
        (gradients,) = torch.autograd.grad(logits, activations, grad_outputs, is_grads_batched=True)
        return gradients
    except RuntimeError as exc:  # an op without a batching rule: fall back to one backward per class
        warnings.warn(f"batched gradients unavailable ({exc}); computing classes one by one", RuntimeWarning, stacklevel=3)
        last = grad_outputs.shape[0] - 1
        return torch.stack(
            [torch.autograd.grad(logits, activations, g, retain_graph=k < last)[0] for k, g in enumerate(grad_outputs)]
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


__all__ = ["ALL", "GradCAM", "GradCAMPlusPlus", "GradientCAM", "layer_output_as_leaf"]

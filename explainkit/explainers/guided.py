"""Guided Grad-CAM: guided backpropagation without touching the user's modules.

pytorch-grad-cam's ``GuidedBackpropReLUModel`` swaps every ``nn.ReLU`` module of the model for a
guided one and back (the model comes back with fresh, no longer in-place ``ReLU`` objects), sees
no functional ``F.relu``, runs ``loss.backward()`` and explains one image per call. Here a
:class:`torch.overrides.TorchFunctionMode`, active only during the explainer's own forward and
only on the calling thread, routes every ReLU call (``nn.ReLU`` modules, in-place or not,
``F.relu``, ``torch.relu``/``relu_``, ``Tensor.relu``/``relu_``) to an autograd function with the
guided backward; the modules are never replaced. One forward and one ``torch.autograd.grad``
give the input gradients *and* the Grad-CAM layer gradients, batched over the targets.
"""

from __future__ import annotations

import threading
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from explainkit.errors import ExplainkitError
from explainkit.explainers.base import Computed, postprocess
from explainkit.explainers.fullgrad import gradients_of
from explainkit.explainers.gradient import GradCAM
from explainkit.models.layouts import Layout, resolve_layout
from explainkit.targets import Target


class GuidedReLU(torch.autograd.Function):
    """``relu`` forward; backward ``max(g, 0) · 1[x > 0]`` (Springenberg et al. 2015): only
    positive gradients pass, and only where the unit was active. ``inplace`` modifies ``x`` in
    place, as ``relu_`` does."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, inplace: bool) -> torch.Tensor:
        if inplace:
            ctx.mark_dirty(x)
            output = torch.relu_(x)
        else:
            output = torch.relu(x)
        ctx.save_for_backward(output)  # output > 0 exactly where x > 0
        return output

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (output,) = ctx.saved_tensors
        return torch.where(output > 0, grad.clamp(min=0), torch.zeros((), dtype=grad.dtype, device=grad.device)), None


def _inplace_of(func: Callable, args: tuple, kwargs: dict) -> bool | None:
    """Whether ``func(*args, **kwargs)`` is an in-place ReLU (``True``), an out-of-place one
    (``False``), or not a ReLU (``None``)."""
    if func is F.relu:
        return bool(kwargs.get("inplace", args[1] if len(args) > 1 else False))
    if func is torch.relu or func is torch.Tensor.relu:
        return False
    if func is torch.relu_ or func is torch.Tensor.relu_ or func is F.relu_:
        return True
    return None


class GuidedReLUs(TorchFunctionMode):
    """While entered, every ReLU call on this thread runs :class:`GuidedReLU` (torch function modes
    are per thread). ``calls`` counts them, ``after_layer`` those after :meth:`layer_ran`.

    Not reached: ReLUs inside TorchScript or ``torch.compile``'d code, and ``clamp(min=0)``
    or other spellings of a ReLU.
    """

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.after_layer = 0
        self._layer_ran = False

    def layer_ran(self) -> None:
        self._layer_ran = True

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        inplace = _inplace_of(func, args, kwargs)
        if inplace is None:
            return func(*args, **kwargs)
        x = args[0]
        self.calls += 1
        self.after_layer += self._layer_ran
        if inplace and x.is_leaf and x.requires_grad:  # relu_ straight on our input leaf: out of place
            inplace = False
        return GuidedReLU.apply(x, inplace)


class GuidedGradCAM(GradCAM):
    r"""Guided Grad-CAM (Selvaraju et al., "Grad-CAM: Visual Explanations from Deep Networks via
    Gradient-based Localization", ICCV 2017, https://arxiv.org/abs/1610.02391), with guided
    backpropagation (Springenberg et al., "Striving for Simplicity: The All Convolutional Net",
    ICLR 2015 workshop, https://arxiv.org/abs/1412.6806).

    With ``G = ∂^{guided} y / ∂x`` the ``(C, H, W)`` input gradient when every ReLU's backward
    is ``max(g, 0) · 1[x > 0]``, and ``L`` the Grad-CAM map at ``layer`` (ReLU, bilinear
    upsampling to the input size, min-max scaled to [0, 1], as pytorch-grad-cam gives it):

    .. math:: M = \rho(G) \odot L, \qquad \rho(G)_{ij} = \Big(\sum_c G_{c,ij}^2\Big)^{1/2}
              \;(\text{``norm''}) \text{ or } \max_c |G_{c,ij}| \;(\text{``max''})

    The paper multiplies the 3-channel guided gradient by ``L`` and shows it as a colour image;
    explainkit returns one ``(H, W)`` map per target, so the channels are reduced first: the L2
    norm (default; independent of the colour basis) or the largest absolute value
    (Simonyan et al.'s saliency reduction). ``L >= 0``, so reducing before or after the product
    is the same. ``normalize=False`` returns ``ρ(G) ⊙ L`` with ``L`` in [0, 1] (the paper's
    product); the default scales each product map to [0, 1].

    One forward with guided ReLUs and one backward to the input and the layer's output give both
    ``G`` and Grad-CAM's gradients, when no ReLU runs after ``layer`` (the usual last conv
    block: pooling and a linear head above it); otherwise the Grad-CAM gradients would have passed
    guided ReLUs, so Grad-CAM gets a forward and backward of its own (exactly Grad-CAM).

    Cost: one forward with autograd from the input, one backward to the input (all targets:
    batched, ``class_chunk`` at a time), plus a second Grad-CAM pass if ReLUs follow the layer.
    Prefer it for a high-resolution, class-discriminative picture of the input pixels the class
    relies on (edges, texture); note guided backpropagation is largely class-insensitive and
    insensitive to the model's weights (Adebayo et al., NeurIPS 2018), so the class information
    comes mostly from the Grad-CAM factor.

    Args:
        model, layer, autocast, layout, class_chunk: see :class:`~explainkit.explainers.gradient.GradientCAM`.
        channel_reduction: ``"norm"`` (L2 norm over the input channels) or ``"max"`` (largest
            absolute value over them).
    """

    name = "guided-gradcam"
    family = "gradient"

    def __init__(
        self,
        model: nn.Module,
        layer: str | nn.Module | None = None,
        *,
        channel_reduction: str = "norm",
        autocast: torch.dtype | None = None,
        layout: Layout | None = None,
        class_chunk: int = 64,
    ):
        if channel_reduction not in ("norm", "max"):
            raise ExplainkitError(f"channel_reduction must be 'norm' or 'max', got {channel_reduction!r}")
        super().__init__(model, layer, autocast=autocast, layout=layout, class_chunk=class_chunk)
        self.channel_reduction = channel_reduction

    def reduce_channels(self, gradients: torch.Tensor) -> torch.Tensor:
        """``(..., C, H, W)`` guided gradients -> ``(..., H, W)``."""
        gradients = gradients.float()
        if self.channel_reduction == "max":
            reduced: torch.Tensor = gradients.abs().amax(dim=-3)
        else:
            reduced = torch.linalg.vector_norm(gradients, dim=-3)
        return reduced

    def compute(self, images: torch.Tensor, target: Target) -> Computed:
        inputs = images.detach().requires_grad_(True)  # a fresh leaf: the caller's tensor is untouched
        captured: dict[str, torch.Tensor] = {}
        guided = GuidedReLUs()
        owner = threading.get_ident()

        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
            if threading.get_ident() != owner:
                return None
            if not isinstance(output, torch.Tensor):
                raise ExplainkitError(
                    f"layer {type(module).__name__} returns {type(output).__name__}, not a tensor; pick another layer"
                )
            captured["activations"] = output
            guided.layer_ran()
            return output.clone()  # so a following in-place op cannot modify the captured output

        autocast = torch.autocast(images.device.type, dtype=self.autocast, enabled=self.autocast is not None)
        handle = self.layer.register_forward_hook(hook)
        try:
            with target.forward_context(), torch.enable_grad(), autocast:
                with guided:
                    output = self.model(inputs)
                if "activations" not in captured:
                    raise ExplainkitError(f"layer {self.layer_name!r} did not run in the model's forward pass")
                bound = target.bind(output)
                scores = bound(output)  # (N,) or (N, J)
        finally:
            handle.remove()
        size = (images.shape[-2], images.shape[-1])
        layer_output = captured["activations"]
        one_pass = guided.after_layer == 0  # no guided ReLU between the layer and the scores
        layout = resolve_layout(self.layout, layer_output, images, self.model, self.layer_name)
        activations = layout.to_channels_first(layer_output.detach().float())
        wanted = [inputs, layer_output] if one_pass else [inputs]
        cam_of_separate_pass = None if one_pass else super().compute(images, target).raw  # (N, [J,] h, w)

        def product(gradients: list[torch.Tensor], cam: torch.Tensor | None) -> torch.Tensor:
            if cam is None:
                cam = self._cam(activations, layout.to_channels_first(gradients[1].float()))
            return self.reduce_channels(gradients[0]) * postprocess(cam, size, normalize=True)

        if scores.ndim == 1:
            gradients = gradients_of(scores, wanted, torch.ones_like(scores))
            return Computed(product(gradients, cam_of_separate_pass), bound, scores)  # (N, H, W)
        maps = []
        columns = scores.shape[1]
        basis = torch.eye(columns, dtype=scores.dtype, device=scores.device)
        for start in range(0, columns, self.class_chunk):
            chunk = basis[start : start + self.class_chunk, None, :].expand(-1, scores.shape[0], -1)  # (J', N, J)
            last = start + self.class_chunk >= columns
            gradients = gradients_of(scores, wanted, chunk, rows=True, vmap=bound.batched, retain_graph=not last)
            cam = None if cam_of_separate_pass is None else cam_of_separate_pass[:, start : start + len(chunk)].transpose(0, 1)
            maps.append(product(gradients, cam))  # (J', N, H, W)
        return Computed(torch.cat(maps).transpose(0, 1), bound, scores)  # (N, J, H, W)


__all__ = ["GuidedGradCAM", "GuidedReLU", "GuidedReLUs"]

"""FullGrad: the input-gradient map plus the bias-gradient map of every biased conv and BatchNorm.

Why our own instead of pytorch-grad-cam's ``FullGrad``: that one runs ``loss.backward()`` (filling
every parameter's ``.grad``), copies each layer's activations *and* gradients to the CPU in its
hooks, and post-processes thousands of channel maps one by one in numpy (``cv2.resize`` per
channel), one target per call. Here every gradient comes from one ``torch.autograd.grad`` call
over the input and the captured layer outputs, batched over the targets (``is_grads_batched``),
and the post-processing is a few batched tensor ops on the images' device: the per-channel maps
are scaled and summed at each layer's resolution, then upsampled once per resolution (bilinear
resizing is linear, so that is the same sum).
"""

from __future__ import annotations

import threading
import warnings
from collections import defaultdict
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn as nn

from explainkit.errors import ExplainkitError
from explainkit.explainers.base import Computed, Explainer, upsample_bilinear
from explainkit.targets import Target

_EPS = 1e-7  # pytorch-grad-cam's scale_cam_image: (x - min) / (max - min + 1e-7)


def biased_layers(model: nn.Module) -> list[nn.Module]:
    """The modules FullGrad reads, in ``model.modules()`` order: ``Conv2d`` and ``BatchNorm2d``
    with a bias (pytorch-grad-cam's rule), and their subclasses that keep the plain forward
    (a subclass that adds an activation, such as timm's ``BatchNormAct2d``, is left out: its
    output is not the affine layer's output the bias enters)."""
    plain = (nn.Conv2d.forward, nn.modules.batchnorm._BatchNorm.forward)
    return [
        module
        for module in model.modules()
        if isinstance(module, (nn.Conv2d, nn.BatchNorm2d))
        and getattr(module, "bias", None) is not None
        and type(module).forward in plain
    ]


def effective_bias(module: nn.Module) -> torch.Tensor:
    """The ``(C,)`` float32 bias a layer adds to each output channel, detached.

    A convolution's own bias; for BatchNorm in eval mode, ``y = γ (x - μ) / √(σ² + ε) + β``, so
    the bias is ``β - γ μ / √(σ² + ε)`` (the official FullGrad code's and pytorch-grad-cam's rule).
    A BatchNorm without running statistics (batch statistics even in eval mode) contributes ``β``.
    """
    own = module.bias
    assert isinstance(own, torch.Tensor), f"{type(module).__name__} has no bias"
    bias = own.detach().float()
    if isinstance(module, nn.BatchNorm2d) and module.running_mean is not None and module.running_var is not None:
        weight = module.weight.detach().float() if module.weight is not None else torch.ones_like(bias)
        bias = bias - module.running_mean.float() * weight / torch.sqrt(module.running_var.float() + module.eps)
    return bias


@contextmanager
def capture_outputs(layers: list[nn.Module]) -> Iterator[list[tuple[torch.Tensor, nn.Module]]]:
    """Forward hooks that record each 4-D output of ``layers`` (every call, in call order) with its
    module; the forward goes on with a clone, so a following in-place op (``ReLU(inplace=True)``
    after a BatchNorm) cannot modify the recorded tensor, whose gradient is then the gradient
    with respect to the layer's own output. Only forwards of the entering thread are recorded;
    the hooks are removed on exit, also after an exception."""
    captured: list[tuple[torch.Tensor, nn.Module]] = []
    owner = threading.get_ident()

    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor | None:
        if threading.get_ident() != owner or not isinstance(output, torch.Tensor) or output.ndim != 4:
            return None
        captured.append((output, module))
        return output.clone()

    handles = [layer.register_forward_hook(hook) for layer in layers]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def scaled_channel_sum(maps: torch.Tensor) -> torch.Tensor:
    """``Σ_c (m_c - min m_c) / (max m_c - min m_c + 1e-7)`` over the channel dim ``-3``: each
    ``(h, w)`` map min-max scaled on its own, then summed (``(..., C, h, w)`` -> ``(..., h, w)``)."""
    flat = maps.flatten(-2)  # (..., C, hw)
    low, high = flat.aminmax(dim=-1)  # (..., C)
    summed = ((flat - low[..., None]) / (high - low + _EPS)[..., None]).sum(dim=-2)
    unflat: torch.Tensor = summed.unflatten(-1, maps.shape[-2:])
    return unflat


def fullgrad_map(
    inputs: torch.Tensor,
    input_gradients: torch.Tensor,
    biases: list[torch.Tensor],
    bias_gradients: list[torch.Tensor],
    size: tuple[int, int],
) -> torch.Tensor:
    """The unscaled FullGrad map ``(..., N, H, W)`` from the input ``(N, C, H, W)``, its gradients
    ``(..., N, C, H, W)``, and each biased layer's ``(C_l,)`` bias and output gradients
    ``(..., N, C_l, h_l, w_l)`` (see :class:`FullGrad`)."""
    total = scaled_channel_sum((input_gradients.float() * inputs.float()).abs())
    if tuple(total.shape[-2:]) != tuple(size):
        total = upsample_bilinear(total, size)
    by_size: dict[tuple[int, int], torch.Tensor] = defaultdict(lambda: torch.zeros((), device=total.device))
    for bias, gradients in zip(biases, bias_gradients):
        term = scaled_channel_sum((gradients.float() * bias[:, None, None]).abs())
        resolution = (term.shape[-2], term.shape[-1])
        by_size[resolution] = by_size[resolution] + term
    for resolution, summed in by_size.items():  # bilinear resizing is linear: once per resolution
        total = total + (summed if resolution == tuple(size) else upsample_bilinear(summed, size))
    return total


class FullGrad(Explainer):
    r"""FullGrad (Srinivas & Fleuret, "Full-Gradient Representation for Neural Network
    Visualization", NeurIPS 2019, https://arxiv.org/abs/1905.00780), as pytorch-grad-cam computes it.

    With ``x`` the input, ``y`` the target's score, and for every biased layer ``l`` (each
    ``Conv2d`` and ``BatchNorm2d`` with a bias; a BatchNorm's bias is its eval-mode
    ``β - γ μ / √(σ² + ε)``) its output ``z_l`` and bias ``b_l``:

    .. math:: S = \sum_{c} \psi\big(|x_c \odot \partial y / \partial x_c|\big)
              + \sum_{l} \sum_{c} \psi\big(|b_{l,c} \, \partial y / \partial z_{l,c}|\big)

    where ``ψ`` min-max scales one ``(h, w)`` map to [0, 1] (``(m - min) / (max - min + 1e-7)``)
    and resizes it bilinearly to the input size: every input channel and every channel of every
    biased layer is scaled on its own, then all are summed; the sum is scaled to [0, 1] per map.
    A layer run twice in one forward contributes once per call. ``Linear`` biases are left out:
    they have no spatial map (as in the paper's saliency and pytorch-grad-cam).

    ``layer`` does not apply: FullGrad reads every biased layer, so a given layer is ignored
    (accepted so that one ``--layer`` can be passed to several methods at once);
    :attr:`layer_name` is ``None``.

    Cost: one forward with autograd from the input, one backward to the input and every biased
    layer's output (``targets="all"``: one batched backward per ``class_chunk`` classes), and a
    min-max over every channel map (no per-channel upsampling: maps are summed at each layer's
    resolution first). Memory: the gradients of every biased layer's output, times the classes of
    a chunk. Prefer it for a fine-grained, input-resolution map that still reflects the whole
    network (not one layer's resolution); prefer Grad-CAM for a coarse class-discriminative map
    at a fraction of the cost.

    Args:
        model: see :class:`~explainkit.explainers.base.Explainer`.
        layer: ignored (see above).
        class_chunk: targets per batched backward for ``"all"``, top-k and several scores per
            image; the gradients of every biased layer are held for that many targets at once.
    """

    name = "fullgrad"
    family = "gradient"
    reads_layer = False

    def __init__(self, model: nn.Module, layer: str | nn.Module | None = None, *, class_chunk: int = 16) -> None:
        if not isinstance(class_chunk, int) or isinstance(class_chunk, bool) or class_chunk < 1:
            raise ExplainkitError(f"class_chunk must be a positive integer, got {class_chunk!r}")
        self.model = model
        self.layer_name, self.layer = None, None  # type: ignore[assignment]
        self.class_chunk = class_chunk

    def compute(self, images: torch.Tensor, target: Target) -> Computed:
        inputs = images.detach().requires_grad_(True)  # a fresh leaf: the caller's tensor is untouched
        with capture_outputs(biased_layers(self.model)) as captured, torch.enable_grad(), target.forward_context():
            output = self.model(inputs)
            bound = target.bind(output)
            scores = bound(output)  # (N,) or (N, J)
        outputs = [tensor for tensor, _ in captured]
        biases = [effective_bias(module).to(images.device) for _, module in captured]
        size = (images.shape[-2], images.shape[-1])
        wanted = [inputs, *outputs]
        if scores.ndim == 1:
            gradients = gradients_of(scores, wanted, torch.ones_like(scores))
            return Computed(fullgrad_map(inputs.detach(), gradients[0], biases, gradients[1:], size), bound, scores)
        maps = []
        columns = scores.shape[1]
        basis = torch.eye(columns, dtype=scores.dtype, device=scores.device)
        for start in range(0, columns, self.class_chunk):
            chunk = basis[start : start + self.class_chunk, None, :].expand(-1, scores.shape[0], -1)  # (J', N, J)
            last = start + self.class_chunk >= columns
            gradients = gradients_of(scores, wanted, chunk, rows=True, vmap=bound.batched, retain_graph=not last)
            maps.append(fullgrad_map(inputs.detach(), gradients[0], biases, gradients[1:], size))  # (J', N, H, W)
        return Computed(torch.cat(maps).transpose(0, 1), bound, scores)  # (N, J, H, W)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(class_chunk={self.class_chunk})"


def gradients_of(
    scores: torch.Tensor,
    wanted: list[torch.Tensor],
    grad_outputs: torch.Tensor,
    *,
    rows: bool = False,
    vmap: bool = True,
    retain_graph: bool = False,
) -> list[torch.Tensor]:
    """``d(scores . grad_outputs)/d t`` for every ``t`` in ``wanted``, in one ``autograd.grad`` call.

    ``rows``: ``grad_outputs`` has a leading dim of rows, one gradient each (``(R, *t.shape)``
    results), in one vmapped backward (``is_grads_batched``) when ``vmap`` and every op on the path
    has a batching rule, else row by row. Zeros for tensors the scores do not depend on.
    Parameters' ``.grad`` is never written.
    """
    lead = (grad_outputs.shape[0],) if rows else ()
    if not scores.requires_grad:
        return [t.new_zeros(*lead, *t.shape) for t in wanted]
    found: tuple[torch.Tensor | None, ...] | None = None
    if not rows:
        found = torch.autograd.grad(scores, wanted, grad_outputs, retain_graph=retain_graph, allow_unused=True)
    elif vmap:
        try:
            found = torch.autograd.grad(
                # retain_graph=True: if vmap fails part-way, the column fallback below needs the graph
                scores,
                wanted,
                grad_outputs,
                retain_graph=True,
                allow_unused=True,
                is_grads_batched=True,
            )
        except RuntimeError as exc:  # an op without a batching rule
            warnings.warn(f"batched gradients unavailable ({exc}); computing columns one by one", RuntimeWarning, stacklevel=3)
    if found is None:
        last = grad_outputs.shape[0] - 1
        each = [gradients_of(scores, wanted, row, retain_graph=retain_graph or k < last) for k, row in enumerate(grad_outputs)]
        return [torch.stack(parts) for parts in zip(*each)]
    return [t.new_zeros(*lead, *t.shape) if g is None else g for g, t in zip(found, wanted)]


__all__ = ["FullGrad", "biased_layers", "capture_outputs", "effective_bias", "fullgrad_map", "gradients_of", "scaled_channel_sum"]

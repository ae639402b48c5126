"""ShapleyCAM: Grad-CAM weights with a second-order (Hessian-vector) correction."""

from __future__ import annotations

import torch
import torch.nn as nn

from explainkit.errors import ExplainkitError
from explainkit.explainers.base import Computed
from explainkit.explainers.gradient import GradCAM, GradientCAM, _batched_gradients, layer_output_as_leaf
from explainkit.models.layouts import Layout, resolve_layout
from explainkit.targets import ClassScores, ResidualSoftmax, Target


def shapley_gradient(scores: torch.Tensor, leaf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(g, H·A)`` for one score per image: ``g = ∂s/∂A`` and the Hessian-vector product
    ``H·A = ∂(g · A)/∂A`` with the activations ``A`` (the leaf's value) as the vector, from a
    double backward (pytorch-grad-cam's ``ShapleyCAM.get_cam_weights``). ``H·A`` is ``None`` when
    the gradient does not depend on ``A`` (a linear head with a logit: the Hessian is zero)."""
    if not scores.requires_grad:
        return torch.zeros_like(leaf), None
    (gradient,) = torch.autograd.grad(scores, leaf, torch.ones_like(scores), create_graph=True, allow_unused=True)
    if gradient is None:
        return torch.zeros_like(leaf), None
    hvp = None
    if gradient.requires_grad:
        (hvp,) = torch.autograd.grad(gradient, leaf, leaf.detach(), allow_unused=True)
    return gradient.detach(), hvp


def shapley_objective(scores: torch.Tensor, leaf: torch.Tensor) -> torch.Tensor:
    """``(N, J)`` scores ``s - ½ d`` whose gradients are ShapleyCAM's ``g_j - ½ H_j·A`` for every
    column at once.

    ``d_j = (∂s_j/∂A) · A`` with ``A`` held constant is the directional derivative of each column
    along the activations, so ``∂d_j/∂A = H_j · A``. It comes from the double-vjp trick: with
    ``u`` a dummy ``(N, J)`` input, ``G(u) = Σ_j u_j ∂s_j/∂A`` (one backward, graph kept) is linear
    in ``u`` and ``d = ∂(G · A)/∂u``, itself differentiable in ``A``. One batched backward of
    ``s - ½ d`` over the columns then gives every column's corrected gradient, where a double
    backward per column would cost ``J`` times the graph.
    """
    if not scores.requires_grad:
        return scores
    dummy = torch.zeros_like(scores, requires_grad=True)
    (combined,) = torch.autograd.grad(scores, leaf, dummy, create_graph=True, allow_unused=True)
    if combined is None or not combined.requires_grad:
        return scores
    (directional,) = torch.autograd.grad(combined, dummy, leaf.detach(), create_graph=True, allow_unused=True)
    if directional is None or not directional.requires_grad:  # the Hessian is zero (a linear head)
        return scores
    return scores - 0.5 * directional


class ShapleyCAM(GradientCAM):
    r"""ShapleyCAM (Huaiguang Cai, "CAMs as Shapley Value-based Explainers", arXiv preprint 2025,
    https://arxiv.org/abs/2501.06261; pytorch-grad-cam's ``ShapleyCAM``).

    Reads the CAM as a second-order Taylor estimate of each channel's Shapley value: with ``g``
    the gradient of the score ``s`` with respect to the layer's activations ``A`` and ``H`` its
    Hessian there,

    .. math:: w_c = \frac{1}{hw} \sum_{ij} \Big(g - \tfrac{1}{2}\, H A\Big)_{c,ij}, \qquad
              L = \mathrm{ReLU}\Big(\sum_c w_c A_c\Big)

    (``H A`` the Hessian-vector product with the activations as the vector, its sign and the ½ as
    pytorch-grad-cam computes them). The score of a class target is ReST by default,
    :class:`~explainkit.targets.ResidualSoftmax`: ``s_t = y_t + \log p_t`` (the logit minus the
    cross-entropy), which the paper recommends over the logit.

    When the correction vanishes: for a network that is piecewise linear above the layer (ReLU,
    max-pooling, convolutions, BatchNorm in eval mode, average pooling, a linear head: ResNets,
    VGG) and the plain logit (``rest=False``), ``H = 0`` almost everywhere, so ShapleyCAM *is*
    Grad-CAM (tested). ReST keeps it non-zero there: its softmax part is curved in the logits,
    ``H = -J^T (\mathrm{diag}(p) - p p^T) J`` with ``J = ∂y/∂A``, so ``-½ H A = ½ J^T
    (\mathrm{diag}(p) - p p^T) J A``, the same for every class ``t`` (tested). Smooth activations above the layer (GELU, SiLU, softmax attention) make
    ``H`` non-zero for the logit too.

    Targets: every form the base takes; class forms score ReST (or the logit with
    ``rest=False``); any other target object or callable is differentiated as given (it must be
    twice differentiable: detection boxes through RoIAlign are not).

    Cost: one forward; for one score per image, a backward above the layer that keeps its graph
    and a double backward through it (about three backwards, pytorch-grad-cam's way); for ``J``
    scores per image (``"all"``, top-k, class sets), two backwards for the directional
    derivatives of every column and then one batched backward of ``s - ½ d`` over the columns
    (chunks of ``class_chunk``; column by column, with a warning, where an op on the path has no
    vmap batching rule), not ``J`` double backwards. All of it only above the layer,
    so at ``layer4`` of a ResNet it costs about what Grad-CAM does. Prefer it over Grad-CAM with
    ReST when the classes compete (the softmax part subtracts the evidence for the others); with a
    logit on a ReLU network use Grad-CAM, which it equals.

    Args:
        model, layer, autocast, layout, class_chunk: see :class:`~explainkit.explainers.gradient.GradientCAM`.
        rest: score class targets with ReST (default, as the paper) or, ``False``, with the plain
            logit (pytorch-grad-cam's default ``ClassifierOutputTarget``).
    """

    name = "shapleycam"
    family = "gradient"

    channel_weights = GradCAM.channel_weights  # the spatial mean, of the corrected gradient

    def __init__(
        self,
        model: nn.Module,
        layer: str | nn.Module | None = None,
        *,
        rest: bool = True,
        autocast: torch.dtype | None = None,
        layout: Layout | None = None,
        class_chunk: int = 64,
    ):
        super().__init__(model, layer, autocast=autocast, layout=layout, class_chunk=class_chunk)
        if not isinstance(rest, bool):
            raise ExplainkitError(f"rest must be True (ReST scores) or False (logits), got {rest!r}")
        self.rest = rest

    def class_score(self, target: Target) -> Target:
        """ReST for a class target when ``rest`` is on; every other target as it is."""
        if self.rest and type(target) is ClassScores:
            return ResidualSoftmax(target.classes)
        return target

    def compute(self, images: torch.Tensor, target: Target) -> Computed:
        target = self.class_score(target)
        autocast = torch.autocast(images.device.type, dtype=self.autocast, enabled=self.autocast is not None)
        with target.forward_context(), layer_output_as_leaf(self.layer) as captured, autocast:
            output = self.model(images)
            if "activations" not in captured:
                raise ExplainkitError(f"layer {self.layer_name!r} did not run in the model's forward pass")
            bound = target.bind(output)
            scores = bound(output)  # (N,) or (N, J), recorded from the layer up
        leaf = captured["activations"]
        layout = resolve_layout(self.layout, leaf, images, self.model, self.layer_name)
        activations = layout.to_channels_first(leaf.detach().float())
        with torch.enable_grad():  # the double backward records graphs, also under the caller's no_grad
            if scores.ndim == 1:
                gradient, hvp = shapley_gradient(scores, leaf)
                corrected = gradient if hvp is None else gradient - 0.5 * hvp
                return Computed(self._cam(activations, layout.to_channels_first(corrected.float())), bound, scores)
            objective = shapley_objective(scores, leaf)
            cams = []
            columns = scores.shape[1]
            basis = torch.eye(columns, dtype=scores.dtype, device=scores.device)
            for start in range(0, columns, self.class_chunk):
                chunk = basis[start : start + self.class_chunk, None, :].expand(-1, scores.shape[0], -1)
                last = start + self.class_chunk >= columns
                corrected = _batched_gradients(objective, leaf, chunk, retain_graph=not last, batched=bound.batched)
                cams.append(self._cam(activations, layout.to_channels_first(corrected.float())))  # (J', N, h, w)
        return Computed(torch.cat(cams).transpose(0, 1), bound, scores)

    def __repr__(self) -> str:
        return f"ShapleyCAM(layer={self.layer_name!r}, rest={self.rest})"


__all__ = ["ShapleyCAM", "shapley_gradient", "shapley_objective"]

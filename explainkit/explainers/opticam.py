"""Opti-CAM: channel weights optimised, per image and target, so that the image masked by its own
saliency map scores as high as possible."""

from __future__ import annotations

import sys
from typing import Any

import torch
import torch.nn as nn
from tqdm import tqdm

from explainkit.errors import ExplainkitError
from explainkit.explainers.base import Computed, Explainer, normalize_maps, upsample_bilinear
from explainkit.explainers.gradient import forward_with_activations
from explainkit.models.layouts import Layout, resolve_layout
from explainkit.targets import BoundTarget, Target

BETAS = (0.9, 0.999)  # Adam's defaults, which the authors use
EPSILON = 1e-8


def saliency(weights: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """``(M, h, w)``: ``Σ_c softmax(u)_c F_c`` for logits ``weights (M, C)`` and ``features (M, C, h, w)``."""
    return torch.einsum("mc,mchw->mhw", weights.softmax(dim=1), features)


class OptiCAM(Explainer):
    r"""Opti-CAM (Zhang, Torres, Sicre, Avrithis & Ayache, Computer Vision and Image Understanding
    2024, https://arxiv.org/abs/2301.07002; the authors' code: github.com/hanwei0912/OptiCAM).

    With ``F = ReLU(A)`` the target layer's activations, ``u`` one logit per channel and ``n`` the
    min-max scaling of a map upsampled (bilinear) to the input, each image ``x`` and target column
    ``t`` gets its own

    .. math:: S(u) = n\Big(\mathrm{up}\Big(\sum_c \mathrm{softmax}(u)_c\, F_c\Big)\Big), \qquad
              u^\star = \arg\max_u \; y^t\big(x \odot S(u)\big)

    the saliency map whose masking of the image keeps the target's score (the logit, the authors'
    ``logit_predict``) highest. As in the authors' code: ``u`` starts at ``0.5`` for every channel
    (uniform weights), Adam (lr ``0.1``) runs ``iterations`` steps (``50``) on
    ``-y^t(x \odot S)``, and every ``iterations // 10`` steps an optimisation stops, keeping the
    map of that step, when its score fell since the last such check (``early_stop``; the authors
    check a batch's summed loss, here each image and column alone, as their code does for a batch
    of one). The map returned is ``\sum_c \mathrm{softmax}(u^\star)_c F_c``.

    The image is masked as given, so with normalised inputs the masked-out pixels go to the
    dataset's mean colour (the authors mask ``[0, 1]`` pixels before normalising: black).

    Every image's and every target column's ``u`` are one ``(N J, C)`` tensor: an iteration is one
    forward and one backward (``torch.autograd.grad`` to ``u`` only) of the ``N J`` masked images,
    in chunks of ``batch_size`` on the images' device. Cost: ``iterations`` forwards and backwards
    of the whole model per image and target column (about ``3 x iterations`` forward-equivalents:
    150 by default, against Score-CAM's 512 forwards at a ResNet's ``layer4``; 1.5 to 3.2 s per
    image for a CIFAR ResNet18 on one CPU core, with and without the early stop), fewer once pairs stop (they leave the batch);
    ``targets="all"`` multiplies it by the classes. Prefer it where faithfulness to the model's
    own masked scores matters more than time: the paper reports it well ahead of other CAMs on
    the masked-image classification metrics (average drop and increase, and its average gain),
    while noting that this is not better localisation.

    Args:
        model, layer: see :class:`~explainkit.explainers.base.Explainer`.
        iterations: Adam steps per image and target (the authors' 50).
        lr: Adam's learning rate (the authors' 0.1).
        early_stop: stop an image's optimisation when its score falls, as the authors do.
        batch_size: masked images per forward (image x target pairs, optimised chunk by chunk).
        progress: show a progress bar (only on a terminal).
        layout: how the layer's output maps to ``(N, C, h, w)`` (default: read off the model).
    """

    name = "opticam"
    family = "perturbation"

    def __init__(
        self,
        model: nn.Module,
        layer: str | nn.Module | None = None,
        *,
        iterations: int = 50,
        lr: float = 0.1,
        early_stop: bool = True,
        batch_size: int = 64,
        progress: bool = True,
        layout: Layout | None = None,
    ) -> None:
        super().__init__(model, layer)
        if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 0:
            raise ExplainkitError(f"iterations must be a whole number >= 0, got {iterations!r}")
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
            raise ExplainkitError(f"lr must be a positive number, got {lr!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ExplainkitError(f"batch_size must be at least 1, got {batch_size!r}")
        self.iterations, self.lr, self.early_stop = iterations, float(lr), bool(early_stop)
        self.batch_size, self.progress, self.layout = batch_size, bool(progress), layout

    def compute(self, images: torch.Tensor, target: Target) -> Computed:
        model_output, output = forward_with_activations(self.model, self.layer, self.layer_name, images)
        layout = resolve_layout(self.layout, output, images, self.model, self.layer_name)
        features = torch.relu(torch.nan_to_num(layout.to_channels_first(output.float())))  # (N, C, h, w)
        bound = target.bind(model_output)
        reference = bound(model_output).detach()  # (N,) or (N, J)
        n, columns = len(images), 1 if reference.ndim == 1 else reference.shape[1]
        owners = torch.arange(n, device=images.device).repeat_interleave(columns)  # pair -> image
        column = torch.arange(columns, device=images.device).repeat(n)  # pair -> target column
        weights = torch.full((n * columns, features.shape[1]), 0.5, device=images.device)  # the authors' start
        chunks = range(0, n * columns, self.batch_size)
        bar = tqdm(
            total=len(chunks) * self.iterations, desc="opticam", unit="step", leave=False,
            disable=not (self.progress and sys.stderr.isatty()),
        )  # fmt: skip
        try:
            with target.forward_context():
                for start in chunks:
                    pairs = slice(start, start + self.batch_size)
                    weights[pairs] = self._optimise(
                        images, features, bound, owners[pairs], column[pairs] if reference.ndim == 2 else None,
                        weights[pairs], bar,
                    )  # fmt: skip
        finally:
            bar.close()
        # (N, J, h, w) without gathering a copy of the features for every (image, column) pair
        maps = torch.einsum("njc,nchw->njhw", weights.view(n, columns, -1).softmax(dim=-1), features)
        return Computed(maps[:, 0] if reference.ndim == 1 else maps, bound, reference)

    def _optimise(
        self,
        images: torch.Tensor,
        features: torch.Tensor,
        bound: BoundTarget,
        owners: torch.Tensor,
        column: torch.Tensor | None,
        weights: torch.Tensor,
        bar: Any,
    ) -> torch.Tensor:
        """The optimised ``(M, C)`` channel logits of ``M`` (image, column) pairs: Adam on ``-score``.
        Pairs whose optimisation stopped leave the batch, so later steps forward only the rest."""
        features, pixels = features[owners], images[owners]
        size = (images.shape[-2], images.shape[-1])
        u = weights.clone()
        first, second = torch.zeros_like(u), torch.zeros_like(u)
        result, live = u.clone(), torch.arange(len(u), device=u.device)  # live: the rows still optimised
        previous = torch.full((len(u),), float("inf"), device=u.device)
        check = max(1, self.iterations // 10)
        for step in range(self.iterations):
            with torch.enable_grad():
                u.requires_grad_(True)
                masks = normalize_maps(upsample_bilinear(saliency(u, features), size))  # (M, H, W)
                scores = self._scores(bound, self.model((pixels * masks[:, None]).to(images.dtype)), owners, column)
                gradient = None
                if scores.requires_grad:
                    (gradient,) = torch.autograd.grad(scores.sum(), u, allow_unused=True)
                if gradient is None:  # a target that does not depend on the image (a constant, no boxes)
                    gradient = torch.zeros_like(u)
            u = u.detach()
            if self.early_stop and step % check == 0:
                # The authors' test on their loss f(x) - f(x ⊙ S): it rose, so the score fell.
                loss = -scores.detach().float()
                stopped = loss > previous
                previous = loss
                if bool(stopped.any()):  # one sync per check (every iterations // 10 steps)
                    result[live[stopped]] = u[stopped]  # the map of this step, as the authors return
                    keep = ~stopped
                    live, u, gradient, first, second, previous = (t[keep] for t in (live, u, gradient, first, second, previous))
                    features, pixels, owners = features[keep], pixels[keep], owners[keep]
                    column = None if column is None else column[keep]
                    if len(live) == 0:
                        bar.update(self.iterations - step)
                        return result
            u = self._adam(u, -gradient, first, second, step + 1)
            bar.update(1)
        result[live] = u
        return result

    def _scores(self, bound: BoundTarget, output: Any, owners: torch.Tensor, column: torch.Tensor | None) -> torch.Tensor:
        """``(M,)``: each masked image's score for its own target column."""
        scores = bound(output, owners)
        if column is None:
            return scores if scores.ndim == 1 else scores[:, 0]
        return scores.gather(1, column[:, None])[:, 0]

    def _adam(self, u: torch.Tensor, gradient: torch.Tensor, first: torch.Tensor, second: torch.Tensor, t: int) -> torch.Tensor:
        """One step of ``torch.optim.Adam`` (default betas and eps, as the authors), on the device;
        ``first`` and ``second`` are its moment estimates, updated in place."""
        first.mul_(BETAS[0]).add_(gradient, alpha=1 - BETAS[0])
        second.mul_(BETAS[1]).addcmul_(gradient, gradient, value=1 - BETAS[1])
        denominator = (second.sqrt() / (1 - BETAS[1] ** t) ** 0.5).add_(EPSILON)
        return torch.addcdiv(u, first, denominator, value=-self.lr / (1 - BETAS[0] ** t))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(layer={self.layer_name!r}, iterations={self.iterations}, lr={self.lr})"


__all__ = ["OptiCAM", "saliency"]

"""Score-CAM: channel weights from the model's scores on activation-masked copies of the image."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from explainkit.errors import ExplainkitError
from explainkit.explainers.base import Explainer, Targets, resolve_targets
from explainkit.explainers.gradient import forward_with_activations
from explainkit.layouts import Layout, resolve_layout
from explainkit.outputs import logits_of


class ScoreCAM(Explainer):
    r"""Score-CAM (Wang et al., CVPR Workshops 2020, https://arxiv.org/abs/1910.01279).

    Each channel's activation map ``A_c``, upsampled to the input (bilinear, corners aligned) and
    min-max scaled to ``M_c`` in [0, 1], masks the image; the channel's weight is the softmax over
    channels of the model's score for the target on that masked image:

    .. math:: w_c = \mathrm{softmax}_c\big(y^t(x \odot M_c)\big), \qquad L = \mathrm{ReLU}\Big(\sum_c w_c A_c\Big)

    (pytorch-grad-cam's formulation: raw logits, softmax over channels, ``1e-8`` in the scaling.)

    Cost: one forward per channel per image (512 at ResNet18's ``layer4``) and no backward. Those
    masked forwards give every class's score at once, so ``targets="all"`` costs about what one
    target costs (pytorch-grad-cam repeats them per target). Masked images are built and run in
    chunks of ``batch_size`` on the images' device, so memory stays bounded. Prefer it where
    gradients are unreliable (saturated or noisy); it is the slowest method here.
    """

    name = "scorecam"

    def __init__(
        self, model: nn.Module, layer: str | nn.Module | None = None, *, batch_size: int = 256, layout: Layout | None = None
    ) -> None:
        super().__init__(model, layer)
        if batch_size < 1:
            raise ExplainkitError(f"batch_size must be at least 1, got {batch_size}")
        self.batch_size = batch_size
        self.layout = layout

    def masked_scores(self, images: torch.Tensor, activations: torch.Tensor) -> torch.Tensor:
        """``(N, C, K)``: the model's logits for every class on each channel-masked image."""
        n, c = activations.shape[:2]
        flat = activations.reshape(n * c, 1, *activations.shape[-2:])
        scores = []
        for start in range(0, n * c, self.batch_size):  # chunks of (image, channel) pairs
            masks = F.interpolate(
                flat[start : start + self.batch_size], size=images.shape[-2:], mode="bilinear", align_corners=True
            )
            low = masks.amin(dim=(-2, -1), keepdim=True)
            high = masks.amax(dim=(-2, -1), keepdim=True)
            masks = (masks - low) / (high - low + 1e-8)
            owners = torch.arange(start, min(start + self.batch_size, n * c), device=images.device) // c
            scores.append(logits_of(self.model(images[owners] * masks)).float())
        return torch.cat(scores).view(n, c, -1)

    def compute(self, images: torch.Tensor, targets: Targets):
        logits, output = forward_with_activations(self.model, self.layer, self.layer_name, images)
        layout = resolve_layout(self.layout, output, images, self.model, self.layer_name)
        activations = layout.to_channels_first(output.float())  # (N, C, h, w)
        resolved = resolve_targets(targets, logits)
        with torch.no_grad():
            scores = self.masked_scores(images, activations)  # (N, C, K)
        if isinstance(resolved, str):  # ALL: every class from the same masked forwards
            weights = scores.softmax(dim=1)  # (N, C, K)
            return torch.einsum("nck,nchw->nkhw", weights, activations), logits, resolved
        chosen = scores.gather(2, resolved.view(-1, 1, 1).expand(-1, scores.shape[1], 1)).squeeze(2)  # (N, C)
        return torch.einsum("nc,nchw->nhw", chosen.softmax(dim=1), activations), logits, resolved

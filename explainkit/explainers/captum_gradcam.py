"""An adapter over Captum's ``LayerGradCam``, post-processed exactly like our own CAMs."""

from __future__ import annotations

import torch

from explainkit.errors import ExplainkitError
from explainkit.explainers.base import Computed, Explainer
from explainkit.targets import Target


class CaptumGradCAM(Explainer):
    """Captum's Grad-CAM (``captum.attr.LayerGradCam``; Selvaraju et al. 2017).

    Same formula as :class:`~explainkit.explainers.gradient.GradCAM`; offered for users who
    standardise on Captum and as an independent reference. Captum takes one target per call,
    so ``targets="all"`` costs K backward passes (top-k: k, boxes: one per box), and binding the target one extra forward.
    """

    name = "captum-gradcam"
    family = "gradient"

    def compute(self, images: torch.Tensor, target: Target) -> Computed:
        from captum.attr import LayerGradCam  # imported on use: registering the name needs no captum

        with torch.no_grad():
            output = self.model(images)
        bound = target.bind(output)
        scores = bound(output)

        def forward(x: torch.Tensor) -> torch.Tensor:  # the target's scores: Captum differentiates them
            return bound(self.model(x))

        grad_cam = LayerGradCam(forward, self.layer)

        def attribute(column: int | None) -> torch.Tensor:
            maps: torch.Tensor = grad_cam.attribute(images, target=column)
            if maps.ndim != 4:  # LayerGradCam assumes (N, C, h, w); anything else would be silently wrong
                raise ExplainkitError(
                    f"captum-gradcam needs a layer with (N, C, h, w) output; {self.layer_name!r} is not one: use gradcam"
                )
            return maps[:, 0].detach()

        if scores.ndim == 2:  # "all", top-k, boxes: Captum takes one target per call, one call per column
            return Computed(torch.stack([attribute(j) for j in range(scores.shape[1])], dim=1), bound, scores)
        return Computed(attribute(None), bound, scores)

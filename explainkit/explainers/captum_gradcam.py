"""An adapter over Captum's ``LayerGradCam``, post-processed exactly like our own CAMs."""

from __future__ import annotations

import torch

from explainkit.errors import ExplainkitError
from explainkit.explainers.base import Explainer, Targets, class_sets, resolve_targets
from explainkit.models.outputs import logits_of


class CaptumGradCAM(Explainer):
    """Captum's Grad-CAM (``captum.attr.LayerGradCam``; Selvaraju et al. 2017).

    Same formula as :class:`~explainkit.explainers.gradient.GradCAM`; offered for users who
    standardise on Captum and as an independent reference. Captum takes one target per call,
    so ``targets="all"`` costs K backward passes (top-k: k), and predicted-class targets one extra forward.
    """

    name = "captum-gradcam"

    def compute(self, images: torch.Tensor, targets: Targets):
        from captum.attr import LayerGradCam  # imported on use: registering the name needs no captum

        def forward(x: torch.Tensor) -> torch.Tensor:
            return logits_of(self.model(x))

        with torch.no_grad():
            logits = forward(images)
        resolved = resolve_targets(targets, logits)
        grad_cam = LayerGradCam(forward, self.layer)

        def attribute(target) -> torch.Tensor:
            maps: torch.Tensor = grad_cam.attribute(images, target=target)
            if maps.ndim != 4:  # LayerGradCam assumes (N, C, h, w); anything else would be silently wrong
                raise ExplainkitError(
                    f"captum-gradcam needs a layer with (N, C, h, w) output; {self.layer_name!r} is not one: use gradcam"
                )
            return maps[:, 0].detach()

        classes = class_sets(resolved, logits)
        if classes is not None:  # "all" or top-k: one Captum call per column
            return torch.stack([attribute(column) for column in classes.T], dim=1), logits, resolved
        return attribute(resolved), logits, resolved

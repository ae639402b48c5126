"""An adapter over Captum's ``LayerGradCam``, post-processed exactly like our own CAMs."""

from __future__ import annotations

import torch

from explainkit.explainers.base import Explainer, Targets, resolve_targets


class CaptumGradCAM(Explainer):
    """Captum's Grad-CAM (``captum.attr.LayerGradCam``; Selvaraju et al. 2017).

    Same formula as :class:`~explainkit.explainers.gradient.GradCAM`; offered for users who
    standardise on Captum and as an independent reference. Captum takes one target per call,
    so ``targets="all"`` costs K backward passes, and predicted-class targets one extra forward.
    """

    name = "captum-gradcam"

    def compute(self, images: torch.Tensor, targets: Targets):
        from captum.attr import LayerGradCam  # imported on use: registering the name needs no captum

        with torch.no_grad():
            logits = self.model(images)
        resolved = resolve_targets(targets, logits)
        grad_cam = LayerGradCam(self.model, self.layer)
        if isinstance(resolved, str):  # ALL
            maps = [grad_cam.attribute(images, target=k)[:, 0] for k in range(logits.shape[1])]
            return torch.stack(maps, dim=1).detach(), logits, resolved
        return grad_cam.attribute(images, target=resolved)[:, 0].detach(), logits, resolved

"""pytorch-grad-cam's method zoo as explainkit explainers (an explainkit plugin)."""

from __future__ import annotations

import torch
from pytorch_grad_cam import (
    AblationCAM,
    EigenCAM,
    EigenGradCAM,
    GradCAM,
    GradCAMElementWise,
    GradCAMPlusPlus,
    HiResCAM,
    LayerCAM,
    ScoreCAM,
    XGradCAM,
)
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

import explainkit
from explainkit.explainers.base import Explainer, class_sets, resolve_targets
from explainkit.models.outputs import logits_of

# Methods explainkit has natively keep pytorch-grad-cam's version under a "pgc-" name (a reference
# to compare against, and no clash); the others keep their plain names until explainkit has them.
METHODS = {
    "pgc-scorecam": ScoreCAM,
    "pgc-ablationcam": AblationCAM,
    "pgc-eigencam": EigenCAM,
    "eigengradcam": EigenGradCAM,
    "pgc-xgradcam": XGradCAM,
    "pgc-layercam": LayerCAM,
    "pgc-hirescam": HiResCAM,
    "pgc-gradcam-elementwise": GradCAMElementWise,
    "pgc-gradcam": GradCAM,
    "pgc-gradcam++": GradCAMPlusPlus,
}


class PytorchGradCamExplainer(Explainer):
    """Runs a ``pytorch_grad_cam`` method class inside its ``with`` block (so its hooks go) and
    restores every parameter's ``.grad``, which its full ``backward()`` would overwrite."""

    method_class: type = GradCAM

    def compute(self, images: torch.Tensor, targets):
        with torch.no_grad():
            logits = logits_of(self.model(images))
        resolved = resolve_targets(targets, logits)
        saved_grads = [(p, p.grad) for p in self.model.parameters()]
        try:
            with torch.enable_grad(), self.method_class(model=self.model, target_layers=[self.layer]) as cam:
                classes = class_sets(resolved, logits)
                if classes is not None:  # "all", top-k: pytorch-grad-cam takes one target per image per call
                    per_class = [
                        cam(input_tensor=images, targets=[ClassifierOutputTarget(int(k)) for k in column])
                        for column in classes.T.tolist()
                    ]
                    maps = torch.stack([torch.from_numpy(m) for m in per_class], dim=1)
                else:
                    wanted = [ClassifierOutputTarget(k) for k in resolved.tolist()]
                    maps = torch.from_numpy(cam(input_tensor=images, targets=wanted))
        finally:
            for parameter, grad in saved_grads:
                parameter.grad = grad
        return maps.to(images.device), logits, resolved


def _adapter(name: str, method_class: type) -> type:
    return type(
        f"Zoo_{method_class.__name__}",
        (PytorchGradCamExplainer,),
        {"name": name, "method_class": method_class, "__doc__": f"pytorch-grad-cam's {method_class.__name__}."},
    )


@explainkit.hookimpl
def register_explainers(register):
    for name, method_class in METHODS.items():
        register(name, _adapter(name, method_class))

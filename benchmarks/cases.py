"""The benchmark cases as plain callables, shared by the pytest-benchmark suite and the memory probe.

Peers are used as their documentation shows: pytorch-grad-cam inside a ``with`` block (so its
hooks leave the model), Captum's ``LayerGradCam.attribute`` with the class target.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Callable

import torch

import explainkit
from explainkit.explainers.gradient import GradCAM, GradCAMPlusPlus

NUM_CLASSES = 10
PGC_CLASSES = {
    "gradcam": "GradCAM",
    "gradcam++": "GradCAMPlusPlus",
    "xgradcam": "XGradCAM",
    "hirescam": "HiResCAM",
    "layercam": "LayerCAM",
    "gradcam-elementwise": "GradCAMElementWise",
    "eigencam": "EigenCAM",
    "scorecam": "ScoreCAM",
    "ablationcam": "AblationCAM",
}


def autocast_context(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def forward(model, images, dtype=None) -> Callable[[], object]:
    """The floor: plain inference."""

    def run():
        with torch.inference_mode(), autocast_context(images.device, dtype):
            return model(images)

    return run


def ours(name: str, model, images, layer: str, targets=None, dtype=None) -> Callable[[], object]:
    if name in ("gradcam", "gradcam++"):
        explainer = (GradCAM if name == "gradcam" else GradCAMPlusPlus)(model, layer, autocast=dtype)
    else:
        explainer = explainkit.get_explainer(name, model, layer=layer)
    return lambda: explainer(images, targets=targets)


def ours_ten_calls(model, images, layer: str, dtype=None) -> Callable[[], object]:
    explainer = GradCAM(model, layer, autocast=dtype)
    return lambda: [explainer(images, targets=k) for k in range(NUM_CLASSES)]


def pgc(method: str, model, images, layer: str, classes=(None,)) -> Callable[[], object]:
    """pytorch-grad-cam, one call per class in ``classes`` (None = its predicted class)."""
    import pytorch_grad_cam as pgc_module  # peers import on use: the GPU image lacks them
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    method_class = getattr(pgc_module, PGC_CLASSES[method])
    target_layer = model.get_submodule(layer)

    def run():
        out = []
        with method_class(model=model, target_layers=[target_layer]) as cam:
            for k in classes:
                targets = None if k is None else [ClassifierOutputTarget(k)] * len(images)
                out.append(cam(input_tensor=images, targets=targets))
        return out

    return run


def captum(model, images, layer: str, classes=(None,)) -> Callable[[], object]:
    """Captum LayerGradCam, one call per class (None = predicted class, which costs a forward)."""
    from captum.attr import LayerGradCam

    grad_cam = LayerGradCam(model, model.get_submodule(layer))

    def run():
        out = []
        for k in classes:
            if k is None:
                with torch.no_grad():
                    k = model(images).argmax(1)
            out.append(grad_cam.attribute(images, target=k))
        return out

    return run

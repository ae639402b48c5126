"""The benchmark cases as plain callables, shared by the pytest-benchmark suite and the memory probe.

Peers are used as their documentation shows: pytorch-grad-cam inside a ``with`` block (so its
hooks leave the model), Captum's ``LayerGradCam.attribute`` with the class target.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Callable, Iterator

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


# --- the newer methods (bench_methods.py): pytorch-grad-cam 1.5.7 and torch-cam 0.5 -------------

PGC_NEW_CLASSES = {
    "finercam": "FinerCAM",
    "shapleycam": "ShapleyCAM",
    "kpcacam": "KPCA_CAM",
    "fem": "FEM",
    "fullgrad": "FullGrad",
    "refinecam": "RefineCAM",
    "guided-gradcam": "GuidedBackpropReLUModel",
}
PGC_TARGET_FREE = ("kpcacam", "fem")  # their maps ignore the target: one call serves every class
TORCHCAM_NEW_CLASSES = {"finercam": "FinerCAM", "refinecam": "RefineCAM", "legrad": "LeGrad"}


@contextmanager
def relus_kept(model: torch.nn.Module) -> Iterator[None]:
    """pytorch-grad-cam's ``GuidedBackpropReLUModel`` puts back new non-inplace ``nn.ReLU()``s:
    the originals go back after, so the shared model stays the one every case runs."""
    slots = [(p, k, m) for p in model.modules() for k, m in p._modules.items() if isinstance(m, torch.nn.ReLU)]
    try:
        yield
    finally:
        for parent, key, module in slots:
            parent._modules[key] = module


def pgc_new(method: str, model, images, layers: list[str], columns: list[list[int]]) -> Callable[[], object]:
    """pytorch-grad-cam 1.5.7's newer methods as its README and examples call them, inside one
    ``with`` block, one call per column (a class per image: each image's predicted class, or one
    class for every image): FinerCAM by ``target_idx`` (a column of predicted classes: its
    default, ``None``, each image's top class), ShapleyCAM with ``ClassifierOutputReST``, RefineCAM over
    ``layers`` (it has no ``with``: each per-layer CAM is released after), FullGrad without
    layers, KPCA-CAM and FEM once (they ignore the target), Guided Grad-CAM as its ``cam.py``:
    ``GradCAM`` then ``GuidedBackpropReLUModel`` on one image at a time, the 3-channel product."""
    import numpy as np
    import pytorch_grad_cam as pgc_module
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputReST, ClassifierOutputTarget

    modules = [model.get_submodule(layer) for layer in layers]
    calls = columns[:1] if method in PGC_TARGET_FREE else columns

    def opened():
        if method == "refinecam":
            return _released(pgc_module.RefineCAM(model, modules))
        if method == "fullgrad":
            return pgc_module.FullGrad(model, [])
        if method == "guided-gradcam":
            return pgc_module.GradCAM(model=model, target_layers=modules)
        return getattr(pgc_module, PGC_NEW_CLASSES[method])(model=model, target_layers=modules)

    def one(cam, column):
        if method == "finercam":
            return cam(input_tensor=images, target_idx=column[0] if len(set(column)) == 1 else None)
        make = ClassifierOutputReST if method == "shapleycam" else ClassifierOutputTarget
        maps = cam(input_tensor=images, targets=[make(k) for k in column])
        if method != "guided-gradcam":
            return maps
        guided = pgc_module.GuidedBackpropReLUModel(model=model, device=None)
        with relus_kept(model):
            found = [guided(images[i : i + 1].clone(), target_category=k) for i, k in enumerate(column)]
        return maps[..., None] * np.stack(found)

    def run():
        with opened() as cam:
            return [one(cam, column) for column in calls]

    return run


@contextmanager
def _released(cam) -> Iterator[object]:
    try:
        yield cam
    finally:
        for base in cam.base_cam_per_layer:
            base.activations_and_grads.release()


def torchcam_new(
    method: str, model, images, layers: list[str] | list[torch.nn.Module], columns: list[list[int]]
) -> Callable[[], object]:
    """torch-cam 0.5's FinerCAM (``gamma=1``), RefineCAM (its Grad-CAM++ base) and LeGrad as its
    docs show: one forward inside the ``with`` block, then one extractor call per column (the
    graph retained until the last)."""
    from torchcam import methods as torchcam_methods

    method_class = getattr(torchcam_methods, TORCHCAM_NEW_CLASSES[method])
    options = {"gamma": 1.0} if method == "finercam" else {}
    target = layers[0] if method == "finercam" else list(layers)

    def run():
        with method_class(model, target, **options) as cam:
            scores = model(images)
            return [cam(class_idx=column, scores=scores, retain_graph=i < len(columns) - 1) for i, column in enumerate(columns)]

    return run

"""pytorch-grad-cam's method zoo as explainkit explainers (an explainkit plugin)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn as nn
from pytorch_grad_cam import (
    FEM,
    KPCA_CAM,
    AblationCAM,
    EigenCAM,
    EigenGradCAM,
    FinerCAM,
    FullGrad,
    GradCAM,
    GradCAMElementWise,
    GradCAMPlusPlus,
    GuidedBackpropReLUModel,
    HiResCAM,
    LayerCAM,
    RefineCAM,
    ScoreCAM,
    ShapleyCAM,
    XGradCAM,
)
from pytorch_grad_cam.utils.model_targets import ClassifierOutputReST, ClassifierOutputTarget, FinerWeightedTarget

import explainkit
from explainkit.errors import ExplainkitError
from explainkit.explainers.base import Explainer, class_sets, resolve_targets
from explainkit.models.layers import resolve_layer
from explainkit.models.outputs import logits_of
from explainkit.targets import ClassDifference, ClassScores

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
    "pgc-finercam": FinerCAM,
    "pgc-shapleycam": ShapleyCAM,
    "pgc-kpcacam": KPCA_CAM,
    "pgc-fem": FEM,
    "pgc-fullgrad": FullGrad,
    "pgc-refinecam": RefineCAM,
    "pgc-guided-gradcam": GuidedBackpropReLUModel,
}


class PytorchGradCamExplainer(Explainer):
    """Runs a ``pytorch_grad_cam`` method inside its ``with`` block (so its hooks go) and restores
    every parameter's ``.grad``, which its full ``backward()`` would overwrite.

    A method with its own constructor or targets overrides :meth:`open` (the method object, a
    context manager) or :meth:`target` (pytorch-grad-cam's target for class ``k`` of one image).
    """

    method_class: type = GradCAM
    family = "gradient"
    #: the maps do not depend on the target (Eigen-CAM, KPCA-CAM, FEM): one call serves every class
    class_agnostic = False

    def open(self) -> Any:
        """The pytorch-grad-cam method, entered as a ``with`` block (its hooks go when it exits)."""
        return self.method_class(model=self.model, target_layers=[self.layer])

    def target(self, k: int, logits: torch.Tensor) -> object:
        """pytorch-grad-cam's target for class ``k`` of an image whose logits are ``logits`` ``(K,)``."""
        return ClassifierOutputTarget(k)

    def maps(self, cam, images: torch.Tensor, classes: list[int], logits: torch.Tensor) -> Any:
        """``(N, H, W)``: one pytorch-grad-cam call, class ``classes[i]`` for image ``i``."""
        return cam(input_tensor=images, targets=[self.target(k, row) for k, row in zip(classes, logits)])

    def compute(self, images: torch.Tensor, targets):
        with torch.no_grad():
            logits = logits_of(self.model(images))
        resolved = resolve_targets(targets, logits)  # a target other than classes: a one-line error
        classes = class_sets(resolved, logits)
        # pytorch-grad-cam takes one target per image per call: "all" and top-k run a call per column
        if classes is None:
            assert isinstance(resolved, torch.Tensor)  # "all" always has class sets
            columns = [resolved.tolist()]
        else:
            columns = classes.T.tolist()
        calls = columns[:1] if self.class_agnostic else columns
        found: list[torch.Tensor] = []
        saved_grads = [(p, p.grad) for p in self.model.parameters()]
        try:
            with torch.enable_grad(), self.open() as cam:
                for column in calls:
                    found.append(torch.from_numpy(np.asarray(self.maps(cam, images, column, logits), dtype=np.float32)))
        finally:
            for parameter, grad in saved_grads:
                parameter.grad = grad
        if len(found) < len(calls):  # its __exit__ swallows an IndexError raised inside the block
            raise ExplainkitError(f"{self.name}: pytorch-grad-cam's {self.method_class.__name__} failed (an IndexError)")
        found = found * len(columns) if self.class_agnostic else found
        maps = found[0] if classes is None else torch.stack(found, dim=1)
        return maps.to(images.device), logits, resolved


class FinerCamExplainer(PytorchGradCamExplainer):
    """Finer-CAM: Grad-CAM of ``FinerWeightedTarget``: class ``k`` against the ``comparisons``
    classes whose logits are nearest to its own, weighted by their probabilities, times ``alpha``
    (pytorch-grad-cam's ``FinerCAM`` with its default ``GradCAM`` base). Takes class targets, or
    explainkit's :class:`~explainkit.targets.ClassDifference` (its classes, comparisons and alpha)."""

    def __init__(self, model: nn.Module, layer=None, comparisons: int = 3, alpha: float = 1.0) -> None:
        super().__init__(model, layer)
        self.comparisons, self.alpha = comparisons, alpha

    def compute(self, images: torch.Tensor, targets):
        if isinstance(targets, ClassDifference):
            same = type(self)(self.model, self.layer, targets.comparisons, targets.alpha)
            return PytorchGradCamExplainer.compute(same, images, ClassScores(targets.classes))
        return super().compute(images, targets)

    def target(self, k: int, logits: torch.Tensor) -> object:
        distance = (logits - logits[k]).abs()
        distance[k] = -1.0  # the class itself sorts first, as FinerCAM's own target_idx call does
        similar = distance.argsort()[1 : 1 + min(self.comparisons, len(logits) - 1)]
        return FinerWeightedTarget(k, similar.tolist(), self.alpha)


class ShapleyCamExplainer(PytorchGradCamExplainer):
    """ShapleyCAM with the ReST target (logit minus cross-entropy), as pytorch-grad-cam's docs pair them."""

    def target(self, k: int, logits: torch.Tensor) -> object:
        return ClassifierOutputReST(k)


class KpcaCamExplainer(PytorchGradCamExplainer):
    """KPCA-CAM: the first kernel principal component of the layer's activations (ignores the target)."""

    family = "class-agnostic"
    class_agnostic = True

    def __init__(self, model: nn.Module, layer=None, kernel: str = "sigmoid", gamma: float | None = None) -> None:
        super().__init__(model, layer)
        self.kernel, self.gamma = kernel, gamma

    def open(self) -> Any:
        return KPCA_CAM(model=self.model, target_layers=[self.layer], kernel=self.kernel, gamma=self.gamma)


class FemExplainer(PytorchGradCamExplainer):
    """FEM: channels weighted by the share of their activations above mean + ``k`` std (ignores the target)."""

    family = "class-agnostic"
    class_agnostic = True

    def __init__(self, model: nn.Module, layer=None, k: float = 2) -> None:
        super().__init__(model, layer)
        self.k = k

    def open(self) -> Any:
        return FEM(model=self.model, target_layers=[self.layer], k=self.k)


class FullGradExplainer(PytorchGradCamExplainer):
    """FullGrad: |input x input-gradient| plus |bias x gradient| of every Conv2d/BatchNorm2d with a
    bias; ``layer`` is not used (FullGrad reads every such layer)."""

    def open(self) -> Any:
        return FullGrad(model=self.model, target_layers=[])  # any layer given is ignored, with a print


def preceding_layers(model: nn.Module, layer: nn.Module, count: int = 2) -> list[nn.Module]:
    """``layer`` after up to ``count`` of its preceding siblings of the same class (``layer4`` of a
    ResNet -> ``[layer2, layer3, layer4]``)."""
    for parent in model.modules():
        siblings = list(parent.children())
        at = next((i for i, child in enumerate(siblings) if child is layer), None)
        if at is not None:
            return [m for m in siblings[:at] if type(m) is type(layer)][-count:] + [layer]
    return [layer]


@contextmanager
def _released(cam: RefineCAM) -> Iterator[RefineCAM]:
    """RefineCAM has no ``with`` block of its own: release each per-layer base CAM's hooks."""
    try:
        yield cam
    finally:
        for base in cam.base_cam_per_layer:
            base.activations_and_grads.release()


class RefineCamExplainer(PytorchGradCamExplainer):
    """RefineCAM: the product of per-layer Grad-CAM++ maps (each normalised). ``layers``: dotted
    names or modules; default ``layer`` and the two preceding siblings of its class."""

    family = "fusion"

    def __init__(self, model: nn.Module, layer=None, layers: Sequence[str | nn.Module] | None = None) -> None:
        super().__init__(model, layer)
        if layers:
            self.layers = [resolve_layer(model, one)[1] for one in layers]
        else:
            self.layers = preceding_layers(model, self.layer)

    def open(self) -> Any:
        return _released(RefineCAM(model=self.model, target_layers=self.layers))


def relu_slots(model: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """``(parent, key, module)`` for every ``nn.ReLU`` in ``model``, to put each back."""
    return [
        (parent, key, child) for parent in model.modules() for key, child in parent._modules.items() if isinstance(child, nn.ReLU)
    ]


class GuidedGradCamExplainer(PytorchGradCamExplainer):
    """Guided Grad-CAM: pytorch-grad-cam's ``GradCAM`` map times its ``GuidedBackpropReLUModel``
    input gradient ``G``, reduced over the colour channels as explainkit's ``guided-gradcam`` does:
    ``channel_reduction="norm"`` (``sqrt(sum_c G_c^2)``) or ``"max"`` (``max_c |G_c|``).
    (pytorch-grad-cam's example shows the 3-channel product as a colour image.)

    ``GuidedBackpropReLUModel`` takes one image and swaps every ``nn.ReLU`` for its own module,
    putting back new ``nn.ReLU()`` (not ``inplace``); each original ReLU is put back here, even
    after an error. One guided backward per image and class."""

    method_class = GuidedBackpropReLUModel

    def __init__(self, model: nn.Module, layer=None, channel_reduction: str = "norm") -> None:
        super().__init__(model, layer)
        if channel_reduction not in ("norm", "max"):
            raise ExplainkitError(f"channel_reduction must be 'norm' or 'max', got {channel_reduction!r}")
        self.channel_reduction = channel_reduction

    def open(self) -> Any:
        return GradCAM(model=self.model, target_layers=[self.layer])

    def maps(self, cam, images: torch.Tensor, classes: list[int], logits: torch.Tensor) -> Any:
        gradcam = super().maps(cam, images, classes, logits)
        slots = relu_slots(self.model)
        try:
            guided = GuidedBackpropReLUModel(self.model)
            # a fresh leaf per call: it sets requires_grad and reads .grad of what it is given
            found = np.stack([guided(images[i : i + 1].detach().clone(), target_category=k) for i, k in enumerate(classes)])
        finally:
            for parent, key, module in slots:
                parent._modules[key] = module
        reduced = np.abs(found).max(axis=-1) if self.channel_reduction == "max" else np.linalg.norm(found, axis=-1)
        return gradcam * reduced


ADAPTERS: dict[type, type[PytorchGradCamExplainer]] = {
    FinerCAM: FinerCamExplainer,
    ShapleyCAM: ShapleyCamExplainer,
    KPCA_CAM: KpcaCamExplainer,
    FEM: FemExplainer,
    FullGrad: FullGradExplainer,
    RefineCAM: RefineCamExplainer,
    GuidedBackpropReLUModel: GuidedGradCamExplainer,
}
FAMILIES = {ScoreCAM: "perturbation", AblationCAM: "perturbation", EigenCAM: "class-agnostic"}


def _adapter(name: str, method_class: type) -> type:
    base = ADAPTERS.get(method_class, PytorchGradCamExplainer)
    doc = f"pytorch-grad-cam's {method_class.__name__}." + (f" {base.__doc__}" if base is not PytorchGradCamExplainer else "")
    attributes = {"name": name, "method_class": method_class, "__doc__": doc}
    if method_class in FAMILIES:
        attributes.update(family=FAMILIES[method_class], class_agnostic=FAMILIES[method_class] == "class-agnostic")
    return type(f"Zoo_{method_class.__name__}", (base,), attributes)


@explainkit.hookimpl
def register_explainers(register):
    for name, method_class in METHODS.items():
        register(name, _adapter(name, method_class))

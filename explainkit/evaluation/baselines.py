"""Reference "explainers" every method is compared against.

* ``random`` — seeded uniform noise drawn at the explained layer's spatial resolution and
  upsampled like a CAM, so it removes contiguous regions as a CAM does;
* ``random-pixel`` — i.i.d. per-pixel noise (scattered deletion wrecks a 32x32 image fastest,
  so on deletion every CAM looks worse than it; reported for transparency);
* ``center`` — a centred Gaussian (CIFAR-10 objects are centred: a strong prior).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from explainkit.explainers.base import Explainer, class_sets, resolve_targets
from explainkit.models.outputs import logits_of

BASELINES = ("random", "random-pixel", "center")
BASELINE_PREFIX = "baseline:"  # their key in results, apart from any registered method's name


class _Baseline(Explainer):
    def __init__(self, model: nn.Module, layer=None, seed: int = 0) -> None:
        super().__init__(model, layer)
        self.generator = torch.Generator().manual_seed(seed)

    def _forward(self, images: torch.Tensor):
        shape: dict[str, tuple[int, ...]] = {}

        def record(module, inputs, output) -> None:
            shape.setdefault("hw", tuple(output.shape[-2:]))

        handle = self.layer.register_forward_hook(record)
        try:
            with torch.no_grad():
                logits = logits_of(self.model(images))
        finally:
            handle.remove()
        return logits, shape["hw"]

    def _random(self, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        return torch.rand(shape, generator=self.generator).to(device)

    def _expand(self, maps: torch.Tensor, resolved, logits: torch.Tensor) -> torch.Tensor:
        classes = class_sets(resolved, logits)
        return maps if classes is None else maps[:, None].expand(-1, classes.shape[1], *maps.shape[1:])


class RandomMap(_Baseline):
    """Uniform noise at the explained layer's resolution (``random``), or per pixel (``random-pixel``)."""

    name = "random"
    per_pixel = False

    def compute(self, images, targets):
        logits, layer_hw = self._forward(images)
        resolved = resolve_targets(targets, logits)
        classes = class_sets(resolved, logits)
        k = 1 if classes is None else classes.shape[1]
        hw = tuple(images.shape[-2:]) if self.per_pixel else layer_hw
        maps = self._random((len(images), k, *hw), images.device)
        return (maps[:, 0] if classes is None else maps), logits, resolved


class RandomPixelMap(RandomMap):
    name = "random-pixel"
    per_pixel = True


class CenterMap(_Baseline):
    name = "center"

    def compute(self, images, targets):
        logits, _ = self._forward(images)
        resolved = resolve_targets(targets, logits)
        h, w = images.shape[-2:]
        ys = torch.linspace(-1, 1, h, device=images.device).view(h, 1)
        xs = torch.linspace(-1, 1, w, device=images.device).view(1, w)
        gaussian = torch.exp(-(ys**2 + xs**2) / (2 * 0.5**2))
        return self._expand(gaussian.expand(len(images), h, w), resolved, logits), logits, resolved


def make_baseline(name: str, model: nn.Module, layer=None, seed: int = 0) -> Explainer:
    return {"random": RandomMap, "random-pixel": RandomPixelMap, "center": CenterMap}[name](model, layer, seed=seed)

"""A plain function registered as an explainer, given the one explainer contract.

A plugin may register a factory ``factory(model, layer=None, **options)`` that returns a plain
callable ``fn(images, targets=None, normalize=True) -> (N, H, W) maps`` taking one class per
image. The registry wraps such a factory once, at registration, so that code above the registry
always holds an :class:`~explainkit.explainers.base.Explainer`: :meth:`~Explainer.explain` returns
maps, logits and targets, top-k / ``"all"`` / class sets work (one ``fn`` call per column of
classes, after one forward for the logits), and post-processing and model hygiene are the base's.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn as nn

from explainkit.errors import ExplainkitError
from explainkit.explainers.base import Computed, Explainer, ExplainerFn, class_sets, class_target
from explainkit.models.outputs import logits_of
from explainkit.targets import Target, bound_classes


class FunctionExplainer(Explainer):
    """An :class:`Explainer` around a plain map function ``fn(images, targets) -> (N, H, W)``.

    Args:
        model: the model ``fn`` explains (run once per call for the logits).
        fn: the function the plugin's factory returned.
        name: its registered name (for messages).
        layer_name: the layer it reads, if it says so (``fn.layer_name``), else what was asked for.
    """

    def __init__(self, model: nn.Module, fn: ExplainerFn, name: str, layer_name: str | None) -> None:
        # No layer resolution: a plain function may not read any layer (gradient x input, say).
        self.model = model
        self.fn = fn
        self.name = name
        self.layer_name = getattr(fn, "layer_name", None) or layer_name  # type: ignore[assignment]
        self.layer = None  # type: ignore[assignment]

    def compute(self, images: torch.Tensor, target: Target) -> Computed:
        with torch.no_grad():
            logits = logits_of(self.model(images))
        resolved = class_target(target, logits, f"explainer {self.name!r} (a plain function of class indices)")
        classes = class_sets(resolved, logits)
        columns = [resolved] if classes is None else list(classes.T)
        maps = []
        for column in columns:  # the function takes one class per image: one call per column
            produced = self.fn(images, column)
            if not isinstance(produced, torch.Tensor) or tuple(produced.shape) != (len(images), *images.shape[-2:]):
                got = tuple(produced.shape) if isinstance(produced, torch.Tensor) else type(produced).__name__
                raise ExplainkitError(
                    f"explainer {self.name!r} returned maps of shape {got}, not (N, H, W) = "
                    f"{(len(images), *images.shape[-2:])} for these images"
                )
            maps.append(produced)
        raw = maps[0] if classes is None else torch.stack(maps, dim=1)
        bound = bound_classes(resolved, logits)
        return Computed(raw, bound, bound(logits))


def function_factory(name: str, factory: Callable[..., Any]) -> Callable[..., Explainer]:
    """``factory`` made to always return an :class:`Explainer`: what it builds is returned as is when
    it is one, and wrapped in a :class:`FunctionExplainer` when it is a plain callable."""

    def build(model: nn.Module, layer: str | nn.Module | None = None, **options: Any) -> Explainer:
        made = factory(model, layer=layer, **options)
        if isinstance(made, Explainer):
            return made
        if not callable(made):
            raise ExplainkitError(f"explainer {name!r}: its factory returned {type(made).__name__}, not a callable")
        return FunctionExplainer(model, made, name, layer if isinstance(layer, str) else None)

    build.__doc__ = getattr(factory, "__doc__", None)
    return build

"""Built-in explainers and the base classes plugins build on."""

from explainkit.explainers.base import (
    ALL,
    Explainer,
    ExplainerFn,
    Explanation,
    evaluation_mode,
    normalize_maps,
    postprocess,
    resolve_targets,
)
from explainkit.explainers.gradient import GradCAM, GradCAMPlusPlus, GradientCAM

__all__ = [
    "ALL",
    "Explainer",
    "ExplainerFn",
    "Explanation",
    "GradCAM",
    "GradCAMPlusPlus",
    "GradientCAM",
    "evaluation_mode",
    "normalize_maps",
    "postprocess",
    "resolve_targets",
]

"""Built-in explainers and the base classes plugins build on."""

from explainkit.explainers.base import ALL, Explainer, Explanation, evaluation_mode, normalize_maps, postprocess
from explainkit.explainers.gradient import GradCAM, GradCAMPlusPlus, GradientCAM

__all__ = [
    "ALL",
    "Explainer",
    "Explanation",
    "GradCAM",
    "GradCAMPlusPlus",
    "GradientCAM",
    "evaluation_mode",
    "normalize_maps",
    "postprocess",
]

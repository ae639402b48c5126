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
from explainkit.explainers.gradient import (
    GradCAM,
    GradCAMElementWise,
    GradCAMPlusPlus,
    GradientCAM,
    HiResCAM,
    LayerCAM,
    XGradCAM,
    layer_output_as_leaf,
)

__all__ = [
    "ALL",
    "Explainer",
    "ExplainerFn",
    "Explanation",
    "GradCAM",
    "GradCAMElementWise",
    "GradCAMPlusPlus",
    "GradientCAM",
    "HiResCAM",
    "LayerCAM",
    "XGradCAM",
    "evaluation_mode",
    "layer_output_as_leaf",
    "normalize_maps",
    "postprocess",
    "resolve_targets",
]

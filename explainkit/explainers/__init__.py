"""Built-in explainers and the base classes plugins build on."""

from explainkit.explainers.ablation import AblationCAM
from explainkit.explainers.base import (
    ALL,
    TOPK,
    Explainer,
    ExplainerFn,
    Explanation,
    class_sets,
    evaluation_mode,
    normalize_maps,
    postprocess,
    resolve_targets,
)
from explainkit.explainers.eigen import EigenCAM
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
from explainkit.explainers.perturbation import LayerPass, PerturbationCAM
from explainkit.explainers.score import ScoreCAM

__all__ = [
    "ALL",
    "TOPK",
    "AblationCAM",
    "EigenCAM",
    "LayerPass",
    "PerturbationCAM",
    "ScoreCAM",
    "class_sets",
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

"""Built-in explainers and the base classes plugins build on."""

from explainkit.explainers.ablation import AblationCAM
from explainkit.explainers.attention import AttentionRollout, CheferRelevance
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
from explainkit.explainers.fem import FEM
from explainkit.explainers.finer import FinerCAM
from explainkit.explainers.fullgrad import FullGrad
from explainkit.explainers.fusion import FusedCAM, PolyCAM, RefineCAM
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
from explainkit.explainers.graphs import CapturedCAM, capture
from explainkit.explainers.guided import GuidedGradCAM
from explainkit.explainers.kpca import KPCACAM
from explainkit.explainers.legrad import LeGrad
from explainkit.explainers.opticam import OptiCAM
from explainkit.explainers.perturbation import LayerPass, PerturbationCAM
from explainkit.explainers.score import ScoreCAM
from explainkit.explainers.shapley import ShapleyCAM

__all__ = [
    "ALL",
    "TOPK",
    "AblationCAM",
    "AttentionRollout",
    "CapturedCAM",
    "CheferRelevance",
    "EigenCAM",
    "FEM",
    "FinerCAM",
    "FullGrad",
    "FusedCAM",
    "GuidedGradCAM",
    "KPCACAM",
    "LeGrad",
    "OptiCAM",
    "PolyCAM",
    "RefineCAM",
    "ShapleyCAM",
    "LayerPass",
    "PerturbationCAM",
    "ScoreCAM",
    "capture",
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

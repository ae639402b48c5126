"""Registers explainkit's own explainers: gradcam, gradcam++, xgradcam, hirescam, layercam, gradcam-elementwise, eigencam, scorecam, ablationcam and captum-gradcam."""

from __future__ import annotations

from explainkit.hookspecs import hookimpl


@hookimpl
def register_explainers(register):
    from explainkit.explainers.ablation import AblationCAM
    from explainkit.explainers.captum_gradcam import CaptumGradCAM
    from explainkit.explainers.eigen import EigenCAM
    from explainkit.explainers.gradient import GradCAM, GradCAMElementWise, GradCAMPlusPlus, HiResCAM, LayerCAM, XGradCAM
    from explainkit.explainers.score import ScoreCAM

    register("gradcam", GradCAM)
    register("gradcam++", GradCAMPlusPlus)
    register("xgradcam", XGradCAM)
    register("hirescam", HiResCAM)
    register("layercam", LayerCAM)
    register("gradcam-elementwise", GradCAMElementWise)
    register("eigencam", EigenCAM)
    register("scorecam", ScoreCAM)
    register("ablationcam", AblationCAM)
    register("captum-gradcam", CaptumGradCAM)

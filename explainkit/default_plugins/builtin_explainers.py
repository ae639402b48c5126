"""Registers explainkit's own explainers through the hook a third party uses; each class
registers under its own ``name`` (``explainkit methods`` lists them)."""

from __future__ import annotations

from explainkit.hookspecs import hookimpl


@hookimpl
def register_explainers(register):
    from explainkit.explainers.ablation import AblationCAM
    from explainkit.explainers.captum_gradcam import CaptumGradCAM
    from explainkit.explainers.eigen import EigenCAM
    from explainkit.explainers.gradient import GradCAM, GradCAMElementWise, GradCAMPlusPlus, HiResCAM, LayerCAM, XGradCAM
    from explainkit.explainers.score import ScoreCAM

    register(GradCAM)
    register(GradCAMPlusPlus)
    register(XGradCAM)
    register(HiResCAM)
    register(LayerCAM)
    register(GradCAMElementWise)
    register(EigenCAM)
    register(ScoreCAM)
    register(AblationCAM)
    register(CaptumGradCAM)

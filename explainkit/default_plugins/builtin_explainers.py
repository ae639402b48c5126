"""Registers explainkit's own explainers through the hook a third party uses; each class
registers under its own ``name`` (``explainkit methods`` lists them with their ``family``)."""

from __future__ import annotations

from explainkit.hookspecs import hookimpl


@hookimpl
def register_explainers(register):
    from explainkit.explainers.ablation import AblationCAM
    from explainkit.explainers.attention import AttentionRollout, CheferRelevance
    from explainkit.explainers.captum_gradcam import CaptumGradCAM
    from explainkit.explainers.eigen import EigenCAM
    from explainkit.explainers.fem import FEM
    from explainkit.explainers.finer import FinerCAM
    from explainkit.explainers.fullgrad import FullGrad
    from explainkit.explainers.fusion import FusedCAM, PolyCAM, RefineCAM
    from explainkit.explainers.gradient import GradCAM, GradCAMElementWise, GradCAMPlusPlus, HiResCAM, LayerCAM, XGradCAM
    from explainkit.explainers.guided import GuidedGradCAM
    from explainkit.explainers.kpca import KPCACAM
    from explainkit.explainers.legrad import LeGrad
    from explainkit.explainers.opticam import OptiCAM
    from explainkit.explainers.score import ScoreCAM
    from explainkit.explainers.shapley import ShapleyCAM

    for explainer in (
        # gradient: channel or element weights from the target's gradient at one layer
        GradCAM,
        GradCAMPlusPlus,
        XGradCAM,
        HiResCAM,
        LayerCAM,
        GradCAMElementWise,
        FinerCAM,
        ShapleyCAM,
        FullGrad,
        GuidedGradCAM,
        CaptumGradCAM,
        # perturbation: scores of perturbed forwards
        ScoreCAM,
        AblationCAM,
        OptiCAM,
        # class-agnostic: the activations alone
        EigenCAM,
        KPCACAM,
        FEM,
        # fusion: one method's maps at several layers
        FusedCAM,
        RefineCAM,
        PolyCAM,
        # attention: vision transformers' attention probabilities
        AttentionRollout,
        CheferRelevance,
        LeGrad,
    ):
        register(explainer)

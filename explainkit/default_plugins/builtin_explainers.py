"""Registers explainkit's own explainers: gradcam, gradcam++ and captum-gradcam."""

from __future__ import annotations

from explainkit.hookspecs import hookimpl


@hookimpl
def register_explainers(register):
    from explainkit.explainers.captum_gradcam import CaptumGradCAM
    from explainkit.explainers.gradient import GradCAM, GradCAMPlusPlus

    register("gradcam", GradCAM)
    register("gradcam++", GradCAMPlusPlus)
    register("captum-gradcam", CaptumGradCAM)

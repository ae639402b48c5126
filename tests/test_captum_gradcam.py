"""The Captum adapter matches captum.attr.LayerGradCam after the shared post-processing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from captum.attr import LayerGradCam

from explainkit.explainers.captum_gradcam import CaptumGradCAM
from explainkit.explainers.gradient import GradCAM
from tests.conftest import correlation


def _captum_reference(model, layer, images, targets):
    raw = LayerGradCam(model, layer).attribute(images, target=targets, relu_attributions=True)
    return F.interpolate(raw, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]


@pytest.mark.parametrize("layer_name", ["layer4", "layer3"])
def test_matches_layer_grad_cam(layer_name, random_model, images):
    ours = CaptumGradCAM(random_model, layer=layer_name).explain(images)
    reference = _captum_reference(random_model, random_model.get_submodule(layer_name), images, ours.targets)
    informative = reference.flatten(1).std(1) > 1e-6
    assert informative.any()
    assert correlation(ours.maps, reference)[informative].min() > 0.99


@pytest.mark.parametrize("layer_name", ["layer4", "layer3"])
def test_matches_layer_grad_cam_on_trained_model(layer_name, trained_model):
    images = torch.randn(8, 3, 32, 32)
    ours = CaptumGradCAM(trained_model, layer=layer_name).explain(images)
    reference = _captum_reference(trained_model, trained_model.get_submodule(layer_name), images, ours.targets)
    informative = reference.flatten(1).std(1) > 1e-6
    assert informative.sum() >= 4
    assert correlation(ours.maps, reference)[informative].min() > 0.99


def test_agrees_with_our_gradcam(random_model, images):
    ours = GradCAM(random_model)(images, targets=3, normalize=False)
    captum = CaptumGradCAM(random_model)(images, targets=3, normalize=False)
    torch.testing.assert_close(captum, ours, rtol=1e-3, atol=1e-5)


def test_all_targets_shape(random_model, images):
    maps = CaptumGradCAM(random_model)(images[:2], targets="all")
    assert maps.shape == (2, 10, 32, 32)
    assert maps.amax(dim=(-2, -1)).le(1).all() and maps.amin().ge(0)

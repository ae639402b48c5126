"""EigenCAM: parity with pytorch-grad-cam up to the SVD's sign, sign correction, class-agnostic."""

from __future__ import annotations

import pytest
import torch
from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection

from explainkit.explainers.eigen import EigenCAM
from explainkit.targets import ClassScores
from tests.conftest import correlation


@pytest.mark.parametrize("layer_name", ["layer4", "layer3"])
def test_projection_matches_pytorch_grad_cam_up_to_sign(random_model, images, layer_name):
    """Before ReLU (pytorch-grad-cam's sign is LAPACK's, ours is corrected): |corr| per map > 0.99."""
    explainer = EigenCAM(random_model, layer_name)
    ours = explainer.compute(images, ClassScores()).raw  # (N, h, w) projections, pre-ReLU
    captured = {}
    handle = random_model.get_submodule(layer_name).register_forward_hook(lambda m, i, o: captured.update(a=o.detach()))
    with torch.no_grad():
        random_model(images)
    handle.remove()
    theirs = torch.from_numpy(get_2d_projection(captured["a"].numpy()))
    assert correlation(ours, theirs).abs().min() > 0.99


def test_salient_regions_come_out_positive_and_targets_do_not_matter(random_model, images):
    explainer = EigenCAM(random_model, "layer4")
    raw = explainer(images, normalize=False)
    assert (raw.flatten(1).amax(1) > 0).all()  # after ReLU, the dominant sign is the kept one
    every = explainer(images, targets="all")
    assert every.shape == (len(images), 10, 32, 32)
    torch.testing.assert_close(every[:, 3], explainer(images, targets=3))
    torch.testing.assert_close(every[:, 0], every[:, 9])


def test_a_zero_layer_gives_zero_maps_not_nan(random_model):
    zero = torch.zeros(2, 3, 32, 32)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1, bias=False), torch.nn.Flatten(), torch.nn.Linear(4 * 32 * 32, 10)
    )
    torch.nn.init.zeros_(model[0].weight)
    maps = EigenCAM(model, "0")(zero)
    assert torch.isfinite(maps).all() and maps.abs().max() == 0

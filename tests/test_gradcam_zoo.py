"""The explainkit-gradcam-zoo plugin distribution (plugins/explainkit-gradcam-zoo)."""

from __future__ import annotations

import copy

import pytest
import torch

import explainkit
from explainkit.registry import registrations
from tests.conftest import correlation

pytest.importorskip("explainkit_gradcam_zoo", reason="pip install -e plugins/explainkit-gradcam-zoo")
from explainkit_gradcam_zoo import METHODS  # noqa: E402

FAST = [
    "pgc-xgradcam",
    "pgc-layercam",
    "pgc-hirescam",
    "pgc-gradcam-elementwise",
    "pgc-eigencam",
    "eigengradcam",
    "pgc-gradcam",
    "pgc-gradcam++",
]


def test_registered_through_the_entry_point(fresh_plugins):
    found = registrations()
    for name in METHODS:
        assert found[name].plugin == "gradcam_zoo"


@pytest.mark.parametrize("name", FAST)
def test_zoo_methods_follow_the_contract(name, random_model, images):
    model = copy.deepcopy(random_model).train()
    model.fc.weight.grad = torch.ones_like(model.fc.weight)
    maps = explainkit.get_explainer(name, model, layer="layer4")(images, targets=[0, 1, 2, 3, 4, 5])
    assert maps.shape == (6, 32, 32) and maps.dtype == torch.float32
    assert maps.min() >= 0 and maps.max() <= 1 + 1e-6
    assert model.training  # pytorch-grad-cam calls model.eval(); the base restores the mode
    assert torch.equal(model.fc.weight.grad, torch.ones_like(model.fc.weight))  # its backward() is undone
    assert model.conv1.weight.grad is None
    assert all(not m._forward_hooks for m in model.modules())


def test_scorecam_runs_on_one_image(random_model):
    # Score-CAM costs one forward per channel of the layer (512 at layer4): keep it to one map.
    maps = explainkit.get_explainer("pgc-scorecam", random_model)(torch.randn(1, 3, 32, 32), targets=3)
    assert maps.shape == (1, 32, 32) and maps.max() <= 1 + 1e-6


def test_pgc_gradcam_agrees_with_ours(random_model, images):
    ours = explainkit.get_explainer("gradcam", random_model)(images, targets=2)
    theirs = explainkit.get_explainer("pgc-gradcam", random_model)(images, targets=2)
    informative = theirs.flatten(1).std(1) > 1e-4
    assert correlation(ours, theirs)[informative].min() > 0.99

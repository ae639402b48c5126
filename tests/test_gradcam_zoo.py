"""The explainkit-gradcam-zoo plugin distribution (plugins/explainkit-gradcam-zoo)."""

from __future__ import annotations

import copy

import pytest
import torch

import explainkit
from explainkit.errors import ExplainkitError
from explainkit.registry import registrations
from explainkit.targets import ClassDifference, MultiLabel
from tests.conftest import correlation

pytest.importorskip("explainkit_gradcam_zoo", reason="pip install -e plugins/explainkit-gradcam-zoo")
from pytorch_grad_cam import GuidedBackpropReLUModel  # noqa: E402

from explainkit_gradcam_zoo import METHODS, relu_slots  # noqa: E402

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


# pytorch-grad-cam 1.5.7's newer methods, as references for explainkit's native versions
NEW = ["pgc-finercam", "pgc-shapleycam", "pgc-kpcacam", "pgc-fem", "pgc-fullgrad", "pgc-refinecam", "pgc-guided-gradcam"]


def _relus(model):
    return [(parent, key, child, type(child), getattr(child, "inplace", None)) for parent, key, child in relu_slots(model)]


def _assert_left_as_found(model, relus, images, pixels):
    assert model.training  # pytorch-grad-cam calls model.eval(); the base restores the mode
    assert torch.equal(model.fc.weight.grad, torch.ones_like(model.fc.weight))  # its backward() is undone
    assert model.conv1.weight.grad is None and model.layer4[1].bn2.bias.grad is None
    assert all(not m._forward_hooks and not m._backward_hooks for m in model.modules())
    assert _relus(model) == relus  # the same ReLU objects in the same places, still inplace
    assert not images.requires_grad and images.grad is None and torch.equal(images, pixels)


@pytest.mark.parametrize("name", NEW)
def test_new_methods_follow_the_contract(name, random_model, images):
    model = copy.deepcopy(random_model).train()
    model.fc.weight.grad = torch.ones_like(model.fc.weight)
    relus, pixels = _relus(model), images.clone()
    maps = explainkit.get_explainer(name, model, layer="layer4")(images, targets=[0, 1, 2, 3, 4, 5])
    assert maps.shape == (6, 32, 32) and maps.dtype == torch.float32
    assert maps.min() >= 0 and maps.max() <= 1 + 1e-6 and maps.flatten(1).amax(1).min() > 0.99  # not all-zero
    _assert_left_as_found(model, relus, images, pixels)


@pytest.mark.parametrize("name", NEW)
def test_new_methods_explain_all_classes(name, random_model, images):
    pair = images[:2]
    explainer = explainkit.get_explainer(name, random_model, layer="layer4")
    every = explainer(pair, targets="all")
    assert every.shape == (2, 10, 32, 32) and every.min() >= 0 and every.max() <= 1 + 1e-6
    assert torch.allclose(every[:, 7], explainer(pair, targets=7), atol=1e-5)  # column k is class k
    assert explainer(pair, targets=("topk", 2)).shape == (2, 2, 32, 32)


def test_target_free_methods_give_every_class_the_same_map(random_model, images):
    for name in ("pgc-kpcacam", "pgc-fem"):
        every = explainkit.get_explainer(name, random_model)(images[:2], targets="all")
        assert torch.equal(every, every[:, :1].expand_as(every))


@pytest.mark.parametrize("name", NEW)
def test_new_methods_refuse_non_class_targets_in_one_line(name, random_model, images):
    with pytest.raises(ExplainkitError) as error:
        explainkit.get_explainer(name, random_model)(images[:2], targets=MultiLabel(labels=[1, 2]))
    assert "\n" not in str(error.value) and "class" in str(error.value)


def test_guided_gradcam_puts_the_relus_back_after_an_error(random_model, images, monkeypatch):
    model = copy.deepcopy(random_model).train()
    model.fc.weight.grad = torch.ones_like(model.fc.weight)
    relus, pixels = _relus(model), images.clone()

    def fails_after_the_swap(self, image):  # pytorch-grad-cam swaps the ReLUs before its forward
        assert not relu_slots(self.model)
        raise RuntimeError("boom")

    monkeypatch.setattr(GuidedBackpropReLUModel, "forward", fails_after_the_swap)
    with pytest.raises(RuntimeError, match="boom"):
        explainkit.get_explainer("pgc-guided-gradcam", model)(images, targets=3)
    _assert_left_as_found(model, relus, images, pixels)


def test_guided_gradcam_is_gradcam_times_guided_backprop(random_model, images):
    guided = explainkit.get_explainer("pgc-guided-gradcam", random_model)(images, targets=4, normalize=False)
    gradcam = explainkit.get_explainer("pgc-gradcam", random_model)(images, targets=4, normalize=False)
    assert torch.all((guided > 0) <= (gradcam > 0))  # zero where Grad-CAM is zero
    assert correlation(guided, gradcam).min() < 0.99  # and detailed by the input gradient


def test_pgc_finercam_agrees_with_ours(random_model, images):
    # explainkit's Finer-CAM: its Grad-CAM of the ClassDifference target (pytorch-grad-cam's FinerWeightedTarget)
    target = ClassDifference(2, comparisons=2, alpha=0.5)
    ours = explainkit.get_explainer("gradcam", random_model)(images, targets=target)
    theirs = explainkit.get_explainer("pgc-finercam", random_model, comparisons=2, alpha=0.5)(images, targets=2)
    assert torch.allclose(explainkit.get_explainer("pgc-finercam", random_model)(images, targets=target), theirs, atol=1e-6)
    informative = theirs.flatten(1).std(1) > 1e-4
    assert informative.any() and correlation(ours, theirs)[informative].min() > 0.99
    plain = explainkit.get_explainer("pgc-gradcam", random_model)(images, targets=2)
    assert correlation(plain, theirs).min() < 0.999  # the comparison classes change the map


def test_pgc_refinecam_layers(random_model):
    at_layer4 = explainkit.get_explainer("pgc-refinecam", random_model, layer="layer4")
    assert at_layer4.layers == [random_model.layer2, random_model.layer3, random_model.layer4]
    default = explainkit.get_explainer("pgc-refinecam", random_model)  # layer3 for a ResNet18-CIFAR card
    assert default.layers == [random_model.layer1, random_model.layer2, random_model.layer3]
    chosen = explainkit.get_explainer("pgc-refinecam", random_model, layers=["layer3", random_model.layer4])
    assert chosen.layers == [random_model.layer3, random_model.layer4]


def test_new_method_options_reach_pytorch_grad_cam(random_model, images):
    assert explainkit.get_explainer("pgc-fem", random_model, k=1).k == 1
    kpca = explainkit.get_explainer("pgc-kpcacam", random_model, kernel="rbf", gamma=0.5)
    assert kpca(images[:1]).shape == (1, 32, 32) and (kpca.kernel, kpca.gamma) == ("rbf", 0.5)
    with pytest.raises(ExplainkitError, match="does not take"):
        explainkit.get_explainer("pgc-fem", random_model, kernel="rbf")


def test_guided_gradcam_channel_reductions(random_model, images):
    norm = explainkit.get_explainer("pgc-guided-gradcam", random_model)(images[:2], targets=1, normalize=False)
    peak = explainkit.get_explainer("pgc-guided-gradcam", random_model, channel_reduction="max")(
        images[:2], targets=1, normalize=False
    )
    assert torch.all(peak <= norm + 1e-6) and torch.all(norm <= peak * 3**0.5 + 1e-6)  # max_c |G_c| <= |G| <= sqrt(3) max
    with pytest.raises(ExplainkitError, match="channel_reduction"):
        explainkit.get_explainer("pgc-guided-gradcam", random_model, channel_reduction="sum")


NATIVE_OPTIONS = {
    "finercam": {},
    "shapleycam": {},
    "kpcacam": {},
    "fem": {},
    "fullgrad": {},
    "guided-gradcam": {},
    "refinecam": {"layers": ["layer2", "layer3", "layer4"], "method": "gradcam++"},  # pytorch-grad-cam's base
}


@pytest.mark.parametrize("name", list(NATIVE_OPTIONS))
def test_references_agree_with_the_native_methods(name, random_model, images):
    if name not in explainkit.list_explainers():
        pytest.skip(f"explainkit has no native {name!r} registered yet")
    layer = {} if "layers" in NATIVE_OPTIONS[name] else {"layer": "layer4"}
    ours = explainkit.get_explainer(name, random_model, **layer, **NATIVE_OPTIONS[name])(images, targets=[0, 1, 2, 3, 4, 5])
    theirs = explainkit.get_explainer(f"pgc-{name}", random_model, layer="layer4")(images, targets=[0, 1, 2, 3, 4, 5])
    informative = theirs.flatten(1).std(1) > 1e-4
    assert informative.any() and correlation(ours, theirs)[informative].min() > 0.99

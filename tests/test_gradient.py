"""GradCAM and GradCAM++: parity with pytorch-grad-cam, batched "all", autograd scope."""

from __future__ import annotations

import pytest
import torch
import torchvision
from pytorch_grad_cam import GradCAM as PgcGradCAM
from pytorch_grad_cam import GradCAMElementWise as PgcGradCAMElementWise
from pytorch_grad_cam import GradCAMPlusPlus as PgcGradCAMPlusPlus
from pytorch_grad_cam import HiResCAM as PgcHiResCAM
from pytorch_grad_cam import LayerCAM as PgcLayerCAM
from pytorch_grad_cam import XGradCAM as PgcXGradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

import explainkit.explainers.gradient as gradient_module
from explainkit.explainers.gradient import (
    GradCAM,
    GradCAMElementWise,
    GradCAMPlusPlus,
    HiResCAM,
    LayerCAM,
    XGradCAM,
    layer_output_as_leaf,
)
from tests.conftest import correlation

PAIRS = [(GradCAM, PgcGradCAM), (GradCAMPlusPlus, PgcGradCAMPlusPlus)]


def _reference(pgc_class, model, layer, images, targets):
    with pgc_class(model=model, target_layers=[layer]) as cam:
        return torch.from_numpy(cam(input_tensor=images, targets=[ClassifierOutputTarget(int(t)) for t in targets]))


def _assert_parity(ours_class, pgc_class, model, layer_name, images):
    ours = ours_class(model, layer=layer_name).explain(images)
    reference = _reference(pgc_class, model, model.get_submodule(layer_name), images, ours.targets)
    informative = reference.flatten(1).std(1) > 1e-4  # an all-zero map has no correlation
    assert informative.sum() >= len(images) // 2
    corr = correlation(ours.maps, reference)[informative]
    assert corr.min() > 0.99, corr


@pytest.mark.parametrize("layer_name", ["layer4", "layer3"])
@pytest.mark.parametrize("ours_class, pgc_class", PAIRS, ids=["gradcam", "gradcam++"])
def test_parity_with_pytorch_grad_cam_random_model(ours_class, pgc_class, layer_name, random_model, images):
    _assert_parity(ours_class, pgc_class, random_model, layer_name, images)


@pytest.mark.parametrize("layer_name", ["layer4", "layer3"])
@pytest.mark.parametrize("ours_class, pgc_class", PAIRS, ids=["gradcam", "gradcam++"])
def test_parity_with_pytorch_grad_cam_trained_model(ours_class, pgc_class, layer_name, trained_model):
    torch.manual_seed(3)
    images = torch.randn(8, 3, 32, 32) * 0.8
    _assert_parity(ours_class, pgc_class, trained_model, layer_name, images)


@pytest.mark.parametrize("explainer_class", [GradCAM, GradCAMPlusPlus])
@pytest.mark.parametrize("layer_name", ["layer4", "layer3"])
def test_all_targets_equal_single_target_calls(explainer_class, layer_name, random_model, images):
    explainer = explainer_class(random_model, layer=layer_name)
    every = explainer(images, targets="all", normalize=False)
    assert every.shape == (len(images), 10, 32, 32)
    for k in (0, 4, 9):
        single = explainer(images, targets=k, normalize=False)
        torch.testing.assert_close(every[:, k], single, rtol=1e-4, atol=1e-5)


def test_per_image_targets_pick_each_images_class(random_model, images):
    explainer = GradCAM(random_model)
    targets = torch.tensor([0, 1, 2, 3, 4, 5])
    maps = explainer(images, targets=targets)
    every = explainer(images, targets="all")
    torch.testing.assert_close(maps, every[torch.arange(6), targets], rtol=1e-4, atol=1e-5)


def test_gradcam_weights_are_spatially_averaged_gradients():
    activations = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).view(2, 3, 2, 2)
    gradients = torch.ones(2, 3, 2, 2) * torch.tensor([1.0, -2.0, 3.0]).view(1, 3, 1, 1)
    weights = GradCAM.channel_weights(None, activations, gradients)
    torch.testing.assert_close(weights, torch.tensor([[1.0, -2.0, 3.0]] * 2))


def test_gradcam_plus_plus_alpha_is_zero_where_denominator_vanishes():
    activations = torch.zeros(1, 2, 2, 2)
    gradients = torch.zeros(1, 2, 2, 2)
    gradients[0, 0, 0, 0] = 2.0  # g=2, sum A = 0 -> alpha = 4 / 8 = 0.5, w = 0.5 * 2 = 1
    weights = GradCAMPlusPlus.channel_weights(None, activations, gradients)
    assert torch.isfinite(weights).all()
    torch.testing.assert_close(weights, torch.tensor([[1.0, 0.0]]))


def test_no_graph_is_recorded_below_the_layer(random_model, images):
    grad_mode_seen = {}

    def spy(name):
        def hook(module, inputs, output):
            grad_mode_seen[name] = (torch.is_grad_enabled(), output.requires_grad)

        return hook

    handles = [
        random_model.layer3.register_forward_hook(spy("layer3")),
        random_model.fc.register_forward_hook(spy("fc")),
    ]
    try:
        GradCAM(random_model, layer="layer4")(images.requires_grad_(True))
    finally:
        for handle in handles:
            handle.remove()
    assert grad_mode_seen["layer3"] == (False, False)  # below the layer: no autograd at all
    assert grad_mode_seen["fc"] == (True, True)  # above it: the graph we differentiate


def test_layer_output_as_leaf_restores_grad_mode_and_hook_on_error(random_model):
    before = torch.is_grad_enabled()
    with pytest.raises(RuntimeError):
        with layer_output_as_leaf(random_model.layer4):
            raise RuntimeError("boom")
    assert torch.is_grad_enabled() == before
    assert not random_model.layer4._forward_hooks


def test_inplace_op_after_the_target_layer_is_allowed(random_model, images):
    # layer4.0.bn1 is followed by ReLU(inplace=True): the leaf must not be modified in place.
    maps = GradCAM(random_model, layer="layer4.0.bn1")(images)
    assert maps.shape == (6, 32, 32) and torch.isfinite(maps).all()


def test_bfloat16_autocast_matches_float32(random_model, images):
    reference = GradCAM(random_model)(images)
    mixed = GradCAM(random_model, autocast=torch.bfloat16)(images)
    assert mixed.dtype == torch.float32
    assert correlation(mixed, reference).mean() > 0.9


def test_threads_sharing_one_model_get_their_own_maps(random_model):
    """A web server's pattern: several threads explain with one model at once."""
    from concurrent.futures import ThreadPoolExecutor

    torch.manual_seed(5)
    batches = [torch.randn(3, 3, 32, 32) for _ in range(8)]
    explainer = GradCAM(random_model, "layer4")
    serial = [explainer(b, targets=t) for b, t in zip(batches, [None, "all"] * 4)]
    random_model.train()  # the mode must come back exactly, however the calls interleave
    with ThreadPoolExecutor(4) as pool:
        threaded = list(pool.map(lambda bt: explainer(*bt), zip(batches, [None, "all"] * 4)))
    assert random_model.training and all(m.training for m in random_model.modules())
    random_model.eval()
    for a, b in zip(serial, threaded):
        torch.testing.assert_close(a, b)


ZOO = [(XGradCAM, PgcXGradCAM), (HiResCAM, PgcHiResCAM), (LayerCAM, PgcLayerCAM), (GradCAMElementWise, PgcGradCAMElementWise)]


@pytest.mark.parametrize("layer_name", ["layer4", "layer3"])
@pytest.mark.parametrize("ours_class, pgc_class", ZOO, ids=[c.name for c, _ in ZOO])
def test_native_zoo_parity_with_pytorch_grad_cam(ours_class, pgc_class, layer_name, random_model, images):
    _assert_parity(ours_class, pgc_class, random_model, layer_name, images)


@pytest.mark.parametrize("ours_class", [c for c, _ in ZOO], ids=[c.name for c, _ in ZOO])
def test_native_zoo_all_classes_equal_single_targets(ours_class, random_model, images):
    explainer = ours_class(random_model, "layer4")
    every = explainer(images, targets="all")
    for k in (0, 9):
        torch.testing.assert_close(every[:, k], explainer(images, targets=k), atol=1e-4, rtol=1e-4)


def test_all_classes_of_a_1000_class_model_in_chunks_of_classes():
    """``targets="all"`` runs class_chunk classes per backward: a small chunk gives the same maps
    (so 1000-class models stay within bounded memory), and the chunks cover every class."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=1000).eval()
    images = torch.randn(2, 3, 64, 64)
    whole = GradCAM(model, "layer4", class_chunk=1000)(images, targets="all")
    chunked = GradCAM(model, "layer4", class_chunk=64)
    calls = []
    original = gradient_module._batched_gradients
    try:
        gradient_module._batched_gradients = lambda *a, **k: calls.append(a[2].shape[0]) or original(*a, **k)
        maps = chunked(images, targets="all")
    finally:
        gradient_module._batched_gradients = original
    assert maps.shape == (2, 1000, 64, 64)
    assert calls == [64] * 15 + [40]
    torch.testing.assert_close(maps, whole, atol=1e-5, rtol=1e-4)

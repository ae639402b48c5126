"""FEM: parity with pytorch-grad-cam's FEM, the k-sigma weights by hand, class-agnostic columns,
options, model state."""

from __future__ import annotations

import copy

import pytest
import torch
from pytorch_grad_cam import FEM as PgcFEM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from explainkit.errors import ExplainkitError
from explainkit.explainers.fem import FEM, fem_weights
from explainkit.targets import ClassScores
from tests.conftest import correlation


def _activations(model, layer_name, images):
    captured = {}
    handle = model.get_submodule(layer_name).register_forward_hook(lambda m, i, o: captured.update(a=o.detach()))
    with torch.no_grad():
        model(images)
    handle.remove()
    return captured["a"]


@pytest.mark.parametrize("k", [2.0, 1.0, 0.0])
@pytest.mark.parametrize("layer_name", ["layer4", "layer3"])
def test_raw_maps_equal_pytorch_grad_cam(random_model, images, layer_name, k):
    """Before ReLU, against pytorch-grad-cam's get_cam_image on the same activations (numpy)."""
    ours = FEM(random_model, layer_name, k=k).compute(images, ClassScores()).raw
    reference = PgcFEM(random_model, [random_model.get_submodule(layer_name)], k=k)
    activations = _activations(random_model, layer_name, images).numpy()
    theirs = torch.from_numpy(reference.get_cam_image(images, None, None, activations, None, False)).float()
    reference.activations_and_grads.release()
    informative = theirs.flatten(1).std(1) > 1e-6
    assert informative.sum() >= len(images) // 2
    assert correlation(ours, theirs)[informative].min() > 0.99
    torch.testing.assert_close(ours, theirs, atol=1e-4 * theirs.abs().max().item(), rtol=1e-3)


def test_maps_match_pytorch_grad_cam_fem(random_model, images):
    """The whole call (ReLU, upsampling, scaling) against pytorch-grad-cam's FEM, per map."""
    result = FEM(random_model, "layer4").explain(images)
    with PgcFEM(random_model, [random_model.layer4]) as cam:
        reference = torch.from_numpy(cam(input_tensor=images, targets=[ClassifierOutputTarget(int(t)) for t in result.targets]))
    informative = reference.flatten(1).std(1) > 1e-4
    assert informative.sum() >= len(images) // 2
    assert correlation(result.maps, reference)[informative].min() > 0.99


def test_weights_by_hand():
    """Channel 0: one 10 among fifteen 0s (mean 0.625, std 2.42, threshold 5.47 at k=2): 1 of 16
    positions above. Channel 1: constant, std 0, nothing strictly above its mean. Channel 2: half
    3s, half 1s (mean 2, std 1): at k=0.5 the threshold is 2.5, so 8 of 16; at k=2 (4) none."""
    activations = torch.zeros(1, 3, 4, 4)
    activations[0, 0, 2, 1] = 10.0
    activations[0, 1] = 1.0
    activations[0, 2, :2] = 3.0
    activations[0, 2, 2:] = 1.0
    torch.testing.assert_close(fem_weights(activations, 2.0), torch.tensor([[1 / 16, 0.0, 0.0]]))
    torch.testing.assert_close(fem_weights(activations, 0.5), torch.tensor([[1 / 16, 0.0, 0.5]]))
    # The population std (1; the sample std is 1.033) and a strict inequality: at k=0.99 the
    # threshold is 2.99 (3s above it), at k=1 exactly 3 (none above it).
    torch.testing.assert_close(fem_weights(activations, 0.99), torch.tensor([[1 / 16, 0.0, 0.5]]))
    torch.testing.assert_close(fem_weights(activations, 1.0), torch.tensor([[1 / 16, 0.0, 0.0]]))
    model = torch.nn.Sequential(torch.nn.Identity(), torch.nn.Flatten(), torch.nn.Linear(48, 2))
    raw = FEM(model, "0", k=0.5).compute(activations, ClassScores()).raw
    torch.testing.assert_close(raw, activations[:, 0] / 16 + activations[:, 2] / 2)


def test_class_agnostic_every_column_is_the_same_map(random_model, images):
    explainer = FEM(random_model, "layer4")
    every = explainer(images, targets="all")
    assert every.shape == (len(images), 10, 32, 32)
    torch.testing.assert_close(every[:, 3], explainer(images, targets=3))
    torch.testing.assert_close(every[:, 0], every[:, 9])
    assert explainer(images, targets=("topk", 2)).shape == (len(images), 2, 32, 32)
    assert explainer(images, targets=lambda out: out[:, 1] - out[:, 0]).shape == (len(images), 32, 32)


def test_a_zero_layer_gives_zero_maps_not_nan():
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1, bias=False), torch.nn.Flatten(), torch.nn.Linear(4 * 32 * 32, 10)
    )
    torch.nn.init.zeros_(model[0].weight)
    maps = FEM(model, "0")(torch.randn(2, 3, 32, 32))
    assert torch.isfinite(maps).all() and maps.abs().max() == 0


@pytest.mark.parametrize("k", ["2", None, float("nan"), True])
def test_bad_k_names_the_parameter(random_model, k):
    with pytest.raises(ExplainkitError, match="^k must"):
        FEM(random_model, "layer4", k=k)


def test_model_state_left_as_found(random_model, images):
    model = copy.deepcopy(random_model).train()
    model.layer2.eval()
    model.conv1.weight.grad = torch.full_like(model.conv1.weight, 0.25)
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    modes = {n: m.training for n, m in model.named_modules()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    FEM(model, "layer3")(images, targets="all")
    with pytest.raises(RuntimeError):
        FEM(model, "layer3")(torch.randn(2, 5, 32, 32))  # fails inside the model
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    for key, value in model.named_buffers():
        torch.testing.assert_close(value, buffers[key], msg=key)
    assert torch.equal(model.conv1.weight.grad, torch.full_like(model.conv1.weight, 0.25))
    assert all(p.grad is None for n, p in model.named_parameters() if n != "conv1.weight")
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules()) == 0

"""KPCA-CAM: parity with pytorch-grad-cam (scikit-learn's KernelPCA) for every kernel, sign rule,
reduction to Eigen-CAM for the linear kernel, class-agnostic columns, options, model state."""

from __future__ import annotations

import copy

import pytest
import torch
from pytorch_grad_cam import KPCA_CAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection_kernel

from explainkit.errors import ExplainkitError
from explainkit.explainers.eigen import EigenCAM, positive_dominant
from explainkit.explainers.kpca import KERNELS, KPCACAM, center_kernel, kernel_matrix
from explainkit.targets import ClassScores
from tests.conftest import correlation


def _activations(model, layer_name, images):
    captured = {}
    handle = model.get_submodule(layer_name).register_forward_hook(lambda m, i, o: captured.update(a=o.detach()))
    with torch.no_grad():
        model(images)
    handle.remove()
    return captured["a"]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("layer_name", ["layer4", "layer3"])
def test_projection_equals_scikit_learn_kernel_pca_with_its_sign(random_model, images, layer_name, kernel):
    """Before ReLU: the same numbers as pytorch-grad-cam's get_2d_projection_kernel (scikit-learn's
    KernelPCA, fit image by image), not only up to sign: our sign rule (positive-dominant) is the
    one scikit-learn's svd_flip applies (the eigenvector's largest-magnitude entry positive)."""
    ours = KPCACAM(random_model, layer_name, kernel=kernel).compute(images, ClassScores()).raw
    theirs = torch.from_numpy(get_2d_projection_kernel(_activations(random_model, layer_name, images).numpy(), kernel))
    assert ours.shape == theirs.shape
    assert correlation(ours, theirs).min() > 0.99
    torch.testing.assert_close(ours, theirs, atol=1e-4 * theirs.abs().max().item(), rtol=1e-3)


def test_gamma_reaches_the_kernel_as_in_scikit_learn(random_model, images):
    ours = KPCACAM(random_model, "layer4", kernel="rbf", gamma=0.05).compute(images, ClassScores()).raw
    theirs = torch.from_numpy(get_2d_projection_kernel(_activations(random_model, "layer4", images).numpy(), "rbf", 0.05))
    assert correlation(ours, theirs).min() > 0.99
    default = KPCACAM(random_model, "layer4", kernel="rbf").compute(images, ClassScores()).raw
    assert correlation(ours, default).min() < 0.999  # gamma 0.05 vs 1/512: the option is not ignored


def test_maps_match_pytorch_grad_cam_kpca_cam(random_model, images):
    """The whole call (ReLU, upsampling, scaling) against KPCA_CAM, per map."""
    explainer = KPCACAM(random_model, "layer4")
    result = explainer.explain(images)
    with KPCA_CAM(random_model, [random_model.layer4]) as cam:
        reference = torch.from_numpy(cam(input_tensor=images, targets=[ClassifierOutputTarget(int(t)) for t in result.targets]))
    informative = reference.flatten(1).std(1) > 1e-4
    assert informative.sum() >= len(images) // 2
    assert correlation(result.maps, reference)[informative].min() > 0.99


def test_linear_kernel_is_eigencam(random_model, images):
    """With k(x, y) = x.y the centred kernel is X X^T, whose top eigenpair gives sigma_1 u_1: Eigen-CAM."""
    linear = KPCACAM(random_model, "layer4", kernel="linear").compute(images, ClassScores()).raw
    eigen = EigenCAM(random_model, "layer4").compute(images, ClassScores()).raw
    torch.testing.assert_close(linear, eigen, atol=1e-3 * eigen.abs().max().item(), rtol=1e-3)


def test_kernels_and_centring_by_hand():
    points = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]]])
    torch.testing.assert_close(kernel_matrix(points, "linear", 1.0)[0], torch.tensor([[0.0, 0, 0], [0, 1, 0], [0, 0, 4]]))
    rbf = kernel_matrix(points, "rbf", 0.5)[0]
    torch.testing.assert_close(rbf[1, 2], torch.exp(torch.tensor(-0.5 * 5.0)))  # |(1,0)-(0,2)|^2 = 5
    torch.testing.assert_close(kernel_matrix(points, "sigmoid", 0.5)[0, 2, 2], torch.tanh(torch.tensor(0.5 * 4 + 1.0)))
    torch.testing.assert_close(kernel_matrix(points, "poly", 0.5, degree=2, coef0=1.0)[0, 1, 1], torch.tensor(1.5**2))
    cosine = kernel_matrix(points, "cosine", 1.0)[0]
    assert cosine[0].eq(0).all() and cosine[1, 2] == 0 and cosine[2, 2] == 1  # a zero row stays zero
    centred = center_kernel(torch.arange(9.0).view(1, 3, 3) ** 2)
    torch.testing.assert_close(centred.sum(dim=-1), torch.zeros(1, 3), atol=1e-5, rtol=0)  # rows and columns sum to 0
    torch.testing.assert_close(centred.sum(dim=-2), torch.zeros(1, 3), atol=1e-5, rtol=0)


def test_positive_dominant_flips_only_negative_dominant_maps():
    maps = torch.tensor([[[1.0, -3.0]], [[3.0, -1.0]]])
    torch.testing.assert_close(positive_dominant(maps), torch.tensor([[[-1.0, 3.0]], [[3.0, -1.0]]]))


def test_a_single_bright_region_is_the_map():
    """Activations that are zero but on a 2x2 block (the same vector there): the first kernel
    component separates the block from the rest; after the sign rule the block is the peak."""
    activations = torch.zeros(1, 4, 6, 6)
    activations[0, :, 1:3, 3:5] = torch.tensor([1.0, 2.0, 0.5, 1.5])[:, None, None]
    model = torch.nn.Sequential(torch.nn.Identity(), torch.nn.Flatten(), torch.nn.Linear(4 * 36, 3))
    raw = KPCACAM(model, "0").compute(activations, ClassScores()).raw[0]
    block = torch.zeros(6, 6, dtype=torch.bool)
    block[1:3, 3:5] = True
    assert raw[block].min() > 0 and raw[~block].max() < raw[block].min()
    torch.testing.assert_close(raw[~block], raw[~block][0].expand(32))  # the background is one value


def test_class_agnostic_every_column_is_the_same_map(random_model, images):
    explainer = KPCACAM(random_model, "layer4")
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
    maps = KPCACAM(model, "0")(torch.randn(2, 3, 32, 32))
    assert torch.isfinite(maps).all() and maps.abs().max() == 0


@pytest.mark.parametrize(
    "options, word", [({"kernel": "laplace"}, "kernel"), ({"gamma": 0.0}, "gamma"), ({"gamma": -1}, "gamma"),
                      ({"kernel": "poly", "degree": 0}, "degree")]
)  # fmt: skip
def test_bad_options_name_the_parameter(random_model, options, word):
    with pytest.raises(ExplainkitError, match=word):
        KPCACAM(random_model, "layer4", **options)


def test_model_state_left_as_found(random_model, images):
    model = copy.deepcopy(random_model).train()
    model.layer2.eval()
    model.conv1.weight.grad = torch.full_like(model.conv1.weight, 0.25)
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    modes = {n: m.training for n, m in model.named_modules()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    KPCACAM(model, "layer3")(images, targets="all")
    with pytest.raises(RuntimeError):
        KPCACAM(model, "layer3")(torch.randn(2, 5, 32, 32))  # fails inside the model
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    for key, value in model.named_buffers():
        torch.testing.assert_close(value, buffers[key], msg=key)
    assert torch.equal(model.conv1.weight.grad, torch.full_like(model.conv1.weight, 0.25))
    assert all(p.grad is None for n, p in model.named_parameters() if n != "conv1.weight")
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules()) == 0

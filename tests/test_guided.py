"""Guided Grad-CAM: guided backpropagation equal to pytorch-grad-cam's, without replacing any
module; functional ReLUs guided too; the product with Grad-CAM equal to pytorch-grad-cam's; one
backward when no ReLU follows the layer; batched targets equal to single ones; the model as found."""

from __future__ import annotations

import copy
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from pytorch_grad_cam import GradCAM as PgcGradCAM
from pytorch_grad_cam.guided_backprop import GuidedBackpropReLUModel
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from explainkit.errors import ExplainkitError
from explainkit.explainers.gradient import GradCAM
from explainkit.explainers.guided import GuidedGradCAM, GuidedReLU, GuidedReLUs
from tests.conftest import correlation
from tests.test_base import _hooks


def _pgc_guided(model, images, classes):
    """pytorch-grad-cam's guided backprop, ``(N, C, H, W)``: one image per call, on a copy (it
    replaces the ReLU modules and fills .grad)."""
    guided = GuidedBackpropReLUModel(copy.deepcopy(model), device="cpu")
    return torch.stack(
        [torch.from_numpy(guided(images[i : i + 1].clone(), int(c))).permute(2, 0, 1) for i, c in enumerate(classes)]
    )


def _ours_guided(model, images, classes):
    inputs = images.clone().requires_grad_(True)
    with GuidedReLUs() as mode:
        output = model(inputs)
    (gradients,) = torch.autograd.grad(output.gather(1, torch.as_tensor(classes)[:, None]).sum(), inputs)
    return gradients, mode


def _pgc_gradcam(model, layer_name, images, classes):
    model = copy.deepcopy(model)
    with PgcGradCAM(model=model, target_layers=[model.get_submodule(layer_name)]) as cam:
        return torch.from_numpy(cam(input_tensor=images.clone(), targets=[ClassifierOutputTarget(int(c)) for c in classes]))


def test_guided_relu_backward_by_hand():
    x = torch.tensor([-1.0, 2.0, 3.0, 0.5], requires_grad=True)
    y = GuidedReLU.apply(x * 1, False)
    (grad,) = torch.autograd.grad(y, x, torch.tensor([5.0, -1.0, 2.0, 0.0]))
    torch.testing.assert_close(grad, torch.tensor([0.0, 0.0, 2.0, 0.0]))  # x > 0 and upstream > 0
    z = x * 1
    out = GuidedReLU.apply(z, True)
    assert out is z and torch.equal(z.detach(), torch.tensor([0.0, 2.0, 3.0, 0.5]))  # in place, as relu_


@pytest.mark.parametrize("fixture", ["random_model", "trained_model"])
def test_guided_gradients_equal_pytorch_grad_cams(fixture, request):
    model = request.getfixturevalue(fixture)
    torch.manual_seed(3)
    images = torch.randn(4, 3, 32, 32)
    classes = model(images).argmax(1)
    ours, mode = _ours_guided(model, images, classes)
    assert mode.calls == 17  # resnet18: stem + 2 per block x 8 blocks, each nn.ReLU(inplace=True) call
    reference = _pgc_guided(model, images, classes)
    torch.testing.assert_close(ours, reference, atol=1e-6, rtol=1e-4)
    for reduce in (lambda g: g.norm(dim=1), lambda g: g.abs().amax(dim=1)):
        assert correlation(reduce(ours), reduce(reference)).min() > 0.999


def test_guidance_changes_the_gradient_and_ends_with_the_block(random_model, images):
    inputs = images.clone().requires_grad_(True)
    guided, _ = _ours_guided(random_model, images, [1] * len(images))
    (plain,) = torch.autograd.grad(random_model(inputs)[:, 1].sum(), inputs)  # after the block: plain ReLUs
    assert not torch.allclose(guided, plain, atol=1e-6)
    assert not torch._C._is_torch_function_mode_enabled()


class _FunctionalNet(nn.Module):
    """The same weights as ``_ModuleNet``, with every spelling of a functional ReLU."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.c = nn.Conv2d(8, 8, 3, padding=1)
        self.d = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = F.relu(self.a(x))
        x = torch.relu(self.b(x))
        x = self.c(x).relu()
        y = self.d(x)
        F.relu(y, inplace=True)  # the result is used through the in-place side effect
        return self.head(y.mean(dim=(2, 3)))


class _ModuleNet(_FunctionalNet):
    def __init__(self):
        super().__init__()
        self.relu = nn.ReLU()

    def forward(self, x):
        for conv in (self.a, self.b, self.c, self.d):
            x = self.relu(conv(x))
        return self.head(x.mean(dim=(2, 3)))


def test_functional_relus_are_guided_too():
    torch.manual_seed(0)
    functional = _FunctionalNet().eval()
    twin = _ModuleNet().eval()
    twin.load_state_dict(functional.state_dict())
    images = torch.randn(3, 3, 16, 16)
    classes = torch.tensor([0, 2, 4])
    ours, mode = _ours_guided(functional, images, classes)
    assert mode.calls == 4
    torch.testing.assert_close(ours, _pgc_guided(twin, images, classes), atol=1e-6, rtol=1e-4)
    # pytorch-grad-cam cannot see functional ReLUs: its "guided" gradient is the plain one there
    inputs = images.clone().requires_grad_(True)
    (plain,) = torch.autograd.grad(functional(inputs).gather(1, classes[:, None]).sum(), inputs)
    torch.testing.assert_close(_pgc_guided(functional, images, classes), plain, atol=1e-6, rtol=1e-4)
    assert not torch.allclose(ours, plain, atol=1e-6)
    # and the explainer on the functional model equals it on the module twin
    maps = GuidedGradCAM(functional, "d")(images, classes)
    torch.testing.assert_close(maps, GuidedGradCAM(twin, "d")(images, classes), atol=1e-5, rtol=1e-4)


def test_another_threads_relus_are_not_guided():
    x = torch.tensor([1.0, 2.0], requires_grad=True)

    def plain_gradient():
        (grad,) = torch.autograd.grad(torch.relu(x * 1), x, torch.tensor([-1.0, 3.0]))
        return grad

    with GuidedReLUs() as mode, ThreadPoolExecutor(1) as pool:
        other = pool.submit(plain_gradient).result()
    assert mode.calls == 0
    torch.testing.assert_close(other, torch.tensor([-1.0, 3.0]))


def _assert_map_parity(model, layer_name, images, reduction):
    ours = GuidedGradCAM(model, layer_name, channel_reduction=reduction).explain(images)
    guided = _pgc_guided(model, images, ours.targets)
    reduced = guided.norm(dim=1) if reduction == "norm" else guided.abs().amax(dim=1)
    reference = reduced * _pgc_gradcam(model, layer_name, images, ours.targets)
    informative = reference.flatten(1).std(1) > 1e-6
    assert informative.sum() >= len(images) // 2
    corr = correlation(ours.maps, reference)[informative]
    assert corr.min() > 0.99, corr


@pytest.mark.parametrize("reduction", ["norm", "max"])
@pytest.mark.parametrize("layer_name", ["layer4", "layer3"])  # layer3: ReLUs above it, Grad-CAM apart
def test_parity_with_pytorch_grad_cam_random_model(layer_name, reduction, random_model, images):
    _assert_map_parity(random_model, layer_name, images, reduction)


@pytest.mark.parametrize("layer_name", ["layer4", "layer3"])
def test_parity_with_pytorch_grad_cam_trained_model(layer_name, trained_model):
    torch.manual_seed(3)
    _assert_map_parity(trained_model, layer_name, torch.randn(6, 3, 32, 32) * 0.8, "norm")


def test_one_pass_when_no_relu_follows_the_layer(random_model, images, monkeypatch):
    calls = []
    original = GradCAM.compute
    monkeypatch.setattr(GradCAM, "compute", lambda self, *a: calls.append(1) or original(self, *a))
    GuidedGradCAM(random_model, "layer4")(images, targets="all")
    assert calls == []  # both gradients from one backward
    GuidedGradCAM(random_model, "layer3")(images)
    assert calls == [1]  # layer4's ReLUs follow: Grad-CAM's own plain pass


@pytest.mark.parametrize("layer_name", ["layer4", "layer3"])
def test_all_targets_equal_single_target_calls(layer_name, random_model, images):
    explainer = GuidedGradCAM(random_model, layer_name, class_chunk=4)
    every = explainer(images, targets="all", normalize=False)
    assert every.shape == (6, 10, 32, 32)
    for k in (0, 5, 9):
        torch.testing.assert_close(every[:, k], explainer(images, targets=k, normalize=False), atol=1e-5, rtol=1e-4)
    top = explainer.explain(images, ("topk", 2))
    torch.testing.assert_close(top.maps[:, 1], explainer(images, targets=top.targets[:, 1]), atol=1e-5, rtol=1e-4)


def test_callable_target_is_differentiated(random_model, images):
    """A score that is not a class: the difference of two logits, from one forward."""
    explainer = GuidedGradCAM(random_model, "layer4")
    maps = explainer(images, targets=lambda out: out[:, 3] - out[:, 7], normalize=False)
    inputs = images.clone().requires_grad_(True)
    with GuidedReLUs():
        output = random_model(inputs)
    (guided,) = torch.autograd.grad((output[:, 3] - output[:, 7]).sum(), inputs)
    gradcam = GradCAM(random_model, "layer4")(images, targets=lambda out: out[:, 3] - out[:, 7])
    torch.testing.assert_close(maps, guided.norm(dim=1) * gradcam, atol=1e-5, rtol=1e-4)


def test_modules_are_the_same_objects_and_the_model_as_found(random_model, images):
    model = copy.deepcopy(random_model).train()
    model.layer2.eval()
    model.fc.weight.requires_grad_(False)
    model.conv1.weight.grad = torch.full_like(model.conv1.weight, 0.25)
    modules = dict(model.named_modules())
    classes = {n: type(m) for n, m in modules.items()}
    inplace = {n: m.inplace for n, m in modules.items() if isinstance(m, nn.ReLU)}
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    modes = {n: m.training for n, m in model.named_modules()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}

    for layer_name in ("layer4", "layer3"):
        GuidedGradCAM(model, layer_name)(images, targets="all")
        with pytest.raises(ExplainkitError):
            GuidedGradCAM(model, layer_name)(images, targets=[0, 1])  # wrong length: raises after the forward
    with pytest.raises(RuntimeError):
        GuidedGradCAM(model)(torch.randn(2, 5, 32, 32))  # fails inside the guided forward

    after = dict(model.named_modules())
    assert after.keys() == modules.keys() and all(after[n] is m for n, m in modules.items())
    assert {n: type(m) for n, m in after.items()} == classes
    assert {n: m.inplace for n, m in after.items() if isinstance(m, nn.ReLU)} == inplace
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    for key, value in model.named_buffers():
        torch.testing.assert_close(value, buffers[key], msg=key)
    assert torch.equal(model.conv1.weight.grad, torch.full_like(model.conv1.weight, 0.25))
    assert all(p.grad is None for n, p in model.named_parameters() if n != "conv1.weight")
    assert _hooks(model) == 0
    assert not torch._C._is_torch_function_mode_enabled()
    # and plain gradients of the model are plain again: negative upstream gradients pass its ReLUs
    inputs = images.clone().requires_grad_(True)
    model.eval()
    (after_grad,) = torch.autograd.grad(model(inputs)[:, 0].sum(), inputs)
    (reference,) = torch.autograd.grad(random_model(inputs)[:, 0].sum(), inputs)
    torch.testing.assert_close(after_grad, reference)


def test_bad_channel_reduction_is_refused(random_model):
    with pytest.raises(ExplainkitError, match="channel_reduction"):
        GuidedGradCAM(random_model, channel_reduction="mean")

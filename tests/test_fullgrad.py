"""FullGrad: parity with pytorch-grad-cam, a hand-computed case, the biased layers it reads,
batched targets equal to single ones, and the model left exactly as found."""

from __future__ import annotations

import copy
from collections import OrderedDict

import pytest
import torch
import torch.nn as nn
from pytorch_grad_cam import FullGrad as PgcFullGrad
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

import explainkit.explainers.fullgrad as fullgrad_module
from explainkit.errors import ExplainkitError
from explainkit.explainers.fullgrad import FullGrad, biased_layers, effective_bias, scaled_channel_sum
from explainkit.targets import ClassScores
from tests.conftest import correlation
from tests.test_base import _hooks


def _reference(model, images, targets):
    """pytorch-grad-cam's FullGrad on a copy (it calls model.eval() and fills .grad)."""
    model = copy.deepcopy(model)
    with PgcFullGrad(model=model, target_layers=[]) as cam:
        return torch.from_numpy(cam(input_tensor=images.clone(), targets=targets))


def _assert_parity(model, images):
    ours = FullGrad(model).explain(images)
    reference = _reference(model, images, [ClassifierOutputTarget(int(t)) for t in ours.targets])
    assert reference.flatten(1).std(1).gt(1e-4).all()  # every map informative
    corr = correlation(ours.maps, reference)
    assert corr.min() > 0.99, corr
    # Not just correlated: the same recipe, so the same numbers up to float noise.
    torch.testing.assert_close(ours.maps, reference, atol=1e-5, rtol=0)


def test_parity_with_pytorch_grad_cam_random_model(random_model, images):
    _assert_parity(random_model, images)


def test_parity_with_pytorch_grad_cam_trained_model(trained_model):
    torch.manual_seed(3)
    _assert_parity(trained_model, torch.randn(6, 3, 32, 32) * 0.8)


def test_parity_with_a_callable_target(random_model, images):
    """Any score is what gets differentiated: a class difference, as a pytorch-grad-cam callable."""
    ours = FullGrad(random_model)(images[:3], targets=lambda out: out[:, 2] - out[:, 5])
    reference = _reference(random_model, images[:3], [lambda row: row[2] - row[5]] * 3)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)


def test_hand_computed_map():
    """x = [[3, 0], [2, .5]], a 1x1 conv z = x - 1, ReLU, mean, y = logit 0.

    dy/dz = mask/4 with mask = [1, 0, 1, 0] (z > 0); dy/dx = mask/4.
    Input term |x dy/dx| = [.75, 0, .5, 0] -> scaled [1, 0, 2/3, 0].
    Bias term |b dy/dz| = [.25, 0, .25, 0] -> scaled [1, 0, 1, 0].
    Sum [2, 0, 5/3, 0]; normalised [1, 0, 5/6, 0].
    """
    conv = nn.Conv2d(1, 1, 1)
    head = nn.Linear(1, 2, bias=False)
    with torch.no_grad():
        conv.weight.fill_(1.0)
        conv.bias.fill_(-1.0)
        head.weight.copy_(torch.tensor([[1.0], [-1.0]]))
    model = nn.Sequential(conv, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), head).eval()
    x = torch.tensor([[[[3.0, 0.0], [2.0, 0.5]]]])
    explainer = FullGrad(model)
    raw = explainer(x, targets=0, normalize=False)
    torch.testing.assert_close(raw, torch.tensor([[[2.0, 0.0], [5 / 3, 0.0]]]), atol=1e-5, rtol=0)
    torch.testing.assert_close(explainer(x, targets=0), torch.tensor([[[1.0, 0.0], [5 / 6, 0.0]]]), atol=1e-5, rtol=0)


def test_scaled_channel_sum_scales_each_channel_then_sums():
    maps = torch.tensor([[[[0.0, 2.0], [4.0, 4.0]], [[1.0, 1.0], [1.0, 3.0]], [[5.0, 5.0], [5.0, 5.0]]]])
    expected = torch.tensor([[[0.0, 0.5], [1.0, 1.0]]]) + torch.tensor([[[0.0, 0.0], [0.0, 1.0]]])  # constant -> 0
    torch.testing.assert_close(scaled_channel_sum(maps), expected, atol=1e-6, rtol=0)


def test_effective_bias_of_batchnorm_and_conv():
    bn = nn.BatchNorm2d(2).eval()
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([1.0, -2.0]))
        bn.running_var.copy_(torch.tensor([3.0, 0.5]))
        bn.weight.copy_(torch.tensor([2.0, -1.0]))
        bn.bias.copy_(torch.tensor([0.5, 0.25]))
    expected = bn.bias - bn.running_mean * bn.weight / torch.sqrt(bn.running_var + bn.eps)
    torch.testing.assert_close(effective_bias(bn), expected.detach())
    # the bias is what BN adds to a zero input
    torch.testing.assert_close(effective_bias(bn), bn(torch.zeros(1, 2, 1, 1)).flatten().detach())
    conv = nn.Conv2d(2, 3, 3)
    torch.testing.assert_close(effective_bias(conv), conv.bias.detach())


def test_biased_layers_are_pytorch_grad_cams_conv_and_batchnorm(random_model):
    class NormAct(nn.BatchNorm2d):  # like timm's BatchNormAct2d: its output is not BN's
        def forward(self, x):
            return torch.relu(super().forward(x))

    class PlainSubclass(nn.Conv2d):
        pass

    model = nn.Sequential(
        OrderedDict(
            a=nn.Conv2d(3, 4, 3, bias=False),
            b=nn.Conv2d(4, 4, 3),
            c=nn.BatchNorm2d(4),
            d=nn.BatchNorm2d(4, affine=False),
            e=NormAct(4),
            f=PlainSubclass(4, 4, 1),
            g=nn.Linear(4, 4),
        )
    )
    assert biased_layers(model) == [model.b, model.c, model.f]
    # on torchvision's ResNet: every BatchNorm2d (its convs have no bias), as pytorch-grad-cam finds them
    assert biased_layers(random_model) == [m for m in random_model.modules() if isinstance(m, nn.BatchNorm2d)]


@pytest.mark.parametrize("targets", ["all", ("topk", 3)])
def test_several_targets_equal_single_target_calls(targets, random_model, images):
    explainer = FullGrad(random_model, class_chunk=4)  # three chunks for "all"
    result = explainer.explain(images, targets, normalize=False)
    classes = torch.arange(10).expand(len(images), -1) if targets == "all" else result.targets
    for column in (0, classes.shape[1] - 1):
        single = explainer(images, targets=classes[:, column], normalize=False)
        torch.testing.assert_close(result.maps[:, column], single, atol=1e-4, rtol=1e-4)


def test_one_autograd_call_per_chunk_of_targets(random_model, images, monkeypatch):
    calls = []
    original = fullgrad_module.gradients_of

    def spy(scores, wanted, grad_outputs, **options):
        calls.append((len(wanted), tuple(grad_outputs.shape), options.get("rows", False)))
        return original(scores, wanted, grad_outputs, **options)

    monkeypatch.setattr(fullgrad_module, "gradients_of", spy)
    FullGrad(random_model, class_chunk=6)(images, targets="all")
    layers = len(biased_layers(random_model))
    assert calls == [(1 + layers, (6, 6, 10), True), (1 + layers, (4, 6, 10), True)]


def test_a_given_layer_is_ignored(random_model, images):
    explainer = FullGrad(random_model, layer="layer3")
    assert explainer.layer_name is None and explainer.layer is None
    torch.testing.assert_close(explainer(images), FullGrad(random_model)(images))


def test_bad_class_chunk_is_refused():
    with pytest.raises(ExplainkitError, match="class_chunk"):
        FullGrad(nn.Conv2d(3, 3, 1), class_chunk=0)


def test_inplace_relu_after_batchnorm_does_not_change_the_gradients(random_model, images):
    """The recorded BatchNorm outputs must be BN's own, not what the in-place ReLU made of them."""
    model = copy.deepcopy(random_model)
    maps = FullGrad(model)(images, normalize=False)
    for module in model.modules():
        if isinstance(module, nn.ReLU):
            module.inplace = False
    torch.testing.assert_close(FullGrad(model)(images, normalize=False), maps)


def test_model_left_exactly_as_found(random_model, images):
    model = copy.deepcopy(random_model).train()
    model.layer2.eval()
    model.fc.weight.requires_grad_(False)
    model.conv1.weight.grad = torch.full_like(model.conv1.weight, 0.25)
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    modes = {n: m.training for n, m in model.named_modules()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    modules = dict(model.named_modules())
    image_copy = images.clone()

    FullGrad(model)(images, targets="all")
    with pytest.raises(ExplainkitError):
        FullGrad(model)(images, targets=[0, 1])  # wrong length: raises after the forward
    with pytest.raises(RuntimeError):
        FullGrad(model)(torch.randn(2, 5, 32, 32))  # fails inside the model

    assert {n: m.training for n, m in model.named_modules()} == modes
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    for key, value in model.named_buffers():
        torch.testing.assert_close(value, buffers[key], msg=key)
    assert torch.equal(model.conv1.weight.grad, torch.full_like(model.conv1.weight, 0.25))
    assert all(p.grad is None for n, p in model.named_parameters() if n != "conv1.weight")
    assert _hooks(model) == 0
    assert all(a is b for a, b in zip(dict(model.named_modules()).values(), modules.values()))
    assert torch.equal(images, image_copy) and not images.requires_grad


def test_works_under_no_grad_on_a_frozen_model(random_model, images):
    model = copy.deepcopy(random_model).requires_grad_(False)
    with torch.no_grad():
        maps = FullGrad(model)(images, ClassScores(3))
        assert not torch.is_grad_enabled()
    torch.testing.assert_close(maps, FullGrad(random_model)(images, 3))


def test_ops_without_a_batching_rule_fall_back_column_by_column(random_model, images):
    # A gradient hook that detaches (as pytorch-grad-cam's leftover hooks do) has no vmap rule: the
    # batched backward fails part-way and the columns run one by one on the graph it kept.
    def spy(module, inputs, output):
        output.register_hook(lambda grad: (grad.detach(), None)[1])

    handle = random_model.layer3.register_forward_hook(spy)
    try:
        with pytest.warns(RuntimeWarning, match="one by one"):
            looped = FullGrad(random_model)(images, "all", normalize=False)
    finally:
        handle.remove()
    torch.testing.assert_close(looped, FullGrad(random_model)(images, "all", normalize=False), rtol=1e-5, atol=1e-6)

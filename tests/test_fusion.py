"""Multi-layer fusion (RefineCAM, Poly-CAM): parity with pytorch-grad-cam, the one-pass per-layer
gradients, the rules on hand-computed cases, targets, model hygiene and the layers argument."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from pytorch_grad_cam import GradCAM as PgcGradCAM
from pytorch_grad_cam import GradCAMPlusPlus as PgcGradCAMPlusPlus
from pytorch_grad_cam import RefineCAM as PgcRefineCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

import explainkit
from explainkit.errors import ExplainkitError, LayerNotFoundError, UnknownExplainerError
from explainkit.explainers.eigen import EigenCAM
from explainkit.explainers.fusion import (
    FusedCAM,
    PolyCAM,
    RefineCAM,
    default_fusion_layers,
    fuse_layers,
    layer_outputs_as_leaves,
    local_relevance_normalization,
    parse_layers,
    percentile_normalize,
    poly_rule,
    refine_rule,
)
from explainkit.explainers.gradient import GradCAM, LayerCAM
from explainkit.models.layers import default_layer
from tests.conftest import correlation

LAYERS = ["layer2", "layer3", "layer4"]
RULES = [RefineCAM, PolyCAM]


def _hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


def _pgc_refinecam(model, images, classes, base=PgcGradCAM):
    """pytorch-grad-cam's RefineCAM with a Grad-CAM base, its hooks released after."""
    reference = PgcRefineCAM(model, [model.get_submodule(name) for name in LAYERS], base_method=base)
    try:
        return torch.from_numpy(reference(images, [ClassifierOutputTarget(int(c)) for c in classes]))
    finally:
        for cam in reference.base_cam_per_layer:
            cam.activations_and_grads.release()


def _assert_refinecam_parity(model, images, method="gradcam", base=PgcGradCAM):
    ours = RefineCAM(model, layers=LAYERS, method=method).explain(images)
    hooks = _hooks(model)
    reference = _pgc_refinecam(model, images, ours.targets, base)
    assert _hooks(model) == hooks  # pgc's hooks gone: they would break our batched backward
    informative = reference.flatten(1).std(1) > 1e-4
    assert informative.sum() >= len(images) // 2
    corr = correlation(ours.maps, reference)[informative]
    assert corr.min() > 0.99, corr


# --- parity and the one-pass gradients -------------------------------------------------------
def test_refinecam_parity_with_pytorch_grad_cam_random_model(random_model, images):
    _assert_refinecam_parity(random_model, images)


def test_refinecam_parity_with_pytorch_grad_cams_default_base_gradcam_plus_plus(random_model, images):
    _assert_refinecam_parity(random_model, images, "gradcam++", PgcGradCAMPlusPlus)


def test_refinecam_parity_with_pytorch_grad_cam_trained_model(trained_model):
    torch.manual_seed(3)
    _assert_refinecam_parity(trained_model, torch.randn(8, 3, 32, 32) * 0.8)


@pytest.mark.parametrize("method", [GradCAM, LayerCAM], ids=["gradcam (channel weights)", "layercam (contributions)"])
@pytest.mark.parametrize(
    "targets", [None, "all", ("topk", 2), lambda out: out[:, 0] - out[:, 1]], ids=["pred", "all", "top2", "fn"]
)
def test_per_layer_maps_equal_single_layer_maps(method, targets, random_model, images):
    fused = PolyCAM(random_model, layers=LAYERS, method=method)
    assert fused.joint  # one forward, one backward for all layers
    per_layer = fused.explain_layers(images, targets, normalize=False)
    assert list(per_layer) == LAYERS
    for name in LAYERS:
        single = method(random_model, layer=name)(images, targets, normalize=False)
        torch.testing.assert_close(per_layer[name], single, rtol=1e-5, atol=1e-6)


def test_one_forward_and_one_backward_for_every_layer(random_model, images, monkeypatch):
    calls = {"forward": 0}
    handle = random_model.conv1.register_forward_hook(lambda *_: calls.__setitem__("forward", calls["forward"] + 1))
    inputs_per_backward = []
    real_grad = torch.autograd.grad

    def counting_grad(outputs, inputs, *args, **kwargs):
        inputs_per_backward.append(len(inputs) if isinstance(inputs, (list, tuple)) else 1)
        return real_grad(outputs, inputs, *args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", counting_grad)
    try:
        RefineCAM(random_model, layers=LAYERS)(images, "all")
    finally:
        handle.remove()
    assert calls["forward"] == 1
    assert inputs_per_backward == [3]  # one batched backward (10 classes <= class_chunk) for the three layers


def test_leaves_no_batching_rule_falls_back_column_by_column(random_model, images):
    # A gradient hook that detaches (as pytorch-grad-cam's leftover hooks do) has no vmap rule.
    def spy(module, inputs, output):
        output.register_hook(lambda grad: (grad.detach(), None)[1])

    handle = random_model.layer3.register_forward_hook(spy)
    try:
        with pytest.warns(RuntimeWarning, match="one by one"):
            looped = RefineCAM(random_model, layers=LAYERS)(images, "all", normalize=False)
    finally:
        handle.remove()
    batched = RefineCAM(random_model, layers=LAYERS)(images, "all", normalize=False)
    torch.testing.assert_close(looped, batched, rtol=1e-5, atol=1e-6)


def test_layer_outputs_as_leaves_keeps_the_path_to_shallow_layers(random_model, images):
    with layer_outputs_as_leaves([random_model.layer3, random_model.layer4]) as (inputs, outputs):
        logits = random_model(images)
    assert inputs[0].is_leaf and inputs[1].is_leaf and logits.requires_grad
    deep, shallow = torch.autograd.grad(logits[:, 0].sum(), [inputs[1], inputs[0]])
    assert shallow.abs().sum() > 0 and deep.abs().sum() > 0  # the shallow leaf is not cut off
    assert outputs[0].shape == (6, 256, 8, 8) and not outputs[0].requires_grad
    assert torch.is_grad_enabled() and _hooks(random_model) == 0


# --- the rules -------------------------------------------------------------------------------
def test_refinecam_rule_is_the_product_of_scaled_upsampled_maps():
    deep = torch.tensor([[[-1.0, 2.0], [0.0, 4.0]]])  # ReLU, scale to [0, 1]: [[0, .5], [0, 1]]
    shallow = torch.arange(16.0).view(1, 4, 4) - 5
    fused = refine_rule([shallow, deep], (4, 4))
    scaled_deep = F.interpolate(torch.tensor([[[[0.0, 0.5], [0.0, 1.0]]]]), (4, 4), mode="bilinear")[0]
    scaled_deep = (scaled_deep - scaled_deep.min()) / (scaled_deep.max() - scaled_deep.min())
    scaled_shallow = (shallow.relu() - 0) / 10
    torch.testing.assert_close(fused, scaled_deep * scaled_shallow)


def test_polycam_rule_local_normalisation_and_percentiles_by_hand():
    # Deep 1x1: bilinear resizing of the 4x4 shallow map to 1x1 (align_corners=False) reads its
    # centre 2x2 (5, 6, 9, 10: mean 7.5), so LNorm divides by 7.5; the deep value scales it away.
    shallow = torch.arange(16.0).view(1, 4, 4)
    deep = torch.full((1, 1, 1), 3.0)
    torch.testing.assert_close(local_relevance_normalization(shallow, (1, 1)), shallow / 7.5)
    fused = poly_rule([shallow, deep], (4, 4))
    # p0.1 of 0..15 (x 3/7.5) is 0.015, p99.9 is 14.985: (x - 0.015) / 14.985 clipped
    torch.testing.assert_close(fused, ((shallow - 0.015) / 14.985).clamp(0, 1))
    assert poly_rule([shallow, -deep], (4, 4)).eq(0).all()  # no deep evidence: nothing


def test_polycam_rule_upsamples_the_deep_map_into_the_shallow_one_by_hand():
    deep = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    shallow = torch.ones(1, 4, 4)  # LNorm of a constant map is 1: the result is the upsampled deep map
    weights = torch.tensor([1.0, 0.75, 0.25, 0.0])  # 2 -> 4 bilinear weights of the first deep row/column
    upsampled = weights[:, None] * weights[None, :]
    high = 0.75 + 0.985 * 0.25  # p99.9 of its 16 values (..., 0.75, 0.75, 1); p0.1 is 0
    expected = (upsampled / high).clamp(0, 1)[None]
    torch.testing.assert_close(poly_rule([shallow, deep], (4, 4)), expected)
    torch.testing.assert_close(poly_rule([deep, shallow], (4, 4)), expected)  # any order: by resolution


def _authors_polycam(maps):
    """aenglebert/polycam's ``compute_cams`` (lnorm=True) on maps given shallow first."""
    prev = None
    for activation in reversed(maps):
        activation = torch.relu(activation[:, None])
        if prev is None:
            prev = activation
        else:
            norm = F.interpolate(
                F.interpolate(activation, prev.shape[-2:], mode="bilinear"), activation.shape[-2:], mode="bilinear"
            )
            activation = activation / torch.maximum(norm, torch.tensor(1e-12))
            prev = activation * F.interpolate(prev, activation.shape[-2:], mode="bilinear")
        prev = torch.relu(prev)
    flat = prev.flatten(-2).numpy()
    low = torch.tensor(np.percentile(flat, 0.1, axis=-1)).float()[..., None, None]
    high = torch.tensor(np.percentile(flat, 99.9, axis=-1)).float()[..., None, None]
    return ((prev - low) / torch.maximum(high, torch.tensor(1e-12))).clamp(0, 1)[:, 0]


def test_polycam_rule_equals_the_authors_code_on_three_layers():
    torch.manual_seed(0)
    maps = [torch.randn(5, 16, 16), torch.randn(5, 8, 8) + 0.5, torch.randn(5, 4, 4) + 1]
    torch.testing.assert_close(poly_rule(maps, (32, 32)), _authors_polycam(maps), rtol=1e-5, atol=1e-6)


def test_percentile_normalize_matches_numpy():
    maps = torch.randn(3, 2, 7, 9)
    low = np.percentile(maps.flatten(-2).numpy(), 0.1, axis=-1)[..., None, None]
    high = np.percentile(maps.flatten(-2).numpy(), 99.9, axis=-1)[..., None, None]
    expected = np.clip((maps.numpy() - low) / np.maximum(high, 1e-12), 0, 1)
    torch.testing.assert_close(percentile_normalize(maps), torch.from_numpy(expected).float(), rtol=1e-5, atol=1e-6)


def _high_frequency_share(maps, cutoff=4):
    """Share of each map's spectral energy above ``cutoff`` cycles per image (a 4x4 map has ~2)."""
    spectrum = torch.fft.fft2(maps - maps.mean((-2, -1), keepdim=True)).abs().square()
    frequency = torch.fft.fftfreq(maps.shape[-1]).abs() * maps.shape[-1]
    high = (frequency[:, None] > cutoff) | (frequency[None, :] > cutoff)
    return (spectrum * high).sum((-2, -1)) / spectrum.sum((-2, -1)).clamp_min(1e-12)


@pytest.mark.parametrize("rule, factor", [(RefineCAM, 1.5), (PolyCAM, 2.5)])
def test_fused_maps_have_more_detail_than_layer4(rule, factor, random_model, trained_model):
    torch.manual_seed(0)
    images = torch.randn(6, 3, 32, 32)
    for model in (random_model, trained_model):
        fused = rule(model, layers=LAYERS)(images)
        alone = GradCAM(model, layer="layer4")(images)
        assert fused.shape == alone.shape == (6, 32, 32)  # the input's resolution
        assert _high_frequency_share(fused).mean() > factor * _high_frequency_share(alone).mean()


# --- targets and the contract ------------------------------------------------------------------
@pytest.mark.parametrize("rule", RULES)
def test_all_equals_single_class_calls(rule, random_model, images):
    explainer = rule(random_model, layers=LAYERS)
    every = explainer(images, targets="all", normalize=False)
    assert every.shape == (6, 10, 32, 32)
    for k in (0, 4, 9):
        torch.testing.assert_close(every[:, k], explainer(images, targets=k, normalize=False), rtol=1e-4, atol=1e-5)
    top = explainer.explain(images, ("topk", 3))
    for rank in range(3):
        torch.testing.assert_close(top.maps[:, rank], explainer(images, top.targets[:, rank]), rtol=1e-4, atol=2e-4)


@pytest.mark.parametrize("rule", RULES)
def test_output_contract(rule, random_model, images):
    maps = rule(random_model, layers=LAYERS)(images)
    assert maps.shape == (6, 32, 32) and maps.dtype == torch.float32 and maps.min() >= 0 and maps.max() <= 1
    assert torch.isfinite(maps).all()


@pytest.mark.parametrize("rule", RULES)
def test_model_state_left_as_found_also_when_the_call_raises(rule, random_model, images):
    model = copy.deepcopy(random_model).train()
    model.layer2.eval()
    model.fc.weight.requires_grad_(False)
    model.conv1.weight.grad = torch.full_like(model.conv1.weight, 0.25)
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    modes = {n: m.training for n, m in model.named_modules()}
    requires = {n: p.requires_grad for n, p in model.named_parameters()}
    grad_mode = torch.is_grad_enabled()

    def check():
        assert {n: m.training for n, m in model.named_modules()} == modes
        assert all(torch.equal(v, buffers[k]) for k, v in model.named_buffers())
        assert {n: p.requires_grad for n, p in model.named_parameters()} == requires
        assert torch.equal(model.conv1.weight.grad, torch.full_like(model.conv1.weight, 0.25))
        assert all(p.grad is None for n, p in model.named_parameters() if n != "conv1.weight")
        assert _hooks(model) == 0 and torch.is_grad_enabled() == grad_mode

    explainer = rule(model, layers=LAYERS)
    explainer(images, "all")
    check()
    with pytest.raises(ExplainkitError):
        explainer(images, targets=11)  # out of range: raised inside the hooked forward
    check()
    with torch.no_grad():
        explainer(images)
    check()


def test_a_layer_that_does_not_run_is_an_error_without_leftovers(random_model, images):
    class Skips(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.unused = inner, nn.Conv2d(3, 3, 1)

        def forward(self, x):
            return self.inner(x)

    model = Skips(copy.deepcopy(random_model)).eval()
    with pytest.raises(ExplainkitError, match="'unused' did not run"):
        RefineCAM(model, layers=["inner.layer3", "unused"])(images)
    assert _hooks(model) == 0 and torch.is_grad_enabled()


# --- any method ----------------------------------------------------------------------------
def test_non_gradient_method_runs_once_per_layer(random_model, images):
    fused = RefineCAM(random_model, layers=LAYERS, method="eigencam")
    assert not fused.joint
    per_layer = fused.explain_layers(images, normalize=False)
    for name in LAYERS:
        torch.testing.assert_close(per_layer[name], EigenCAM(random_model, layer=name)(images, normalize=False))
    expected = torch.stack([m / m.flatten(1).amax(1).clamp_min(1e-12)[:, None, None] for m in per_layer.values()]).prod(0)
    assert correlation(fused(images), expected).min() > 0.99


def test_third_party_method_by_registered_name(fresh_plugins, random_model, images):
    class Plugin:
        @explainkit.hookimpl
        def register_explainers(self, register):
            def factory(model, layer=None, scale=1.0):
                def fn(images, classes):  # a plain map function: full-resolution maps, one class per image
                    return images.abs().mean(1) * scale + classes[:, None, None].float()

                return fn

            register("absmean", factory)

    fresh_plugins.register(Plugin(), name="absmean-plugin")
    fused = PolyCAM(random_model, layers=LAYERS, method="absmean", scale=2.0)
    assert not fused.joint and fused.method_name == "absmean"
    assert fused(images, "all").shape == (6, 10, 32, 32)
    with pytest.raises(ExplainkitError, match="'absmean' does not take batch_size"):
        PolyCAM(random_model, layers=LAYERS, method="absmean", batch_size=4)


def test_method_given_as_class_name_or_factory(random_model, images):
    by_name = RefineCAM(random_model, layers=LAYERS, method="layercam")(images)
    by_class = RefineCAM(random_model, layers=LAYERS, method=LayerCAM)(images)
    torch.testing.assert_close(by_name, by_class)
    with pytest.raises(UnknownExplainerError, match="gradcamm"):
        RefineCAM(random_model, layers=LAYERS, method="gradcamm")
    with pytest.raises(ExplainkitError, match="does not take batch_size"):
        RefineCAM(random_model, layers=LAYERS, method=GradCAM, batch_size=4)
    with pytest.raises(ExplainkitError, match="itself a fusion"):
        RefineCAM(random_model, layers=LAYERS, method=PolyCAM)
    with pytest.raises(ExplainkitError, match="method must be"):
        RefineCAM(random_model, layers=LAYERS, method=3)


def test_options_reach_every_layer(random_model, images):
    fused = PolyCAM(random_model, layers=LAYERS, method="gradcam", class_chunk=3)
    assert [e.class_chunk for e in fused.explainers] == [3, 3, 3]
    torch.testing.assert_close(fused(images, "all"), PolyCAM(random_model, layers=LAYERS)(images, "all"), rtol=1e-4, atol=1e-5)


# --- the layers ------------------------------------------------------------------------------
def test_default_layers_are_the_default_layer_and_two_larger_predecessors(random_model):
    assert default_layer(random_model) == "layer3"  # the CIFAR card's measured layer
    assert default_fusion_layers(random_model) == ["layer1", "layer2", "layer3"]
    assert default_fusion_layers(random_model, "layer4") == LAYERS
    assert default_fusion_layers(random_model, "layer4.1", depth=2) == ["layer3", "layer4.1"]
    assert RefineCAM(random_model).layer_names == ["layer1", "layer2", "layer3"]
    assert RefineCAM(random_model, layer="layer4").layer_names == LAYERS


def test_default_layers_of_a_plain_sequential_cnn():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    )  # fmt: skip
    assert default_fusion_layers(model) == ["1", "3", "5"]  # the last module at each resolution
    maps = PolyCAM(model)(torch.randn(2, 3, 32, 32))
    assert maps.shape == (2, 32, 32)


def test_layers_as_text_or_as_layer_list(random_model, images):
    expected = RefineCAM(random_model, layers=LAYERS)(images)
    assert parse_layers(" layer2, layer3 ,layer4,") == LAYERS
    torch.testing.assert_close(RefineCAM(random_model, layer="layer2,layer3,layer4")(images), expected)  # --layer a,b,c
    torch.testing.assert_close(RefineCAM(random_model, layer=LAYERS)(images), expected)
    modules = [random_model.get_submodule(n) for n in LAYERS]
    torch.testing.assert_close(RefineCAM(random_model, layers=modules)(images), expected)
    torch.testing.assert_close(fuse_layers("refine", random_model, "gradcam", "layer2,layer3,layer4")(images), expected)
    assert isinstance(fuse_layers("poly", random_model, layers=LAYERS), PolyCAM)
    assert repr(RefineCAM(random_model, layers=LAYERS)) == "RefineCAM(method='gradcam', layers=['layer2', 'layer3', 'layer4'])"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"layers": []}, "at least two layers"),
        ({"layers": ["layer4"]}, "at least two layers"),
        ({"layers": "layer4"}, "at least two layers"),
        ({"layers": ["layer3", "layer3"]}, "'layer3' more than once"),
        ({"layers": "layer2,layer2"}, "'layer2' more than once"),
        ({"layers": ["layer9", "layer4"]}, "layers: unknown layer 'layer9'"),
        ({"layers": ["layer3", 4]}, "layers must hold dotted layer names"),
        ({"layers": 4}, "layers must be a list"),
        ({"layers": LAYERS, "layer": "layer4"}, "not both"),
    ],
)
def test_bad_layers_are_one_line_errors(kwargs, message, random_model):
    with pytest.raises(ExplainkitError) as caught:
        RefineCAM(random_model, **kwargs)
    text = str(caught.value)
    assert message in text and "\n" not in text


def test_unknown_layer_is_a_layer_error(random_model):
    with pytest.raises(LayerNotFoundError):
        PolyCAM(random_model, layers=["layer2", "layer5"])


def test_fuse_layers_rejects_unknown_rules(random_model):
    with pytest.raises(ExplainkitError, match="rule must be one of poly, refine"):
        fuse_layers("mean", random_model, layers=LAYERS)


def test_fused_classes_carry_their_family():
    assert FusedCAM.family == RefineCAM.family == PolyCAM.family == "fusion"
    assert (FusedCAM.name, RefineCAM.name, PolyCAM.name) == ("fusedcam", "refinecam", "polycam")


@pytest.mark.parametrize("rule, named", [("refine", RefineCAM), ("poly", PolyCAM), ("polycam", PolyCAM)])
def test_fusedcam_rule_option_is_the_named_classes(rule, named, random_model, images):
    general = FusedCAM(random_model, layers=LAYERS, method="layercam", rule=rule)
    assert general.rule == named(random_model, layers=LAYERS).rule
    torch.testing.assert_close(general(images, "all"), named(random_model, layers=LAYERS, method="layercam")(images, "all"))
    assert repr(general).endswith(f"rule={general.rule!r})")


def test_fusedcam_with_defaults_is_refinecam_at_the_default_layers(random_model, images):
    torch.testing.assert_close(FusedCAM(random_model)(images), RefineCAM(random_model)(images))


@pytest.mark.parametrize("rule", ["mean", None, 3])
def test_bad_rule_is_an_error_naming_rule(rule, random_model):
    with pytest.raises(ExplainkitError, match="rule must be one of poly, refine"):
        FusedCAM(random_model, layers=LAYERS, rule=rule)


def test_named_rules_refuse_another_rule(random_model):
    with pytest.raises(ExplainkitError, match="refinecam fuses by its own rule; for rule='poly' use fusedcam"):
        RefineCAM(random_model, layers=LAYERS, rule="poly")


def test_fusedcam_through_the_registry_entry(random_model, images, fresh_plugins):
    class Plugin:
        @explainkit.hookimpl
        def register_explainers(self, register):
            register("fused-test", FusedCAM)

    fresh_plugins.register(Plugin(), name="fused-test-plugin")
    cam = explainkit.get_explainer("fused-test", random_model, layer="layer2,layer3,layer4", method="gradcam", rule="poly")
    torch.testing.assert_close(cam(images), PolyCAM(random_model, layers=LAYERS)(images))


def test_a_method_that_ignores_the_layer_cannot_be_fused(random_model):
    with pytest.raises(ExplainkitError, match="'fullgrad' does not read one layer"):
        FusedCAM(random_model, layers=["layer3", "layer4"], method="fullgrad")

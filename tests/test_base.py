"""The explainer contract every method inherits: targets, output, post-processing, model state."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import explainkit
from explainkit.errors import ExplainkitError
from explainkit.explainers.base import evaluation_mode, normalize_maps, postprocess, resolve_targets, upsample_bilinear
from explainkit.plugins import BUILTIN_NAME
from explainkit.registry import registrations

# Every built-in CNN method, read off the registry (the built-ins register through the same hook as
# plugins), but scorecam, whose contract tests/test_score.py checks at one image (a forward per
# channel). Attention methods need a vision transformer: tests/test_attention.py and
# tests/test_legrad.py check their contract on torchvision, timm and Hugging Face ViTs.
BUILTINS = sorted(
    r.name for r in registrations().values() if r.plugin == BUILTIN_NAME and r.name != "scorecam" and r.family != "attention"
)
# Options that keep a slow method's contract test short (its own module tests the defaults).
FAST = {"opticam": {"iterations": 2, "progress": False}}


def _hooks(model):
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) + len(getattr(m, "_backward_pre_hooks", {}))
        for m in model.modules()
    )


# --- targets -------------------------------------------------------------------------------
def test_resolve_targets_forms():
    logits = torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 1.0]])
    assert resolve_targets(None, logits).tolist() == [1, 0]
    assert resolve_targets(2, logits).tolist() == [2, 2]
    assert resolve_targets([2, 1], logits).tolist() == [2, 1]
    assert resolve_targets(torch.tensor([0, 2]), logits).tolist() == [0, 2]
    assert resolve_targets("all", logits) == "all"


def test_resolve_topk_orders_classes_by_score():
    logits = torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 1.0]])
    assert resolve_targets(("topk", 2), logits).tolist() == [[1, 2], [0, 2]]
    assert resolve_targets("topk:1", logits).tolist() == [[1], [0]]
    assert resolve_targets(("topk", 9), logits).shape == (2, 3)  # k beyond the classes: every class


@pytest.mark.parametrize(
    "bad", [3, -1, [0], [0, 1, 2], [0, 5], "every", True, [0.5, 1.0], "topk:0", "topk:x", ("topk", None), [[0, 1]], [[0], [3]]]
)
def test_resolve_targets_rejects_bad_targets(bad):
    with pytest.raises(ExplainkitError):
        resolve_targets(bad, torch.zeros(2, 3))


# --- post-processing ---------------------------------------------------------------------------
def test_normalize_maps_scales_each_map_and_keeps_zero_maps_zero():
    maps = torch.stack([torch.zeros(4, 4), torch.arange(16.0).view(4, 4) + 5, torch.full((4, 4), 7.0)])
    scaled = normalize_maps(maps)
    assert scaled[0].eq(0).all()
    assert scaled[1].min() == 0 and scaled[1].max() == 1
    assert scaled[2].eq(0).all()


def test_postprocess_relu_upsample_shapes():
    raw = torch.tensor([[[-1.0, 2.0], [0.5, -3.0]]])
    out = postprocess(raw, (8, 8), normalize=False)
    assert out.shape == (1, 8, 8) and out.dtype == torch.float32 and out.min() >= 0
    assert postprocess(torch.randn(2, 10, 4, 4), (32, 32)).shape == (2, 10, 32, 32)


@pytest.mark.parametrize(
    "source,size", [((4, 4), (32, 32)), ((7, 7), (224, 224)), ((3, 5), (17, 9)), ((14, 14), (7, 7)), ((1, 1), (4, 4))]
)
def test_upsample_bilinear_equals_interpolate(source, size):
    maps = torch.randn(3, 2, *source)
    expected = F.interpolate(maps, size=size, mode="bilinear", align_corners=False)
    torch.testing.assert_close(upsample_bilinear(maps, size), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(upsample_bilinear(maps[0], size), expected[0], atol=1e-5, rtol=1e-5)  # any leading shape


# --- the contract, for every built-in ------------------------------------------------------
@pytest.mark.parametrize("name", BUILTINS)
def test_output_contract(name, random_model, images):
    explainer = explainkit.get_explainer(name, random_model, layer="layer4", **FAST.get(name, {}))
    maps = explainer(images)
    assert maps.shape == (6, 32, 32) and maps.dtype == torch.float32 and maps.device == images.device
    assert maps.min() >= 0 and maps.max() <= 1
    per_map_max = maps.flatten(1).amax(1)
    assert torch.all((per_map_max == 0) | torch.isclose(per_map_max, torch.tensor(1.0)))
    assert explainer(images, targets="all").shape == (6, 10, 32, 32)


@pytest.mark.parametrize("name", BUILTINS)
def test_topk_maps_are_the_single_target_maps_of_each_rank(name, random_model, images):
    explainer = explainkit.get_explainer(name, random_model, **FAST.get(name, {}))
    result = explainer.explain(images, ("topk", 3))
    assert result.maps.shape == (len(images), 3, *images.shape[-2:])
    assert torch.equal(result.targets, result.logits.topk(3, dim=1).indices)
    for rank in range(3):
        single = explainer(images, targets=result.targets[:, rank])
        torch.testing.assert_close(result.maps[:, rank], single, atol=2e-4, rtol=1e-3)


@pytest.mark.parametrize("name", BUILTINS)
def test_explicit_class_sets_per_image_are_the_single_target_maps(name, random_model, images):
    explainer = explainkit.get_explainer(name, random_model, **FAST.get(name, {}))
    wanted = torch.tensor([[k % 10, (k + 3) % 10] for k in range(len(images))])
    result = explainer.explain(images, wanted)
    assert result.maps.shape == (len(images), 2, *images.shape[-2:]) and torch.equal(result.targets, wanted)
    for column in range(2):
        torch.testing.assert_close(result.maps[:, column], explainer(images, targets=wanted[:, column]), atol=2e-4, rtol=1e-3)


@pytest.mark.parametrize("name", BUILTINS)
def test_model_state_left_as_found(name, random_model, images):
    model = copy.deepcopy(random_model).train()  # training mode, to see it restored
    model.layer2.eval()  # a mixed mode must survive too
    model.fc.weight.requires_grad_(False)
    model.conv1.weight.grad = torch.full_like(model.conv1.weight, 0.25)
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    modes = {n: m.training for n, m in model.named_modules()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}

    explainkit.get_explainer(name, model, layer="layer3", **FAST.get(name, {}))(images, targets="all")

    assert {n: m.training for n, m in model.named_modules()} == modes
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    for key, value in model.named_buffers():
        torch.testing.assert_close(value, buffers[key], msg=key)
    assert torch.equal(model.conv1.weight.grad, torch.full_like(model.conv1.weight, 0.25))
    assert all(p.grad is None for n, p in model.named_parameters() if n != "conv1.weight")
    assert _hooks(model) == 0


@pytest.mark.parametrize("name", BUILTINS)
def test_hooks_removed_when_the_call_raises(name, random_model, images):
    explainer = explainkit.get_explainer(name, random_model, **FAST.get(name, {}))
    with pytest.raises(ExplainkitError):
        explainer(images, targets=[0, 1])  # wrong length
    assert _hooks(random_model) == 0
    with pytest.raises(RuntimeError):
        explainer(torch.randn(2, 5, 32, 32))  # wrong channel count fails inside the model
    assert _hooks(random_model) == 0
    assert not random_model.training


@pytest.mark.parametrize("name", BUILTINS)
def test_works_under_no_grad_and_on_a_frozen_model(name, random_model, images):
    model = copy.deepcopy(random_model).requires_grad_(False)
    explainer = explainkit.get_explainer(name, model, **FAST.get(name, {}))
    with torch.no_grad():
        maps = explainer(images)
        assert not torch.is_grad_enabled()
    assert maps.flatten(1).amax(1).gt(0).any()
    torch.testing.assert_close(
        maps, explainkit.get_explainer(name, random_model, **FAST.get(name, {}))(images), rtol=1e-4, atol=1e-4
    )


@pytest.mark.parametrize("name", BUILTINS)
def test_inference_tensors_as_inputs_are_accepted(name, random_model, images):
    with torch.inference_mode():
        frozen_images = images.clone()
        targets = random_model(frozen_images).argmax(1)
    maps = explainkit.get_explainer(name, random_model, **FAST.get(name, {}))(frozen_images, targets)
    torch.testing.assert_close(
        maps, explainkit.get_explainer(name, random_model, **FAST.get(name, {}))(images, targets.clone()), rtol=1e-4, atol=1e-4
    )


@pytest.mark.parametrize("name", BUILTINS)
def test_inference_mode_is_a_clear_error(name, random_model, images):
    explainer = explainkit.get_explainer(name, random_model, **FAST.get(name, {}))
    with torch.inference_mode(), pytest.raises(ExplainkitError, match="inference_mode"):
        explainer(images)


def test_bad_images_are_rejected(random_model):
    explainer = explainkit.get_explainer("gradcam", random_model)
    with pytest.raises(ExplainkitError, match="N, C, H, W"):
        explainer(torch.zeros(3, 32, 32))
    with pytest.raises(ExplainkitError):
        explainer(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))


def test_evaluation_mode_restores_after_exception(random_model):
    model = copy.deepcopy(random_model).train()
    with pytest.raises(ValueError), evaluation_mode(model):
        assert not model.training
        raise ValueError
    assert all(m.training for m in model.modules())


@pytest.mark.parametrize("name", BUILTINS)
def test_non_finite_images_are_refused_by_name(name, random_model, images):
    explainer = explainkit.get_explainer(name, random_model, layer="layer4", **FAST.get(name, {}))
    spoiled = images.clone()
    spoiled[1, 0, 3, 3] = float("nan")
    spoiled[4, 2, 0, 0] = float("inf")
    with pytest.raises(ExplainkitError, match=r"images 1, 4 \(0-based\) contain NaN or Inf"):
        explainer(spoiled)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_images_of_another_dtype_are_cast_to_the_models(dtype, random_model, images):
    explainer = explainkit.get_explainer("gradcam", random_model, layer="layer4")
    expected = explainer(images.to(dtype).float())  # the same values the cast gives
    maps = explainer(images.to(dtype))
    assert maps.dtype == torch.float32 and torch.isfinite(maps).all()
    torch.testing.assert_close(maps, expected)

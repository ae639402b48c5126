"""FinerCAM: parity with pytorch-grad-cam's FinerCAM (every base weighting), the look-alike target
for every class form in one batched backward, target handling, options, model state."""

from __future__ import annotations

import copy

import pytest
import torch
from pytorch_grad_cam import FinerCAM as PgcFinerCAM
from pytorch_grad_cam import GradCAM as PgcGradCAM
from pytorch_grad_cam import GradCAMElementWise as PgcGradCAMElementWise
from pytorch_grad_cam import GradCAMPlusPlus as PgcGradCAMPlusPlus
from pytorch_grad_cam import HiResCAM as PgcHiResCAM
from pytorch_grad_cam import LayerCAM as PgcLayerCAM
from pytorch_grad_cam import XGradCAM as PgcXGradCAM
from pytorch_grad_cam.utils.model_targets import FinerWeightedTarget

import explainkit.explainers.gradient as gradient_module
from explainkit.errors import ExplainkitError
from explainkit.explainers.finer import BASES, FinerCAM
from explainkit.explainers.gradient import GradCAM
from explainkit.targets import ClassDifference, ClassDifferences, MultiLabel
from tests.conftest import correlation

PGC_BASES = {
    "gradcam": PgcGradCAM,
    "gradcam++": PgcGradCAMPlusPlus,
    "xgradcam": PgcXGradCAM,
    "hirescam": PgcHiResCAM,
    "layercam": PgcLayerCAM,
    "gradcam-elementwise": PgcGradCAMElementWise,
}


def _reference(model, layer_name, images, base="gradcam", **options):
    with PgcFinerCAM(model, [model.get_submodule(layer_name)], base_method=PGC_BASES[base]) as cam:
        return torch.from_numpy(cam(images, **options))


def _assert_close_maps(ours, reference, strict=True):
    informative = reference.flatten(1).std(1) > 1e-4  # an all-zero map has no correlation
    assert informative.sum() >= len(reference) // 2
    corr = correlation(ours, reference)[informative]
    assert corr.min() > 0.99, corr
    if strict:  # stricter than the correlation: the maps agree with pytorch-grad-cam's to ~1e-6
        assert (ours - reference).abs().amax() < 1e-3


@pytest.mark.parametrize("layer_name", ["layer4", "layer3"])
def test_parity_with_pytorch_grad_cam_random_model(layer_name, random_model, images):
    ours = FinerCAM(random_model, layer_name)(images)  # the predicted class against its 3 look-alikes
    _assert_close_maps(ours, _reference(random_model, layer_name, images))


@pytest.mark.parametrize("layer_name", ["layer4", "layer3"])
def test_parity_with_pytorch_grad_cam_trained_model(layer_name, trained_model):
    torch.manual_seed(3)
    images = torch.randn(8, 3, 32, 32) * 0.8
    _assert_close_maps(FinerCAM(trained_model, layer_name)(images), _reference(trained_model, layer_name, images))


@pytest.mark.parametrize("base", sorted(BASES))
def test_every_base_weighting_matches_pytorch_grad_cam(base, random_model, images):
    ours = FinerCAM(random_model, "layer4", base=base)(images, targets=7)
    # explainkit's Grad-CAM++ leaves out pytorch-grad-cam's eps = 1e-6 in the alpha denominator,
    # which matters for gradients this small (Grad-CAM++ itself differs from theirs by ~0.04 here)
    _assert_close_maps(ours, _reference(random_model, "layer4", images, base, target_idx=7), strict=base != "gradcam++")


def test_comparisons_and_alpha_match_pytorch_grad_cam(random_model, images):
    ours = FinerCAM(random_model, "layer3", comparisons=2, alpha=0.5)(images, targets=3)
    reference = _reference(random_model, "layer3", images, alpha=0.5, comparison_categories=[1, 2], target_idx=3)
    _assert_close_maps(ours, reference)


def test_per_image_classes_match_pytorch_grad_cams_finer_targets(random_model, images):
    classes = torch.tensor([0, 1, 2, 3, 4, 5])
    explanation = FinerCAM(random_model, "layer4").explain(images, classes)
    look_alikes = explanation.target.details["comparisons"]  # (N, 3)
    targets = [FinerWeightedTarget(int(c), look_alikes[i].tolist(), 1.0) for i, c in enumerate(classes)]
    with PgcFinerCAM(random_model, [random_model.layer4]) as cam:
        reference = torch.from_numpy(cam(images, targets=targets))
    _assert_close_maps(explanation.maps, reference)
    # the look-alikes are the classes of nearest logits, the class itself excluded
    logits = explanation.logits
    distance = (logits - logits.gather(1, classes[:, None])).abs()
    distance[torch.arange(6), classes] = float("inf")
    expected = distance.argsort(dim=1)[:, :3]
    assert torch.equal(look_alikes.sort(dim=1).values, expected.sort(dim=1).values)


@pytest.mark.parametrize("layer_name", ["layer4", "layer3"])
def test_all_classes_equal_single_class_calls_in_one_batched_backward(layer_name, random_model, images, monkeypatch):
    explainer = FinerCAM(random_model, layer_name)
    calls = []
    original = gradient_module._batched_gradients
    monkeypatch.setattr(gradient_module, "_batched_gradients", lambda *a, **k: calls.append(a[2].shape[0]) or original(*a, **k))
    every = explainer.explain(images, targets="all", normalize=False)
    assert calls == [10]  # every class's column in one backward
    assert every.maps.shape == (6, 10, 32, 32) and every.targets is None
    assert every.target.details["comparisons"].shape == (6, 10, 3)
    for k in (0, 4, 9):
        torch.testing.assert_close(every.maps[:, k], explainer(images, targets=k, normalize=False), rtol=1e-4, atol=1e-6)


def test_topk_and_class_sets_are_the_single_class_maps(random_model, images):
    explainer = FinerCAM(random_model, "layer4", base="layercam")
    top = explainer.explain(images, "topk:3")
    assert torch.equal(top.targets, top.logits.topk(3, dim=1).indices)
    sets = torch.tensor([[k % 10, (k + 5) % 10] for k in range(6)])
    chosen = explainer(images, sets)
    for column in range(3):
        torch.testing.assert_close(top.maps[:, column], explainer(images, top.targets[:, column]), rtol=1e-3, atol=2e-4)
    for column in range(2):
        torch.testing.assert_close(chosen[:, column], explainer(images, sets[:, column]), rtol=1e-3, atol=2e-4)


def test_class_differences_columns_are_finer_weighted_targets_on_hand_logits():
    logits = torch.tensor([[2.0, 1.5, -1.0, 0.9, 3.0], [0.0, 0.1, 0.2, 5.0, -0.3]])
    bound = ClassDifferences("all", comparisons=2, alpha=0.5).bind(logits)
    scores = bound(logits)
    assert scores.shape == (2, 5)
    # class 0 of image 0 (y=2.0): nearest are 1 (1.5) and 4 (3.0)
    p = logits[0].softmax(0)
    expected = (p[1] * (2.0 - 0.5 * 1.5) + p[4] * (2.0 - 0.5 * 3.0)) / (p[1] + p[4] + 1e-9)
    torch.testing.assert_close(scores[0, 0], expected)
    assert set(bound.details["comparisons"][0, 0].tolist()) == {1, 4}
    for image in range(2):
        for k in range(5):
            look_alikes = bound.details["comparisons"][image, k].tolist()
            reference = FinerWeightedTarget(k, look_alikes, 0.5)(logits[image])
            torch.testing.assert_close(scores[image, k], reference)
    # one class per image: the values of ClassDifference
    single = ClassDifferences([4, 3], comparisons=2, alpha=0.5).bind(logits)
    torch.testing.assert_close(single(logits), ClassDifference([4, 3], comparisons=2, alpha=0.5).bind(logits)(logits))
    # a perturbed forward's rows scored against the images they come from
    index = torch.tensor([1, 1, 0])
    rows = logits[index] * 0.5
    perturbed = bound(rows, index)
    for m, image in enumerate(index.tolist()):
        for k in range(5):
            look_alikes = bound.details["comparisons"][image, k].tolist()  # fixed by the unperturbed forward
            torch.testing.assert_close(perturbed[m, k], FinerWeightedTarget(k, look_alikes, 0.5)(rows[m]))


def test_alpha_zero_is_the_base_method_of_the_plain_logit(random_model, images):
    finer = FinerCAM(random_model, "layer4", alpha=0)(images, targets=2)
    torch.testing.assert_close(finer, GradCAM(random_model, "layer4")(images, targets=2), atol=1e-4, rtol=1e-4)
    # and with alpha = 1 the look-alikes change the maps (this test can fail)
    contrasted = FinerCAM(random_model, "layer4")(images, targets=2)
    assert (contrasted - finer).abs().amax() > 0.05


def test_explicit_class_difference_passes_through(random_model, images):
    target = ClassDifference([1, 2, 3, 4, 5, 6], comparisons=1, alpha=2.0)
    ours = FinerCAM(random_model, "layer4", comparisons=3, alpha=1.0)(images, target)  # the target's options win
    torch.testing.assert_close(ours, GradCAM(random_model, "layer4")(images, target))


@pytest.mark.parametrize("target", [MultiLabel(labels=[1, 2]), lambda out: out[:, 0]], ids=["multilabel", "callable"])
def test_targets_that_are_not_classes_are_a_one_line_error(target, random_model, images):
    with pytest.raises(ExplainkitError, match="finercam contrasts classes") as error:
        FinerCAM(random_model)(images, target)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    "options, parameter",
    [({"base": "scorecam"}, "base"), ({"comparisons": 0}, "comparisons"), ({"comparisons": 1.5}, "comparisons"),
     ({"alpha": float("nan")}, "alpha"), ({"alpha": "1"}, "alpha")],
)  # fmt: skip
def test_bad_options_name_the_parameter(options, parameter, random_model):
    with pytest.raises(ExplainkitError, match=f"^{parameter} "):
        FinerCAM(random_model, **options)


def test_a_one_class_model_is_a_clear_error(images):
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 1)
    )
    with pytest.raises(ExplainkitError, match="at least 2 classes"):
        FinerCAM(model.eval(), "0")(images)


def _hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


def test_model_state_left_as_found_also_when_the_call_raises(random_model, images):
    model = copy.deepcopy(random_model).train()
    model.fc.weight.requires_grad_(False)
    model.conv1.weight.grad = torch.full_like(model.conv1.weight, 0.25)
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    explainer = FinerCAM(model, "layer3", base="gradcam++")
    explainer(images, targets="all")
    with pytest.raises(ExplainkitError):
        explainer(images, targets=[0, 1])  # wrong length
    with pytest.raises(ExplainkitError):
        explainer(images, lambda out: out[:, 0])
    assert all(m.training for m in model.modules())
    assert not model.fc.weight.requires_grad and model.conv1.weight.requires_grad
    for key, value in model.named_buffers():
        torch.testing.assert_close(value, buffers[key], msg=key)
    assert torch.equal(model.conv1.weight.grad, torch.full_like(model.conv1.weight, 0.25))
    assert all(p.grad is None for n, p in model.named_parameters() if n != "conv1.weight")
    assert _hooks(model) == 0


def test_works_under_no_grad_on_a_frozen_model(random_model, images):
    frozen = copy.deepcopy(random_model).requires_grad_(False)
    with torch.no_grad():
        maps = FinerCAM(frozen)(images, "topk:2")
    torch.testing.assert_close(maps, FinerCAM(random_model)(images, "topk:2"), rtol=1e-4, atol=1e-4)

"""ShapleyCAM and the ReST target: parity with pytorch-grad-cam's ShapleyCAM (ReST and logit),
the Hessian-vector product by hand and where it vanishes, every column of "all" from one batched
backward, model state."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from pytorch_grad_cam import ShapleyCAM as PgcShapleyCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputReST, ClassifierOutputTarget

from explainkit.errors import ExplainkitError
from explainkit.explainers.gradient import GradCAM, layer_output_as_leaf
from explainkit.explainers.shapley import ShapleyCAM, shapley_gradient
from explainkit.targets import BoundTarget, ClassScores, ResidualSoftmax, Target
from tests.conftest import correlation


def _reference(model, layer_name, images, target_class):
    with PgcShapleyCAM(model, [model.get_submodule(layer_name)]) as cam:
        return torch.from_numpy(cam(images, [target_class(int(t)) for t in targets_of(model, images)]))


def targets_of(model, images):
    with torch.no_grad():
        return model(images).argmax(1)


def _assert_close_maps(ours, reference):
    informative = reference.flatten(1).std(1) > 1e-4  # an all-zero map has no correlation
    assert informative.sum() >= len(reference) // 2
    corr = correlation(ours, reference)[informative]
    assert corr.min() > 0.99, corr
    # Stricter than the correlation: Grad-CAM of the same score already correlates > 0.99 with
    # ShapleyCAM; these maps agree with pytorch-grad-cam's to ~1e-6 (float summation order).
    assert (ours - reference).abs().amax() < 1e-3


@pytest.mark.parametrize("layer_name", ["layer4", "layer3"])
def test_parity_with_pytorch_grad_cam_rest_random_model(layer_name, random_model, images):
    ours = ShapleyCAM(random_model, layer_name)(images)  # ReST of the predicted class
    _assert_close_maps(ours, _reference(random_model, layer_name, images, ClassifierOutputReST))


@pytest.mark.parametrize("layer_name", ["layer4", "layer3"])
def test_parity_with_pytorch_grad_cam_rest_trained_model(layer_name, trained_model):
    torch.manual_seed(3)
    images = torch.randn(8, 3, 32, 32) * 0.8
    ours = ShapleyCAM(trained_model, layer_name)(images)
    _assert_close_maps(ours, _reference(trained_model, layer_name, images, ClassifierOutputReST))


@pytest.mark.parametrize("layer_name", ["layer4", "layer3"])
def test_parity_with_pytorch_grad_cam_logit(layer_name, random_model, images):
    ours = ShapleyCAM(random_model, layer_name, rest=False)(images)
    _assert_close_maps(ours, _reference(random_model, layer_name, images, ClassifierOutputTarget))


# --- the second-order term -----------------------------------------------------------------------


def _leaf_and_scores(model, layer, images, target):
    with layer_output_as_leaf(layer) as captured:
        output = model(images)
        scores = target.bind(output)(output)
    return captured["activations"], scores


@pytest.mark.parametrize("layer_name", ["layer4", "layer3"])
def test_hvp_vanishes_for_a_logit_on_a_relu_network_but_not_for_rest(layer_name, random_model, images):
    layer = random_model.get_submodule(layer_name)
    with torch.enable_grad():
        leaf, logits = _leaf_and_scores(random_model, layer, images, ClassScores(3))
        gradient, hvp = shapley_gradient(logits, leaf)
        assert gradient.abs().amax() > 0
        assert hvp is None or torch.equal(hvp, torch.zeros_like(hvp))  # H = 0 almost everywhere
        leaf, rest = _leaf_and_scores(random_model, layer, images, ResidualSoftmax(3))
        rest_gradient, rest_hvp = shapley_gradient(rest, leaf)
        leaf, other = _leaf_and_scores(random_model, layer, images, ResidualSoftmax(8))
        _, other_hvp = shapley_gradient(other, leaf)
    assert rest_hvp is not None and rest_hvp.abs().amax() > 0.05 * rest_gradient.abs().amax()  # softmax keeps H
    # H = -J^T (diag p - p p^T) J: the same for every class on a piecewise-linear network
    torch.testing.assert_close(rest_hvp, other_hvp, rtol=1e-4, atol=1e-7)
    # so with a logit ShapleyCAM is Grad-CAM, and with ReST it is not Grad-CAM of ReST
    torch.testing.assert_close(
        ShapleyCAM(random_model, layer_name, rest=False)(images, 3), GradCAM(random_model, layer_name)(images, 3)
    )
    plain = GradCAM(random_model, layer_name)(images, ResidualSoftmax(3))
    assert (ShapleyCAM(random_model, layer_name)(images, 3) - plain).abs().amax() > 0.01


class _Square(nn.Module):
    def forward(self, x):
        return x.square()


def _smooth_model(head: nn.Module) -> nn.Module:
    torch.manual_seed(7)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), head, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5)).eval()


def test_a_quadratic_head_halves_the_gradcam_weights():
    """y = W mean(A^2) + b is homogeneous of degree 2 in A, so H A = g (Euler) and g - H A / 2 = g / 2:
    ShapleyCAM's map of a logit is half of Grad-CAM's."""
    model = _smooth_model(_Square())
    images = torch.randn(3, 3, 8, 8)
    ours = ShapleyCAM(model, "0", rest=False).explain(images, 2, normalize=False).maps
    gradcam = GradCAM(model, "0").explain(images, 2, normalize=False).maps
    assert gradcam.abs().amax() > 0
    torch.testing.assert_close(ours, 0.5 * gradcam, rtol=1e-4, atol=1e-6)


def test_rest_on_a_linear_head_is_the_hand_formula():
    """y = W mean(A) + b, s_t = y_t + log p_t: w_c = (2 W_t - W^T p + ½ W^T (diag p - p p^T) W m)_c / hw."""
    model = _smooth_model(nn.Identity())
    images = torch.randn(2, 3, 6, 6)
    explainer = ShapleyCAM(model, "1")  # the Identity: A is the conv's output
    raw = explainer.compute(images, ClassScores([1, 4])).raw  # (N, h, w)
    with torch.no_grad():
        activations = model[0](images)  # (N, C, h, w)
        m = activations.mean(dim=(2, 3))
        W = model[4].weight
        p = model(images).softmax(1)
    hw = activations.shape[2] * activations.shape[3]
    expected = []
    for n, t in enumerate([1, 4]):
        sigma = torch.diag(p[n]) - p[n, :, None] * p[n, None, :]
        gradient = 2 * W[t] - W.T @ p[n]
        weights = (gradient + 0.5 * W.T @ sigma @ W @ m[n]) / hw
        expected.append(torch.einsum("c,chw->hw", weights, activations[n]))
    torch.testing.assert_close(raw, torch.stack(expected), rtol=1e-4, atol=1e-6)


def test_logit_hvp_of_a_smooth_head_is_autograds_hvp():
    model = _smooth_model(nn.GELU())
    images = torch.randn(2, 3, 8, 8)
    with torch.enable_grad():
        leaf, scores = _leaf_and_scores(model, model[0], images, ClassScores(2))
        _, hvp = shapley_gradient(scores, leaf)
    activations = leaf.detach()

    def score(a):
        return model[4](model[3](model[2](model[1](a))))[:, 2].sum()

    _, expected = torch.autograd.functional.hvp(score, activations, activations)
    assert expected.abs().amax() > 0  # GELU is curved: the logit has a second-order term
    torch.testing.assert_close(hvp, expected, rtol=1e-4, atol=1e-7)


# --- several scores per image ------------------------------------------------------------------------


@pytest.mark.parametrize("rest", [True, False])
def test_all_classes_of_a_smooth_head_equal_single_class_calls(rest):
    """The batched path (s - ½ d, one backward over the columns) against one double backward per
    class, on a head where every class has its own Hessian."""
    model = _smooth_model(nn.GELU())
    images = torch.randn(3, 3, 8, 8)
    explainer = ShapleyCAM(model, "0", rest=rest)
    every = explainer(images, "all", normalize=False)
    assert every.shape == (3, 5, 8, 8)
    for k in range(5):
        torch.testing.assert_close(every[:, k], explainer(images, k, normalize=False), rtol=1e-4, atol=1e-6)
    chunked = ShapleyCAM(model, "0", rest=rest, class_chunk=2)(images, "all", normalize=False)
    torch.testing.assert_close(chunked, every, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("layer_name", ["layer4", "layer3"])
def test_all_classes_equal_single_class_calls(layer_name, random_model, images):
    explainer = ShapleyCAM(random_model, layer_name)
    every = explainer.explain(images, targets="all", normalize=False)
    assert every.maps.shape == (6, 10, 32, 32) and every.targets is None
    for k in (0, 4, 9):
        torch.testing.assert_close(every.maps[:, k], explainer(images, targets=k, normalize=False), rtol=1e-4, atol=1e-6)


class _Unbatched(Target):
    """Every class's ReST, declared without a vmap batching rule: the column-by-column path."""

    def bind(self, output):
        bound = ResidualSoftmax("all").bind(output)
        return BoundTarget(bound.score, logits=bound.logits, batched=False)


def test_targets_without_batching_go_column_by_column():
    model = _smooth_model(nn.GELU())
    images = torch.randn(2, 3, 8, 8)
    explainer = ShapleyCAM(model, "0")
    torch.testing.assert_close(explainer(images, _Unbatched()), explainer(images, "all"), rtol=1e-5, atol=1e-6)


def test_topk_and_class_sets_are_the_single_class_maps(random_model, images):
    explainer = ShapleyCAM(random_model, "layer4")
    top = explainer.explain(images, ("topk", 2))
    assert torch.equal(top.targets, top.logits.topk(2, dim=1).indices)
    for rank in range(2):
        torch.testing.assert_close(top.maps[:, rank], explainer(images, top.targets[:, rank]), rtol=1e-3, atol=2e-4)


def test_other_targets_are_differentiated_as_given(random_model, images):
    difference = ShapleyCAM(random_model, "layer4")(images, lambda out: out[:, 0] - out[:, 1])
    assert difference.shape == (6, 32, 32) and torch.isfinite(difference).all()
    # an explicit ReST target is what a class means by default
    torch.testing.assert_close(
        ShapleyCAM(random_model, "layer4")(images, ResidualSoftmax(5)), ShapleyCAM(random_model, "layer4")(images, 5)
    )


# --- the ReST target ---------------------------------------------------------------------------------


def test_rest_scores_are_pytorch_grad_cams_classifier_output_rest():
    torch.manual_seed(0)
    logits = torch.randn(4, 6) * 3
    every = ResidualSoftmax("all").bind(logits)(logits)
    torch.testing.assert_close(every, 2 * logits - logits.logsumexp(1, keepdim=True))
    classes = torch.tensor([0, 5, 2, 2])
    bound = ResidualSoftmax(classes).bind(logits)
    single = bound(logits)
    for n, t in enumerate(classes.tolist()):
        torch.testing.assert_close(single[n], ClassifierOutputReST(t)(logits[n]))
    top = ResidualSoftmax(("topk", 2)).bind(logits)
    assert torch.equal(top.classes, logits.topk(2, dim=1).indices)
    torch.testing.assert_close(top(logits), every.gather(1, top.classes))
    index = torch.tensor([3, 0])  # rows of a perturbed forward, from images 3 and 0
    torch.testing.assert_close(bound(logits[index], index), torch.stack([single[3], single[0]]))


# --- options and state ---------------------------------------------------------------------------------


def test_bad_rest_option_names_the_parameter(random_model):
    with pytest.raises(ExplainkitError, match="^rest "):
        ShapleyCAM(random_model, rest="yes")


def _hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


def test_model_state_left_as_found_also_when_the_call_raises(random_model, images):
    model = copy.deepcopy(random_model).train()
    model.layer2.eval()
    model.fc.weight.requires_grad_(False)
    model.conv1.weight.grad = torch.full_like(model.conv1.weight, 0.25)
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    modes = {n: m.training for n, m in model.named_modules()}
    explainer = ShapleyCAM(model, "layer3")
    explainer(images, targets="all")
    explainer(images, targets=2)
    with pytest.raises(ExplainkitError):
        explainer(images, targets=[0, 1])  # wrong length
    with pytest.raises(RuntimeError):
        explainer(torch.randn(2, 5, 32, 32))  # fails inside the model
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert not model.fc.weight.requires_grad and model.conv1.weight.requires_grad
    for key, value in model.named_buffers():
        torch.testing.assert_close(value, buffers[key], msg=key)
    assert torch.equal(model.conv1.weight.grad, torch.full_like(model.conv1.weight, 0.25))
    assert all(p.grad is None for n, p in model.named_parameters() if n != "conv1.weight")
    assert _hooks(model) == 0


def test_works_under_no_grad_on_a_frozen_model(random_model, images):
    """The double backward records graphs: it must do so also under the caller's no_grad."""
    frozen = copy.deepcopy(random_model).requires_grad_(False)
    with torch.no_grad():
        single = ShapleyCAM(frozen, "layer3")(images)
        every = ShapleyCAM(frozen, "layer3")(images, "all")
        assert not torch.is_grad_enabled()
    torch.testing.assert_close(single, ShapleyCAM(random_model, "layer3")(images), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(every, ShapleyCAM(random_model, "layer3")(images, "all"), rtol=1e-4, atol=1e-4)

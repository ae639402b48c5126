"""Opti-CAM: the authors' loop (ported below) gives the same maps, a model whose optimum is known,
the masked score rises, every target form, options, model state."""

from __future__ import annotations

import copy
import io
import sys
from collections import OrderedDict

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from explainkit.errors import ExplainkitError
from explainkit.explainers.base import normalize_maps
from explainkit.explainers.opticam import OptiCAM
from explainkit.targets import ClassScores
from tests.conftest import correlation


# --- the authors' reference loop ------------------------------------------------------------
def authors_opticam(model, layer, images, labels, max_iter=50, learning_rate=0.1, stop=True):
    """hanwei0912/OptiCAM util.py ``Basic_OptCAM.forward`` (logit_predict, plain loss, max_min),
    restated: ``w = 0.5`` per channel, Adam on ``sum(f(x) - f(x * S))``, a stop when that loss rose
    since the check ``max_iter // 10`` steps before (``stop=False`` leaves it out). Returns the
    (N, 1, H, W) scaled maps."""
    captured = {}
    handle = layer.register_forward_hook(lambda m, i, o: captured.update(a=o.detach()))
    with torch.no_grad():
        model(images)
    handle.remove()
    feature = F.relu(captured["a"])
    w = torch.full((feature.shape[0], feature.shape[1], 1, 1), 0.5, requires_grad=True)
    optimizer = torch.optim.Adam([w], lr=learning_rate)

    def f(x):
        return model(x).gather(1, labels[:, None])[:, 0]

    def combine(w):
        alpha = F.softmax(w, dim=1)
        saliency_map = (alpha * feature).sum(1, keepdim=True)
        saliency_map = F.interpolate(saliency_map, size=images.shape[-2:], mode="bilinear", align_corners=False)
        flat = saliency_map.flatten(1)
        low, high = flat.min(1)[0], flat.max(1)[0]
        norm = (saliency_map - low[:, None, None, None]) / (high - low)[:, None, None, None]
        return norm, norm * images

    with torch.no_grad():
        f_images = f(images)
    prev = 1e10
    for step in range(max_iter):
        norm, new_images = combine(w)
        loss = torch.sum(f_images - f(new_images))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if stop and step % (max_iter // 10) == 0:
            if loss > prev:
                return norm.detach()
            prev = loss
    return combine(w)[0].detach()


@pytest.fixture
def frozen(random_model):
    """The random model with frozen parameters: the reference loop's backward fills no .grad."""
    return copy.deepcopy(random_model).requires_grad_(False)


@pytest.fixture(scope="module")
def small_cnn():
    """A three-convolution random CNN (8x8 maps at its last ReLU, "5"): quick to optimise over."""
    torch.manual_seed(2)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    ).eval().requires_grad_(False)  # fmt: skip


def test_the_first_steps_equal_the_authors_batch_loop(frozen, images):
    """Five steps without the stop, all six images in one batch as the authors run them: the same
    numbers. (Longer runs drift apart on a random model: the authors' own loop on these images
    one by one and as a batch, the same arithmetic but for rounding, correlates at 0.94 per map
    after 50 steps: Adam's first steps move every channel's logit by about lr whatever the size
    of its gradient, so rounding-level gradients of a random model's dead channels take the
    sign of their rounding error. The trained model's run below holds to 50 steps.)"""
    labels = torch.tensor([0, 3, 5, 7, 9, 1])
    ours = OptiCAM(frozen, "layer4", early_stop=False, iterations=5, progress=False)(images, labels)
    reference = authors_opticam(frozen, frozen.layer4, images, labels, max_iter=5, stop=False)[:, 0]
    assert correlation(ours, reference).min() > 0.9999
    torch.testing.assert_close(ours, reference, atol=1e-2, rtol=0)


def test_the_early_stop_is_the_authors_on_a_batch_of_one(small_cnn, images):
    """Ten steps, so a check every step: the stop fires for some images (their maps differ from a
    run without it) and each map is the one the authors' loop returns for that image alone."""
    labels = small_cnn(images).argmax(1)
    ours = OptiCAM(small_cnn, "5", iterations=10, progress=False)(images, labels)
    unstopped = OptiCAM(small_cnn, "5", iterations=10, early_stop=False, progress=False)(images, labels)
    assert (ours - unstopped).flatten(1).abs().amax(1).gt(1e-3).any()  # the stop fired somewhere
    reference = torch.cat([authors_opticam(small_cnn, small_cnn[5], images[i : i + 1], labels[i : i + 1], 10) for i in range(6)])
    assert correlation(ours, reference[:, 0]).min() > 0.999
    torch.testing.assert_close(ours, reference[:, 0], atol=1e-2, rtol=0)


def test_maps_equal_the_authors_loop_on_the_trained_model(trained_model):
    """The default 50 steps with the stop, on the trained CIFAR ResNet18, each image through the
    authors' loop alone (they stop a whole batch at once; per image is their batch of one)."""
    model = copy.deepcopy(trained_model).requires_grad_(False)
    torch.manual_seed(3)
    images = torch.randn(3, 3, 32, 32) * 0.8
    ours = OptiCAM(model, "layer4", progress=False).explain(images)
    reference = torch.cat([authors_opticam(model, model.layer4, images[i : i + 1], ours.targets[i : i + 1]) for i in range(3)])
    corr = correlation(ours.maps, reference[:, 0])
    assert corr.min() > 0.99, corr


# --- a model whose optimum is known ----------------------------------------------------------
class Quadrants(nn.Module):
    """Four channels: the image's pixel sum on one quadrant each, zero elsewhere."""

    def __init__(self, size: int = 8) -> None:
        super().__init__()
        regions = torch.zeros(4, size, size)
        half = size // 2
        for k, (rows, cols) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
            regions[k, rows * half : (rows + 1) * half, cols * half : (cols + 1) * half] = 1
        self.register_buffer("regions", regions)

    def forward(self, x):
        return x.sum(1, keepdim=True) * self.regions


class QuadrantContrast(nn.Module):
    """Class k's logit: the evidence in quadrant k minus the mean evidence in the other three."""

    def forward(self, features):
        evidence = features.mean(dim=(-2, -1)) * 4  # (N, 4): the mean over each quadrant
        return evidence * 4 / 3 - evidence.sum(dim=1, keepdim=True) / 3


def quadrant_model():
    return nn.Sequential(OrderedDict(features=Quadrants(), head=QuadrantContrast())).eval()


@pytest.fixture
def positive_images():
    return torch.rand(3, 2, 8, 8) + 0.5


def masked_scores(model, images, raw, classes):
    """The logits of ``classes`` for the images masked by the min-max scaled, upsampled maps."""
    masks = normalize_maps(F.interpolate(raw[:, None], size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0])
    with torch.no_grad():
        return model(images * masks[:, None]).gather(1, classes[:, None])[:, 0]


def best_scores(model, images, classes):
    """The optimum over Opti-CAM's maps: ``S = x / max x`` on the class's quadrant, 0 elsewhere
    (the weight all on its channel). Any map of the family is below it in the quadrant (its max is
    1 somewhere, its min >= 0) and non-negative outside."""
    regions = model.features.regions[classes]  # (N, 8, 8)
    mass = images.sum(1) * regions
    best = mass / mass.flatten(1).amax(1)[:, None, None]
    with torch.no_grad():
        return model(images * best[:, None]).gather(1, classes[:, None])[:, 0]


def test_the_map_concentrates_on_the_target_quadrant(positive_images):
    model = quadrant_model()
    maps = OptiCAM(model, "features", progress=False)(positive_images, targets="all", normalize=False)  # (3, 4, 8, 8)
    for k, region in enumerate(model.features.regions.bool()):
        share = maps[:, k][:, region].sum(1) / maps[:, k].flatten(1).sum(1)
        assert share.min() > 0.9, (k, share)


def test_the_masked_score_rises_to_the_known_optimum(positive_images):
    model = quadrant_model()
    classes = torch.tensor([0, 2, 3])
    scores = []
    for iterations in (0, 5, 20, 50):
        explainer = OptiCAM(model, "features", iterations=iterations, early_stop=False, progress=False)
        raw = explainer.compute(positive_images, ClassScores(classes)).raw
        scores.append(masked_scores(model, positive_images, raw, classes))
    scores = torch.stack(scores)  # (4 budgets, 3 images)
    assert (scores[1:] > scores[:-1]).all(), scores
    best = best_scores(model, positive_images, classes)
    assert (scores[-1] > 0.95 * best).all() and (scores[-1] <= best + 1e-5).all(), (scores[-1], best)


def test_the_masked_score_rises_on_a_cnn(small_cnn, images):
    classes = small_cnn(images).argmax(1)
    start = OptiCAM(small_cnn, "5", iterations=0, progress=False).compute(images, ClassScores(classes)).raw
    end = OptiCAM(small_cnn, "5", iterations=20, early_stop=False, progress=False).compute(images, ClassScores(classes)).raw
    assert (masked_scores(small_cnn, images, end, classes) > masked_scores(small_cnn, images, start, classes)).all()


# --- targets, chunks, options, state ---------------------------------------------------------
def test_every_column_is_its_own_optimisation_and_chunks_do_not_matter(small_cnn, images):
    images = images[:2]
    explainer = OptiCAM(small_cnn, "5", iterations=10, progress=False)
    every = explainer(images, targets="all")
    assert every.shape == (2, 10, 32, 32)
    for k in (0, 7):
        torch.testing.assert_close(every[:, k], explainer(images, targets=k), atol=1e-4, rtol=1e-3)
    chunked = OptiCAM(small_cnn, "5", iterations=10, batch_size=3, progress=False)(images, targets="all")
    torch.testing.assert_close(chunked, every, atol=1e-4, rtol=1e-3)
    assert correlation(every[0, 0][None], every[0, 7][None]) < 0.999  # classes get different maps
    top = explainer.explain(images, ("topk", 2))
    assert top.maps.shape == (2, 2, 32, 32)
    torch.testing.assert_close(top.maps[:, 1], explainer(images, targets=top.targets[:, 1]), atol=1e-4, rtol=1e-3)
    custom = explainer(images, targets=lambda out: out[:, 1] - out[:, 0])
    assert custom.shape == (2, 32, 32) and custom.flatten(1).amax(1).gt(0).all()


def test_a_constant_target_leaves_the_uniform_start():
    model = quadrant_model()
    images = torch.rand(2, 2, 8, 8) + 0.5
    constant = OptiCAM(model, "features", iterations=5, progress=False)(images, targets=lambda out: torch.zeros(len(out)))
    uniform = OptiCAM(model, "features", iterations=0, progress=False)(images)
    torch.testing.assert_close(constant, uniform)


@pytest.mark.parametrize(
    "options, word",
    [({"iterations": -1}, "iterations"), ({"iterations": 2.5}, "iterations"), ({"lr": 0}, "lr"), ({"lr": "0.1"}, "lr"),
     ({"batch_size": 0}, "batch_size")],
)  # fmt: skip
def test_bad_options_name_the_parameter(random_model, options, word):
    with pytest.raises(ExplainkitError, match=f"^{word} must"):
        OptiCAM(random_model, "layer4", **options)


def test_model_state_left_as_found(random_model, images):
    model = copy.deepcopy(random_model).train()
    model.layer2.eval()
    model.fc.weight.requires_grad_(False)
    model.conv1.weight.grad = torch.full_like(model.conv1.weight, 0.25)
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    modes = {n: m.training for n, m in model.named_modules()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    OptiCAM(model, "layer3", iterations=3, progress=False)(images[:2], targets=("topk", 2))
    with pytest.raises(RuntimeError):
        OptiCAM(model, "layer3", iterations=3, progress=False)(torch.randn(2, 5, 32, 32))  # fails inside the model
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    for key, value in model.named_buffers():
        torch.testing.assert_close(value, buffers[key], msg=key)
    assert torch.equal(model.conv1.weight.grad, torch.full_like(model.conv1.weight, 0.25))
    assert all(p.grad is None for n, p in model.named_parameters() if n != "conv1.weight")
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules()) == 0


def test_works_under_no_grad_and_on_a_frozen_model(random_model, frozen, images):
    explainer = OptiCAM(frozen, "layer4", iterations=5, progress=False)
    with torch.no_grad():
        maps = explainer(images[:2])
        assert not torch.is_grad_enabled()
    expected = OptiCAM(random_model, "layer4", iterations=5, progress=False)(images[:2])
    torch.testing.assert_close(maps, expected, rtol=1e-4, atol=1e-4)


class _Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("progress, terminal, shown", [(True, True, True), (False, True, False), (True, False, False)])
def test_the_progress_bar_shows_only_on_a_terminal_when_asked(monkeypatch, small_cnn, images, progress, terminal, shown):
    stream = _Terminal() if terminal else io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    OptiCAM(small_cnn, "5", iterations=3, progress=progress)(images[:2])
    assert ("opticam" in stream.getvalue()) == shown

"""Score-CAM: parity with pytorch-grad-cam, every class from one set of masked forwards, chunking."""

from __future__ import annotations

import torch
from pytorch_grad_cam import ScoreCAM as PgcScoreCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

import explainkit
from explainkit.explainers.score import ScoreCAM
from tests.conftest import correlation


def test_parity_with_pytorch_grad_cam(random_model):
    images = torch.randn(2, 3, 32, 32)
    ours = ScoreCAM(random_model, "layer3").explain(images)
    with PgcScoreCAM(model=random_model, target_layers=[random_model.layer3]) as cam:
        cam.batch_size = 64
        theirs = torch.from_numpy(cam(input_tensor=images, targets=[ClassifierOutputTarget(int(t)) for t in ours.targets]))
    informative = theirs.flatten(1).std(1) > 1e-4
    assert informative.all()
    assert correlation(ours.maps, theirs).min() > 0.98


def test_all_classes_equal_single_targets_and_chunking_does_not_matter(random_model):
    images = torch.randn(2, 3, 32, 32)
    big, small = ScoreCAM(random_model, "layer4", batch_size=512), ScoreCAM(random_model, "layer4", batch_size=37)
    every = big(images, targets="all")
    assert every.shape == (2, 10, 32, 32)
    for k in (1, 8):
        torch.testing.assert_close(every[:, k], small(images, targets=k), atol=1e-4, rtol=1e-4)


def test_registered_as_a_builtin(random_model):
    assert type(explainkit.get_explainer("scorecam", random_model)) is ScoreCAM


def test_contract_on_one_image(random_model):
    """The base contract, at one image (Score-CAM costs a forward per channel)."""
    import copy

    model = copy.deepcopy(random_model).train()
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    image = torch.randn(1, 3, 32, 32)
    with torch.no_grad():  # callers under no_grad are fine
        maps = ScoreCAM(model, "layer4")(image)
    assert maps.shape == (1, 32, 32) and 0 <= maps.min() and maps.max() <= 1 and torch.isfinite(maps).all()
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(v, buffers[k]) for k, v in model.named_buffers())
    assert all(not m._forward_hooks for m in model.modules())
    assert all(p.grad is None for p in model.parameters())

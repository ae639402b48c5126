"""Ablation-CAM: parity with pytorch-grad-cam, all classes from one set of ablations, the
full-forward fallback agreeing with the cut model, and the contract."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
import torch.nn as nn
from pytorch_grad_cam import AblationCAM as PgcAblationCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

import explainkit
from explainkit.explainers.ablation import AblationCAM
from tests.conftest import correlation


@pytest.mark.parametrize("layer", ["layer4", "layer3"])
def test_parity_with_pytorch_grad_cam(random_model, layer):
    images = torch.randn(2, 3, 32, 32)
    ours = AblationCAM(random_model, layer).explain(images)
    with PgcAblationCAM(model=random_model, target_layers=[random_model.get_submodule(layer)]) as cam:
        cam.batch_size = 128
        theirs = torch.from_numpy(cam(input_tensor=images, targets=[ClassifierOutputTarget(int(t)) for t in ours.targets]))
    assert (theirs.flatten(1).std(1) > 1e-4).all()
    assert correlation(ours.maps, theirs).min() > 0.98


def test_all_classes_equal_single_targets_and_chunking_does_not_matter(random_model):
    images = torch.randn(3, 3, 32, 32)
    big, small = AblationCAM(random_model, "layer4", batch_size=4096), AblationCAM(random_model, "layer4", batch_size=37)
    every = big(images, targets="all")
    assert every.shape == (3, 10, 32, 32)
    for k in (0, 7):
        torch.testing.assert_close(every[:, k], small(images, targets=k), atol=1e-5, rtol=1e-4)


def test_runs_only_the_part_above_the_layer(random_model):
    explainer = AblationCAM(random_model, "layer4")
    assert explainer.split is not None
    calls = []
    handle = random_model.conv1.register_forward_hook(lambda *args: calls.append(1))
    try:
        explainer(torch.randn(2, 3, 32, 32))
    finally:
        handle.remove()
    assert len(calls) == 1  # the unablated forward only, not one per channel


class _SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 6, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


class _Untraceable(_SmallCNN):
    """The same network with data-dependent control flow in its forward (fx cannot trace it)."""

    def forward(self, x):
        if bool(x.abs().sum() >= 0):
            x = self.features(x)
        return self.head(x.mean((2, 3)))


def test_untraceable_model_falls_back_to_full_forwards_with_a_warning_and_the_same_maps():
    torch.manual_seed(0)
    model = _Untraceable().eval()
    images = torch.randn(2, 3, 12, 12)
    fallback = AblationCAM(model, "features")
    assert fallback.split is None and "cannot trace" in fallback.split_problem
    with pytest.warns(RuntimeWarning, match="running the whole model per channel"):
        slow = fallback(images, targets="all")
    traceable = _SmallCNN().eval()
    traceable.load_state_dict(model.state_dict())
    fast = AblationCAM(traceable, "features", batch_size=5)
    assert fast.split is not None
    torch.testing.assert_close(slow, fast(images, targets="all"))
    assert all(not m._forward_hooks for m in model.modules())


def test_negative_outputs_are_ablated_below_the_minimum():
    """A layer that goes negative is ablated far below its minimum (pytorch-grad-cam's rule), not to 0."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Flatten(2), nn.Unflatten(2, (8, 8)))
    model.add_module("pool", nn.AdaptiveAvgPool2d(1))
    model.add_module("flat", nn.Flatten())
    model.add_module("head", nn.Linear(4, 3))
    seen = []
    explainer = AblationCAM(model.eval(), "0")
    original = explainer.split[1].forward

    def spy(layer_output, *side):
        seen.append(layer_output.detach().clone())
        return original(layer_output, *side)

    explainer.split[1].forward = spy  # type: ignore[method-assign]
    explainer(torch.randn(1, 3, 8, 8))
    ablated = seen[1]  # seen[0] is the unablated pass
    assert ablated.amin() < -1e6
    assert (ablated[0, 0] < -1e6).all() and (ablated[0, 1:] > -1e6).all()


def test_threads_equal_serial_calls(random_model):
    explainer = AblationCAM(random_model, "layer4", batch_size=64)
    batches = [torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    serial = [explainer(b) for b in batches]
    results: dict[int, torch.Tensor] = {}
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, explainer(batches[i]))) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for i in range(4):
        torch.testing.assert_close(results[i], serial[i])


def test_registered_as_a_builtin_and_zoo_keeps_pgc_name(random_model):
    assert type(explainkit.get_explainer("ablationcam", random_model)) is AblationCAM
    assert "pgc-ablationcam" in explainkit.list_explainers()


def test_contract_on_a_training_model(random_model):
    model = copy.deepcopy(random_model).train()
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    with torch.no_grad():
        maps = AblationCAM(model, "layer4")(torch.randn(2, 3, 32, 32))
    assert maps.shape == (2, 32, 32) and 0 <= maps.min() and maps.max() <= 1 and torch.isfinite(maps).all()
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(v, buffers[k]) for k, v in model.named_buffers())
    assert all(not m._forward_hooks for m in model.modules())
    assert all(p.grad is None for p in model.parameters())

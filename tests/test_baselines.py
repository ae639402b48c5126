from __future__ import annotations

import torch

from explainkit.evaluation.baselines import make_baseline


def test_shapes_and_contract(random_model, images):
    for name in ("random", "random-pixel", "center"):
        explainer = make_baseline(name, random_model, "layer4")
        maps = explainer(images)
        assert maps.shape == (6, 32, 32) and maps.min() >= 0 and maps.max() <= 1
        assert explainer(images, targets="all").shape == (6, 10, 32, 32)
        assert not any(m._forward_hooks for m in random_model.modules())


def test_random_is_seeded_and_smooth_at_layer_resolution(random_model, images):
    a = make_baseline("random", random_model, "layer4", seed=3)(images)
    b = make_baseline("random", random_model, "layer4", seed=3)(images)
    pixel = make_baseline("random-pixel", random_model, "layer4", seed=3)(images)
    assert torch.equal(a, b)
    neighbour_gap = lambda m: (m[..., 1:] - m[..., :-1]).abs().mean()  # noqa: E731
    assert neighbour_gap(a) < neighbour_gap(pixel) / 3  # contiguous regions, not scattered pixels


def test_center_peaks_in_the_middle(random_model, images):
    maps = make_baseline("center", random_model)(images)
    assert maps[0, 15:17, 15:17].min() > 0.95 and maps[0, 0, 0] < 0.1

"""Cascading randomisation and the Spearman correlation behind it."""

from __future__ import annotations

import torch

import explainkit
from explainkit.evaluation.sanity import cascade_order, cascading_randomization, spearman


def test_spearman_known_values_and_constant_maps():
    a = torch.arange(16.0).view(1, 4, 4)
    corr, constant = spearman(torch.cat([a, a, torch.zeros_like(a)]), torch.cat([a * 3 + 1, -a, a]))
    assert torch.allclose(corr, torch.tensor([1.0, -1.0, 0.0], dtype=torch.float64))
    assert constant == 1


def test_cascade_order_is_output_side_first(random_model):
    assert cascade_order(random_model) == ["fc", "layer4", "layer3", "layer2", "layer1", "bn1", "conv1"]


def test_randomization_leaves_the_model_alone(random_model):
    before = {k: v.clone() for k, v in random_model.state_dict().items()}
    images = torch.randn(4, 3, 32, 32)
    steps = cascading_randomization(
        random_model, lambda m: explainkit.get_explainer("gradcam", m), images, torch.zeros(4, dtype=torch.long)
    )
    assert [s["randomized"] for s in steps][:2] == ["fc", "layer4"]
    for key, value in random_model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_gradcam_decorrelates_once_layer4_is_random(trained_model, cifar_dir):
    from explainkit.data.datasets import load_split

    dataset = load_split("test", trained_model.card, cifar_dir)
    images = torch.stack([dataset[i][0] for i in range(0, 10000, 250)])
    with torch.no_grad():
        targets = trained_model(images).argmax(1)
    steps = cascading_randomization(trained_model, lambda m: explainkit.get_explainer("gradcam", m), images, targets)
    by_layer = {s["randomized"]: s["spearman"] for s in steps}
    assert by_layer["layer4"] < 0.5

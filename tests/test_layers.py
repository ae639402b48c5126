"""Layer lookup and defaults."""

from __future__ import annotations

import pytest
import torch.nn as nn

from explainkit.errors import LayerNotFoundError
from explainkit.layers import default_layer, resolve_layer


def test_default_layer_for_resnet_and_others(random_model):
    assert default_layer(random_model) == "layer4"
    seq = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 5, 3), nn.Flatten())
    assert default_layer(seq) == "2"
    with pytest.raises(LayerNotFoundError):
        default_layer(nn.Sequential(nn.Linear(2, 2)))


def test_resolve_by_name_and_module(random_model):
    assert resolve_layer(random_model, "layer3.1")[1] is random_model.layer3[1]
    assert resolve_layer(random_model, random_model.layer2) == ("layer2", random_model.layer2)
    with pytest.raises(LayerNotFoundError, match="not a submodule"):
        resolve_layer(random_model, nn.Conv2d(1, 1, 1))


def test_unknown_layer_lists_candidates(random_model):
    with pytest.raises(LayerNotFoundError) as info:
        resolve_layer(random_model, "layer5")
    message = str(info.value)
    assert "layer4" in message and "candidate" in message

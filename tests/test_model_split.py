"""A model cut at a layer: below + above equals the whole forward; what cannot be cut says why."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torchvision

from explainkit.models.split import SplitError, split_at_layer


@pytest.mark.parametrize("layer", ["layer4", "layer3", "layer4.1.conv2", "layer2.0", "conv1"])
def test_resnet_halves_compose_to_the_model(random_model, layer):
    images = torch.randn(3, 3, 32, 32)
    below, above = split_at_layer(random_model.eval(), layer)
    output, *side = below(images)
    assert output.shape[0] == 3 and all(value.shape[0] == 3 for value in side)
    torch.testing.assert_close(above(output, *side), random_model(images))
    if layer == "layer4.1.conv2":  # the block's residual input is read above the layer
        assert len(side) == 1


def test_vit_block_norm_reads_the_residual_from_below():
    model = torchvision.models.VisionTransformer(32, 8, 2, 2, 32, 64, num_classes=5).eval()
    images = torch.randn(2, 3, 32, 32)
    below, above = split_at_layer(model, "encoder.layers.encoder_layer_1.ln_1")
    output, *side = below(images)
    assert output.shape == (2, 17, 32) and len(side) == 1
    torch.testing.assert_close(above(output, *side), model(images))


def test_above_runs_only_what_lies_above(random_model):
    """Changing the layer output changes the result; the layers below are not in ``above``."""
    below, above = split_at_layer(random_model.eval(), "layer4")
    assert not any(name.startswith(("conv1", "layer1", "layer2", "layer3")) for name, _ in above.named_modules() if name)
    (output,) = below(torch.randn(1, 3, 32, 32))
    assert not torch.equal(above(output), above(torch.zeros_like(output)))


class _Branching(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        x = self.conv(x)
        if x.sum() > 0:  # data-dependent control flow: fx cannot trace it
            x = x * 2
        return self.head(x.mean((2, 3)))


class _Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = nn.Conv2d(3, 3, 1)
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        return self.head(self.block(self.block(x)).mean((2, 3)))


def test_untraceable_model_is_a_split_error():
    with pytest.raises(SplitError, match="cannot trace _Branching"):
        split_at_layer(_Branching(), "conv")


def test_layer_called_twice_is_a_split_error():
    with pytest.raises(SplitError, match="called 2 times"):
        split_at_layer(_Twice(), "block")

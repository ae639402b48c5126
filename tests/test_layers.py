"""Layer lookup and defaults."""

from __future__ import annotations

import pytest
import torch.nn as nn

from explainkit.errors import LayerNotFoundError
from explainkit.layers import default_layer, resolve_layer


def test_default_layer_for_resnet_and_others(random_model):
    import copy

    plain = copy.deepcopy(random_model)
    del plain.card  # no model card: the family rule
    assert default_layer(plain) == "layer4"
    seq = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 5, 3), nn.Flatten())
    assert default_layer(seq) == "2"
    with pytest.raises(LayerNotFoundError):
        default_layer(nn.Sequential(nn.Linear(2, 2)))


def test_resnet18_cifar_card_gets_its_measured_layer(random_model):
    import copy

    from explainkit.card import ModelCard
    from explainkit.layers import default_layer_and_reason

    carded = copy.deepcopy(random_model)
    carded.card = ModelCard()  # architecture resnet18-cifar
    layer, why = default_layer_and_reason(carded)
    assert layer == "layer3" and "measured" in why
    carded.card = ModelCard(architecture="torchvision:resnet18")
    assert default_layer(carded) == "layer4"


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


def _torchvision(name: str, **kwargs):
    import torchvision

    return torchvision.models.get_model(name, weights=None, num_classes=10, **kwargs)


def _timm(name: str, **kwargs):
    timm = pytest.importorskip("timm")
    return timm.create_model(name, pretrained=False, num_classes=10, **kwargs)


FAMILIES = {  # model -> (its default layer, input size)
    "torchvision vit": (lambda: _torchvision("vit_b_16", image_size=64), "encoder.layers.encoder_layer_11.ln_1", 64),
    "torchvision swin": (lambda: _torchvision("swin_t"), "features", 64),
    "torchvision regnet": (lambda: _torchvision("regnet_y_400mf"), "trunk_output", 64),
    "torchvision efficientnet": (lambda: _torchvision("efficientnet_b0"), "features", 64),
    "torchvision mobilenet": (lambda: _torchvision("mobilenet_v3_small"), "features", 64),
    "torchvision convnext": (lambda: _torchvision("convnext_tiny"), "features", 64),
    "timm vit": (lambda: _timm("vit_tiny_patch16_224", img_size=64), "blocks.11.norm1", 64),
    "timm convnext": (lambda: _timm("convnext_atto"), "stages", 64),
    "timm efficientnet": (lambda: _timm("efficientnet_b0"), "blocks", 64),
    "timm regnet": (lambda: _timm("regnetx_002"), "s4", 64),
    "timm swin": (lambda: _timm("swin_tiny_patch4_window7_224", img_size=64, window_size=2), "layers", 64),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_default_layer_per_family_gives_maps_that_are_not_flat(family):
    """The literature's layer per family (last block's first norm for ViTs, the last stage
    otherwise), and a GradCAM there that varies over the image."""
    import torch

    from explainkit.explainers.gradient import GradCAM
    from explainkit.layers import default_layer_and_reason

    build, expected, size = FAMILIES[family]
    torch.manual_seed(0)
    model = build().eval()
    layer, why = default_layer_and_reason(model)
    assert layer == expected and why
    for head in [m for m in model.modules() if isinstance(m, nn.Linear)][-1:]:  # some libraries zero-init the head
        nn.init.normal_(head.weight, std=0.5)
    maps = GradCAM(model)(torch.randn(2, 3, size, size))
    assert (maps.flatten(1).std(1) > 1e-3).all()

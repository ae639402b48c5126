"""Layer lookup and defaults."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from explainkit.errors import LayerNotFoundError
from explainkit.explainers.gradient import GradCAM
from explainkit.models.layers import LayerTrace, default_layer, default_layer_and_reason, resolve_layer, trace_layers


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

    from explainkit.models.card import ModelCard
    from explainkit.models.layers import default_layer_and_reason

    carded = copy.deepcopy(random_model)
    carded.card = ModelCard()  # architecture resnet18-cifar
    layer, why = default_layer_and_reason(carded)
    assert layer == "layer3" and "measured" in why
    carded.card = ModelCard(architecture="torchvision:resnet18")
    assert default_layer(carded) == "layer4"


class _IteratedBlocks(nn.Module):
    """A container its parent iterates (torchvision MaxViT's ``blocks``): ``blocks`` never runs."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.blocks = nn.ModuleList([nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 6, 3, stride=2, padding=1)])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.head(self.pool(x).flatten(1))


class _Branches(nn.Module):
    """A multi-branch block (Inception): two convolutions concatenated."""

    def __init__(self) -> None:
        super().__init__()
        self.left = nn.Conv2d(4, 2, 1)
        self.right = nn.Conv2d(4, 2, 3, padding=1)

    def forward(self, x):
        return torch.cat([self.left(x), self.right(x)], 1)


class _Inception(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.mixed = _Branches()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.pool(self.mixed(self.stem(x))).flatten(1))


def test_a_container_the_forward_iterates_stands_for_its_last_child():
    model = _IteratedBlocks()
    layer, why = default_layer_and_reason(model)
    assert layer == "blocks.1" and "last stage" in why
    assert not trace_layers(model).ran("blocks") and trace_layers(model).ran("blocks.1")
    maps = GradCAM(model)(torch.randn(2, 3, 16, 16))
    assert maps.shape == (2, 16, 16) and torch.isfinite(maps).all()


def test_a_multi_branch_block_is_the_default_not_one_of_its_branches():
    layer, why = default_layer_and_reason(_Inception())
    assert layer == "mixed" and "feature map" in why  # the old rule took the last Conv2d: mixed.right


def test_pooling_and_attention_internals_are_never_a_default():
    trace = LayerTrace((3, 32, 32), {"a": (1, 8, 4, 4), "b": (1, 4, 50, 16), "c": (1, 8, 1, 1), "d": (1, 8)})
    model = nn.Module()
    assert trace.reading(model, "a") == "nchw"
    assert trace.reading(model, "b") is None  # (1, heads, tokens, dim): not the image's aspect ratio
    assert trace.reading(model, "c") is None and trace.reading(model, "d") is None


def test_the_dry_forward_restores_the_model_and_leaves_no_hook(random_model):
    import copy

    model = copy.deepcopy(random_model).train()
    del model.card
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    assert default_layer(model) == "layer4"
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(b, buffers[name]) for name, b in model.named_buffers())
    assert not any(m._forward_hooks for m in model.modules())
    assert trace_layers(model) is trace_layers(model)  # cached per model and input size


def test_a_model_that_cannot_run_the_dry_forward_falls_back_and_says_so():
    fixed = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 8 * 8, 2))  # 8x8 inputs only
    layer, why = default_layer_and_reason(fixed)
    assert layer == "0" and "not checked" in why and "224" in why
    assert trace_layers(fixed, (3, 8, 8)).error is None


def test_hierarchical_timm_tokens_read_off_feature_info():
    """LeViT's last stage has 16 tokens: 4x4 from the stage's declared reduction (64), not 7 + 3x3."""
    model = _timm("levit_128").eval()
    layer, why = default_layer_and_reason(model)
    assert layer == "stages.2" and "feature_info" in why
    assert trace_layers(model).reading(model, layer) == "tokens: 0 prefix + 4x4 grid"


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
    "timm convnext": (lambda: _timm("convnext_atto"), "stages.3", 64),
    "timm efficientnet": (lambda: _timm("efficientnet_b0"), "blocks.6", 64),
    "timm regnet": (lambda: _timm("regnetx_002"), "s4", 64),
    "timm swin": (lambda: _timm("swin_tiny_patch4_window7_224", img_size=64, window_size=2), "layers.3", 64),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_default_layer_per_family_gives_maps_that_are_not_flat(family):
    """The literature's layer per family (last block's first norm for ViTs, the last stage
    otherwise), and a GradCAM there that varies over the image."""
    import torch

    from explainkit.explainers.gradient import GradCAM
    from explainkit.models.layers import default_layer_and_reason

    build, expected, size = FAMILIES[family]
    torch.manual_seed(0)
    model = build().eval()
    layer, why = default_layer_and_reason(model)
    assert layer == expected and why
    for head in [m for m in model.modules() if isinstance(m, nn.Linear)][-1:]:  # some libraries zero-init the head
        nn.init.normal_(head.weight, std=0.5)
    maps = GradCAM(model)(torch.randn(2, 3, size, size))
    assert (maps.flatten(1).std(1) > 1e-3).all()

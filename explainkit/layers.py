"""Finding the layer a CAM is taken at."""

from __future__ import annotations

import difflib

import torch.nn as nn

from explainkit.errors import LayerNotFoundError

# Names tried in order when no layer is given: the last stage of torchvision's ResNets
# (``layer4``), then the feature extractor of VGG/DenseNet/MobileNet/EfficientNet/ConvNeXt
# (``features``). Other models fall back to their last Conv2d.
DEFAULT_LAYER_NAMES = ("layer4", "features")


def candidate_layers(model: nn.Module) -> list[str]:
    """Dotted names of the submodules that produce feature maps (containers and Conv2d)."""
    names = []
    for name, module in model.named_modules():
        if not name:
            continue
        if isinstance(module, nn.Conv2d) or (len(list(module.children())) > 0 and name.count(".") <= 1):
            names.append(name)
    return names


def _transformer_default(model: nn.Module) -> str | None:
    """ViT-style models: the last block's first norm (its tokens still map to patches)."""
    encoder_layers = getattr(getattr(model, "encoder", None), "layers", None)  # torchvision VisionTransformer
    if isinstance(encoder_layers, nn.Sequential) and len(encoder_layers) and hasattr(encoder_layers[-1], "ln_1"):
        return f"encoder.layers.{list(encoder_layers._modules)[-1]}.ln_1"
    blocks = getattr(model, "blocks", None)  # timm VisionTransformer / DeiT / EVA
    if isinstance(blocks, (nn.Sequential, nn.ModuleList)) and len(blocks) and hasattr(blocks[-1], "norm1"):
        return f"blocks.{len(blocks) - 1}.norm1"
    return None


def default_layer(model: nn.Module) -> str:
    """The layer used when none is given: for ViTs the last block's first norm; ``layer4``
    (ResNets), ``features`` (VGG, DenseNet, MobileNet, EfficientNet, ConvNeXt, Swin), else the
    last Conv2d."""
    transformer = _transformer_default(model)
    if transformer is not None:
        return transformer
    modules = dict(model.named_modules())
    for name in DEFAULT_LAYER_NAMES:
        if name in modules:
            return name
    convs: list[str] = [name for name, module in model.named_modules() if isinstance(module, nn.Conv2d)]
    if not convs:
        raise LayerNotFoundError(
            f"{type(model).__name__} has no Conv2d layer and no {'/'.join(DEFAULT_LAYER_NAMES)}; pass a layer explicitly"
        )
    return convs[-1]


def resolve_layer(model: nn.Module, layer: str | nn.Module | None) -> tuple[str, nn.Module]:
    """Return ``(dotted_name, module)`` for ``layer`` (a dotted path, a submodule, or None)."""
    if layer is None:
        layer = default_layer(model)
    if isinstance(layer, nn.Module):
        for name, module in model.named_modules():
            if module is layer:
                return name or "(model)", module
        raise LayerNotFoundError(f"the given {type(layer).__name__} module is not a submodule of the model")
    if not isinstance(layer, str):
        raise LayerNotFoundError(f"layer must be a dotted path or an nn.Module, not {type(layer).__name__}")
    try:
        return layer, model.get_submodule(layer)
    except AttributeError:
        candidates = candidate_layers(model)
        close = difflib.get_close_matches(layer, candidates, n=3)
        hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
        shown = [c for c in candidates if "." not in c] or candidates
        raise LayerNotFoundError(f"unknown layer {layer!r}{hint}; candidate layers include: {', '.join(shown[:20])}") from None

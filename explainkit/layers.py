"""Finding the layer a CAM is taken at."""

from __future__ import annotations

import difflib

import torch.nn as nn

from explainkit.errors import LayerNotFoundError

# Top-level names tried in order when no layer is given, each the output of a CNN's last stage:
# ResNets (torchvision, timm), torchvision's RegNet, torchvision's VGG/DenseNet/MobileNet/
# EfficientNet/ConvNeXt/Swin, timm's ConvNeXt, timm's Swin (channels-last), timm's
# EfficientNet/MobileNet, timm's RegNet. Other models fall back to their last Conv2d.
DEFAULT_LAYER_NAMES = ("layer4", "trunk_output", "features", "stages", "layers", "blocks", "s4")
# Layers measured to be more faithful than the family rule for one of our architectures (by model
# card): ResNet18-CIFAR's layer3 (8x8) beats layer4 (4x4) on deletion, insertion and both ROAD
# scores with explainkit's evaluate (README, "layer3 or layer4").
ARCHITECTURE_LAYERS = {
    "resnet18-cifar": ("layer3", "measured more faithful than layer4 for ResNet18-CIFAR (deletion, insertion, ROAD)"),
}
# The first norm of a transformer block, by library: torchvision, timm, Hugging Face.
BLOCK_NORMS = ("ln_1", "norm1", "layernorm_before")


def candidate_layers(model: nn.Module) -> list[str]:
    """Dotted names of the submodules that produce feature maps (containers and Conv2d)."""
    names = []
    for name, module in model.named_modules():
        if not name:
            continue
        if isinstance(module, nn.Conv2d) or (len(list(module.children())) > 0 and name.count(".") <= 1):
            names.append(name)
    return names


def _is_hierarchical(model: nn.Module) -> bool:
    """Swin-style models have transformer blocks but stage outputs that are feature maps."""
    return "swin" in type(model).__name__.lower()


def _transformer_default(model: nn.Module) -> str | None:
    """ViT-style models: the last block's first norm (its tokens still map to patches)."""
    if _is_hierarchical(model):
        return None
    last = None
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in BLOCK_NORMS and isinstance(module, nn.LayerNorm):
            last = name
    return last


def _hf_stages(model: nn.Module) -> str | None:
    """Hugging Face CNNs (ResNet, ConvNeXt, RegNet...): the last of ``<base>.encoder.stages``."""
    for name, module in model.named_modules():
        if name.endswith("encoder.stages") and isinstance(module, (nn.ModuleList, nn.Sequential)) and len(module):
            return f"{name}.{len(module) - 1}"
    return None


def default_layer_and_reason(model: nn.Module) -> tuple[str, str]:
    """``(layer, why)``: the layer used when none is given, and the rule that chose it."""
    card = getattr(model, "card", None)  # explainkit's model cards name their architecture
    measured = ARCHITECTURE_LAYERS.get(getattr(card, "architecture", ""))
    if measured is not None and measured[0] in dict(model.named_modules()):
        return measured
    transformer = _transformer_default(model)
    if transformer is not None:
        return transformer, "vision transformer: the last block's first norm (its patch tokens still map to the image)"
    children = dict(model.named_children())
    for name in DEFAULT_LAYER_NAMES:
        if name in children:
            return name, f"the output of the last stage ({name!r})"
    stages = _hf_stages(model)
    if stages is not None:
        return stages, "the output of the last stage (Hugging Face encoder.stages)"
    convs: list[str] = [name for name, module in model.named_modules() if isinstance(module, nn.Conv2d)]
    if not convs:
        raise LayerNotFoundError(
            f"{type(model).__name__} has no Conv2d layer, transformer block or known stage; pass a layer explicitly (--layer)"
        )
    return convs[-1], "the last Conv2d (no known stage or transformer block)"


def default_layer(model: nn.Module) -> str:
    """The layer used when none is given: a layer measured for the model's card architecture
    (ResNet18-CIFAR: ``layer3``); for ViTs the last block's first norm; the last stage of
    ResNets, RegNets, VGG/DenseNet/MobileNet/EfficientNet/ConvNeXt/Swin (torchvision, timm,
    Hugging Face), else the last Conv2d (see :func:`default_layer_and_reason`)."""
    return default_layer_and_reason(model)[0]


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

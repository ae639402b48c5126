"""Layer outputs that are not ``(N, C, h, w)``: token sequences and channels-last stages.

A CAM needs activations and gradients as ``(..., C, h, w)``. Vision transformers give
``(N, L, C)`` token sequences (``P`` prefix tokens: class, distillation, register tokens, then an
``h x w`` patch grid) and Swin-style stages give channels-last ``(N, h, w, C)``. A
:class:`Layout` says how to turn either into channels-first, dropping prefix tokens so their
activations and gradients never enter the map. pytorch-grad-cam asks the user for a
``reshape_transform`` with this knowledge; here it is read off the model where it is declared
(timm's ``num_prefix_tokens``/``patch_embed.grid_size``, torchvision's ViT ``patch_size``, Hugging
Face ``config.patch_size``, the reduction of the stage a layer is in from timm's ``feature_info``) and inferred from the input size otherwise, or given explicitly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from explainkit.errors import LayerNotFoundError

MAX_PREFIX_TOKENS = 8  # class + distillation + up to 6 register tokens when inferring


@dataclass(frozen=True)
class Layout:
    """How a layer's output maps to ``(..., C, h, w)``.

    kind: ``"nchw"`` (as is), ``"nhwc"`` (channels last) or ``"tokens"`` (``(N, L, C)``).
    prefix: tokens before the patch grid (``"tokens"`` only). grid: ``(h, w)`` of the patches.
    """

    kind: str = "nchw"
    prefix: int = 0
    grid: tuple[int, int] | None = None

    def to_channels_first(self, tensor: torch.Tensor) -> torch.Tensor:
        """Apply to activations ``(N, ...)`` or batched gradients ``(K, N, ...)`` alike."""
        if self.kind == "nchw":
            return tensor
        if self.kind == "nhwc":
            return tensor.movedim(-1, -3)
        assert self.grid is not None
        patches = tensor[..., self.prefix :, :]  # (..., h*w, C): prefix tokens dropped
        grid: torch.Tensor = patches.movedim(-1, -2).unflatten(-1, self.grid)
        return grid

    def describe(self) -> str:
        if self.kind == "tokens":
            return f"tokens: {self.prefix} prefix + {self.grid[0]}x{self.grid[1]} grid" if self.grid else "tokens"
        return self.kind


def resolve_layout(
    layout: Layout | None, output: torch.Tensor, images: torch.Tensor, model: nn.Module, layer_name: str
) -> Layout:
    """``layout`` if the user gave one (it always wins), else :func:`infer_layout` for this output."""
    if layout is not None:
        return layout
    return infer_layout(tuple(output.shape), (images.shape[-2], images.shape[-1]), model, layer_name)


def _declared_tokens(model: nn.Module, images_hw: tuple[int, int]) -> tuple[int | None, tuple[int, int] | None]:
    """(prefix tokens, grid) as the model declares them, each None where it does not."""
    prefix: int | None = None
    grid: tuple[int, int] | None = None
    if isinstance(getattr(model, "num_prefix_tokens", None), int):  # timm
        prefix = int(model.num_prefix_tokens)  # type: ignore[arg-type]
    patch_embed = getattr(model, "patch_embed", None)
    declared = getattr(patch_embed, "grid_size", None)
    if declared is not None and len(declared) == 2:
        grid = (int(declared[0]), int(declared[1]))
    patch = getattr(model, "patch_size", None)  # torchvision VisionTransformer
    config = getattr(model, "config", None)  # Hugging Face
    if patch is None and config is not None:
        patch = getattr(config, "patch_size", None)
    if grid is None and isinstance(patch, int) and patch > 0:
        grid = (images_hw[0] // patch, images_hw[1] // patch)
    try:
        import torchvision

        if isinstance(model, torchvision.models.VisionTransformer) and prefix is None:
            prefix = 1  # its class token
    except ImportError:  # pragma: no cover - torchvision is a dependency
        pass
    return prefix, grid


def _stage_grids(model: nn.Module, layer_name: str, images_hw: tuple[int, int]) -> list[tuple[int, int]]:
    """Patch grids for a layer inside a stage that timm declares in ``model.feature_info`` (module
    name and reduction): the input size over the reduction, rounded up (strided convolutions with
    padding) then down (pooling)."""
    info = getattr(model, "feature_info", None)
    if not isinstance(info, list):
        return []
    for entry in info:
        module, reduction = entry.get("module") if isinstance(entry, dict) else None, entry.get("reduction")
        if module and isinstance(reduction, int) and reduction > 0 and (layer_name + ".").startswith(module + "."):
            height, width = images_hw
            return list(
                dict.fromkeys([(-(-height // reduction), -(-width // reduction)), (height // reduction, width // reduction)])
            )
    return []


_OVERRIDE = "pass layout=Layout(kind='tokens', prefix=P, grid=(h, w)) (or kind='nchw'/'nhwc') to the explainer"


def infer_layout(output_shape: tuple[int, ...], images_hw: tuple[int, int], model: nn.Module, layer_name: str) -> Layout:
    """The layout of a layer output of ``output_shape`` for inputs of ``images_hw``: 4-D outputs
    are channels-first or channels-last; token sequences are read from what the model declares
    (the stage's reduction in timm's ``feature_info``, then prefix count and patch grid), else
    inferred from the input's aspect ratio."""
    if len(output_shape) == 4:
        _, a, b, c = output_shape
        if b == c or a != b:  # (N, C, h, w) unless only the middle two match, as in (N, h, w, C)
            return Layout("nchw")
        return Layout("nhwc")
    if len(output_shape) != 3:
        raise LayerNotFoundError(
            f"layer {layer_name!r} outputs shape {output_shape}; a CAM needs (N, C, h, w), (N, h, w, C) or (N, tokens, C)"
        )
    tokens = output_shape[1]
    for stage_grid in _stage_grids(model, layer_name, images_hw):  # hierarchical and hybrid timm models
        extra = tokens - stage_grid[0] * stage_grid[1]
        if 0 <= extra <= MAX_PREFIX_TOKENS:
            return Layout("tokens", extra, stage_grid)
    prefix, grid = _declared_tokens(model, images_hw)
    if grid is not None:
        return _declared_grid_layout(tokens, prefix, grid, layer_name)
    return _inferred_layout(tokens, prefix, images_hw, layer_name)


def _declared_grid_layout(tokens: int, prefix: int | None, grid: tuple[int, int], layer_name: str) -> Layout:
    """Tokens over a patch grid the model declares: patches only (before the prefix tokens are
    added), or the declared (or implied) prefix count before them."""
    patches = grid[0] * grid[1]
    if tokens == patches:
        return Layout("tokens", 0, grid)
    prefix = tokens - patches if prefix is None else prefix
    if prefix < 0 or prefix + patches != tokens:
        raise LayerNotFoundError(
            f"layer {layer_name!r} has {tokens} tokens, not {prefix} prefix + {grid[0]}x{grid[1]} patches as the model "
            f"declares; {_OVERRIDE}"
        )
    return Layout("tokens", prefix, grid)


def _inferred_layout(tokens: int, prefix: int | None, images_hw: tuple[int, int], layer_name: str) -> Layout:
    """Nothing declared: the patch grid has the input's aspect ratio; try each prefix count and
    accept exactly one fit (else :class:`LayerNotFoundError` naming the candidates)."""
    height, width = images_hw
    fits = []
    for count in range(0, min(MAX_PREFIX_TOKENS, tokens - 1) + 1):
        patches = tokens - count
        h = math.isqrt(patches * height // width) if width else 0
        for rows in (h - 1, h, h + 1):
            if rows > 0 and patches % rows == 0 and rows * width == (patches // rows) * height:
                fits.append(Layout("tokens", count, (rows, patches // rows)))
    if prefix is not None:
        fits = [f for f in fits if f.prefix == prefix]
    if len(fits) != 1:
        found = ", ".join(f.describe() for f in fits) or "none"
        raise LayerNotFoundError(
            f"layer {layer_name!r} outputs {tokens} tokens and the model declares no patch grid; candidates: {found}; {_OVERRIDE}"
        )
    return fits[0]

"""A RoIAlign whose backward skips the regions that get no gradient, for explaining detectors.

Why by hand: explaining one detected box differentiates its score, which depends on the one
proposal behind that box, but torchvision's RoIAlign backward loops over every proposal of every
image (150-1,000 per image), zero gradients included. Profiled on Faster R-CNN MobileNetV3-320
(``benchmarks/bench_targets.py``), that was ~70% of the backward of a 4-box explanation. This
backward passes only the rows with a non-zero gradient to torchvision's own kernel: the same
gradients (bit for bit: the skipped rows add nothing), a fraction of the work. The forward is
torchvision's.

:func:`sparse_roi_align_backward` installs it in ``torchvision.ops.poolers`` (what
``MultiScaleRoIAlign`` calls) for the forwards run inside the block; it is reference-counted
under a lock, so threads explaining at once restore torchvision's function exactly once, and
forwards of other threads meanwhile get the same numbers.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Any, Iterator

import torch

_LOCK = threading.Lock()
_STATE: dict[str, Any] = {"users": 0, "original": None}


class _SparseBackwardRoIAlign(torch.autograd.Function):
    @staticmethod
    def forward(ctx, features, rois, spatial_scale, height, width, sampling_ratio, aligned):
        ctx.save_for_backward(rois)
        ctx.meta = (tuple(features.shape), spatial_scale, height, width, sampling_ratio, aligned)
        return torch.ops.torchvision.roi_align(features, rois, spatial_scale, height, width, sampling_ratio, aligned)

    @staticmethod
    def backward(ctx, grad):
        (rois,) = ctx.saved_tensors
        shape, spatial_scale, height, width, sampling_ratio, aligned = ctx.meta
        rows = grad.flatten(1).ne(0).any(dim=1).nonzero().flatten()  # the regions that matter
        features = torch.ops.torchvision._roi_align_backward(
            grad[rows].contiguous(), rois[rows], spatial_scale, height, width, *shape, sampling_ratio, aligned
        )
        return features, None, None, None, None, None, None


def _roi_align(
    input: torch.Tensor,
    boxes: Any,
    output_size: Any,
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
) -> torch.Tensor:
    """``torchvision.ops.roi_align``'s signature, with the sparse backward."""
    from torchvision.ops._utils import convert_boxes_to_roi_format

    rois = boxes if isinstance(boxes, torch.Tensor) else convert_boxes_to_roi_format(boxes)
    height, width = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
    aligned_maps: torch.Tensor = _SparseBackwardRoIAlign.apply(input, rois, spatial_scale, height, width, sampling_ratio, aligned)
    return aligned_maps


@contextmanager
def sparse_roi_align_backward() -> Iterator[None]:
    """Forwards inside the block use the sparse-backward RoIAlign (see the module docstring)."""
    from torchvision.ops import poolers

    with _LOCK:
        if _STATE["users"] == 0:
            _STATE["original"] = poolers.roi_align
            poolers.roi_align = _roi_align
        _STATE["users"] += 1
    try:
        yield
    finally:
        with _LOCK:
            _STATE["users"] -= 1
            if _STATE["users"] == 0:
                poolers.roi_align = _STATE["original"]

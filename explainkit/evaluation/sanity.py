"""Model-parameter randomisation test (Adebayo et al., "Sanity Checks for Saliency Maps", NeurIPS 2018,
https://arxiv.org/abs/1810.03292): randomise the model from the top, cumulatively, and measure how
much the maps change (mean Spearman rank correlation with the trained model's maps)."""

from __future__ import annotations

import copy
from typing import Callable

import torch
import torch.nn as nn
from scipy.stats import rankdata


def cascade_order(model: nn.Module) -> list[str]:
    """Top-level children that hold parameters, output side first (``fc``, ``layer4``, ..., ``conv1``)."""
    return [name for name, child in reversed(list(model.named_children())) if any(True for _ in child.parameters())]


def spearman(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Per-row Spearman correlation of ``(N, ...)`` stacks (average ranks for ties).

    A constant map has no ranking: its correlation counts as 0, and the number of such rows is returned.
    """
    ra = torch.from_numpy(rankdata(a.flatten(1).cpu().numpy(), axis=1)).double()
    rb = torch.from_numpy(rankdata(b.flatten(1).cpu().numpy(), axis=1)).double()
    ra, rb = ra - ra.mean(1, keepdim=True), rb - rb.mean(1, keepdim=True)
    denominator = ra.norm(dim=1) * rb.norm(dim=1)
    constant = denominator == 0
    corr = torch.where(constant, torch.zeros_like(denominator), (ra * rb).sum(1) / torch.where(constant, 1, denominator))
    return corr, int(constant.sum())


def randomize_(module: nn.Module, seed: int) -> None:
    torch.manual_seed(seed)
    for sub in module.modules():
        reset = getattr(sub, "reset_parameters", None)
        if callable(reset):
            reset()


def cascading_randomization(
    model: nn.Module, make_explainer: Callable[[nn.Module], Callable], images: torch.Tensor, targets: torch.Tensor, seed: int = 0
) -> list[dict]:
    """``[{"randomized": name, "spearman": mean, "constant_maps": n}, ...]`` after each cumulative step."""
    reference = make_explainer(model)(images, targets)
    randomized = copy.deepcopy(model)
    results = []
    for step, name in enumerate(cascade_order(randomized)):
        randomize_(randomized.get_submodule(name), seed + step)
        maps = make_explainer(randomized)(images, targets)
        corr, constant = spearman(reference, maps)
        results.append({"randomized": name, "spearman": float(corr.mean()), "constant_maps": constant})
    return results


__all__ = ["cascade_order", "cascading_randomization", "randomize_", "spearman"]

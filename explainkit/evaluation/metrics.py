"""Faithfulness metrics, batched on the device (ROAD's imputation excepted).

All scores are on the softmax probability of the explained class.

* Deletion / insertion AUC — Petsiuk et al., "RISE", BMVC 2018 (https://arxiv.org/abs/1806.07421).
* Average Drop % / Increase in Confidence % — Chattopadhyay et al., "Grad-CAM++", WACV 2018.
* ROAD — Rong et al., "A Consistent and Efficient Evaluation Strategy for Attribution Methods",
  ICML 2022; pytorch-grad-cam's implementation (its noisy linear imputation runs on the CPU).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torchvision.transforms.functional as TF

from explainkit.models.card import ModelCard
from explainkit.models.outputs import LogitsOnly, logits_of

BLUR_KERNEL, BLUR_SIGMA = 11, 5.0
ROAD_PERCENTILES = (10, 20, 30, 40, 50, 60, 70, 80, 90)


def saliency_ranks(maps: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``(N, H, W)`` maps -> ``(N, H*W)`` rank of every pixel, 0 = most salient; ties in a seeded random order."""
    flat = maps.flatten(1)
    shuffle = torch.rand(flat.shape, generator=generator).argsort(dim=1).to(flat.device)
    order_in_shuffle = flat.gather(1, shuffle).argsort(dim=1, descending=True, stable=True)
    order = shuffle.gather(1, order_in_shuffle)  # pixel indices, most salient first
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    return ranks


def _probabilities(model: nn.Module, images: torch.Tensor, targets: torch.Tensor, batch_size: int) -> torch.Tensor:
    out = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            logits = logits_of(model(images[start : start + batch_size])).float()
            out.append(logits.softmax(1).gather(1, targets[start : start + batch_size, None])[:, 0])
    return torch.cat(out)


def perturbation_curve(
    model: nn.Module,
    start: torch.Tensor,
    end: torch.Tensor,
    ranks: torch.Tensor,
    targets: torch.Tensor,
    steps: int,
    batch_size: int = 256,
) -> torch.Tensor:
    """Switch pixels from ``start`` to ``end`` in rank order over ``steps`` equal steps: ``(N, steps+1)`` probabilities."""
    n, c, h, w = start.shape
    counts = torch.linspace(0, h * w, steps + 1).round().long().tolist()
    curve = []
    for count in counts:
        switched = (ranks < count).view(n, 1, h, w)
        curve.append(_probabilities(model, torch.where(switched, end, start), targets, batch_size))
    return torch.stack(curve, dim=1)


def auc(curve: torch.Tensor) -> torch.Tensor:
    """Trapezoid mean of each ``(steps+1)``-point curve over [0, 1]: a value in [0, 1]."""
    return torch.trapezoid(curve, dx=1.0 / (curve.shape[1] - 1), dim=1)


def deletion_insertion(
    model: nn.Module,
    images: torch.Tensor,
    maps: torch.Tensor,
    targets: torch.Tensor,
    steps: int,
    seed: int = 0,
    batch_size: int = 256,
) -> dict[str, torch.Tensor]:
    """Deletion (pixels -> dataset mean, i.e. 0 after normalisation) and insertion (from a blurred copy) curves and AUCs."""
    ranks = saliency_ranks(maps, torch.Generator().manual_seed(seed))
    blurred = TF.gaussian_blur(images, kernel_size=BLUR_KERNEL, sigma=BLUR_SIGMA)
    deletion = perturbation_curve(model, images, torch.zeros_like(images), ranks, targets, steps, batch_size)
    insertion = perturbation_curve(model, blurred, images, ranks, targets, steps, batch_size)
    return {
        "deletion_curve": deletion,
        "insertion_curve": insertion,
        "deletion_auc": auc(deletion),
        "insertion_auc": auc(insertion),
    }


def average_drop_increase(
    model: nn.Module, images: torch.Tensor, maps: torch.Tensor, targets: torch.Tensor, card: ModelCard, batch_size: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image: ``max(0, Y - Y_masked) / Y * 100`` and ``Y_masked > Y``, the input multiplied by the map in pixel space."""
    masked = card.normalize(card.denormalize(images) * maps[:, None])
    original = _probabilities(model, images, targets, batch_size)
    kept = _probabilities(model, masked, targets, batch_size)
    drop = (original - kept).clamp_min(0) / original.clamp_min(1e-12) * 100
    return drop, (kept > original).float() * 100


def road(model: nn.Module, images: torch.Tensor, maps: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ROAD most-relevant-first and least-relevant-first, averaged over percentiles 10..90 (per image).

    The change in the class probability after imputing the removed pixels: MoRF lower is better,
    LeRF higher is better.
    """
    from pytorch_grad_cam.metrics.road import ROADLeastRelevantFirstAverage, ROADMostRelevantFirstAverage
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    wanted = [ClassifierOutputSoftmaxTarget(int(t)) for t in targets.tolist()]
    cams = maps.detach().cpu().numpy().astype(np.float32)
    with torch.no_grad():
        plain = LogitsOnly(model)  # pytorch-grad-cam needs a tensor output
        morf = ROADMostRelevantFirstAverage(list(ROAD_PERCENTILES))(images, cams, wanted, plain)
        lerf = ROADLeastRelevantFirstAverage(list(ROAD_PERCENTILES))(images, cams, wanted, plain)
    return torch.as_tensor(np.asarray(morf)).flatten(), torch.as_tensor(np.asarray(lerf)).flatten()


def bootstrap_ci(values: torch.Tensor, samples: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean, resampling images."""
    values = values.detach().double().cpu()
    if len(values) == 0:
        return float("nan"), float("nan")
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(0, len(values), (samples, len(values)), generator=generator)
    means = values[picks].mean(dim=1)
    alpha = (1 - level) / 2
    return float(means.quantile(alpha)), float(means.quantile(1 - alpha))

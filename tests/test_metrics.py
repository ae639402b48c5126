"""Faithfulness metrics on constructed cases where the right answer is known by hand."""

from __future__ import annotations

import torch
import torch.nn as nn

from explainkit.evaluation import metrics
from explainkit.models.card import ModelCard

H = W = 16
CARD = ModelCard(input_size=[3, H, W])


class EvidenceModel(nn.Module):
    """Class 0's logit grows with the (pixel-space) brightness inside a known region; class 1 is fixed."""

    def __init__(self):
        super().__init__()
        self.mask = torch.zeros(H, W)
        self.mask[4:10, 3:9] = 1

    def forward(self, x):
        pixels = CARD.denormalize(x)
        evidence = (pixels.mean(1) * self.mask).sum((1, 2)) / self.mask.sum()
        return torch.stack([20 * (evidence - 0.6), torch.zeros_like(evidence)], dim=1)


def _images(n=32):
    """Dark images with a bright region where the model looks: blurring or deleting it removes the evidence."""
    torch.manual_seed(0)
    pixels = 0.1 * torch.rand(n, 3, H, W)
    pixels[:, :, 4:10, 3:9] += 0.85
    return CARD.normalize(pixels)


def test_evidence_mask_beats_its_inverse_on_every_metric():
    model, images = EvidenceModel(), _images()
    targets = torch.zeros(len(images), dtype=torch.long)
    good = model.mask.expand(len(images), H, W)
    bad = 1 - good
    g = metrics.deletion_insertion(model, images, good, targets, steps=16)
    b = metrics.deletion_insertion(model, images, bad, targets, steps=16)
    assert g["deletion_auc"].mean() < b["deletion_auc"].mean() - 0.2
    assert g["insertion_auc"].mean() > b["insertion_auc"].mean() + 0.2
    drop_good, _ = metrics.average_drop_increase(model, images, good, targets, CARD)
    drop_bad, _ = metrics.average_drop_increase(model, images, bad, targets, CARD)
    assert drop_good.mean() < 1 and drop_bad.mean() > 50


def test_constant_map_scores_like_random_in_expectation():
    model, images = EvidenceModel(), _images(128)
    targets = torch.zeros(len(images), dtype=torch.long)
    constant = metrics.deletion_insertion(model, images, torch.full((128, H, W), 0.5), targets, steps=16, seed=1)
    random = metrics.deletion_insertion(
        model, images, torch.rand(128, H, W, generator=torch.Generator().manual_seed(2)), targets, steps=16
    )
    assert abs(constant["deletion_auc"].mean() - random["deletion_auc"].mean()) < 0.03
    assert abs(constant["insertion_auc"].mean() - random["insertion_auc"].mean()) < 0.03


def test_ranks_follow_saliency_with_random_ties():
    maps = torch.tensor([[[0.9, 0.1], [0.5, 0.5]]])
    ranks = metrics.saliency_ranks(maps, torch.Generator().manual_seed(0))[0]
    assert ranks[0] == 0 and ranks[1] == 3 and sorted(ranks[2:].tolist()) == [1, 2]
    orders = {tuple(metrics.saliency_ranks(maps, torch.Generator().manual_seed(s))[0].tolist()) for s in range(20)}
    assert len(orders) == 2  # the 0.5 tie is broken both ways, depending on the seed


def test_auc_is_the_trapezoid_mean():
    curve = torch.linspace(1, 0, 9)[None]
    assert torch.isclose(metrics.auc(curve), torch.tensor([0.5])).all()
    assert torch.isclose(metrics.auc(torch.ones(1, 5)), torch.tensor([1.0])).all()


def test_bootstrap_ci():
    values = torch.arange(100, dtype=torch.float32)
    low, high = metrics.bootstrap_ci(values)
    assert low < 49.5 < high and high - low < 20
    assert metrics.bootstrap_ci(torch.full((10,), 3.0)) == (3.0, 3.0)


def test_road_prefers_the_evidence_mask():
    model, images = EvidenceModel(), _images(8)
    targets = torch.zeros(len(images), dtype=torch.long)
    morf_good, lerf_good = metrics.road(model, images, model.mask.expand(8, H, W).contiguous(), targets)
    morf_bad, lerf_bad = metrics.road(model, images, (1 - model.mask).expand(8, H, W).contiguous(), targets)
    assert morf_good.mean() < morf_bad.mean()
    assert lerf_good.mean() > lerf_bad.mean()

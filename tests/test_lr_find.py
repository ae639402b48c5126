from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from explainkit.errors import ExplainkitError
from explainkit.training.lr_find import END_LR, START_LR, find_lr


def _setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 3))
    x = torch.randn(256, 3, 2, 2)
    y = (x.flatten(1).sum(1) > 0).long() + (x[:, 0, 0, 0] > 1).long()
    loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)
    return model, torch.optim.SGD(model.parameters(), lr=0.1), nn.CrossEntropyLoss(), loader


def test_finite_lr_in_range_and_plot_written(tmp_path):
    model, optimizer, criterion, loader = _setup()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lr = find_lr(model, optimizer, criterion, loader, torch.device("cpu"), tmp_path, num_iter=40)
    assert math.isfinite(lr) and START_LR <= lr <= END_LR
    assert (tmp_path / "lr_find.png").stat().st_size > 1000
    for key, value in model.state_dict().items():  # the sweep is undone
        torch.testing.assert_close(value, before[key])


def test_too_few_iterations():
    model, optimizer, criterion, loader = _setup()
    with pytest.raises(ExplainkitError, match="num_iter=5: the LR range test needs at least"):
        find_lr(model, optimizer, criterion, loader, torch.device("cpu"), None, num_iter=5)


def test_the_sweep_starts_at_start_lr_and_picks_from_its_grid(tmp_path, monkeypatch):
    """The course's procedure: from the optimizer's 1e-3 (start_lr) to 10; the pick is one of the sweep's
    LRs ``start * (10 / start) ** (i / (n - 1))``; the course's 1.91e-3 is i = 14 of 200 from 1e-3."""
    from torch_lr_finder import LRFinder

    seen = {}
    real = LRFinder.range_test

    def spy(self, *args, **kwargs):
        real(self, *args, **kwargs)
        seen["lrs"] = list(self.history["lr"])

    monkeypatch.setattr(LRFinder, "range_test", spy)
    model, optimizer, criterion, loader = _setup()
    lr = find_lr(model, optimizer, criterion, loader, torch.device("cpu"), None, num_iter=40, start_lr=1e-3)
    assert seen["lrs"][0] == pytest.approx(1e-3)
    grid = [1e-3 * (END_LR / 1e-3) ** (i / 39) for i in range(40)]
    assert any(lr == pytest.approx(g) for g in grid[10:35])
    assert 1e-3 * (END_LR / 1e-3) ** (14 / 199) == pytest.approx(1.91e-3, rel=2e-3)


def test_start_lr_must_be_below_the_end():
    model, optimizer, criterion, loader = _setup()
    with pytest.raises(ExplainkitError, match="start_lr=20.0: must be positive and below"):
        find_lr(model, optimizer, criterion, loader, torch.device("cpu"), None, num_iter=40, start_lr=20.0)

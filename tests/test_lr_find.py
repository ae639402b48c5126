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

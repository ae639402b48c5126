from __future__ import annotations

import torch

from explainkit.figures import confusion_figure, normalized_confusion, save_figure
from explainkit.training.figures import curves_figure


def test_confusion_rows_sum_to_one():
    confusion = torch.tensor([[5, 1, 0], [0, 0, 0], [2, 2, 4]])
    normalized = normalized_confusion(confusion)
    assert torch.allclose(normalized.sum(1), torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64))
    assert normalized[0, 0] == 5 / 6


def test_figures_render(tmp_path):
    history = [
        {"epoch": e, "train_loss": 1 / e, "test_loss": 1.2 / e, "train_accuracy": 0.1 * e, "test_accuracy": 0.09 * e}
        for e in (1, 2)
    ]
    save_figure(curves_figure(history), tmp_path / "c.png")
    save_figure(confusion_figure(torch.eye(3) * 4, ["a", "b", "c"]), tmp_path / "m.png")
    assert (tmp_path / "c.png").stat().st_size > 1000 and (tmp_path / "m.png").stat().st_size > 1000

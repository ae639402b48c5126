"""Training reports: curves, normalised confusion matrix, misclassified grid, augmented samples."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
from matplotlib.figure import Figure
from torch.utils.data import Dataset, Subset

from explainkit.data.datasets import dataset_size
from explainkit.figures import CELL, confusion_figure, save_figure
from explainkit.models.card import ModelCard


def curves_figure(history: Sequence[dict[str, float]]) -> Figure:
    """2x2: train loss, test loss, train accuracy, test accuracy per epoch."""
    epochs = [row["epoch"] for row in history]
    fig = Figure(figsize=(10, 7))
    axes = fig.subplots(2, 2)
    panels = [
        ("train_loss", "Training loss"),
        ("test_loss", "Test loss"),
        ("train_accuracy", "Training accuracy (%)"),
        ("test_accuracy", "Test accuracy (%)"),
    ]
    for ax, (key, title) in zip(axes.flat, panels):
        values = [row[key] * (100 if "accuracy" in key else 1) for row in history]
        ax.plot(epochs, values, marker="o", markersize=3)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def misclassified_figure(
    model: nn.Module, dataset: Dataset, card: ModelCard, device: torch.device, total_wrong: int, total: int, count: int = 20
) -> Figure:
    """A grid of wrong predictions titled ``Target | Predicted``, with the total count."""
    model.eval()
    wrong: list[tuple[torch.Tensor, int, int]] = []
    batch = 256
    with torch.inference_mode():
        for start in range(0, dataset_size(dataset), batch):
            items = [dataset[i] for i in range(start, min(start + batch, dataset_size(dataset)))]
            images = torch.stack([x for x, _ in items])
            labels = torch.tensor([y for _, y in items])
            predicted = model(images.to(device)).argmax(1).cpu()
            for index in (predicted != labels).nonzero().flatten().tolist():
                wrong.append((images[index], int(labels[index]), int(predicted[index])))
            if len(wrong) >= count:
                break
    wrong = wrong[:count]
    cols = 5
    rows = max(1, (len(wrong) + cols - 1) // cols)
    fig = Figure(figsize=(CELL * cols, CELL * rows + 0.8))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (image, target, predicted) in zip(axes.flat, wrong):
        ax.imshow(card.denormalize(image[None])[0].permute(1, 2, 0).numpy())
        ax.set_title(f"{card.classes[target]} | {card.classes[predicted]}", fontsize=8)
    fig.suptitle(f"Misclassified (Target | Predicted): {total_wrong} of {total} test images", fontsize=10)
    fig.tight_layout()
    return fig


def samples_figure(train_set: Dataset, card: ModelCard, per_class: int = 6) -> Figure:
    """Augmented training images, one row per class."""
    base = train_set.dataset if isinstance(train_set, Subset) else train_set
    indices = train_set.indices if isinstance(train_set, Subset) else range(dataset_size(base))
    targets = getattr(base, "targets", None)
    chosen: dict[int, list[int]] = {k: [] for k in range(len(card.classes))}
    for index in indices:
        label = int(targets[index]) if targets is not None else int(base[index][1])
        if len(chosen[label]) < per_class:
            chosen[label].append(index)
        if all(len(v) == per_class for v in chosen.values()):
            break
    k = len(card.classes)
    fig = Figure(figsize=(CELL * 0.8 * per_class, CELL * 0.8 * k))
    axes = fig.subplots(k, per_class, squeeze=False)
    for label, row in zip(range(k), axes):
        for col, ax in enumerate(row):
            ax.axis("off")
            if col < len(chosen[label]):
                image, _ = base[chosen[label][col]]
                ax.imshow(card.denormalize(image[None])[0].permute(1, 2, 0).numpy())
        row[0].set_title(card.classes[label], fontsize=8, loc="left")
    fig.suptitle("Augmented training samples", fontsize=10)
    fig.tight_layout()
    return fig


def write_reports(
    out: Path,
    history,
    confusion: torch.Tensor,
    model: nn.Module,
    test_set: Dataset,
    train_set: Dataset,
    card: ModelCard,
    device: torch.device,
) -> list[Path]:
    total, wrong = int(confusion.sum()), int(confusion.sum() - confusion.diag().sum())
    return [
        save_figure(curves_figure(history), out / "curves.png"),
        save_figure(confusion_figure(confusion, card.classes), out / "confusion_matrix.png"),
        save_figure(misclassified_figure(model, test_set, card, device, wrong, total), out / "misclassified.png"),
        save_figure(samples_figure(train_set, card), out / "samples.png"),
    ]

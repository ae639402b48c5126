"""Figures: CAM overlays, the per-class grid, the misclassified grid and the method comparison.

Inputs are CPU tensors or arrays: images ``(N, 3, H, W)`` in [0, 1] (already un-normalised)
and maps in [0, 1]. Every figure is saved atomically.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import matplotlib
import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from explainkit.runtime.io import atomic_path

COLORMAP = "inferno"  # perceptually uniform and colour-blind safe (jet is neither)
ALPHA = 0.5
CELL = 1.6  # inches per grid cell


def _hwc(image: torch.Tensor | np.ndarray) -> np.ndarray:
    array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    clipped: np.ndarray = np.clip(array.transpose(1, 2, 0), 0, 1)
    return clipped


def overlay(
    image: torch.Tensor | np.ndarray, cam: torch.Tensor | np.ndarray, alpha: float = ALPHA, colormap: str = COLORMAP
) -> np.ndarray:
    """Blend a ``(3, H, W)`` image in [0, 1] with a ``colormap``-coloured ``(H, W)`` CAM -> ``(H, W, 3)``."""
    cam_array = cam.detach().cpu().numpy() if isinstance(cam, torch.Tensor) else np.asarray(cam)
    heat = matplotlib.colormaps[colormap](np.clip(cam_array, 0, 1))[..., :3]
    blended: np.ndarray = (1 - alpha) * _hwc(image) + alpha * heat
    return blended


def save_figure(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    # A plain Figure (no pyplot): nothing global to close, and no backend switched for the
    # user's session (it renders with its own Agg canvas).
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", dpi=110, bbox_inches="tight")
    return path


def _blank(ax: Axes) -> None:
    ax.set_xticks([])
    ax.set_yticks([])


def per_class_grid(
    images: torch.Tensor,
    maps: torch.Tensor,
    probabilities: torch.Tensor,
    classes: Sequence[str],
    labels: Sequence[str] | None = None,
    title: str = "",
    class_indices: torch.Tensor | None = None,
) -> Figure:
    """One row per image: the image, then its CAM for every class, titled ``class (p)``.

    ``class_indices`` (``(N, J)``, e.g. each image's top-k): the class of each map column, per image.
    """
    n, k = maps.shape[:2]
    fig = Figure(figsize=(CELL * (k + 1), CELL * n + 0.6))
    axes = fig.subplots(n, k + 1, squeeze=False)
    for row in range(n):
        axes[row, 0].imshow(_hwc(images[row]))
        axes[row, 0].set_title(labels[row] if labels else "image", fontsize=8)
        for column in range(k):
            cls = int(class_indices[row, column]) if class_indices is not None else column
            ax = axes[row, column + 1]
            ax.imshow(overlay(images[row], maps[row, column]))
            ax.set_title(f"{classes[cls]} ({float(probabilities[row, cls]):.2f})", fontsize=8)
        for ax in axes[row]:
            _blank(ax)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


@dataclass(frozen=True)
class Misclassified:
    """Misclassified images to draw, row by row: the ``images`` (``(N, 3, H, W)`` in [0, 1]), each
    one's ``(N, H, W)`` map for the class it was ``predicted`` as and for its ``truth``, and the
    ``probability`` of that prediction."""

    images: torch.Tensor
    predicted_maps: torch.Tensor
    true_maps: torch.Tensor
    predicted: Sequence[int]
    truth: Sequence[int]
    probability: Sequence[float]


def misclassified_grid(wrong: Misclassified, classes: Sequence[str], total_wrong: int, scanned: int, title: str = "") -> Figure:
    """Rows of image | CAM for the predicted class | CAM for the true class, under ``title`` and the
    share of misclassified images: ``total_wrong`` of ``scanned`` (the rows may be a sample of them)."""
    n = len(wrong.images)
    rows = max(n, 1)
    fig = Figure(figsize=(CELL * 3.2, CELL * rows + 0.8))
    axes = fig.subplots(rows, 3, squeeze=False)
    for row in range(n):
        pred, true = classes[wrong.predicted[row]], classes[wrong.truth[row]]
        image = wrong.images[row]
        axes[row, 0].imshow(_hwc(image))
        axes[row, 0].set_title(f"pred {pred} ({wrong.probability[row]:.2f}) / true {true}", fontsize=7)
        axes[row, 1].imshow(overlay(image, wrong.predicted_maps[row]))
        axes[row, 1].set_title(f"CAM: {pred}", fontsize=7)
        axes[row, 2].imshow(overlay(image, wrong.true_maps[row]))
        axes[row, 2].set_title(f"CAM: {true}", fontsize=7)
    if n == 0:
        axes[0, 1].text(0.5, 0.5, "no misclassified images", ha="center", va="center")
    for ax in axes.flat:
        _blank(ax)
        if n == 0:
            ax.axis("off")
    header = f"{total_wrong} of {scanned} misclassified ({100 * total_wrong / max(scanned, 1):.2f}%)"
    fig.suptitle(f"{title}\n{header}" if title else header, fontsize=9)
    fig.tight_layout()
    return fig


def methods_grid(
    images: torch.Tensor,
    maps_by_method: Mapping[str, torch.Tensor],
    row_labels: Sequence[str],
    title: str = "",
) -> Figure:
    """Rows = images, columns = the image then one CAM per method, with one shared [0, 1] colour bar."""
    methods = list(maps_by_method)
    n, m = len(images), len(methods)
    fig = Figure(figsize=(CELL * (m + 1) + 0.8, CELL * n + 0.6))
    axes = fig.subplots(n, m + 1, squeeze=False)
    for row in range(n):
        axes[row, 0].imshow(_hwc(images[row]))
        axes[row, 0].set_title(row_labels[row], fontsize=8)
        for col, method in enumerate(methods):
            axes[row, col + 1].imshow(overlay(images[row], maps_by_method[method][row]))
            if row == 0:
                axes[row, col + 1].set_title(method, fontsize=9, fontweight="bold")
        for ax in axes[row]:
            _blank(ax)
    mappable = matplotlib.cm.ScalarMappable(norm=matplotlib.colors.Normalize(0, 1), cmap=COLORMAP)
    fig.colorbar(mappable, ax=axes, fraction=0.03, pad=0.02, label="relevance (per-map [0, 1])")
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def normalized_confusion(confusion: torch.Tensor) -> torch.Tensor:
    """Rows (true classes) scaled to sum to 1; an empty row stays 0."""
    confusion = confusion.double()
    totals = confusion.sum(dim=1, keepdim=True)
    return confusion / torch.where(totals > 0, totals, torch.ones_like(totals))


def confusion_figure(confusion: torch.Tensor, classes: Sequence[str]) -> Figure:
    matrix = normalized_confusion(confusion).numpy()
    k = len(classes)
    fig = Figure(figsize=(0.7 * k + 2, 0.7 * k + 1.5))
    ax = fig.subplots()
    image = ax.imshow(matrix, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(k), classes, rotation=45, ha="right")
    ax.set_yticks(range(k), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if k <= 20:
        for i in range(k):
            for j in range(k):
                ax.text(
                    j,
                    i,
                    f"{matrix[i, j]:.2f}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if matrix[i, j] > 0.5 else "black",
                )
    fig.colorbar(image, ax=ax, fraction=0.046)
    accuracy = float(confusion.diag().sum() / confusion.sum().clamp_min(1))
    ax.set_title(f"Normalised confusion matrix (accuracy {100 * accuracy:.2f}%)")
    fig.tight_layout()
    return fig

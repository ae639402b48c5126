"""Figures for explanation tasks beyond classification: detection, segmentation, multi-label and
similarity.

Inputs are CPU tensors: images ``(N, 3, H, W)`` in [0, 1] (already un-normalised) and maps in
[0, 1]. Every function returns a plain :class:`~matplotlib.figure.Figure` (no pyplot); save it with
:func:`explainkit.figures.save_figure`. Mismatched shapes raise
:class:`~explainkit.errors.ExplainkitError`.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from typing import Mapping, Sequence

import matplotlib
import numpy as np
import torch
from matplotlib import patheffects
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from explainkit.errors import ExplainkitError
from explainkit.figures import _blank, _hwc, overlay

CELL = 2.2  # inches per grid cell: room for a box label
TITLE_ROOM = 0.3  # inches above each row for its titles (tight_layout alone lets them overlap in wide grids)
FONT = 7
OUTLINE = "cyan"  # absent from the inferno colour map, so an outline stays visible on any overlay
_STROKE = [patheffects.withStroke(linewidth=2.5, foreground="black")]


@dataclass(frozen=True)
class Detections:
    """Detected boxes, padded to ``J`` per image: ``boxes`` ``(N, J, 4)`` xyxy in pixels,
    ``labels`` ``(N, J)`` long, ``scores`` ``(N, J)`` float and ``valid`` ``(N, J)`` bool (False
    for padding, which is never drawn)."""

    boxes: torch.Tensor
    labels: torch.Tensor
    scores: torch.Tensor
    valid: torch.Tensor


# --- checks -------------------------------------------------------------------------------------


def _same(where: str, what: str, shapes: Mapping[str, Sequence[int]]) -> None:
    """Raise a one-line :class:`ExplainkitError` unless every shape in ``shapes`` is the same."""
    if len({tuple(shape) for shape in shapes.values()}) > 1:
        listed = ", ".join(f"{name} {tuple(shape)}" for name, shape in shapes.items())
        raise ExplainkitError(f"{where}: {what} disagree: {listed}")


def _check_images(where: str, images: torch.Tensor, maps: torch.Tensor) -> None:
    """``images`` is ``(N, 3, H, W)`` and ``maps`` ends in the same ``(H, W)``."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ExplainkitError(f"{where}: images must be (N, 3, H, W), got {tuple(images.shape)}")
    _same(where, "image and map sizes", {"images": images.shape[-2:], "maps": maps.shape[-2:]})


def _check_per_label(where: str, images: torch.Tensor, maps: torch.Tensor, per_label: Mapping[str, torch.Tensor]) -> None:
    """``images`` ``(N, 3, H, W)``, ``maps`` ``(N, J, H, W)`` and every ``per_label`` tensor ``(N, J)``."""
    _check_images(where, images, maps)
    if maps.ndim != 4:
        raise ExplainkitError(f"{where}: maps must be (N, J, H, W), got {tuple(maps.shape)}")
    _same(where, "first dimensions", _firsts({"images": images, "maps": maps, **per_label}))
    _same(where, "(N, J) shapes", {"maps": maps.shape[:2], **{name: t.shape for name, t in per_label.items()}})


def _firsts(tensors: Mapping[str, torch.Tensor]) -> dict[str, Sequence[int]]:
    return {name: tensor.shape[:1] for name, tensor in tensors.items()}


# --- drawing helpers ----------------------------------------------------------------------------


def _grid(rows: int, columns: int, title: str) -> tuple[Figure, np.ndarray]:
    """A ``rows`` x ``columns`` grid of blank cells (always 2-D, even for one row or column); with
    no rows, one cell that says so."""
    fig = Figure(figsize=(CELL * columns, (CELL + TITLE_ROOM) * max(rows, 1) + (0.4 if title else 0)))
    axes = fig.subplots(max(rows, 1), columns, squeeze=False)
    for ax in axes.flat:
        _blank(ax)
    if rows == 0:
        for ax in axes.flat:
            ax.axis("off")
        axes[0, 0].text(0.5, 0.5, "no images", ha="center", va="center", transform=axes[0, 0].transAxes)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig, axes


def _finish(fig: Figure) -> Figure:
    fig.tight_layout()
    return fig


def _off(ax: Axes) -> None:
    """A cell left empty: no frame, no ticks."""
    ax.axis("off")


def _class_name(classes: Sequence[str], label: int) -> str:
    return classes[label] if 0 <= label < len(classes) else str(label)


def _box_colour(index: int) -> tuple[float, ...]:
    colour: tuple[float, ...] = matplotlib.colormaps["tab10"](index % 10)
    return colour


def _show(ax: Axes, picture: np.ndarray) -> None:
    """``picture`` ``(H, W, 3)`` drawn with pixel-edge coordinates: pixel ``(0, 0)`` spans ``[0, 1]``,
    so xyxy boxes land where they belong."""
    height, width = picture.shape[:2]
    ax.imshow(picture, extent=(0, width, height, 0))


def _draw_box(ax: Axes, box: torch.Tensor, colour: object, text: str | None = None) -> None:
    """Outline ``box`` (xyxy, clipped to the image) and, given ``text``, label it at its top left:
    above the box, or just inside it when the box touches the top of the image."""
    x_max, y_max = ax.get_xlim()[1], ax.get_ylim()[0]
    x0, y0, x1, y1 = (float(v) for v in box)
    x0, x1 = sorted((min(max(x0, 0.0), x_max), min(max(x1, 0.0), x_max)))
    y0, y1 = sorted((min(max(y0, 0.0), y_max), min(max(y1, 0.0), y_max)))
    rect = Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=colour, linewidth=1.6, path_effects=_STROKE)
    ax.add_patch(rect)
    if text is not None:
        inside = y0 < 0.08 * y_max
        ax.text(
            x0,
            y0,
            text,
            fontsize=FONT - 1,
            color="white",
            va="top" if inside else "bottom",
            bbox={"facecolor": colour, "alpha": 0.8, "pad": 1, "edgecolor": "none"},
            clip_on=True,
        )
    ax.set_xlim(0, x_max)
    ax.set_ylim(y_max, 0)


def _outline(ax: Axes, mask: torch.Tensor) -> None:
    """The outline of ``mask`` ``(H, W)`` on a cell drawn by ``imshow``, closed along the image's
    edges (the mask is padded by one empty pixel)."""
    array = mask.detach().cpu().numpy().astype(float)
    if not array.any():
        return
    height, width = array.shape
    padded = np.pad(array, 1)
    ax.contour(np.arange(-1, width + 1), np.arange(-1, height + 1), padded, levels=[0.5], colors=OUTLINE, linewidths=1.5)
    ax.set_xlim(-0.5, width - 0.5)
    ax.set_ylim(height - 0.5, -0.5)


def _ranked(valid: torch.Tensor, values: torch.Tensor) -> list[int]:
    """Indices of the ``valid`` entries of one row, highest ``values`` first."""
    indices = torch.nonzero(valid, as_tuple=False).flatten().tolist()
    return sorted(indices, key=lambda j: -float(values[j]))


# --- detection ----------------------------------------------------------------------------------


def _check_detections(images: torch.Tensor, detections: Detections, maps: torch.Tensor) -> None:
    where = "detection_grid"
    boxes = detections.boxes
    if boxes.ndim != 3 or boxes.shape[-1] != 4:
        raise ExplainkitError(f"{where}: boxes must be (N, J, 4) xyxy, got {tuple(boxes.shape)}")
    per_box = {"boxes": boxes[..., 0], "labels": detections.labels, "scores": detections.scores, "valid": detections.valid}
    _check_per_label(where, images, maps, per_box)


def _detection_row(
    axes: np.ndarray, image: torch.Tensor, detections: Detections, maps: torch.Tensor, classes: Sequence[str]
) -> None:
    """One image's cells: the image with every valid box, then one map per box while cells last."""
    picture = _hwc(image)
    _show(axes[0], picture)
    shown = torch.nonzero(detections.valid, as_tuple=False).flatten().tolist()
    for j in shown:
        name = _class_name(classes, int(detections.labels[j]))
        _draw_box(axes[0], detections.boxes[j], _box_colour(j), f"{name} {float(detections.scores[j]):.2f}")
    extra = max(len(shown) - (len(axes) - 1), 0)
    count = f"{len(shown)} box" if len(shown) == 1 else f"{len(shown)} boxes"
    axes[0].set_title(count + (f" (+{extra} more)" if extra else ""), fontsize=FONT)
    for ax, j in zip(axes[1:], shown):
        _show(ax, overlay(image, maps[j]))
        _draw_box(ax, detections.boxes[j], _box_colour(j))
        name = _class_name(classes, int(detections.labels[j]))
        ax.set_title(f"{name} {float(detections.scores[j]):.2f}", fontsize=FONT)
    for ax in axes[1 + len(shown) :]:
        _off(ax)


def detection_grid(
    images: torch.Tensor,
    detections: Detections,
    maps: torch.Tensor,
    classes: Sequence[str],
    title: str = "",
    *,
    max_boxes: int = 8,
) -> Figure:
    """One row per image: the image with every valid box labelled ``class score``, then the map of
    each valid box (``maps`` ``(N, J, H, W)``) with that box outlined, at most ``max_boxes`` of them
    (the row's first title then says how many more). A label outside ``classes`` shows as its number."""
    _check_detections(images, detections, maps)
    if max_boxes < 1:
        raise ExplainkitError(f"detection_grid: max_boxes must be at least 1, got {max_boxes}")
    n = len(images)
    most = int(detections.valid.sum(dim=1).max()) if n else 0
    fig, axes = _grid(n, 1 + min(most, max_boxes), title)
    for i in range(n):
        row = Detections(detections.boxes[i], detections.labels[i], detections.scores[i], detections.valid[i])
        _detection_row(axes[i], images[i], row, maps[i], classes)
    return _finish(fig)


# --- segmentation -------------------------------------------------------------------------------


def segmentation_grid(images: torch.Tensor, masks: torch.Tensor, maps: torch.Tensor, class_name: str, title: str = "") -> Figure:
    """One row per image: the image with the explained region (``masks`` ``(N, H, W)`` bool)
    outlined, then its map (``(N, H, W)``) with the same outline."""
    where = "segmentation_grid"
    _check_images(where, images, maps)
    _same(where, "first dimensions", _firsts({"images": images, "masks": masks, "maps": maps}))
    _same(where, "mask and map shapes", {"masks": masks.shape, "maps": maps.shape})
    n = len(images)
    fig, axes = _grid(n, 2, title)
    for i in range(n):
        axes[i, 0].imshow(_hwc(images[i]))
        axes[i, 1].imshow(overlay(images[i], maps[i]))
        for ax in axes[i]:
            _outline(ax, masks[i])
    if n:
        axes[0, 0].set_title(f"region: {class_name}", fontsize=FONT + 1)
        axes[0, 1].set_title("map", fontsize=FONT + 1)
    return _finish(fig)


# --- multi-label --------------------------------------------------------------------------------


def _top_labels(names: Sequence[str], shown: int = 3) -> str:
    """Up to ``shown`` names, wrapped to fit a cell's title, and how many more there are."""
    text = ", ".join(names[:shown]) if names else "no labels"
    if len(names) > shown:
        text += f" +{len(names) - shown}"
    return textwrap.fill(text, width=30, max_lines=2, placeholder=" ...")


def multilabel_grid(
    images: torch.Tensor,
    labels: torch.Tensor,
    probabilities: torch.Tensor,
    valid: torch.Tensor,
    maps: torch.Tensor,
    classes: Sequence[str],
    title: str = "",
    *,
    max_labels: int = 8,
) -> Figure:
    """One row per image: the image titled with its top labels, then the map of each valid label
    (``maps`` ``(N, J, H, W)``), most probable first, titled ``name p=probability``; at most
    ``max_labels`` maps a row."""
    where = "multilabel_grid"
    _check_per_label(where, images, maps, {"labels": labels, "probabilities": probabilities, "valid": valid})
    if max_labels < 1:
        raise ExplainkitError(f"{where}: max_labels must be at least 1, got {max_labels}")
    n = len(images)
    most = int(valid.sum(dim=1).max()) if n else 0
    fig, axes = _grid(n, 1 + min(most, max_labels), title)
    for i in range(n):
        order = _ranked(valid[i], probabilities[i])
        names = [_class_name(classes, int(labels[i, j])) for j in order]
        axes[i, 0].imshow(_hwc(images[i]))
        axes[i, 0].set_title(_top_labels(names), fontsize=FONT)
        for ax, j, name in zip(axes[i, 1:], order, names):
            ax.imshow(overlay(images[i], maps[i, j]))
            ax.set_title(f"{name} p={float(probabilities[i, j]):.2f}", fontsize=FONT)
        for ax in axes[i, 1 + len(order) :]:
            _off(ax)
    return _finish(fig)


# --- similarity ---------------------------------------------------------------------------------


def similarity_grid(
    reference: torch.Tensor, images: torch.Tensor, similarities: torch.Tensor, maps: torch.Tensor, title: str = ""
) -> Figure:
    """One row per query image: the ``reference`` ``(3, H, W)`` (first row only), the query, and its
    map (``maps`` ``(N, H, W)``) titled with its cosine similarity to the reference."""
    where = "similarity_grid"
    _check_images(where, images, maps)
    _same(where, "first dimensions", _firsts({"images": images, "similarities": similarities, "maps": maps}))
    _same(where, "image shapes", {"reference": reference.shape, "each image": images.shape[1:]})
    if maps.ndim != 3:
        raise ExplainkitError(f"{where}: maps must be (N, H, W), got {tuple(maps.shape)}")
    n = len(images)
    fig, axes = _grid(n, 3, title)
    if n:
        axes[0, 0].imshow(_hwc(reference))
        axes[0, 0].set_title("reference", fontsize=FONT + 1)
    for i in range(n):
        axes[i, 1].imshow(_hwc(images[i]))
        axes[i, 1].set_title(f"query {i}", fontsize=FONT + 1)
        axes[i, 2].imshow(overlay(images[i], maps[i]))
        axes[i, 2].set_title(f"cos={float(similarities[i]):.3f}", fontsize=FONT + 1)
        if i:
            _off(axes[i, 0])
    return _finish(fig)

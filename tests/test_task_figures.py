"""Task figures (detection, segmentation, multi-label, similarity) render, leave padding blank, and
refuse mismatched shapes with a one-line error."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from PIL import Image

from explainkit.errors import ExplainkitError
from explainkit.figures import save_figure
from explainkit.task_figures import Detections, detection_grid, multilabel_grid, segmentation_grid, similarity_grid

CLASSES = ["cat", "dog", "car"]
SIZE = 32


def _images(n: int) -> torch.Tensor:
    return torch.rand(n, 3, SIZE, SIZE)


def _shown(ax: Axes) -> bool:
    """A cell with something drawn in it (a blank padding cell is switched off and empty)."""
    return ax.axison and bool(ax.images)


def _boxes(ax: Axes) -> int:
    return sum(isinstance(patch, Rectangle) for patch in ax.patches)


def _saved(fig: Figure, path) -> None:
    save_figure(fig, path)
    with Image.open(path) as image:
        assert image.size[0] > 100 and image.size[1] > 100
        pixels = np.asarray(image.convert("RGB")).reshape(-1, 3)
        assert len(np.unique(pixels, axis=0)) > 50  # not a blank canvas


def _detections(valid: list[list[bool]]) -> Detections:
    mask = torch.tensor(valid)
    n, j = mask.shape
    corner = torch.randint(0, SIZE // 2, (n, j, 2)).float()
    boxes = torch.cat([corner, corner + torch.randint(4, SIZE // 2, (n, j, 2)).float()], dim=-1)
    return Detections(boxes, torch.randint(0, len(CLASSES), (n, j)), torch.rand(n, j), mask)


def test_detection_grid_draws_valid_boxes_only(tmp_path):
    detections = _detections([[True, False], [True, True]])
    fig = detection_grid(_images(2), detections, torch.rand(2, 2, SIZE, SIZE), CLASSES, title="detections")
    _saved(fig, tmp_path / "detection.png")
    axes = fig.axes  # row-major, 3 columns: the image and the 2 boxes of the busiest row
    assert len(axes) == 6
    assert [_shown(ax) for ax in axes] == [True, True, False, True, True, True]
    assert _boxes(axes[0]) == 1 and _boxes(axes[3]) == 2
    assert _boxes(axes[1]) == 1 and _boxes(axes[2]) == 0
    assert axes[0].get_title() == "1 box" and axes[3].get_title() == "2 boxes"


def test_detection_grid_one_image_one_box():
    detections = _detections([[True, False]])
    fig = detection_grid(_images(1), detections, torch.rand(1, 2, SIZE, SIZE), CLASSES)
    assert [_shown(ax) for ax in fig.axes] == [True, True]
    assert _boxes(fig.axes[0]) == 1
    name = CLASSES[int(detections.labels[0, 0])]
    assert fig.axes[1].get_title() == f"{name} {float(detections.scores[0, 0]):.2f}"


def test_detection_grid_caps_columns_and_names_unknown_labels():
    detections = _detections([[True, True, True]])
    detections = Detections(detections.boxes, torch.tensor([[0, 99, 1]]), detections.scores, detections.valid)
    fig = detection_grid(_images(1), detections, torch.rand(1, 3, SIZE, SIZE), CLASSES, max_boxes=2)
    assert len(fig.axes) == 3
    assert fig.axes[0].get_title() == "3 boxes (+1 more)"
    assert _boxes(fig.axes[0]) == 3  # every valid box is drawn on the image; only the maps are capped
    assert fig.axes[2].get_title().startswith("99 ")


def test_detection_grid_keeps_boxes_on_the_image():
    boxes = torch.tensor([[[-10.0, -5.0, 50.0, 20.0]]])
    detections = Detections(boxes, torch.tensor([[0]]), torch.tensor([[0.9]]), torch.tensor([[True]]))
    ax = detection_grid(_images(1), detections, torch.rand(1, 1, SIZE, SIZE), CLASSES).axes[0]
    rect = next(patch for patch in ax.patches if isinstance(patch, Rectangle))
    assert rect.get_xy() == (0.0, 0.0) and rect.get_width() == SIZE and rect.get_height() == 20
    assert ax.get_xlim() == (0, SIZE) and ax.get_ylim() == (SIZE, 0)


def test_segmentation_grid_outlines_the_region(tmp_path):
    masks = torch.zeros(2, SIZE, SIZE, dtype=torch.bool)
    masks[0, 8:20, 4:28] = True  # row 1 has an empty region: nothing to outline
    fig = segmentation_grid(_images(2), masks, torch.rand(2, SIZE, SIZE), "dog", title="segmentation")
    _saved(fig, tmp_path / "segmentation.png")
    assert all(_shown(ax) for ax in fig.axes)
    assert [bool(ax.collections) for ax in fig.axes] == [True, True, False, False]
    assert [ax.get_title() for ax in fig.axes[:2]] == ["region: dog", "map"]


def test_segmentation_grid_one_image():
    masks = torch.ones(1, SIZE, SIZE, dtype=torch.bool)  # touches every edge: the outline still closes
    fig = segmentation_grid(_images(1), masks, torch.rand(1, SIZE, SIZE), "car")
    assert len(fig.axes) == 2 and all(ax.collections for ax in fig.axes)


def test_multilabel_grid_one_map_per_valid_label(tmp_path):
    labels = torch.tensor([[0, 1, 2], [2, 0, 1]])
    probabilities = torch.tensor([[0.3, 0.9, 0.5], [0.8, 0.1, 0.1]])
    valid = torch.tensor([[True, True, False], [True, False, False]])
    fig = multilabel_grid(_images(2), labels, probabilities, valid, torch.rand(2, 3, SIZE, SIZE), CLASSES, title="tags")
    _saved(fig, tmp_path / "multilabel.png")
    assert [_shown(ax) for ax in fig.axes] == [True, True, True, True, True, False]
    assert [ax.get_title() for ax in fig.axes[:3]] == ["dog, cat", "dog p=0.90", "cat p=0.30"]
    assert fig.axes[4].get_title() == "car p=0.80"


def test_multilabel_grid_one_label():
    one = torch.ones(1, 1)
    fig = multilabel_grid(_images(1), one.long(), one, one.bool(), torch.rand(1, 1, SIZE, SIZE), CLASSES)
    assert [ax.get_title() for ax in fig.axes] == ["dog", "dog p=1.00"]


def test_similarity_grid_shows_the_reference_once(tmp_path):
    similarities = torch.tensor([0.91234, -0.2])
    fig = similarity_grid(torch.rand(3, SIZE, SIZE), _images(2), similarities, torch.rand(2, SIZE, SIZE), title="sim")
    _saved(fig, tmp_path / "similarity.png")
    assert [_shown(ax) for ax in fig.axes] == [True, True, True, False, True, True]
    assert [fig.axes[i].get_title() for i in (0, 2, 5)] == ["reference", "cos=0.912", "cos=-0.200"]


def test_similarity_grid_one_query():
    fig = similarity_grid(torch.rand(3, SIZE, SIZE), _images(1), torch.tensor([0.5]), torch.rand(1, SIZE, SIZE))
    assert len(fig.axes) == 3 and all(_shown(ax) for ax in fig.axes)


@pytest.mark.parametrize(
    "draw",
    [
        lambda: detection_grid(_images(2), _detections([[True]]), torch.rand(1, 1, SIZE, SIZE), CLASSES),
        lambda: detection_grid(_images(1), _detections([[True, True]]), torch.rand(1, 3, SIZE, SIZE), CLASSES),
        lambda: detection_grid(_images(1), _detections([[True]]), torch.rand(1, 1, 8, 8), CLASSES),
        lambda: segmentation_grid(_images(2), torch.ones(3, SIZE, SIZE).bool(), torch.rand(2, SIZE, SIZE), "dog"),
        lambda: segmentation_grid(_images(2), torch.ones(2, SIZE, SIZE).bool(), torch.rand(1, SIZE, SIZE), "dog"),
        lambda: multilabel_grid(
            _images(2), torch.zeros(1, 2).long(), torch.rand(1, 2), torch.ones(1, 2).bool(), torch.rand(1, 2, SIZE, SIZE), CLASSES
        ),
        lambda: similarity_grid(torch.rand(3, SIZE, SIZE), _images(2), torch.rand(3), torch.rand(2, SIZE, SIZE)),
        lambda: similarity_grid(torch.rand(3, 16, 16), _images(2), torch.rand(2), torch.rand(2, SIZE, SIZE)),
    ],
)
def test_mismatched_shapes_raise_one_line_errors(draw):
    with pytest.raises(ExplainkitError) as error:
        draw()
    assert "\n" not in str(error.value)

"""Figures render, are saved atomically, and overlays blend as documented."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from explainkit import figures

CLASSES = [f"c{i}" for i in range(4)]


def test_overlay_blends_image_and_heat():
    image = torch.zeros(3, 8, 8)
    cam = torch.zeros(8, 8)
    cam[0, 0] = 1
    blended = figures.overlay(image, cam)
    assert blended.shape == (8, 8, 3) and blended.min() >= 0 and blended.max() <= 1
    assert not np.allclose(blended[0, 0], blended[7, 7])  # hot vs cold colour


def test_grids_write_pngs(tmp_path):
    images, maps = torch.rand(2, 3, 16, 16), torch.rand(2, 4, 16, 16)
    probs = torch.softmax(torch.randn(2, 4), 1)
    paths = [
        figures.save_figure(figures.per_class_grid(images, maps, probs, CLASSES), tmp_path / "a.png"),
        figures.save_figure(
            figures.misclassified_grid(
                figures.Misclassified(images, maps[:, 0], maps[:, 1], [0, 1], [2, 3], [0.9, 0.5]), CLASSES, 7, 100
            ),
            tmp_path / "b.png",
        ),
        figures.save_figure(
            figures.misclassified_grid(
                figures.Misclassified(torch.empty(0), torch.empty(0), torch.empty(0), [], [], []), CLASSES, 0, 10
            ),
            tmp_path / "c.png",
        ),
        figures.save_figure(figures.methods_grid(images, {"m1": maps[:, 0], "m2": maps[:, 1]}, ["x", "y"]), tmp_path / "d.png"),
    ]
    for path in paths:
        with Image.open(path) as image:
            assert image.size[0] > 100 and image.size[1] > 50
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b.png", "c.png", "d.png"]


def test_importing_explainkit_leaves_matplotlib_alone():
    """No global backend switch and no pyplot state for a notebook user who merely imports us."""
    import subprocess
    import sys

    code = (
        "import sys, matplotlib; matplotlib.use('svg'); "
        "import explainkit, explainkit.figures, explainkit.jobs.explain, explainkit.training.figures, explainkit.evaluation.run; "
        "assert matplotlib.get_backend() == 'svg', matplotlib.get_backend(); "
        "assert 'matplotlib.pyplot' not in sys.modules"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]

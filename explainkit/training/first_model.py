"""A model for ``explain`` on a machine whose model store is empty: train one, say so."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from explainkit.models.store import models_dir
from explainkit.runtime.io import ensure_writable_dir
from explainkit.training.recipes import resolve_recipe

STORE_FOLDER = "resnet18-cifar10"  # train's default --out inside the store


def train_first_model(device: torch.device, store: str | Path | None = None, data_dir: str | Path | None = None) -> Path:
    """Train ``quick`` (CPU, minutes) or ``default`` (GPU) into the store; return the weights' path."""
    from explainkit.training.trainer import TrainConfig, train

    recipe_name = "default" if device.type == "cuda" else "quick"
    out = ensure_writable_dir(models_dir(store) / STORE_FOLDER)
    if recipe_name == "quick":
        print(
            f"explainkit: no model in {out.parent}/; training one with the 'quick' CPU recipe (a few minutes, modest accuracy). "
            "The full recipe needs a GPU: python -m explainkit train --recipe default"
            + (f" --data-dir {data_dir}" if data_dir else "")
            + ". Pass --no-train to stop here instead.",
            file=sys.stderr,
        )
    else:
        print(f"explainkit: no model in {out.parent}/; training one first", file=sys.stderr)
    result = train(resolve_recipe(recipe_name), TrainConfig(out, data_dir=data_dir, device=device))
    print(f"test accuracy {100 * result.test_accuracy:.2f}% after {len(result.history)} epochs", file=sys.stderr)
    return result.model_path

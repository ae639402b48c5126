"""The LR range test (Smith 2017), through torch-lr-finder: exponential sweep, steepest-gradient pick.

The course ran ``LRFinder(model, Adam(lr=1e-3, weight_decay=1e-4), cross_entropy).range_test(
train_loader, end_lr=10, num_iter=200, step_mode="exp")`` then ``plot()``'s suggestion: with no
``start_lr`` torch-lr-finder starts from the optimizer's LR, 1e-3; the loss is smoothed with
``smooth_f=0.05`` and the sweep stops once it exceeds 5x its best; the suggestion is the steepest
gradient of the smoothed loss after dropping the first 10 and last 5 points. Its 1.91e-3 is the
sweep's 15th LR, ``1e-3 * 1e4 ** (14 / 199)``: right after the skipped start, where a fresh network
trained at 1e-3 loses loss fastest. From 1e-7 the first ~60 batches barely train and the steepest
drop comes later, at a few 1e-4 (our earlier 5.2e-4 and 2.6e-4). ``start_lr`` reproduces either.
"""

from __future__ import annotations

import contextlib
import io
import math
from pathlib import Path
from typing import Iterable

import torch
import torch.nn as nn
from matplotlib.figure import Figure
from torch.utils.data import DataLoader
from torch_lr_finder import LRFinder
from torch_lr_finder.lr_finder import TrainDataLoaderIter

from explainkit.errors import ExplainkitError
from explainkit.figures import save_figure

START_LR = 1e-7
END_LR = 10.0
SKIP_START, SKIP_END = 10, 5


def find_lr(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    criterion: nn.Module,
    loader: DataLoader | Iterable,
    device: torch.device,
    out: Path | None = None,
    num_iter: int = 100,
    start_lr: float = START_LR,
) -> float:
    """Sweep the LR from ``start_lr`` to 10 over ``num_iter`` batches; return the steepest-gradient LR
    (every parameter group sweeps alike; the groups' ``lr_mult`` applies to the training schedule only).

    ``loader`` is a DataLoader or any re-iterable of ``(images, labels)`` batches (the
    device-resident path's). The model and optimizer are restored afterwards. Writes
    ``lr_find.png`` into ``out`` if given.
    """
    if num_iter < SKIP_START + SKIP_END + 2:
        raise ExplainkitError(f"num_iter={num_iter}: the LR range test needs at least {SKIP_START + SKIP_END + 2} iterations")
    if not 0 < start_lr < END_LR:
        raise ExplainkitError(f"start_lr={start_lr}: must be positive and below the sweep's end, {END_LR}")
    for group in optimizer.param_groups:
        group["lr"] = start_lr
    finder = LRFinder(model, optimizer, criterion, device=device)
    batches = loader if isinstance(loader, DataLoader) else TrainDataLoaderIter(loader)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # it prints its own chatter
            finder.range_test(batches, end_lr=END_LR, num_iter=num_iter, step_mode="exp")
            fig = Figure(figsize=(6, 4))
            ax = fig.subplots()
            ax, suggested = finder.plot(skip_start=SKIP_START, skip_end=SKIP_END, ax=ax, suggest_lr=True)
    finally:
        finder.reset()
    if suggested is None or not math.isfinite(suggested):
        raise ExplainkitError("the LR range test found no usable learning rate (the loss never decreased); pass lr= explicitly")
    ax.set_title(f"LR range test: steepest gradient at {suggested:.2e}")
    if out is not None:
        save_figure(fig, Path(out) / "lr_find.png")
    return float(suggested)

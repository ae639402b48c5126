"""Running a model in eval mode for a while and giving it back exactly as it was: the one piece
of model hygiene shared by explainers, the layer trace and the jobs."""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator

import torch.nn as nn

_MODE_LOCK = threading.Lock()
_SAVED_MODES: dict[int, tuple[int, list[tuple[nn.Module, bool]]]] = {}  # id(model) -> (callers inside, modes)


@contextmanager
def evaluation_mode(model: nn.Module) -> Iterator[None]:
    """Put ``model`` in eval mode for the block and restore every submodule's own mode after.

    Re-entrant across threads: the first caller saves the modes, the last one out restores them,
    so concurrent explanations with one shared model never see (or leave) a half-restored model.
    """
    key = id(model)
    with _MODE_LOCK:
        count, modes = _SAVED_MODES.get(key, (0, []))
        if count == 0:
            modes = [(module, module.training) for module in model.modules()]
            model.eval()
        _SAVED_MODES[key] = (count + 1, modes)
    try:
        yield
    finally:
        with _MODE_LOCK:
            count, modes = _SAVED_MODES.pop(key)
            if count > 1:
                _SAVED_MODES[key] = (count - 1, modes)
            else:
                for module, training in modes:
                    module.training = training

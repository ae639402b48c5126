"""An exponential moving average of a model's weights (Polyak averaging), evaluated and saved instead
of the raw weights when a recipe sets ``ema_decay``."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn


class WeightsEMA:
    """``ema = decay * ema + (1 - decay) * weights`` after every optimiser step, for every parameter
    and every floating-point buffer (BatchNorm's running statistics); integer buffers are copied.
    Starts as a copy of the model; ``model`` is the averaged network (eval mode, no gradients)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = float(decay)
        self.model = copy.deepcopy(model).eval()
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        entries = list(self.model.state_dict().values())
        self._floats = [i for i, t in enumerate(entries) if t.dtype.is_floating_point]
        self._others = [i for i, t in enumerate(entries) if not t.dtype.is_floating_point]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One averaging step towards ``model``'s current weights (call after ``optimizer.step()``)."""
        ours, theirs = list(self.model.state_dict().values()), list(model.state_dict().values())
        torch._foreach_lerp_([ours[i] for i in self._floats], [theirs[i].detach() for i in self._floats], 1.0 - self.decay)
        for i in self._others:
            ours[i].copy_(theirs[i])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state)

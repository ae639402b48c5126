"""Ablation-CAM: channel weights from the drop in the score when a channel is removed."""

from __future__ import annotations

import threading
import warnings
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from explainkit.explainers.perturbation import AboveLayer, LayerPass, PerturbationCAM
from explainkit.models.layouts import Layout
from explainkit.models.split import SplitError, split_at_layer

ABLATION_OFFSET = 1e7  # pytorch-grad-cam's value below the minimum for layers with negative outputs


class AblationCAM(PerturbationCAM):
    r"""Ablation-CAM (Desai & Ramaswamy, WACV 2020,
    https://openaccess.thecvf.com/content_WACV_2020/papers/Desai_Ablation-CAM_Visual_Explanations_for_Deep_Convolutional_Network_via_Gradient-free_Localization_WACV_2020_paper.pdf).

    With ``y^t`` the target's score and ``y^t_{-c}`` the score when channel ``c`` of the layer's
    output is ablated (set to 0, or far below the minimum where the layer's outputs go negative,
    as pytorch-grad-cam does):

    .. math:: w_c = \frac{y^t - y^t_{-c}}{y^t}, \qquad L = \mathrm{ReLU}\Big(\sum_c w_c A_c\Big)

    Cost: one forward per channel per image of **only the part of the model above the layer**
    (for ResNet18's ``layer4``: the pooling and the classifier), no backward. The model is cut at
    the layer with :mod:`torch.fx` (:mod:`explainkit.models.split`); pytorch-grad-cam instead runs
    the whole network for every channel. Models fx cannot trace fall back to full forwards with
    the layer's output replaced (with a warning). The ablated forwards give every class's score,
    so ``targets="all"`` costs what one target costs. Prefer it for gradient-free maps at a
    fraction of Score-CAM's cost; its weights are relative score drops, so they follow the head's
    weights closely.

    The model is traced when the explainer is built: do not build one while another thread runs
    the same model (fx patches ``nn.Module.__call__`` while tracing). Calls are thread-safe.
    """

    name = "ablationcam"

    def __init__(
        self, model: nn.Module, layer: str | nn.Module | None = None, *, batch_size: int = 256, layout: Layout | None = None
    ) -> None:
        super().__init__(model, layer, batch_size=batch_size, layout=layout)
        self.split: tuple[fx.GraphModule, fx.GraphModule] | None = None
        self.split_problem = ""
        try:
            self.split = split_at_layer(model, self.layer_name)
        except SplitError as error:
            self.split_problem = str(error)

    def forward(self, images: torch.Tensor) -> tuple[Any, torch.Tensor, AboveLayer | None]:
        if self.split is None:
            self._warn_full_forwards(self.split_problem)
            return super().forward(images)
        below, above = self.split
        output, *side = below(images)
        if not all(isinstance(value, torch.Tensor) and value.shape[:1] == images.shape[:1] for value in side):
            # e.g. a batch size read below the layer and used above it: not repeatable per channel
            self._warn_full_forwards("what the part above the layer reads from below it is not per image")
            return super().forward(images)

        def run_above(layer_outputs: torch.Tensor, owners: torch.Tensor) -> Any:
            return above(layer_outputs, *(value[owners] for value in side))

        # a copy in: an in-place op above the layer (ReLU(inplace=True)) would overwrite its output
        return run_above(output.clone(), torch.arange(len(images), device=images.device)), output, run_above

    def _warn_full_forwards(self, reason: str) -> None:
        warnings.warn(
            f"ablationcam: cannot run only the part of the model above {self.layer_name!r} ({reason}); "
            "running the whole model per channel instead (slower)",
            RuntimeWarning,
            stacklevel=5,
        )

    def channel_scores(self, run: LayerPass) -> torch.Tensor:
        output = run.output
        axis = 1 if run.layout.kind == "nchw" else output.ndim - 1  # channels-last and tokens: last
        n, c = output.shape[0], output.shape[axis]
        low = output.flatten(1).amin(dim=1)
        fill = torch.where(low == 0, torch.zeros_like(low), low - ABLATION_OFFSET)  # (N,)
        above = run.above or self._full_forwards(run.images)
        scores = []
        for owners, channels in self.pair_chunks(n, c, output.device):
            shape = [len(owners)] + [1] * (output.ndim - 1)
            shape[axis] = c
            ablate = F.one_hot(channels, c).bool().view(shape)  # each pair's channel, along the layout's channel axis
            ablated = torch.where(ablate, fill[owners].view([-1] + [1] * (output.ndim - 1)), output[owners])
            scores.append(run.scores(above(ablated, owners), owners))
        return torch.cat(scores).view(n, c, -1)

    def _full_forwards(self, images: torch.Tensor) -> AboveLayer:
        """``above`` by running the whole model with the layer's output replaced by a hook."""
        thread = threading.get_ident()

        def run_above(layer_outputs: torch.Tensor, owners: torch.Tensor) -> Any:
            def replace(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor | None:
                return layer_outputs if threading.get_ident() == thread else None

            handle = self.layer.register_forward_hook(replace)
            try:
                return self.model(images[owners])
            finally:
                handle.remove()

        return run_above

    def weights_from_scores(self, scores: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        original = reference[:, None, :]  # (N, 1, J)
        # A zero reference (a padding box, an empty region) has no drop to measure: weight 0.
        return torch.where(original != 0, (original - scores) / torch.where(original != 0, original, 1), 0)

"""LeGrad: the positive gradient of each block's own class score with respect to that block's
attention probabilities, averaged over heads, queries and blocks.

Why our own instead of torch-cam's ``LeGrad``: torch-cam reads torchvision's
``nn.MultiheadAttention`` blocks only, takes one class per call (one backward per block and
class) and no target objects. Here the probabilities come from
:func:`~explainkit.models.attention.trace_attention` (torchvision, timm and Hugging Face ViTs;
class, distillation and register tokens), and each explained block's input enters the forward as
a fresh leaf with the same values, so the graph of block ``l``'s tokens starts at block ``l``:
the gradient of ``Σ_l s_l`` at ``A_l`` is exactly ``∂s_l/∂A_l`` (the later blocks' scores, which
``A_l`` also feeds, do not reach it), and one backward gives every block's map; the classes of
``"all"``, top-k or a target with several scores share it (``is_grads_batched``, in chunks).
Nothing below the first explained block is recorded by autograd.
"""

from __future__ import annotations

import threading
import warnings
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from explainkit.errors import ExplainkitError
from explainkit.explainers.base import Computed, Explainer
from explainkit.models.attention import attention_blocks, final_head, trace_attention
from explainkit.targets import BoundTarget, Target

POOLINGS = ("mean", "model")
# Gradients held at once by one batched backward (all explained blocks' (N, heads, T, T) per
# column): columns are chunked so that a ViT-B/16 at batch 32 (about 0.7 GB per column for 12
# blocks) does not ask for 45 GB at 64 classes.
GRADIENT_BUDGET_BYTES = 1 << 30


class LeGrad(Explainer):
    r"""LeGrad (Bousselham et al., "LeGrad: An Explainability Method for Vision Transformers via
    Feature Formation Sensitivity", 2024, https://arxiv.org/abs/2404.03214; ICCV 2025).

    With ``z_l`` the ``(T, D)`` tokens after block ``l``, ``A_l`` its ``(H, T, T)`` post-softmax
    attention probabilities, ``C`` the model's final norm and head and ``f`` the target:

    .. math:: s_l = f\big(C(\tfrac{1}{T}\textstyle\sum_t z_{l,t})\big), \qquad
              E_l = \frac{1}{H\,T}\sum_{h}\sum_{i} \Big[\frac{\partial s_l}{\partial A_l}\Big]^+_{h,i,:}, \qquad
              L = \frac{1}{|\mathcal{L}|}\sum_{l \in \mathcal{L}} E_l

    restricted to the patch keys (class, distillation and register keys dropped) and reshaped to
    the patch grid; the base then min-max scales each map. ``∂s_l/∂A_l`` is the derivative of the
    block's *own* score (not of the later blocks' scores, which ``A_l`` also feeds). The tokens
    are mean-pooled (every token, prefix included) before the final norm and head, as the
    authors' code and torch-cam do; ``pooling="model"`` uses the model's own pooling instead (for a class-token ViT
    then only the class token's query row gets a gradient). ``targets`` as every explainer:
    classes, ``"all"``, top-k or a target object, whose score of ``C(z_l)`` is ``s_l``.

    Cost: one forward (autograd recorded from the first explained block up, attention computed
    unfused to expose ``A_l``) and one backward through the explained blocks and the head per
    score column, all blocks in the same backward and up to ``class_chunk`` columns batched in
    one (within a 1 GiB budget for the ``(N, H, T, T)`` gradients). About torch-cam's time for
    one class on the CPU; ``"all"`` batched. Prefer it for vision transformers: it needs no layer
    choice, reads every block, and the paper reports better localisation (segmentation,
    perturbation, open-vocabulary benchmarks) than other ViT explanation methods. CNNs have no
    attention blocks: an :class:`~explainkit.errors.ExplainkitError`.

    Args:
        model: a vision transformer (torchvision, timm, Hugging Face; class, distillation and
            register tokens are handled).
        layer: ignored, as by the other attention methods and FullGrad (LeGrad reads the attention
            blocks; choose them with ``start_block``), so one ``layer`` can go to several methods.
        start_block: the first block explained, counted from 0; negative counts from the end
            (the authors' OpenCLIP wrapper uses ``-2``); default ``0``: every block, as the paper.
        pooling: ``"mean"`` (the paper's) or ``"model"`` (the model's own pooling).
        class_chunk: most columns (classes) per batched backward.
    """

    name = "legrad"
    family = "attention"
    reads_layer = False

    def __init__(
        self,
        model: nn.Module,
        layer: str | nn.Module | None = None,
        *,
        start_block: int = 0,
        pooling: str = "mean",
        class_chunk: int = 64,
    ) -> None:
        if pooling not in POOLINGS:
            raise ExplainkitError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
        if not isinstance(class_chunk, int) or isinstance(class_chunk, bool) or class_chunk < 1:
            raise ExplainkitError(f"class_chunk must be a positive integer, got {class_chunk!r}")
        self.model = model
        self.layer_name, self.layer = "attention blocks", None  # type: ignore[assignment]
        blocks = attention_blocks(model, "legrad")  # ExplainkitError for a model without attention blocks
        if not isinstance(start_block, int) or isinstance(start_block, bool) or not -len(blocks) <= start_block < len(blocks):
            raise ExplainkitError(
                f"start_block must lie in [{-len(blocks)}, {len(blocks) - 1}] for {len(blocks)} blocks, got {start_block}"
            )
        self.start_block = start_block % len(blocks)
        self.pooling = pooling
        self.class_chunk = class_chunk

    def compute(self, images: torch.Tensor, target: Target) -> Computed:
        blocks = attention_blocks(self.model, "legrad")
        chosen = list(range(self.start_block, len(blocks)))
        head = final_head(self.model)
        grad_enabled = torch.is_grad_enabled()
        try:
            with (
                target.forward_context(),
                _blocks_on_leaves([blocks[i] for i in chosen]),
                trace_attention(self.model, (images.shape[-2], images.shape[-1]), "legrad") as trace,
            ):
                output = self.model(images)
        finally:
            torch.set_grad_enabled(grad_enabled)
        if len(trace.probabilities) != len(blocks) or len(trace.block_outputs) != len(blocks):
            raise ExplainkitError(
                f"legrad: the forward ran {len(trace.block_outputs)} of the model's {len(blocks)} attention blocks"
            )
        bound = target.bind(output)
        scores = bound(output)
        probabilities = [trace.probabilities[i] for i in chosen]
        with torch.enable_grad():
            layer_scores = self._layer_scores(head, bound, [trace.block_outputs[i] for i in chosen], trace.prefix_tokens)
        if layer_scores.ndim == 1:
            tokens = _relevance(layer_scores, probabilities, torch.ones_like(layer_scores))  # (N, T)
            return Computed(trace.patch_map(tokens), bound, scores)  # (N, h, w)
        columns, count = layer_scores.shape[1], layer_scores.shape[0]
        per_column = sum(p.numel() * p.element_size() for p in probabilities)
        chunk = max(1, min(self.class_chunk, GRADIENT_BUDGET_BYTES // max(per_column, 1)))
        basis = torch.eye(columns, dtype=layer_scores.dtype, device=layer_scores.device)
        maps = []
        for start in range(0, columns, chunk):
            rows = basis[start : start + chunk, None, :].expand(-1, count, -1)  # (J', N, J)
            last = start + chunk >= columns
            tokens = _batched_relevance(layer_scores, probabilities, rows, retain_graph=not last, batched=bound.batched)
            maps.append(trace.patch_map(tokens))  # (J', N, h, w)
        return Computed(torch.cat(maps).transpose(0, 1), bound, scores)  # (N, J, h, w)

    def _layer_scores(
        self, head: Callable[[torch.Tensor], Any], bound: BoundTarget, block_outputs: Sequence[torch.Tensor], prefix: int
    ) -> torch.Tensor:
        """``Σ_l s_l``: every explained block's target score from one head call over all blocks'
        (mean-pooled) tokens stacked along the batch, ``(N,)`` or ``(N, J)``."""
        count = block_outputs[0].shape[0]
        if self.pooling == "mean":
            # The mean token in every position of a sequence of prefix + 1 tokens: whatever the
            # head pools (class token, patch average, class and distillation tokens averaged), it
            # pools the mean of all the block's tokens, and the final norm runs on few tokens.
            means = torch.cat([z.mean(dim=1, keepdim=True) for z in block_outputs])  # (L*N, 1, D)
            tokens = means.expand(-1, prefix + 1, -1)
        else:
            tokens = torch.cat(list(block_outputs))  # (L*N, T, D), each block's own graph
        index = torch.arange(count, device=tokens.device).repeat(len(block_outputs))
        per_block: torch.Tensor = bound(head(tokens), index)  # (L*N,) or (L*N, J)
        summed: torch.Tensor = per_block.unflatten(0, (len(block_outputs), count)).sum(dim=0)
        return summed

    def __repr__(self) -> str:
        return f"{type(self).__name__}(start_block={self.start_block}, pooling={self.pooling!r})"


@contextmanager
def _blocks_on_leaves(blocks: Sequence[nn.Module]) -> Iterator[None]:
    """Inside the block, each of ``blocks`` receives its input tokens as a fresh grad-requiring
    leaf (the same values), so the graph of a block's output starts at that block: a gradient
    from a block's tokens reaches its own attention and no lower block's. Autograd is off until
    the first of them runs (nothing below is recorded). Hooks act only on the entering thread's
    forwards and are removed on exit; the caller restores the grad mode."""
    owner = threading.get_ident()

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if threading.get_ident() != owner:
            return None
        torch.set_grad_enabled(True)
        if args and isinstance(args[0], torch.Tensor):
            return (args[0].detach().requires_grad_(True), *args[1:]), kwargs
        name = next((k for k, v in kwargs.items() if isinstance(v, torch.Tensor)), None)
        if name is None:
            raise ExplainkitError(f"legrad: block {type(module).__name__} was called without input tokens")
        return args, {**kwargs, name: kwargs[name].detach().requires_grad_(True)}

    handles = [block.register_forward_pre_hook(hook, with_kwargs=True) for block in blocks]
    torch.set_grad_enabled(False)
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _reduce(gradients: Sequence[torch.Tensor | None], like: Sequence[torch.Tensor], lead: tuple[int, ...]) -> torch.Tensor:
    """``(*lead, T)``: the positive gradients averaged over heads, query rows and blocks."""
    total = None
    for gradient in gradients:
        if gradient is None:  # a block the score does not depend on
            continue
        part = F.relu(gradient.float()).mean(dim=(-3, -2))  # (..., N, T): heads and queries
        total = part if total is None else total + part
    if total is None:
        total = like[0].new_zeros(*lead, like[0].shape[-1], dtype=torch.float32)
    return total / len(like)


def _relevance(scores: torch.Tensor, probabilities: Sequence[torch.Tensor], grad_outputs: torch.Tensor) -> torch.Tensor:
    """``(N, T)`` for one score per image."""
    if not scores.requires_grad:
        return _reduce([None], probabilities, (scores.shape[0],))
    gradients = torch.autograd.grad(scores, probabilities, grad_outputs, allow_unused=True)
    return _reduce(gradients, probabilities, (scores.shape[0],))


def _batched_relevance(
    scores: torch.Tensor, probabilities: Sequence[torch.Tensor], rows: torch.Tensor, retain_graph: bool, batched: bool
) -> torch.Tensor:
    """``(J', N, T)``: one relevance per row of ``rows`` ``(J', N, J)``, in one vmap-batched backward
    when ``batched`` and every op on the path has a batching rule, else row by row."""
    lead = (rows.shape[0], scores.shape[0])
    if not scores.requires_grad:
        return _reduce([None], probabilities, lead)
    if batched:
        try:
            gradients = torch.autograd.grad(
                # retain_graph=True: if vmap fails part-way, the column fallback below needs the graph
                scores,
                probabilities,
                rows,
                is_grads_batched=True,
                retain_graph=True,
                allow_unused=True,
            )
            return _reduce(gradients, probabilities, lead)
        except RuntimeError as exc:  # an op without a batching rule
            warnings.warn(f"batched gradients unavailable ({exc}); computing columns one by one", RuntimeWarning, stacklevel=3)
    last = rows.shape[0] - 1
    return torch.stack(
        [
            _reduce(
                torch.autograd.grad(scores, probabilities, row, retain_graph=retain_graph or k < last, allow_unused=True),
                probabilities,
                lead[1:],
            )
            for k, row in enumerate(rows)
        ]
    )


__all__ = ["LeGrad"]

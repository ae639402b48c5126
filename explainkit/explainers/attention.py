"""Maps from a vision transformer's attention: attention rollout and Chefer et al.'s relevance.

Both read every block's attention probabilities ``A_b`` (``(N, heads, T, T)``) through
:func:`explainkit.models.attention.trace_attention` (torchvision, timm and Hugging Face ViTs and
DeiTs, with class, distillation and register tokens) and propagate them through the blocks as
``T x T`` token-to-token matrices, batched over images (and, for Chefer, over targets) on the
images' device. The map is the row of the token the model's head reads (the class token; the
class and distillation tokens averaged for distilled DeiTs; the mean of the patch rows for models
that pool by the mean, see :func:`~explainkit.models.attention.readout_tokens`) over the patch
tokens, reshaped to the patch grid.
"""

from __future__ import annotations

import warnings
from typing import Sequence

import torch
import torch.nn as nn

from explainkit.errors import ExplainkitError
from explainkit.explainers.base import Computed, Explainer
from explainkit.models.attention import AttentionTrace, attention_blocks, trace_attention
from explainkit.targets import Target

HEAD_FUSIONS = ("mean", "max", "min")
# Gradients held at once by a batched backward (elements): columns x N x (heads x T x T x blocks)
# stays under 2**28 floats (1 GiB in float32); ViT-B/16 at 224 px holds 5.6 M per image and column.
GRADIENT_BUDGET = 2**28


class AttentionExplainer(Explainer):
    """Base of the methods that read every block's attention: no layer (every block is read;
    a ``layer`` given for the registry's uniform call is ignored), a one-line refusal for models
    without attention blocks (at the call), and a check that the forward ran every block."""

    name = "attention"
    family = "attention"
    reads_layer = False

    def __init__(self, model: nn.Module, layer: str | nn.Module | None = None) -> None:
        self.model = model
        self.layer_name, self.layer = "attention blocks", None  # type: ignore[assignment]

    def _check(self, trace: AttentionTrace) -> None:
        blocks = len(attention_blocks(self.model, self.name))
        if len(trace.probabilities) != blocks or len(trace.block_outputs) != blocks:
            raise ExplainkitError(
                f"{self.name}: the forward ran {len(trace.probabilities)} of the model's {blocks} attention blocks; "
                "attention methods need a forward through every block once"
            )

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class AttentionRollout(AttentionExplainer):
    r"""Attention rollout (Abnar & Zuidema, "Quantifying Attention Flow in Transformers", ACL 2020,
    https://arxiv.org/abs/2005.00928).

    Per block ``b`` the heads are fused, ``\bar A_b = \mathrm{mean}_h A_{b,h}`` (``head_fusion``:
    ``"mean"``, ``"max"`` or ``"min"`` over heads, as jacobgil/vit-explain offers), the residual
    connection is added and the rows renormalised, and the blocks are multiplied in order:

    .. math:: \hat A_b = \frac{0.5\,\bar A_b + 0.5\,I}{\text{row sums}}, \qquad
              R = \hat A_L \hat A_{L-1} \cdots \hat A_1, \qquad
              \text{map} = R[\text{cls}, \text{patches}]

    With ``discard_ratio = r > 0`` the ``floor(r T^2)`` smallest entries of each image's fused
    ``\bar A_b`` are set to zero first, except the class token's attention to itself (the filter of
    jacobgil/vit-explain, per image here where it filters the first image of a batch only).

    Rows are renormalised as the paper says; vit-explain's ``a / a.sum(dim=-1)`` divides entry
    ``(i, j)`` by the sum of row ``j``, which agrees only where every row already sums to one
    (mean fusion, no discard). With that one line corrected, its maps and these agree to 2e-4
    (maps scaled by their maximum) for every fusion and ``r`` in {0, 0.9}.

    Models without a class token that pool by the mean (timm ``global_pool="avg"``) read the mean
    of the patch rows of ``R``; distilled DeiTs the mean of the class and distillation rows.

    Class-agnostic: every target gets the same map (``targets="all"`` repeats it).

    Cost: one forward without autograd with explicit attention (the fused kernels are switched
    off for the call), then per image ``L`` ``T x T`` residual matrices and ``L`` vector-matrix
    products (the head's row through the blocks, last first: ``O(L T^2)``, not ``O(L T^3)``); no
    backward.
    Prefer it for a quick class-agnostic view of where the class token gathers information; it
    ignores the MLPs and the values, and cannot tell classes apart (use ``chefer2021`` for that).

    Args:
        model: a torchvision/timm/Hugging Face ViT or DeiT.
        head_fusion: how heads are fused: ``"mean"`` (the paper), ``"max"`` or ``"min"``.
        discard_ratio: the fraction of lowest fused attentions dropped per block, in ``[0, 1)``.
    """

    name = "rollout"

    def __init__(
        self, model: nn.Module, layer: str | nn.Module | None = None, *, head_fusion: str = "mean", discard_ratio: float = 0.0
    ) -> None:
        super().__init__(model, layer)
        if head_fusion not in HEAD_FUSIONS:
            raise ExplainkitError(f"head_fusion must be one of {', '.join(HEAD_FUSIONS)}, got {head_fusion!r}")
        if not 0.0 <= discard_ratio < 1.0:
            raise ExplainkitError(f"discard_ratio is a fraction in [0, 1), got {discard_ratio}")
        self.head_fusion, self.discard_ratio = head_fusion, discard_ratio

    def compute(self, images: torch.Tensor, target: Target) -> Computed:
        with torch.no_grad(), trace_attention(self.model, images.shape[-2:], self.name) as trace:
            output = self.model(images)
        self._check(trace)
        rows = rollout(trace.probabilities, self.head_fusion, self.discard_ratio, rows=trace.readout)  # (N, T)
        raw = trace.patch_map(rows)  # (N, h, w)
        bound = target.bind(output)
        scores = bound(output).detach()
        if scores.ndim == 2:  # "all", top-k, boxes...: class-agnostic, the same map for every column
            return Computed(raw[:, None].expand(-1, scores.shape[1], -1, -1), bound, scores)
        return Computed(raw, bound, scores)


def fuse_heads(probabilities: torch.Tensor, head_fusion: str = "mean") -> torch.Tensor:
    """``(..., heads, T, T)`` -> ``(..., T, T)`` by the mean, max or min over heads."""
    if head_fusion == "mean":
        return probabilities.mean(dim=-3)
    if head_fusion == "max":
        return probabilities.amax(dim=-3)
    if head_fusion == "min":
        return probabilities.amin(dim=-3)
    raise ExplainkitError(f"head_fusion must be one of {', '.join(HEAD_FUSIONS)}, got {head_fusion!r}")


def rollout(
    probabilities: Sequence[torch.Tensor],
    head_fusion: str = "mean",
    discard_ratio: float = 0.0,
    rows: Sequence[int] | None = None,
) -> torch.Tensor:
    """The rolled-out attention ``R = Â_L ⋯ Â_1`` of :class:`AttentionRollout`, in float32:
    ``(N, T, T)``, or with ``rows`` the ``(N, T)`` mean of those rows of ``R``, computed as a row
    vector through the blocks from the last down (``T^2`` per block instead of ``T^3``)."""
    residuals = [_residual(block, head_fusion, discard_ratio) for block in probabilities]
    if not residuals:
        raise ExplainkitError("rollout needs at least one attention block")
    if rows is not None:
        vector = _row_vector(residuals[0], rows)  # (N, 1, T)
        for residual in reversed(residuals):
            vector = vector @ residual
        return vector[..., 0, :]
    relevance = residuals[0]
    for residual in residuals[1:]:
        relevance = residual @ relevance
    return relevance


def _residual(block: torch.Tensor, head_fusion: str, discard_ratio: float) -> torch.Tensor:
    """``Â = (0.5 Ā + 0.5 I)`` with rows renormalised, ``Ā`` the fused heads after the discard filter."""
    fused = fuse_heads(block.float(), head_fusion)  # (N, T, T)
    if discard_ratio > 0:
        flat = fused.flatten(1)
        lowest = flat.topk(int(flat.shape[1] * discard_ratio), dim=1, largest=False).indices
        drop = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, lowest, True)
        drop[:, 0] = False  # never the class token's attention to itself
        fused = flat.masked_fill(drop, 0.0).view_as(fused)
    residual = 0.5 * fused + 0.5 * torch.eye(fused.shape[-1], device=fused.device, dtype=fused.dtype)
    return residual / residual.sum(dim=-1, keepdim=True)


def _row_vector(like: torch.Tensor, rows: Sequence[int]) -> torch.Tensor:
    """``(..., 1, T)``: the mean of the unit rows ``rows``, shaped for ``like (..., T, T)``."""
    first, last = rows[0], rows[-1]
    if tuple(rows) != tuple(range(first, last + 1)):
        raise ExplainkitError(f"the rows read must be one run of tokens, got {tuple(rows)}")
    tokens = like.shape[-1]
    vector = torch.zeros(tokens, device=like.device, dtype=like.dtype)
    vector[first : last + 1] = 1.0 / len(rows)  # a slice: no index tensor copied to the device
    return vector.expand(*like.shape[:-2], 1, tokens)


class CheferRelevance(AttentionExplainer):
    r"""Gradient-weighted attention relevance (Chefer, Gur & Wolf, "Generic Attention-model
    Explainability for Interpreting Bi-Modal and Encoder-Decoder Transformers", ICCV 2021,
    https://arxiv.org/abs/2103.15679), rules 5 and 6 for self-attention.

    With ``A_b`` the attention probabilities of block ``b`` (after dropout: the tensor multiplied
    with the values) and ``∇A_b = ∂y^t / ∂A_b`` the gradient of the target's score (the logit,
    not a softmax), starting from ``R = I`` (``T x T``) and going through the blocks in order:

    .. math:: \bar A_b = \mathbb{E}_h\big[(\nabla A_b \odot A_b)^+\big], \qquad R \leftarrow R + \bar A_b R,
              \qquad \text{map} = R[\text{cls}, \text{patches}]

    As the authors' ViT notebook (hila-chefer/Transformer-MM-Explainability,
    ``Transformer_MM_explainability_ViT.ipynb``: ``avg_heads``, ``apply_self_attention_rules``,
    ``generate_relevance``): the ReLU on the product before the mean over heads, no
    normalisation of ``R`` (the map is scaled to [0, 1] afterwards), the class token's row over
    the tokens after it. Where their code reads ``R[0, 1:]`` (one class token) this reads the
    rows the head reads over the patch tokens only, so distillation and register tokens are not
    mapped and a distilled DeiT averages its class and distillation rows, as its head does.
    On a 3-block ViT whose weights were loaded into both, the maps agree with the authors'
    ``generate_relevance`` on their ``ViT_new`` (hila-chefer/Transformer-Explainability) to 2e-4
    relative, per class and for ``targets="all"``.

    Every target column comes from one forward and batched backwards w.r.t. all blocks'
    probabilities at once (``is_grads_batched``), ``class_chunk`` columns at a time, fewer when the
    gradients of a chunk would exceed ``GRADIENT_BUDGET`` elements.

    Cost: one forward with explicit attention and autograd, one backward from the scores down to
    the first block's attention per chunk of targets (``J`` targets cost about ``J`` backwards,
    batched), then ``L`` vector-matrix products per image and target (the head's row through
    ``(I + Ā_L) ⋯ (I + Ā_1)``, last first: ``O(L T^2)``). Prefer it over rollout to tell classes apart (the gradients are
    class-specific) and where rollout's maps are dominated by the identity; it is the standard
    attention baseline for ViTs in the literature.

    Args:
        model: a torchvision/timm/Hugging Face ViT or DeiT.
        class_chunk: at most this many target columns per batched backward.
    """

    name = "chefer2021"

    def __init__(self, model: nn.Module, layer: str | nn.Module | None = None, *, class_chunk: int = 64) -> None:
        super().__init__(model, layer)
        if not isinstance(class_chunk, int) or isinstance(class_chunk, bool) or class_chunk < 1:
            raise ExplainkitError(f"class_chunk must be a positive integer, got {class_chunk!r}")
        self.class_chunk = class_chunk

    def compute(self, images: torch.Tensor, target: Target) -> Computed:
        # The images require grad so a frozen model's forward is recorded too; autograd.grad only
        # walks back from the scores to the probabilities, never to the images or parameters.
        images = images.detach().requires_grad_(True)
        with target.forward_context(), torch.enable_grad(), trace_attention(self.model, images.shape[-2:], self.name) as trace:
            output = self.model(images)
            bound = target.bind(output)
            scores = bound(output)  # (N,) or (N, J)
        self._check(trace)
        probabilities = [p.detach() for p in trace.probabilities]  # the maths below is not recorded
        if scores.ndim == 1:
            gradients = _gradients(scores, trace.probabilities, torch.ones_like(scores)[None], batched=False)
            rows = chefer_relevance(probabilities, [g[0] for g in gradients], rows=trace.readout)  # (N, T)
            return Computed(trace.patch_map(rows), bound, scores)
        n, columns = scores.shape
        per_column = n * sum(p[0].numel() for p in probabilities)
        chunk_size = max(1, min(self.class_chunk, GRADIENT_BUDGET // max(per_column, 1)))
        basis = torch.eye(columns, dtype=scores.dtype, device=scores.device)
        maps = []
        for start in range(0, columns, chunk_size):
            chunk = basis[start : start + chunk_size, None, :].expand(-1, n, -1)  # (J', N, J)
            last = start + chunk_size >= columns
            gradients = _gradients(scores, trace.probabilities, chunk, retain_graph=not last, batched=bound.batched)
            rows = chefer_relevance([p[None] for p in probabilities], gradients, rows=trace.readout)  # (J', N, T)
            maps.append(trace.patch_map(rows))  # (J', N, h, w)
        return Computed(torch.cat(maps).transpose(0, 1), bound, scores)  # (N, J, h, w)


def chefer_relevance(
    probabilities: Sequence[torch.Tensor], gradients: Sequence[torch.Tensor], rows: Sequence[int] | None = None
) -> torch.Tensor:
    """``R = I``, then ``R += mean_h((∇A ⊙ A)^+) @ R`` block by block (rules 5 and 6 of Chefer et
    al. 2021), for probabilities and gradients of shape ``(..., heads, T, T)``, in float32
    (the gradients are overwritten):
    ``(..., T, T)``, or with ``rows`` the ``(..., T)`` mean of those rows of ``R``, computed as a
    row vector through ``(I + Ā_L) ⋯ (I + Ā_1)`` from the last block down (``T^2`` per block)."""
    # in place on the gradients (ours, fresh from autograd): two fewer (J, N, heads, T, T) buffers per block
    weighted = [g.float().mul_(a.float()).clamp_(min=0).mean(dim=-3) for a, g in zip(probabilities, gradients)]
    if not weighted:
        raise ExplainkitError("chefer2021 needs at least one attention block")
    shape = torch.broadcast_shapes(*(w.shape for w in weighted))
    if rows is not None:
        vector = _row_vector(weighted[0].expand(shape), rows)  # (..., 1, T)
        for a_bar in reversed(weighted):
            vector = vector + vector @ a_bar
        return vector[..., 0, :]
    relevance = torch.eye(shape[-1], device=weighted[0].device, dtype=weighted[0].dtype).expand(shape)
    for a_bar in weighted:
        relevance = relevance + a_bar @ relevance
    return relevance


def _gradients(
    scores: torch.Tensor,
    inputs: Sequence[torch.Tensor],
    grad_outputs: torch.Tensor,
    retain_graph: bool = False,
    batched: bool = True,
) -> list[torch.Tensor]:
    """``[(J', *input.shape)]``: the gradient of ``scores . grad_outputs[j]`` w.r.t. each input, for
    each of the ``J'`` rows of ``grad_outputs``: one vmap-batched backward when ``batched`` (else,
    or when an op has no batching rule, row by row). Zeros for inputs the scores do not reach."""
    rows = grad_outputs.shape[0]
    if not scores.requires_grad:
        return [x.new_zeros(rows, *x.shape) for x in inputs]
    if batched and rows > 1:
        try:
            found = torch.autograd.grad(
                # retain_graph=True: if vmap fails part-way, the column fallback below needs the graph
                scores,
                list(inputs),
                grad_outputs,
                is_grads_batched=True,
                retain_graph=True,
                allow_unused=True,
            )
            return [x.new_zeros(rows, *x.shape) if g is None else g for x, g in zip(inputs, found)]
        except RuntimeError as exc:  # an op without a batching rule
            warnings.warn(f"batched gradients unavailable ({exc}); computing columns one by one", RuntimeWarning, stacklevel=3)
    per_row = []
    for k in range(rows):
        found = torch.autograd.grad(
            scores, list(inputs), grad_outputs[k], retain_graph=retain_graph or k < rows - 1, allow_unused=True
        )
        per_row.append([torch.zeros_like(x) if g is None else g for x, g in zip(inputs, found)])
    return [torch.stack(column) for column in zip(*per_row)]


__all__ = ["AttentionExplainer", "AttentionRollout", "CheferRelevance", "chefer_relevance", "fuse_heads", "rollout"]

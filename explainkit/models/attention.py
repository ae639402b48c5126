"""Reading a vision transformer's attention probabilities as tensors in the autograd graph.

Attention methods (rollout, Chefer et al.'s relevance, LeGrad) need each block's attention
probabilities ``A`` of shape ``(N, heads, T, T)``, and the gradient methods among them need
``d score / d A`` for the very tensor that is multiplied with the values. Fused kernels never
materialise ``A``: torchvision's ``nn.MultiheadAttention`` is called with ``need_weights=False``
(and the weights it can return are a view made *after* the product with ``V``, so no gradient
reaches them), timm's ``Attention`` runs ``F.scaled_dot_product_attention`` while ``fused_attn``
is set, Hugging Face's ``ViTAttention`` dispatches on ``config._attn_implementation`` (``sdpa``).

:func:`trace_attention` switches each family to its explicit computation for the duration of a
``with`` block and records ``A`` (the tensor multiplied with ``V``, after attention dropout) and
each block's output token sequence from the forward run inside:

* torchvision ``VisionTransformer``: each ``EncoderBlock.self_attention`` gets an explicit
  forward (in-projection, scaled dot product, softmax, dropout, ``A @ V``, out-projection) as an
  instance attribute, deleted afterwards;
* timm ``vision_transformer.Attention`` (ViT, DeiT, distilled DeiT, register-token ViTs):
  ``fused_attn`` set to ``False`` and a forward hook on its ``attn_drop``, whose output is ``A``;
* Hugging Face ``ViTAttention``/``DeiTAttention``: the config's attention implementation set to
  ``"eager"``, whose second output is ``A``, read by a forward hook.

Everything is restored on exit, also when the forward raises: no hook stays, ``fused_attn`` and
the attention implementation return to their values. Concurrent traces of one shared model (from
several threads) share one patch, applied by the first and removed by the last; each thread's
trace records only its own forwards.

Example:
    >>> with trace_attention(model, images.shape[-2:]) as trace:
    ...     logits = model(images)
    >>> len(trace.probabilities), trace.probabilities[0].shape  # (N, heads, T, T) per block
"""

from __future__ import annotations

import functools
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from explainkit.errors import ExplainkitError
from explainkit.models.layouts import infer_layout


@dataclass
class AttentionTrace:
    """What one forward inside :func:`trace_attention` recorded.

    probabilities: per block, in forward order, the ``(N, heads, T, T)`` attention probabilities
        multiplied with the values (rows sum to 1; after attention dropout in training mode). In
        the autograd graph when the forward ran with autograd on: ``torch.autograd.grad(score,
        trace.probabilities)`` gives the real ``d score / d A``.
    block_outputs: per block, the ``(N, T, D)`` token sequence after the block, in the graph.
    prefix_tokens: class + distillation + register tokens before the patch grid, read as
        :mod:`explainkit.models.layouts` reads them (what the model declares, else inferred).
    grid: the ``(h, w)`` patch grid.
    readout: the token rows the model's head reads: ``(0,)`` for a class token, ``(0, 1)`` for a
        distilled DeiT (class and distillation heads averaged), the patch tokens for models that
        pool by the mean (timm ``global_pool="avg"``). Attention maps average these rows.
    """

    probabilities: list[torch.Tensor] = field(default_factory=list)
    block_outputs: list[torch.Tensor] = field(default_factory=list)
    prefix_tokens: int = 0
    grid: tuple[int, int] = (0, 0)
    readout: tuple[int, ...] = ()

    def patch_map(self, token_scores: torch.Tensor) -> torch.Tensor:
        """``(..., T)`` scores per token -> ``(..., h, w)`` over the patch grid (prefix tokens dropped)."""
        patches = token_scores[..., self.prefix_tokens :]
        if patches.shape[-1] != self.grid[0] * self.grid[1]:
            raise ExplainkitError(
                f"{token_scores.shape[-1]} token scores do not make {self.prefix_tokens} prefix tokens + a "
                f"{self.grid[0]}x{self.grid[1]} patch grid"
            )
        grid: torch.Tensor = patches.unflatten(-1, self.grid)
        return grid


# --- finding the blocks ------------------------------------------------------------------------


@dataclass(frozen=True)
class _Found:
    """The attention modules of a model, their blocks (same order: forward order) and the library."""

    kind: str  # "torchvision", "timm" or "hf"
    blocks: tuple[tuple[str, Any], ...]
    attentions: tuple[Any, ...]  # library modules, read by attribute


def _classes(module: str, names: Sequence[str]) -> tuple[type, ...]:
    """Classes of a library module that is already imported (a model cannot be an instance of a
    class whose module was never imported, so nothing heavy is imported here)."""
    loaded = sys.modules.get(module)
    return tuple(getattr(loaded, name) for name in names if loaded is not None and hasattr(loaded, name))


def _is(obj: object, classes: tuple[type, ...]) -> bool:
    """``isinstance`` without the narrowing (library modules are read by attribute)."""
    return bool(classes) and isinstance(obj, classes)


def _find(model: nn.Module) -> _Found | None:
    modules: list[tuple[str, Any]] = list(model.named_modules())
    torchvision_blocks = _classes("torchvision.models.vision_transformer", ["EncoderBlock"])
    if torchvision_blocks:
        found = [(n, m) for n, m in modules if _is(m, torchvision_blocks)]
        if found:
            return _Found("torchvision", tuple(found), tuple(m.self_attention for _, m in found))
    timm_attention = _classes("timm.models.vision_transformer", ["Attention"])
    if timm_attention:
        found = [(n, m) for n, m in modules if _is(getattr(m, "attn", None), timm_attention)]
        if found:
            return _Found("timm", tuple(found), tuple(m.attn for _, m in found))
    hf_attention = _classes("transformers.models.vit.modeling_vit", ["ViTAttention"]) + _classes(
        "transformers.models.deit.modeling_deit", ["DeiTAttention"]
    )
    if hf_attention:
        found = [(n, m) for n, m in modules if _is(getattr(m, "attention", None), hf_attention)]
        if found:
            return _Found("hf", tuple(found), tuple(m.attention for _, m in found))
    return None


def _found(model: nn.Module, method: str) -> _Found:
    found = _find(model)
    if found is None:
        raise ExplainkitError(f"{method} needs a vision transformer with attention blocks; {type(model).__name__} has none")
    return found


def attention_blocks(model: nn.Module, method: str = "this method") -> list[nn.Module]:
    """The transformer blocks of ``model`` whose attention :func:`trace_attention` reads, in
    forward order: torchvision's ``EncoderBlock``, timm's ``Block``, Hugging Face's ``ViTLayer``
    / ``DeiTLayer``. A model without them is an :class:`ExplainkitError` naming ``method``."""
    return [block for _, block in _found(model, method).blocks]


# --- the head after the blocks -----------------------------------------------------------------


def final_head(model: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """``tokens (N, T, D) -> logits (N, K)``: what the model does after its last block (final
    norm, pooling as the model pools, classifier), so that ``final_head(model)(x)`` for the last
    block's output equals the model's logits (Hugging Face: ``output.logits``). LeGrad applies it
    to every block's output.

    torchvision ``VisionTransformer``: ``heads(encoder.ln(x)[:, 0])``; timm:
    ``forward_head(norm(x))`` (class token, distilled average, mean pooling, attention pooling as
    the model is configured); Hugging Face ``ViTForImageClassification``,
    ``DeiTForImageClassification`` and ``DeiTForImageClassificationWithTeacher`` (the average of
    its class and distillation classifiers).
    """
    if type(model).__name__ == "LogitsOnly":  # explainkit's wrapper that returns a model's logits
        return final_head(model.model)
    torchvision_vit = _classes("torchvision.models.vision_transformer", ["VisionTransformer"])
    if _is(model, torchvision_vit):
        return lambda tokens: model.heads(model.encoder.ln(tokens)[:, 0])
    timm_vit = _classes("timm.models.vision_transformer", ["VisionTransformer"])
    if _is(model, timm_vit):
        return lambda tokens: model.forward_head(model.norm(tokens))
    name = type(model).__name__
    if name == "ViTForImageClassification" and hasattr(model, "vit"):
        return lambda tokens: model.classifier(model.vit.layernorm(tokens)[:, 0])
    if name == "DeiTForImageClassification" and hasattr(model, "deit"):
        return lambda tokens: model.classifier(model.deit.layernorm(tokens)[:, 0])
    if name == "DeiTForImageClassificationWithTeacher" and hasattr(model, "deit"):

        def teacher_head(tokens: torch.Tensor) -> torch.Tensor:
            normed = model.deit.layernorm(tokens)
            logits: torch.Tensor = (model.cls_classifier(normed[:, 0]) + model.distillation_classifier(normed[:, 1])) / 2
            return logits

        return teacher_head
    raise ExplainkitError(
        f"no known head for {name}: the final norm, pooling and classifier after the last block are read off torchvision "
        "VisionTransformer, timm VisionTransformer and Hugging Face ViT/DeiT image classifiers"
    )


def readout_tokens(model: Any, tokens: int, prefix: int) -> tuple[int, ...]:
    """The token rows the model's head reads, for a sequence of ``tokens`` with ``prefix`` prefix
    tokens: the class token ``(0,)``; ``(0, 1)`` for distilled DeiTs (timm's ``head_dist``, Hugging
    Face's ``...WithTeacher``), whose output averages a class and a distillation head; the patch
    tokens (every token where timm pools with the prefix) for models that pool by the mean or by
    attention (timm ``global_pool`` other than ``"token"``); the class token for other models with
    a prefix, all patch tokens for those without."""
    if type(model).__name__ == "LogitsOnly":  # explainkit's wrapper that returns a model's logits
        return readout_tokens(model.model, tokens, prefix)
    patches = tuple(range(prefix, tokens))
    timm_vit = _classes("timm.models.vision_transformer", ["VisionTransformer"])
    if _is(model, timm_vit):
        if isinstance(getattr(model, "head_dist", None), nn.Module):
            return (0, 1)
        if getattr(model, "global_pool", "token") == "token" and getattr(model, "attn_pool", None) is None and prefix > 0:
            return (0,)
        return tuple(range(tokens)) if getattr(model, "pool_include_prefix", False) else patches
    if type(model).__name__ == "DeiTForImageClassificationWithTeacher":
        return (0, 1)
    return (0,) if prefix > 0 else patches


# --- the patch, shared by concurrent traces of one model ---------------------------------------


def _mha_forward(
    module: nn.MultiheadAttention,
    record: Callable[[torch.Tensor], None],
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    need_weights: bool = True,
    attn_mask: torch.Tensor | None = None,
    **options: bool,  # average_attn_weights=True, is_causal=False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``nn.MultiheadAttention.forward`` for unmasked attention with one in-projection (what
    torchvision's ViT uses), computed explicitly so that the probabilities multiplied with ``V``
    are a tensor of the graph, handed to ``record``."""
    if key_padding_mask is not None or attn_mask is not None or options.get("is_causal", False):
        raise ExplainkitError("attention tracing supports unmasked self-attention only (torchvision's ViT)")
    if not module._qkv_same_embed_dim or module.bias_k is not None or module.add_zero_attn:
        raise ExplainkitError("attention tracing needs nn.MultiheadAttention with one in-projection and no extra key/value bias")
    if not module.batch_first:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    heads = module.num_heads
    weight, bias = module.in_proj_weight, module.in_proj_bias
    biases = bias.chunk(3) if bias is not None else (None, None, None)
    q, k, v = (
        F.linear(t, w, b).unflatten(-1, (heads, -1)).transpose(1, 2)  # (N, heads, T, d)
        for t, w, b in zip((query, key, value), weight.chunk(3), biases)
    )
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # scaled as PyTorch scales: q first
    probabilities = F.dropout(scores.softmax(dim=-1), module.dropout, module.training)
    record(probabilities)
    output = (probabilities @ v).transpose(1, 2).flatten(2)  # (N, T, D)
    output = F.linear(output, module.out_proj.weight, module.out_proj.bias)
    if not module.batch_first:
        output = output.transpose(0, 1)
    weights = None
    if need_weights:
        weights = probabilities.mean(dim=1) if options.get("average_attn_weights", True) else probabilities
    return output, weights


class _Patch:
    """The switches and hooks on one model while at least one trace of it is open."""

    def __init__(self, model: nn.Module, found: _Found) -> None:
        self.model, self.found = model, found
        self.count = 0
        self.sinks: dict[int, list[tuple[AttentionTrace, tuple[int, int]]]] = {}
        self.undo: list[Callable[[], None]] = []
        self.configs: list[Any] = []  # Hugging Face configs switched to eager (one per object)

    # recording: only the forwards of threads that opened a trace, into their innermost trace
    def _sink(self) -> tuple[AttentionTrace, tuple[int, int]] | None:
        stack = self.sinks.get(threading.get_ident())
        return stack[-1] if stack else None

    def record_attention(self, probabilities: torch.Tensor) -> None:
        sink = self._sink()
        if sink is not None:
            sink[0].probabilities.append(probabilities)

    def record_block(self, name: str, output: Any) -> None:
        sink = self._sink()
        if sink is None:
            return
        trace, images_hw = sink
        tokens = output[0] if isinstance(output, (tuple, list)) else output
        if not trace.block_outputs:  # the first block tells the token count: prefix, grid, readout
            layout = infer_layout(tuple(tokens.shape), images_hw, self.model, name)
            assert layout.grid is not None
            trace.prefix_tokens, trace.grid = layout.prefix, layout.grid
            trace.readout = readout_tokens(self.model, tokens.shape[1], layout.prefix)
        trace.block_outputs.append(tokens)

    def apply(self) -> None:
        """Switch every attention to its explicit form and hook the blocks; undo steps kept in order."""
        try:
            for name, block in self.found.blocks:
                handle = block.register_forward_hook(functools.partial(_block_hook, self, name))
                self.undo.append(handle.remove)
            for attention in self.found.attentions:
                getattr(self, f"_apply_{self.found.kind}")(attention)
        except BaseException:
            self.restore()
            raise

    def _apply_torchvision(self, attention: Any) -> None:
        had = "forward" in attention.__dict__
        previous = attention.__dict__.get("forward")
        attention.forward = functools.partial(_mha_forward, attention, self.record_attention)

        def undo() -> None:
            if had:
                attention.forward = previous
            else:
                del attention.forward

        self.undo.append(undo)

    def _apply_timm(self, attention: Any) -> None:
        fused = attention.fused_attn
        attention.fused_attn = False
        self.undo.append(lambda: setattr(attention, "fused_attn", fused))
        handle = attention.attn_drop.register_forward_hook(functools.partial(_probabilities_hook, self, 0))
        self.undo.append(handle.remove)

    def _apply_hf(self, attention: Any) -> None:
        config: Any = getattr(attention, "config", None) or getattr(self.model, "config", None)
        if not any(seen is config for seen in self.configs):
            self.configs.append(config)
            implementation = config._attn_implementation
            config._attn_implementation = "eager"
            self.undo.append(lambda: setattr(config, "_attn_implementation", implementation))
        handle = attention.register_forward_hook(functools.partial(_probabilities_hook, self, 1))
        self.undo.append(handle.remove)

    def restore(self) -> None:
        """Undo every step, last first; every step runs even when one fails."""
        errors = []
        while self.undo:
            try:
                self.undo.pop()()
            except Exception as exc:  # noqa: BLE001 - keep restoring the rest
                errors.append(exc)
        self.configs.clear()
        if errors:
            raise errors[0]


def _block_hook(patch: _Patch, name: str, module: nn.Module, inputs: tuple, output: Any) -> None:
    patch.record_block(name, output)


def _probabilities_hook(patch: _Patch, position: int, module: nn.Module, inputs: tuple, output: Any) -> None:
    """timm's ``attn_drop`` returns ``A`` itself (position 0 of a tensor); Hugging Face's attention
    returns ``(output, A)`` (position 1)."""
    if isinstance(output, torch.Tensor):
        probabilities: object = output
    else:
        probabilities = output[position] if isinstance(output, (tuple, list)) and len(output) > position else None
    if not isinstance(probabilities, torch.Tensor):
        version = getattr(sys.modules.get("transformers"), "__version__", "?")
        raise ExplainkitError(
            f"{type(module).__name__} returned no attention probabilities (transformers {version}); attention methods "
            "read Hugging Face ViTs from transformers >= 5, whose eager attention returns them"
        )
    patch.record_attention(probabilities)


_PATCHES: dict[int, _Patch] = {}
_PATCH_LOCK = threading.Lock()


@contextmanager
def trace_attention(model: nn.Module, images_hw: Sequence[int], method: str = "attention tracing") -> Iterator[AttentionTrace]:
    """Record each block's attention probabilities and output during the forward run inside.

    Args:
        model: a torchvision ``VisionTransformer``, a timm ViT/DeiT (with distillation or register
            tokens) or a Hugging Face ViT/DeiT; anything else is an :class:`ExplainkitError`.
        images_hw: the ``(H, W)`` of the images (to read the patch grid, as layouts do).
        method: the name used in the error for a model without attention blocks.

    Yields:
        An :class:`AttentionTrace`, filled by the forward run inside the block (run it with
        autograd on to differentiate through the probabilities). The model is restored on exit.
    """
    found = _found(model, method)
    trace = AttentionTrace()
    owner = threading.get_ident()
    key = id(model)
    with _PATCH_LOCK:
        patch = _PATCHES.get(key)
        if patch is None:
            patch = _Patch(model, found)
            patch.apply()
            _PATCHES[key] = patch
        patch.count += 1
        patch.sinks.setdefault(owner, []).append((trace, (int(images_hw[0]), int(images_hw[1]))))
    try:
        yield trace
    finally:
        with _PATCH_LOCK:
            stack = patch.sinks[owner]
            stack.pop()
            if not stack:
                del patch.sinks[owner]
            patch.count -= 1
            if patch.count == 0:
                del _PATCHES[key]
                patch.restore()


__all__ = ["AttentionTrace", "attention_blocks", "final_head", "readout_tokens", "trace_attention"]

"""Multi-layer fusion: one explainer per layer, their maps fused into one (RefineCAM, Poly-CAM).

A deep layer knows *what* the class is but sees the image through a 4x4 or 7x7 grid; a shallow
layer sees 32x32 or 56x56 but knows little about the class. Fusion methods take a CAM at
several layers and combine them so the deep map decides *where* and the shallow maps add
detail. :class:`FusedCAM` is the general mechanism: any registered method (``method="gradcam"``,
``"scorecam"``, ``"eigencam"``, a third party's name) or any explainer class, at any list of
layers (``layers=["layer2", "layer3", "layer4"]``), fused by a rule: ``rule="refine"``
(:class:`RefineCAM`) or ``rule="poly"`` (:class:`PolyCAM`).

Speed: when the method is a gradient CAM (:class:`~explainkit.explainers.gradient.GradientCAM`
that does not override ``compute``), every layer's gradient comes from **one** forward and
**one** backward (one batched backward per chunk of classes for ``"all"`` and top-k): the
shallowest layer's output becomes an autograd leaf, the deeper layers' outputs stay in the
graph, and ``torch.autograd.grad`` of the scores with respect to all of them at once gives
``∂y/∂A_l`` for every ``l`` -- the gradient with respect to an intermediate tensor is the total
derivative through every path above it, which is what a single-layer Grad-CAM computes with
its own leaf at ``l`` (tested equal). pytorch-grad-cam's ``RefineCAM`` runs one full forward
and ``backward()`` per layer and per target. Other methods (Score-CAM, Eigen-CAM, plugins)
fall back to one call of the method per layer.
"""

from __future__ import annotations

import threading
import warnings
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence, cast

import torch
import torch.nn as nn

from explainkit.errors import ExplainkitError, LayerNotFoundError
from explainkit.explainers.base import (
    Computed,
    Explainer,
    _as_computed,
    as_model_dtype,
    check_images,
    normalize_maps,
    postprocess,
    upsample_bilinear,
)
from explainkit.explainers.gradient import GradientCAM
from explainkit.models.layers import _POOLS, resolve_layer, trace_layers
from explainkit.models.layouts import infer_layout, resolve_layout
from explainkit.models.modes import evaluation_mode
from explainkit.targets import BoundTarget, Target, Targets, as_target

#: layers fused when none are given: the default layer and its predecessors of larger resolution
DEFAULT_DEPTH = 3

Method = str | Callable[..., Any]
LayerSpec = str | nn.Module


# --- the layers ---------------------------------------------------------------------------------


def parse_layers(text: str) -> list[str]:
    """``"layer2, layer3,layer4"`` -> ``["layer2", "layer3", "layer4"]`` (the CLI's ``--layer a,b,c``)."""
    return [name.strip() for name in text.split(",") if name.strip()]


def _area(model: nn.Module, shape: tuple[int, ...], image_hw: tuple[int, int], name: str) -> int | None:
    """Positions in the map of a layer output of ``shape`` (``None``: not a feature map)."""
    try:
        layout = infer_layout(shape, image_hw, model, name)
    except LayerNotFoundError:
        return None
    if layout.kind == "tokens":
        return None if layout.grid is None else layout.grid[0] * layout.grid[1]
    rows, cols = shape[1:3] if layout.kind == "nhwc" else shape[2:]
    return int(rows) * int(cols)


def default_fusion_layers(model: nn.Module, deepest: LayerSpec | None = None, depth: int = DEFAULT_DEPTH) -> list[str]:
    """``deepest`` (default: :func:`~explainkit.models.layers.default_layer`) and up to ``depth - 1``
    layers before it, each of strictly larger resolution than the next, shallowest first.

    Read off the dry forward that picks the default layer (:func:`~explainkit.models.layers.trace_layers`):
    walking back from ``deepest`` in the order modules finish, the first feature map of a larger
    resolution is the *last* module at that resolution (a stage's output, not a block inside
    it). Siblings of ``deepest`` are preferred (ResNet18: ``layer2, layer3, layer4``; timm:
    ``stages.1..3``); when it has none (torchvision VGG's ``features``), any module that ran
    before it (``features.22, features.29, features``: the layers the Poly-CAM authors pick).
    """
    deepest_name, _ = resolve_layer(model, deepest)
    trace = trace_layers(model)
    shape = trace.outputs.get(deepest_name)
    if trace.error is not None or not isinstance(shape, tuple):
        why = trace.error or f"layer {deepest_name!r} did not return a tensor in a dry forward"
        raise LayerNotFoundError(f"cannot pick layers to fuse below {deepest_name!r} ({why}); pass layers=[...] explicitly")
    image_hw = trace.resized or trace.input_size[1:]
    modules = dict(model.named_modules())
    order = list(trace.outputs)
    before = order[: order.index(deepest_name)]
    parent = deepest_name.rpartition(".")[0]

    def walk(candidates: list[str]) -> list[str]:
        area = _area(model, shape, image_hw, deepest_name)
        chosen: list[str] = []
        for name in reversed(candidates):
            if len(chosen) == depth - 1 or area is None:
                break
            output = trace.outputs[name]
            if (
                isinstance(modules[name], _POOLS)
                or name in trace.final
                or not isinstance(output, tuple)
                or any(name.startswith(c + ".") for c in chosen)
                or trace.reading(model, name) is None
            ):
                continue
            larger = _area(model, output, image_hw, name)
            if larger is not None and larger > area:
                chosen.append(name)
                area = larger
        return chosen

    siblings = [name for name in before if name.rpartition(".")[0] == parent and not name.startswith(deepest_name + ".")]
    chosen = walk(siblings)
    if len(chosen) < depth - 1:
        chosen = walk(before)
    return [*reversed(chosen), deepest_name]


def resolve_fusion_layers(
    model: nn.Module, layer: LayerSpec | Sequence[LayerSpec] | None, layers: str | Sequence[LayerSpec] | None
) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of each layer to fuse: ``layers`` (a list or ``"a,b,c"``), or ``layer``
    given as such a list, or :func:`default_fusion_layers` below ``layer`` (a single layer: the deepest)."""
    if layers is not None and layer is not None:
        raise ExplainkitError("give layers=[...] or one layer (the deepest, fused with those before it), not both")
    given: Any = layers if layers is not None else layer
    if isinstance(given, str) and "," in given:
        given = parse_layers(given)
    if isinstance(given, (str, nn.Module)) and layers is not None:  # layers="layer4": a list of one
        given = [given]
    elif given is None or isinstance(given, (str, nn.Module)):
        given = default_fusion_layers(model, given)
    if not isinstance(given, (list, tuple)):
        raise ExplainkitError(f"layers must be a list of dotted layer names or modules, not {type(given).__name__}")
    if len(given) < 2:
        raise ExplainkitError(
            f"layers must name at least two layers to fuse, got {len(given)}; for one layer use the method alone"
        )
    resolved = []
    for item in given:
        if not isinstance(item, (str, nn.Module)):
            raise ExplainkitError(f"layers must hold dotted layer names or modules, not {type(item).__name__}")
        try:
            resolved.append(resolve_layer(model, item))
        except LayerNotFoundError as exc:
            raise LayerNotFoundError(f"layers: {exc}") from None
    names = [name for name, _ in resolved]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise ExplainkitError(f"layers lists {', '.join(map(repr, twice))} more than once")
    return resolved


# --- the per-layer explainers -------------------------------------------------------------------


def _method_factory(method: Method) -> tuple[str, Callable[..., Explainer], Any]:
    """``(name, factory returning an Explainer, what to check options against)`` for ``method``."""
    from explainkit.registry import as_explainer_factory, require_explainer

    factory: Callable[..., Explainer]
    registered: Any
    if isinstance(method, str):
        registration = require_explainer(method)
        factory, registered, name = registration.factory, registration.registered, method
    elif isinstance(method, type) and issubclass(method, Explainer):
        factory, registered, name = method, method, method.name
    elif callable(method):
        name = str(getattr(method, "name", None) or getattr(method, "__name__", type(method).__name__))
        factory, registered = as_explainer_factory(name, cast(Callable[..., Any], method)), method
    else:
        raise ExplainkitError(f"method must be a registered explainer name or an explainer class, not {type(method).__name__}")
    if isinstance(registered, type) and issubclass(registered, FusedCAM):
        raise ExplainkitError(f"method {name!r} is itself a fusion of layers; pick a single-layer method such as 'gradcam'")
    return name, factory, registered


# --- one forward, every layer's gradient -------------------------------------------------------


@contextmanager
def layer_outputs_as_leaves(layers: Sequence[nn.Module]) -> Iterator[tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]]:
    """:func:`~explainkit.explainers.gradient.layer_output_as_leaf` for several layers at once:
    yields ``(inputs, outputs)``, filled by the forward run inside the block: ``inputs[i]`` is what
    to differentiate for ``layers[i]`` and ``outputs[i]`` its detached output (its last call).

    Autograd is off until the first of ``layers`` runs; that output becomes a fresh leaf and
    autograd is on from there. A later layer's output depends on that leaf and must not be
    detached (that would cut the path from the scores to the shallower layers); it gets a zero
    *probe* leaf added instead, ``A_l + 0``, so ``torch.autograd.grad(scores, [inputs[i] ...])``
    gives every ``∂y/∂A_l`` (the gradient reaching the probe is the one reaching ``A_l``) in one
    backward, vmap-batched over classes too (a gradient taken for the intermediate tensor itself
    has no batching rule). The hooks return new tensors, so an in-place op after a layer
    (``ReLU(inplace=True)``) never modifies what was captured. Hooks removed and grad mode
    restored on exit, also after an exception; forwards run by other threads are left alone.
    """
    captured: dict[int, torch.Tensor] = {}
    activations: dict[int, torch.Tensor] = {}
    owner = threading.get_ident()

    def capture(index: int):
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor | None:
            if threading.get_ident() != owner:
                return None
            if not isinstance(output, torch.Tensor):
                raise ExplainkitError(
                    f"layer {type(module).__name__} returns {type(output).__name__}, not a tensor; pick another layer"
                )
            torch.set_grad_enabled(True)
            if output.requires_grad:  # above an earlier leaf: stay in the graph, add a zero probe
                probe = torch.zeros_like(output).requires_grad_(True)
                captured[index] = probe
                activations[index] = output.detach()
                return output + probe
            leaf = output.detach().requires_grad_(True)
            captured[index] = leaf
            activations[index] = leaf.detach()
            return leaf.clone()

        return hook

    grad_enabled = torch.is_grad_enabled()
    handles = []
    torch.set_grad_enabled(False)
    try:
        for index, layer in enumerate(layers):
            handles.append(layer.register_forward_hook(capture(index)))
        yield captured, activations
    finally:
        for handle in handles:
            handle.remove()
        torch.set_grad_enabled(grad_enabled)


def _gradients(
    scores: torch.Tensor, tensors: list[torch.Tensor], grad_outputs: torch.Tensor, retain_graph: bool
) -> list[torch.Tensor]:
    """``d(scores . grad_outputs)/d tensors[l]`` for every ``l``, in one backward; zeros where the
    scores do not depend on a layer (a constant user target)."""
    if not scores.requires_grad:
        return [torch.zeros_like(t) for t in tensors]
    found = torch.autograd.grad(scores, tensors, grad_outputs, retain_graph=retain_graph, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for g, t in zip(found, tensors)]


def _batched_gradients(
    scores: torch.Tensor, tensors: list[torch.Tensor], grad_outputs: torch.Tensor, retain_graph: bool, batched: bool
) -> list[torch.Tensor]:
    """``(J', *tensors[l].shape)`` for every ``l``: one gradient per row of ``grad_outputs``, in one
    vmap-batched backward when ``batched`` and every op has a batching rule, else column by column."""
    if not scores.requires_grad:
        return [t.new_zeros(grad_outputs.shape[0], *t.shape) for t in tensors]
    if batched:
        try:
            # The graph is kept through this try (its buffers are freed with it on return): a
            # backward that fails half-way under vmap must leave it whole for the loop below.
            found = torch.autograd.grad(
                scores, tensors, grad_outputs, is_grads_batched=True, retain_graph=True, allow_unused=True
            )
            return [t.new_zeros(grad_outputs.shape[0], *t.shape) if g is None else g for g, t in zip(found, tensors)]
        except RuntimeError as exc:  # an op without a batching rule
            warnings.warn(f"batched gradients unavailable ({exc}); computing columns one by one", RuntimeWarning, stacklevel=3)
    last = grad_outputs.shape[0] - 1
    columns = [_gradients(scores, tensors, g, retain_graph or k < last) for k, g in enumerate(grad_outputs)]
    return [torch.stack(per_layer) for per_layer in zip(*columns)]


# --- the rules ---------------------------------------------------------------------------------


def refine_rule(maps: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    """RefineCAM's fusion (:class:`RefineCAM`) of raw per-layer maps ``(..., h_l, w_l)``: each
    ReLU'd and scaled to [0, 1] at its resolution, upsampled to ``size``, scaled again; their product."""
    fused = None
    for raw in maps:
        scaled = normalize_maps(upsample_bilinear(normalize_maps(raw.float().relu()), size))
        fused = scaled if fused is None else fused * scaled
    assert fused is not None
    return fused


def percentile_normalize(maps: torch.Tensor, outlier: float = 0.1) -> torch.Tensor:
    """Poly-CAM's normalisation of each ``(h, w)`` map: ``(x - p_low) / max(p_high, 1e-12)``
    clipped to [0, 1], with ``p_low``/``p_high`` its ``outlier`` and ``100 - outlier`` percentiles
    (linear interpolation, as ``numpy.percentile``). Sort-based, on the device, any batch size."""
    flat = maps.flatten(-2)
    ordered = flat.sort(dim=-1).values
    count = ordered.shape[-1]

    def percentile(q: float) -> torch.Tensor:
        position = q / 100 * (count - 1)
        low = int(position)
        high = min(low + 1, count - 1)
        fraction = position - low
        return ordered[..., low : low + 1] * (1 - fraction) + ordered[..., high : high + 1] * fraction

    low, high = percentile(outlier), percentile(100 - outlier)
    scaled = (flat - low) / high.clamp_min(1e-12)
    return scaled.clamp(0, 1).view_as(maps)


def local_relevance_normalization(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Poly-CAM's LNorm: ``M / max(U(D(M)), 1e-12)`` with ``D`` bilinear resizing to the deeper
    layer's ``size`` and ``U`` back to ``M``'s (``align_corners=False``, as the authors' ``F.interpolate``):
    each region's relevance relative to its neighbourhood at the deeper resolution."""
    local = upsample_bilinear(upsample_bilinear(maps, size), (maps.shape[-2], maps.shape[-1]))
    return maps / local.clamp_min(1e-12)


def poly_rule(maps: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    """Poly-CAM's fusion (:class:`PolyCAM`) of raw per-layer maps ``(..., h_l, w_l)``, taken in
    order of decreasing resolution whatever the order given; the result is at the shallowest
    layer's resolution (``size`` unused: the base upsamples)."""
    areas = [raw.shape[-2] * raw.shape[-1] for raw in maps]
    ordered = [raw.float().relu() for _, raw in sorted(zip(areas, maps), key=lambda pair: -pair[0])]  # stable
    fused = ordered[-1]
    for layer_map in reversed(ordered[:-1]):
        local = local_relevance_normalization(layer_map, (fused.shape[-2], fused.shape[-1]))
        fused = (local * upsample_bilinear(fused, (layer_map.shape[-2], layer_map.shape[-1]))).relu()
    return percentile_normalize(fused)


Rule = Callable[[list[torch.Tensor], tuple[int, int]], torch.Tensor]
#: fusion rules by name (``FusedCAM(rule=...)``, the CLI's ``--fuse``)
RULES: dict[str, Rule] = {"refine": refine_rule, "poly": poly_rule}


def _rule(rule: object) -> tuple[str, Rule]:
    name = rule[: -len("cam")] if isinstance(rule, str) and rule.endswith("cam") else rule  # "polycam" -> "poly"
    if not isinstance(name, str) or name not in RULES:
        raise ExplainkitError(f"rule must be one of {', '.join(sorted(RULES))}; got {rule!r}")
    return name, RULES[name]


# --- the fused explainer -----------------------------------------------------------------------


class FusedCAM(Explainer):
    """One ``method`` explainer per layer, their raw maps fused by ``rule``
    (:func:`refine_rule`: :class:`RefineCAM`'s product; :func:`poly_rule`: :class:`PolyCAM`'s
    deep-to-shallow recursion). Registered as ``fusedcam``, the general form of both.

    Args:
        model: the model to explain.
        layer: the deepest layer, fused with the layers of larger resolution before it
            (:func:`default_fusion_layers`; ``None``: the model's default layer), or a list of
            layers / ``"a,b,c"`` (what ``--layer a,b,c`` passes).
        layers: the layers to fuse, dotted names or modules (at least two; give this or ``layer``).
        method: a registered explainer name (``"gradcam"``, ``"layercam"``, ``"scorecam"``, a
            plugin's) or an :class:`~explainkit.explainers.base.Explainer` class or factory.
        rule: ``"refine"`` (default) or ``"poly"`` (:data:`RULES`).
        **options: the method's own options (``autocast=``, ``class_chunk=``, ``batch_size=``...),
            passed to each layer's explainer; an option the method does not take is an
            :class:`~explainkit.errors.ExplainkitError` naming it.

    Gradient methods share one forward and one backward over every layer (module docstring);
    others run once per layer. :meth:`explain_layers` returns the per-layer maps.
    """

    name = "fusedcam"
    family = "fusion"

    def __init__(
        self,
        model: nn.Module,
        layer: LayerSpec | Sequence[LayerSpec] | None = None,
        *,
        layers: str | Sequence[LayerSpec] | None = None,
        method: Method = "gradcam",
        rule: str = "refine",
        **options: Any,
    ) -> None:
        self.rule, self._fuse = _rule(rule)
        self.model = model
        resolved = resolve_fusion_layers(model, layer, layers)
        self.layer_names = [name for name, _ in resolved]
        self.layer_name = ",".join(self.layer_names)
        self.layer = resolved[-1][1]  # the last listed (by default the deepest)
        self.method_name, factory, registered = _method_factory(method)
        from explainkit.registry import check_factory_options  # the registry imports explainers

        check_factory_options(self.method_name, registered, options, kind="method")
        self.explainers = [factory(model, layer=module, **options) for _, module in resolved]
        if not all(getattr(explainer, "reads_layer", True) for explainer in self.explainers):
            raise ExplainkitError(
                f"method {self.method_name!r} does not read one layer (it ignores layer), so there is nothing to fuse across layers"
            )
        self.joint = all(
            isinstance(e, GradientCAM) and type(e).compute is GradientCAM.compute and type(e) is type(self.explainers[0])
            for e in self.explainers
        )

    def __repr__(self) -> str:
        rule = "" if type(self) is not FusedCAM else f", rule={self.rule!r}"
        return f"{type(self).__name__}(method={self.method_name!r}, layers={self.layer_names!r}{rule})"

    # the rule ---------------------------------------------------------------------------------

    def fuse(self, maps: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        """Fuse raw per-layer maps ``(..., h_l, w_l)`` (in :attr:`layer_names` order) into one
        ``(..., h, w)`` map at any resolution; ``size`` is the input's ``(H, W)``."""
        return self._fuse(maps, size)

    # the per-layer maps -----------------------------------------------------------------------

    def layer_maps(self, images: torch.Tensor, target: Target) -> tuple[list[torch.Tensor], BoundTarget, torch.Tensor]:
        """``(raw maps, one per layer, (N, h_l, w_l) or (N, J, h_l, w_l); bound target; scores)``,
        the model already in eval mode (as :meth:`compute`); padding columns zeroed."""
        if self.joint:
            raws, bound, scores = self._gradient_maps(images, target)
        else:
            raws, bound, scores = self._per_layer_maps(images, target)
        if bound.valid is not None:
            raws = [r * bound.valid[:, : r.shape[1], None, None].to(r.dtype) if r.ndim == 4 else r for r in raws]
        return raws, bound, scores

    def _gradient_maps(self, images: torch.Tensor, target: Target) -> tuple[list[torch.Tensor], BoundTarget, torch.Tensor]:
        explainers = cast(list[GradientCAM], self.explainers)  # self.joint: all GradientCAMs
        first = explainers[0]
        autocast = torch.autocast(images.device.type, dtype=first.autocast, enabled=first.autocast is not None)
        with target.forward_context(), layer_outputs_as_leaves([e.layer for e in explainers]) as (captured, outputs), autocast:
            output = self.model(images)
            missing = [name for i, name in enumerate(self.layer_names) if i not in captured]
            if missing:
                raise ExplainkitError(f"layers {', '.join(map(repr, missing))} did not run in the model's forward pass")
            bound = target.bind(output)
            scores = bound(output)  # (N,) or (N, J)
        tensors = [captured[i] for i in range(len(explainers))]  # what the gradients are taken for
        layer_outputs = [outputs[i] for i in range(len(explainers))]
        layouts = [
            resolve_layout(e.layout, t, images, self.model, name)
            for e, t, name in zip(explainers, layer_outputs, self.layer_names)
        ]
        activations = [layout.to_channels_first(t.float()) for layout, t in zip(layouts, layer_outputs)]

        def cams(gradients: list[torch.Tensor]) -> list[torch.Tensor]:
            return [
                e._cam(a, layout.to_channels_first(g.float()))
                for e, a, layout, g in zip(explainers, activations, layouts, gradients)
            ]

        if scores.ndim == 1:
            return cams(_gradients(scores, tensors, torch.ones_like(scores), False)), bound, scores
        columns, chunk_size = scores.shape[1], first.class_chunk
        basis = torch.eye(columns, dtype=scores.dtype, device=scores.device)
        chunks: list[list[torch.Tensor]] = []
        for start in range(0, columns, chunk_size):
            rows = basis[start : start + chunk_size, None, :].expand(-1, scores.shape[0], -1)  # (J', N, J)
            last = start + chunk_size >= columns
            chunks.append(cams(_batched_gradients(scores, tensors, rows, not last, bound.batched)))  # each (J', N, h, w)
        return [torch.cat(per_layer).transpose(0, 1) for per_layer in zip(*chunks)], bound, scores

    def _per_layer_maps(self, images: torch.Tensor, target: Target) -> tuple[list[torch.Tensor], BoundTarget, torch.Tensor]:
        computed = [_as_computed(e.compute(images, target), e.name) for e in self.explainers]
        return [c.raw for c in computed], computed[0].target, computed[0].scores

    # the contract -----------------------------------------------------------------------------

    def compute(self, images: torch.Tensor, target: Target) -> Computed:
        raws, bound, scores = self.layer_maps(images, target)
        return Computed(self.fuse(raws, (images.shape[-2], images.shape[-1])), bound, scores)

    def explain_layers(self, images: torch.Tensor, targets: Targets = None, normalize: bool = True) -> dict[str, torch.Tensor]:
        """Each layer's own map before fusion, post-processed like any explainer's (ReLU,
        upsampling to the input, optional [0, 1] scaling), by layer name; from the same single
        forward and backward as a fused call."""
        check_images(images)
        images = as_model_dtype(images, self.model)
        if images.is_inference():
            images = images.clone()
        with evaluation_mode(self.model):
            raws, _, _ = self.layer_maps(images, as_target(targets))
        size = (images.shape[-2], images.shape[-1])
        return {name: postprocess(raw, size, normalize) for name, raw in zip(self.layer_names, raws)}


class RefineCAM(FusedCAM):
    r"""RefineCAM: the product of a CAM's normalised maps at several layers.

    From pytorch-grad-cam (``RefineCAM``, 1.5.7; also torch-cam 0.5's ``RefineCAM``), after
    "How to Evaluate and Refine your CAM" (arXiv 2605.14641). With ``M_l`` the method's map at
    layer ``l``, ``s(x) = (x - \min x) / (\max x - \min x)`` per map and ``U`` bilinear
    upsampling to the input:

    .. math:: L = s\Big(\prod_l s\big(U\, s(\mathrm{ReLU}(M_l))\big)\Big)

    pytorch-grad-cam's rule step for step: each layer's map scaled at its own resolution,
    resized, scaled again (its single-layer ``forward`` does both), the product taken at the
    input resolution and scaled (by the base; ``normalize=False`` returns the product itself,
    in [0, 1]). A location survives only where every layer agrees: the deep map removes the
    shallow maps' off-object noise, the shallow maps sharpen the deep map's blobs.

    Cost with a gradient method: one forward and one backward for all layers (pytorch-grad-cam:
    one forward and backward per layer and per target), plus a resize per layer. Prefer it to a
    single deep layer when maps must follow object boundaries; pytorch-grad-cam's default
    method is Grad-CAM++ (``method="gradcam++"``), explainkit's Grad-CAM.
    """

    name = "refinecam"

    def __init__(
        self,
        model: nn.Module,
        layer: LayerSpec | Sequence[LayerSpec] | None = None,
        *,
        layers: str | Sequence[LayerSpec] | None = None,
        method: Method = "gradcam",
        **options: Any,
    ) -> None:
        _own_rule(self.name, options)
        super().__init__(model, layer, layers=layers, method=method, rule="refine", **options)


class PolyCAM(FusedCAM):
    r"""Poly-CAM (Englebert, Cornu & De Vleeschouwer, "Poly-CAM: High resolution class activation
    map for convolutional neural networks", 2022, https://arxiv.org/abs/2204.13359; the
    authors' code: github.com/aenglebert/polycam, ``_PolyCAM.compute_cams``).

    From the deepest layer ``L`` to the shallowest, each layer's map rescaled by its local
    relevance (LNorm) multiplies the upsampled map from the layers above:

    .. math:: P_L = \mathrm{ReLU}(M_L), \qquad
              P_l = \mathrm{ReLU}\Big(\frac{\mathrm{ReLU}(M_l)}{\max(U_l D_{l+1} \mathrm{ReLU}(M_l), 10^{-12})}
                    \cdot U_l P_{l+1}\Big)

    with ``D_{l+1}`` bilinear resizing to the resolution of ``P_{l+1}`` and ``U_l`` to layer
    ``l``'s; the result is normalised by its 0.1 and 99.9 percentiles
    (``(P - p_{0.1}) / p_{99.9}`` clipped to [0, 1]) and upsampled to the input. Layers are taken
    in order of decreasing resolution whatever order they are given in. The paper's weights
    (PCAM+/-, from masked forwards) are one choice of ``M_l``; here ``M_l`` is any method's map
    (``method="gradcam"`` by default, ``"scorecam"`` is closest to PCAM+).

    Cost with a gradient method: one forward and one backward for all layers, then a few
    resizes at the shallowest resolution. Prefer it for maps at the shallowest layer's
    resolution that still follow the deep layer's class evidence; ``normalize=False`` returns
    the percentile-normalised map (its scale is the rule's, not the model's).
    """

    name = "polycam"

    def __init__(
        self,
        model: nn.Module,
        layer: LayerSpec | Sequence[LayerSpec] | None = None,
        *,
        layers: str | Sequence[LayerSpec] | None = None,
        method: Method = "gradcam",
        **options: Any,
    ) -> None:
        _own_rule(self.name, options)
        super().__init__(model, layer, layers=layers, method=method, rule="poly", **options)


def _own_rule(name: str, options: dict[str, Any]) -> None:
    if "rule" in options:
        raise ExplainkitError(f"{name} fuses by its own rule; for rule={options['rule']!r} use fusedcam")


def fuse_layers(
    rule: str, model: nn.Module, method: Method = "gradcam", layers: str | Sequence[LayerSpec] | None = None, **options: Any
) -> FusedCAM:
    """``method`` at ``layers`` fused by ``rule`` (``"refine"``/``"refinecam"`` or ``"poly"``/``"polycam"``):
    a :class:`RefineCAM` or :class:`PolyCAM`.

    Example:
        >>> cam = fuse_layers("poly", model, "layercam", "layer2,layer3,layer4")
        >>> maps = cam(images)  # (N, H, W)
    """
    name, _ = _rule(rule)
    return {"refine": RefineCAM, "poly": PolyCAM}[name](model, layers=layers, method=method, **options)


__all__ = [
    "DEFAULT_DEPTH",
    "RULES",
    "FusedCAM",
    "PolyCAM",
    "RefineCAM",
    "default_fusion_layers",
    "fuse_layers",
    "layer_outputs_as_leaves",
    "local_relevance_normalization",
    "parse_layers",
    "percentile_normalize",
    "poly_rule",
    "refine_rule",
    "resolve_fusion_layers",
]

"""Finding the layer a CAM is taken at.

The default layer is chosen from one dry forward of the model (:func:`trace_layers`), so it is
always a module the forward really calls and whose output really is a feature map: a container
that its parent iterates child by child (torchvision's MaxViT ``blocks``, timm's FastViT
``stages``) never runs as a module, and a hook on it would never fire. The rules, in order:

1. a layer measured for the model card's architecture (ResNet18-CIFAR: ``layer3``);
2. detectors and segmenters whose ``backbone`` returns a dict of levels (torchvision's FPN,
   ``IntermediateLayerGetter`` and SSD feature extractors; a CAM needs one tensor): the deepest
   backbone output that every level is built from (:func:`_backbone_of_levels`);
3. plain vision transformers (every block norm outputs the same token sequence): the last block's
   first norm, whose patch tokens still map to the image (pytorch-grad-cam's advice);
4. timm models: the last stage that timm declares in ``model.feature_info``;
5. a last stage by its conventional name (torchvision's ``layer4``, ``features``, ``trunk_output``...)
   or Hugging Face's ``encoder.stages``;
6. anything else: the last module to finish in the forward whose output is a feature map, which
   for a multi-branch network (GoogLeNet, Inception) is the last block, not one of its branches.
"""

from __future__ import annotations

import difflib
import threading
import weakref
from dataclasses import dataclass

import torch
import torch.nn as nn

from explainkit.errors import LayerNotFoundError, first_line
from explainkit.models.layouts import infer_layout
from explainkit.models.modes import evaluation_mode

# Top-level names of a CNN's last stage: ResNets (torchvision, timm), torchvision's RegNet,
# torchvision's VGG/DenseNet/MobileNet/EfficientNet/ConvNeXt/Swin, timm's ConvNeXt/Swin/EfficientNet/RegNet.
DEFAULT_LAYER_NAMES = ("layer4", "trunk_output", "features", "stages", "layers", "blocks", "s4")
# Layers measured to be more faithful than the family rule for one of our architectures (by model
# card): ResNet18-CIFAR's layer3 (8x8) beats layer4 (4x4) on deletion, insertion and both ROAD
# scores with explainkit's evaluate (README, "layer3 or layer4").
ARCHITECTURE_LAYERS = {
    "resnet18-cifar": ("layer3", "measured more faithful than layer4 for ResNet18-CIFAR (deletion, insertion, ROAD)"),
}
# The first norm of a transformer block, by library: torchvision, timm, Hugging Face.
BLOCK_NORMS = ("ln_1", "norm1", "layernorm_before", "norm_out")  # norm_out: TNT's outer (patch) blocks
# Input size of the dry forward when neither the card nor the model declares one.
FALLBACK_INPUT_SIZE = 224
# Pooling only shrinks the map before it: never a default layer of its own.
_POOLS = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.AvgPool2d, nn.MaxPool2d)
# How the trace records a module that returns a dict (an FPN's or IntermediateLayerGetter's levels).
_DICTS = ("OrderedDict", "dict")

Shape = tuple[int, ...]


@dataclass(frozen=True)
class LayerTrace:
    """What one dry forward of a model showed.

    input_size: the ``(C, H, W)`` it ran on. outputs: each submodule's output shape (a tuple) or
    the type name of a non-tensor output, in the order the modules *finished*; a submodule the
    forward never called is absent. error: why the forward failed (then ``outputs`` is empty).
    resized: the ``(H, W)`` batch a detector's own transform made of the image (torchvision's
    ``GeneralizedRCNNTransform`` resizes to ``min_size`` and pads; SSD's squashes to a square), which
    its feature maps follow; ``None`` when the model runs on the image as given.
    final: the submodules whose output *is* the model's output tensor (a segmenter's decode head
    returning its logits): a map of them weighs the class scores by themselves, so no default.
    """

    input_size: tuple[int, int, int]
    outputs: dict[str, Shape | str]
    error: str | None = None
    resized: tuple[int, int] | None = None
    final: frozenset[str] = frozenset()

    def ran(self, name: str) -> bool:
        return name in self.outputs

    def reading(self, model: nn.Module, name: str) -> str | None:
        """How explainkit reads ``name``'s output as a map (``nchw``, ``tokens: ...``), or ``None``
        when it is not a feature map of this batch with more than one position."""
        shape = self.outputs.get(name)
        if not isinstance(shape, tuple) or len(shape) not in (3, 4) or shape[0] != 1:
            return None
        height, width = self.resized or self.input_size[1:]
        try:
            layout = infer_layout(shape, (height, width), model, name)
        except LayerNotFoundError:
            return None
        if layout.kind == "tokens":
            return layout.describe()
        rows, cols = shape[1:3] if layout.kind == "nhwc" else shape[2:]
        # a map of the image has more than one position and the image's aspect ratio (to a cell);
        # attention internals such as (1, heads, tokens, dim) do not
        if rows * cols <= 1 or abs(rows - cols * height / width) > 1:
            return None
        return layout.describe()


_TRACES: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, LayerTrace]] = weakref.WeakKeyDictionary()
_TRACE_LOCK = threading.Lock()


def dry_input_size(model: nn.Module) -> tuple[int, int, int]:
    """``(C, H, W)`` the model expects: its card's, else what the model declares (timm and
    torchvision ViTs, Hugging Face configs, timm's pretrained config), else 3 x 224 x 224."""
    card = getattr(model, "card", None)
    if card is not None and len(getattr(card, "input_size", ())) == 3:
        c, h, w = card.input_size
        return int(c), int(h), int(w)
    first_conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    channels = first_conv.in_channels if first_conv is not None else 3
    config = getattr(model, "config", None)
    pretrained = getattr(model, "pretrained_cfg", None)
    declared = (
        getattr(getattr(model, "patch_embed", None), "img_size", None),  # timm
        getattr(model, "image_size", None),  # torchvision ViT
        getattr(config, "image_size", None),  # Hugging Face
        pretrained.get("input_size", (None,))[1:] if isinstance(pretrained, dict) else None,  # timm
    )
    for size in declared:
        if isinstance(size, int) and size > 0:
            return channels, size, size
        if isinstance(size, (tuple, list)) and len(size) == 2 and all(isinstance(s, int) and s > 0 for s in size):
            return channels, int(size[0]), int(size[1])
    return channels, FALLBACK_INPUT_SIZE, FALLBACK_INPUT_SIZE


def trace_layers(model: nn.Module, input_size: tuple[int, int, int] | None = None) -> LayerTrace:
    """Run one zero image through ``model`` (eval mode, no autograd, restored after) and record
    every submodule's output shape. Cached per model object and input size; a model whose
    submodules change is traced again."""
    size = tuple(input_size) if input_size is not None else dry_input_size(model)
    named = [(name, module) for name, module in model.named_modules() if name]
    key = (size, tuple(id(module) for _, module in named))
    with _TRACE_LOCK:
        cached = _TRACES.get(model)
    if cached is not None and cached[0] == key:
        return cached[1]
    outputs: dict[str, Shape | str] = {}
    storage: dict[str, tuple[int, Shape]] = {}  # each tensor output's data pointer and shape: the model's own output
    resized: list[tuple[int, int]] = []
    owner = threading.get_ident()

    def recorder(name: str):
        def record(module: nn.Module, inputs: tuple, output: object) -> None:
            if threading.get_ident() == owner and name not in outputs:  # the first call of a shared module
                outputs[name] = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
                if isinstance(output, torch.Tensor):
                    storage[name] = (output.data_ptr(), tuple(output.shape))
                batch = _resized_batch(output)
                if batch is not None and not resized:
                    resized.append(batch)

        return record

    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    dtype = parameter.dtype if parameter is not None and parameter.dtype.is_floating_point else torch.float32
    handles = [module.register_forward_hook(recorder(name)) for name, module in named]
    error, final = None, frozenset[str]()
    try:
        with evaluation_mode(model), torch.no_grad():
            result = model(torch.zeros(1, *size, device=device, dtype=dtype))
        pointer = _output_pointer(result)
        final = frozenset(name for name, value in storage.items() if value == pointer)
    except Exception as exc:  # noqa: BLE001 - any model's failure becomes the trace's error
        outputs.clear()
        error = f"{type(exc).__name__}: {first_line(exc)}"
    finally:
        for handle in handles:
            handle.remove()
    trace = LayerTrace(size, outputs, error, resized[0] if resized and not error else None, final)  # type: ignore[arg-type]
    with _TRACE_LOCK:
        _TRACES[model] = (key, trace)
    return trace


def _output_pointer(output: object) -> tuple[int, Shape] | None:
    """The data pointer and shape of a model's output tensor (a tensor, or a dict's / ModelOutput's
    ``out``/``logits``: a segmenter's), else ``None``. Shape too: a view (``Flatten``) shares the pointer."""
    if isinstance(output, dict):
        output = output.get("out", output.get("logits"))
    return (output.data_ptr(), tuple(output.shape)) if isinstance(output, torch.Tensor) else None


def _resized_batch(output: object) -> tuple[int, int] | None:
    """``(H, W)`` of the batch in a torchvision detector's transform output ``(ImageList, targets)``."""
    if not isinstance(output, tuple) or not output:
        return None
    tensors, sizes = getattr(output[0], "tensors", None), getattr(output[0], "image_sizes", None)
    if isinstance(tensors, torch.Tensor) and tensors.ndim == 4 and isinstance(sizes, list):
        return int(tensors.shape[-2]), int(tensors.shape[-1])
    return None


def _listed(name: str, trace: LayerTrace, everything: bool) -> bool:
    """Stages, blocks and block norms (depth <= 2, transformer block norms, and the stages of a
    backbone that returns a dict of levels); all with ``everything``."""
    if everything:
        return True
    parent = name.rpartition(".")[0]
    return name.count(".") <= 1 or name.rsplit(".", 1)[-1] in BLOCK_NORMS or trace.outputs.get(parent) in _DICTS


def layer_table(model: nn.Module, input_size: tuple[int, int, int], everything: bool = False) -> list[dict[str, str]]:
    """One row per candidate layer: ``name``, ``shape`` of its output for a ``(1, *input_size)``
    batch, ``reading`` (how explainkit turns it into a map) and ``default`` ("*" for the default
    layer). Reads the same dry forward that picks the default layer."""
    default, _ = default_layer_and_reason(model)
    trace = trace_layers(model, input_size)
    if trace.error is not None:
        raise LayerNotFoundError(f"the model's forward on a 1x{'x'.join(map(str, input_size))} batch failed: {trace.error}")
    rows = []
    for name, _ in model.named_modules():
        if not name or not (_listed(name, trace, everything) or name == default):
            continue
        shape = trace.outputs.get(name)
        if shape is None:
            reading = "not run by the forward"
        elif isinstance(shape, str):
            reading = f"returns {shape}: not usable"
        else:
            reading = trace.reading(model, name) or "not a feature map"
        shown = "x".join(map(str, shape)) if isinstance(shape, tuple) else "-"
        rows.append({"name": name, "shape": shown, "reading": reading, "default": "*" if name == default else ""})
    return rows


def candidate_layers(model: nn.Module) -> list[str]:
    """Dotted names of the submodules that produce feature maps (containers and Conv2d)."""
    names = []
    for name, module in model.named_modules():
        if not name:
            continue
        if isinstance(module, nn.Conv2d) or (len(list(module.children())) > 0 and name.count(".") <= 1):
            names.append(name)
    return names


def _transformer_default(model: nn.Module, trace: LayerTrace) -> str | None:
    """Plain ViTs: every block norm outputs the same ``(1, L, C)`` token sequence and nothing
    before the first block but the patch embedding is a feature map; the last block's norm.
    Hierarchical (Swin, PiT) and hybrid models (CoAtNet, EfficientFormer, LeViT) do not qualify."""
    norms: list[str] = [
        name
        for name, module in model.named_modules()
        if name.rsplit(".", 1)[-1] in BLOCK_NORMS and isinstance(module, nn.LayerNorm) and trace.ran(name)
    ]
    shapes = {trace.outputs[name] for name in norms}
    if not norms or len(shapes) != 1:
        return None
    order = list(trace.outputs)
    before = order[: order.index(norms[0])]
    grids = {trace.outputs[n][-2:] for n in before if isinstance(trace.outputs[n], tuple) and len(trace.outputs[n]) == 4}
    if len(grids) > 1:  # convolution stages before the first block: a hybrid (EfficientFormer), not a plain ViT
        return None
    shape = next(iter(shapes))
    if not isinstance(shape, tuple) or len(shape) != 3 or trace.reading(model, norms[-1]) is None:
        return None
    return norms[-1]


def _last_map_child(trace: LayerTrace, model: nn.Module, name: str) -> str | None:
    """The last direct child of ``name`` that ran and whose output is a feature map."""
    depth = name.count(".") + 1
    children = [
        other
        for other in trace.outputs
        if other.startswith(name + ".") and other.count(".") == depth and trace.reading(model, other)
    ]
    return children[-1] if children else None


def _last_run_within(trace: LayerTrace, model: nn.Module, name: str) -> str | None:
    """``name`` if the forward ran it and it is a feature map. A container the forward never ran
    (its parent calls its children one by one) stands for its last child that ran and is a
    feature map. ``None`` otherwise."""
    if trace.ran(name):
        return name if trace.reading(model, name) is not None else None
    return _last_map_child(trace, model, name)


def _class_token_norm(model: nn.Module, trace: LayerTrace, name: str) -> str | None:
    """For a token layer with prefix tokens, the last block norm inside it that reads the same way:
    a head that reads only the class token gets no gradient to the patch tokens after the last
    block's attention, so a block *output* gives a flat map (PiT, CoaT); its first norm does not."""
    reading = trace.reading(model, name)
    if reading is None or not reading.startswith("tokens") or reading.startswith("tokens: 0 prefix"):
        return None
    norms = [
        other for other in trace.outputs if other.rsplit(".", 1)[-1] in BLOCK_NORMS and trace.reading(model, other) == reading
    ]
    inside = [other for other in norms if other.startswith(name + ".")]
    # a final norm after the last block (CrossViT, TNT) has no norm inside: the last block's anywhere
    found = inside or norms
    return found[-1] if found else None


def _backbone_of_levels(model: nn.Module, trace: LayerTrace) -> tuple[str, str] | None:
    """Detectors and segmenters whose ``model.backbone`` returns a dict of levels, which a CAM
    cannot use: the deepest backbone output (a plain ``(N, C, h, w)`` tensor) every level is built from.

    * an FPN over ``backbone.body`` (torchvision's Faster/Mask R-CNN, RetinaNet, FCOS): the body's
      last stage (``backbone.body.layer4``, the last MobileNet block), which the FPN's top-down path
      adds into every level;
    * SSD's feature extractors (``backbone.features`` then ``backbone.extra``): the source of the
      first, finest level (VGG's conv4_3 ``backbone.features``; SSDLite's ``backbone.features.0``),
      from which every coarser level is computed: a later layer gets no gradient from the detections
      of the levels before it;
    * an ``IntermediateLayerGetter`` itself (FCN, DeepLabV3, LR-ASPP): its last stage that ran, the
      one the classifier reads (``backbone.layer4``; ``backbone.16`` for MobileNet).
    """
    if trace.outputs.get("backbone") not in _DICTS:
        return None
    backbone = model.get_submodule("backbone")
    unusable = "a dict of levels, which a CAM cannot use"
    if isinstance(getattr(backbone, "body", None), nn.Module) and trace.outputs.get("backbone.body") in _DICTS:
        found = _last_map_child(trace, model, "backbone.body")
        if found is not None:
            return (
                found,
                f"the last stage of the detector's backbone: its FPN returns {unusable}, and adds this stage into every level",
            )
    if isinstance(getattr(backbone, "features", None), nn.Module) and isinstance(getattr(backbone, "extra", None), nn.Module):
        found = _first_level_source(model, trace)
        if found is not None:
            return (
                found,
                f"the source of SSD's first, finest level, which every coarser level is computed from: its backbone returns {unusable}",
            )
    found = _last_map_child(trace, model, "backbone")
    if found is not None:
        return found, f"the last stage of the backbone: it returns {unusable}"
    return None


def _first_level_source(model: nn.Module, trace: LayerTrace) -> str | None:
    """SSD's ``backbone.features`` when it runs as one module (VGG), else its first child that gives
    a feature map (SSDLite runs its two halves of MobileNet one by one and keeps both outputs)."""
    if trace.reading(model, "backbone.features"):
        return "backbone.features"
    maps = [name for name in trace.outputs if name.rpartition(".")[0] == "backbone.features" and trace.reading(model, name)]
    return maps[0] if maps else None


def _timm_stage(model: nn.Module, trace: LayerTrace) -> tuple[str, str] | None:
    """timm's own declaration of its stages: the last ``model.feature_info`` entry that ran."""
    info = getattr(model, "feature_info", None)
    if not isinstance(info, list) or not info or not all(isinstance(entry, dict) for entry in info):
        return None
    for entry in reversed(info):
        declared = str(entry.get("module", ""))
        found = _last_run_within(trace, model, declared) if declared else None
        if found is not None:
            where = f"its module {declared!r}" + ("" if found == declared else f", run as {found!r}")
            return found, f"timm's feature_info: the last stage ({where}, reduction {entry.get('reduction', '?')})"
    return None


def _named_stage(model: nn.Module, trace: LayerTrace) -> tuple[str, str] | None:
    """A last stage by its conventional name, or Hugging Face's ``<base>.encoder.stages``."""
    children = dict(model.named_children())
    for name in DEFAULT_LAYER_NAMES:
        if name in children:
            found = _last_run_within(trace, model, name)
            if found is not None:
                return found, f"the output of the last stage ({found!r})"
    for name, module in model.named_modules():
        if name.endswith("encoder.stages") and isinstance(module, (nn.ModuleList, nn.Sequential)) and len(module):
            found = _last_run_within(trace, model, f"{name}.{len(module) - 1}")
            if found is not None:
                return found, "the output of the last stage (Hugging Face encoder.stages)"
    return None


def _last_feature_map(model: nn.Module, trace: LayerTrace) -> tuple[str, str] | None:
    """The last module to finish whose output is a feature map (pooling layers aside)."""
    modules = dict(model.named_modules())
    maps = [
        name
        for name in trace.outputs
        if not isinstance(modules[name], _POOLS) and name not in trace.final and trace.reading(model, name)
    ]
    if not maps:
        return None
    return maps[-1], "the last module whose output is a feature map (no known stage or transformer block)"


def _untraced_default(model: nn.Module, trace: LayerTrace) -> tuple[str, str]:
    """When the dry forward failed: the last stage by name, else the last Conv2d, unchecked."""
    children = dict(model.named_children())
    unchecked = f"not checked: a dry forward on 1x{'x'.join(map(str, trace.input_size))} failed ({trace.error})"
    for name in DEFAULT_LAYER_NAMES:
        if name in children:
            return name, f"the output of the last stage ({name!r}); {unchecked}"
    convs = [name for name, module in model.named_modules() if isinstance(module, nn.Conv2d)]
    if convs:
        return convs[-1], f"the last Conv2d; {unchecked}"
    raise LayerNotFoundError(
        f"{type(model).__name__} has no Conv2d layer or known stage, and {unchecked}; pass a layer explicitly"
    )


def default_layer_and_reason(model: nn.Module) -> tuple[str, str]:
    """``(layer, why)``: the layer used when none is given, and the rule that chose it (module docstring)."""
    card = getattr(model, "card", None)  # explainkit's model cards name their architecture
    measured = ARCHITECTURE_LAYERS.get(getattr(card, "architecture", ""))
    if measured is not None and measured[0] in dict(model.named_modules()):
        return measured
    trace = trace_layers(model)
    if trace.error is not None:
        return _untraced_default(model, trace)
    levels = _backbone_of_levels(model, trace)
    if levels is not None:
        return levels
    transformer = _transformer_default(model, trace)
    if transformer is not None:
        return transformer, "vision transformer: the last block's first norm (its patch tokens still map to the image)"
    chosen = _timm_stage(model, trace) or _named_stage(model, trace) or _last_feature_map(model, trace)
    if chosen is None:
        raise LayerNotFoundError(
            f"{type(model).__name__} has no layer whose output is a feature map (N, C, h, w), (N, h, w, C) or "
            f"(N, tokens, C) for a 1x{'x'.join(map(str, trace.input_size))} input; pass a layer explicitly"
        )
    norm = _class_token_norm(model, trace, chosen[0])
    if norm is not None:
        return norm, f"{chosen[1]}; there the last block's first norm, as its tokens carry a class token"
    return chosen


def default_layer(model: nn.Module) -> str:
    """The layer used when none is given (see :func:`default_layer_and_reason`)."""
    return default_layer_and_reason(model)[0]


def resolve_layer(model: nn.Module, layer: str | nn.Module | None) -> tuple[str, nn.Module]:
    """Return ``(dotted_name, module)`` for ``layer`` (a dotted path, a submodule, or None)."""
    if layer is None:
        layer = default_layer(model)
    if isinstance(layer, nn.Module):
        for name, module in model.named_modules():
            if module is layer:
                return name or "(model)", module
        raise LayerNotFoundError(f"the given {type(layer).__name__} module is not a submodule of the model")
    if not isinstance(layer, str):
        raise LayerNotFoundError(f"layer must be a dotted path or an nn.Module, not {type(layer).__name__}")
    try:
        return layer, model.get_submodule(layer)
    except AttributeError:
        candidates = candidate_layers(model)
        close = difflib.get_close_matches(layer, candidates, n=3)
        hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
        shown = [c for c in candidates if "." not in c] or candidates
        raise LayerNotFoundError(f"unknown layer {layer!r}{hint}; candidate layers include: {', '.join(shown[:20])}") from None

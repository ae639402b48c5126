"""Any image classifier from a model spec: ``torchvision:NAME``, ``timm:NAME``, ``hf:DIR`` or
``package.module:callable``, with its class names and preprocessing read from the library.
``torchvision:`` also names torchvision's detectors and segmenters (``fasterrcnn_resnet50_fpn``,
``deeplabv3_resnet50``...), built offline when no weights are asked for (no ImageNet backbone either).

:func:`load_spec` returns the model in eval mode with a :class:`~explainkit.models.card.ModelCard` as
``model.card`` (like :func:`explainkit.models.load_model`), so everything downstream (explain,
evaluate, figures) treats it like explainkit's own models.

Where each piece comes from, first match wins:

* weights: ``weights=PATH`` (a state_dict ``.pt``/``.pth``/``.safetensors``; the number of classes
  is read off its classifier), ``weights="DEFAULT"`` (the library's pretrained weights; needs the
  network the first time), else random initialisation (with a warning);
* class names: ``classes`` (a list, or a file with one name per line), then the model's metadata
  (torchvision's ImageNet, COCO or VOC ``categories``, Hugging Face ``id2label``, timm's ImageNet info), then
  ``class_0, class_1, ...``;
* preprocessing: explicit ``image_size``/``mean``/``std``, then a model card beside the weights,
  then the library's (torchvision weight transforms, timm's data config, the Hugging Face image
  processor saved with the model, else its config's image size), then 224x224 with ImageNet statistics.
  A torchvision detector resizes and normalises inside its forward: its card asks for its own
  ``min_size`` square and mean 0, std 1.
"""

from __future__ import annotations

import importlib
import json
import math
import socket
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.nn as nn

from explainkit.errors import CheckpointError, ExplainkitError, first_line
from explainkit.models.card import IMAGENET_MEAN, IMAGENET_STD, INTERPOLATIONS, ModelCard
from explainkit.models.store import state_mismatch

KINDS = ("torchvision", "timm", "hf")
DEFAULT_WEIGHTS = "DEFAULT"
DOWNLOAD_TIMEOUT_S = 20.0


class ModelSpecError(ExplainkitError):
    """A model spec that names nothing loadable (unknown kind or architecture, unimportable module)."""


@dataclass(frozen=True)
class ModelSpec:
    """A parsed spec: ``kind`` is ``torchvision``, ``timm``, ``hf`` or ``callable``."""

    kind: str
    name: str

    def __str__(self) -> str:
        return f"{self.kind}:{self.name}" if self.kind != "callable" else self.name


@dataclass
class Preprocessing:
    """What the model expects: input ``size`` (h, w), optional shorter-side ``resize`` before a centre crop, statistics."""

    size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize: int | None = None
    interpolation: str = "bilinear"


def parse_spec(text: str) -> ModelSpec:
    """``"timm:vit_small_patch16_224"`` -> ``ModelSpec("timm", "vit_small_patch16_224")``."""
    kind, sep, name = text.partition(":")
    if not sep or not name or not kind:
        raise ModelSpecError(f"spec={text!r}: expected torchvision:NAME, timm:NAME, hf:DIR or package.module:callable")
    if kind in KINDS:
        return ModelSpec(kind, name)
    if all(part.isidentifier() for part in kind.split(".")) and name.isidentifier():
        return ModelSpec("callable", text)
    raise ModelSpecError(f"spec={text!r}: unknown kind {kind!r}; use torchvision:, timm:, hf: or package.module:callable")


@contextmanager
def _download_timeout() -> Iterator[None]:
    """Downloads give up after ``DOWNLOAD_TIMEOUT_S`` instead of hanging on a dead network."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def _offline_error(spec: ModelSpec, error: BaseException) -> CheckpointError:
    return CheckpointError(
        f"cannot fetch the pretrained weights of {spec} (no network? {first_line(error)}); pass weights=PATH (a local state_dict)"
    )


def read_classes(source: str | Path | Sequence[str]) -> list[str]:
    """Class names from a list, or a file: a JSON list, a JSON object with a ``classes`` list (a
    model card), or one name per line (blank lines skipped)."""
    if not isinstance(source, (str, Path)):
        return [str(name) for name in source]
    path = Path(source)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise ExplainkitError(f"classes={path}: cannot read it: {first_line(error)}") from None
    if text.lstrip().startswith(("[", "{")):
        try:
            names = json.loads(text)
        except json.JSONDecodeError as error:
            raise ExplainkitError(f"classes={path}: invalid JSON: {error}") from None
        if isinstance(names, dict):  # a model card
            names = names.get("classes")
            if not isinstance(names, list):
                raise ExplainkitError(f"classes={path}: a JSON object without a 'classes' list")
        return [str(name) for name in names]
    return [line.strip() for line in text.splitlines() if line.strip()]


def _classifier_outputs(state: dict[str, torch.Tensor], model: nn.Module) -> int | None:
    """The number of classes a state_dict was trained for, read off the model's last Linear layer."""
    last = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last = name
    weight = state.get(f"{last}.weight") if last is not None else None
    return int(weight.shape[0]) if weight is not None and weight.ndim == 2 else None


def _read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    from explainkit.models.store import _read_state_dict

    return _read_state_dict(Path(path))


def _load_state(model: nn.Module, state: dict[str, torch.Tensor], spec: ModelSpec, path: str | Path) -> None:
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise CheckpointError(f"weights {path} do not fit {spec}: {state_mismatch(error)}") from None


# --- torchvision --------------------------------------------------------------------------------
# torchvision's model modules a spec may name; detection and segmentation builders take weights_backbone.
TORCHVISION_TASKS = ("classification", "detection", "segmentation")


def _torchvision_task(name: str) -> str | None:
    """Which of :data:`TORCHVISION_TASKS` torchvision's model ``name`` is, ``None`` when it has no such model."""
    import torchvision

    for task in TORCHVISION_TASKS:
        module = torchvision.models if task == "classification" else getattr(torchvision.models, task)
        if name in torchvision.models.list_models(module=module):
            return task
    return None


def _torchvision_preprocessing(enum: Any, model: nn.Module) -> Preprocessing | None:
    """The weights' eval transform: a classifier's resize + centre crop, a segmenter's shorter side
    (as a square crop); a detector resizes and normalises inside its forward (``model.transform``), so
    it gets its own ``min_size`` square and no normalisation here."""
    transform = enum.transforms() if enum is not None else None
    crop, resize = getattr(transform, "crop_size", None), getattr(transform, "resize_size", None)
    size: Sequence[int] | None = crop or resize
    if getattr(transform, "mean", None) is not None and size:
        return Preprocessing(
            size=(int(size[0]), int(size[-1])),
            mean=tuple(transform.mean),  # type: ignore[union-attr]
            std=tuple(transform.std),  # type: ignore[union-attr]
            resize=int(resize[0]) if resize else None,
            interpolation=str(transform.interpolation.value),  # type: ignore[union-attr]
        )
    min_size = getattr(getattr(model, "transform", None), "min_size", None)
    if isinstance(min_size, (tuple, list)) and min_size:
        side = int(min_size[-1])
        return Preprocessing((side, side), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    return None


def _torchvision_build(name: str, task: str, **kwargs: Any) -> nn.Module:
    """Random weights, offline: detection and segmentation builders would fetch ImageNet backbone weights."""
    import torchvision

    if task != "classification":
        kwargs.setdefault("weights_backbone", None)
    model: nn.Module = torchvision.models.get_model(name, weights=None, **kwargs)
    return model


def _torchvision_fitted(spec: ModelSpec, task: str, state: dict[str, torch.Tensor]) -> nn.Module:
    """A detector or segmenter built for the classes ``state`` was trained for. A class-dependent
    tensor's first dimension is ``a * K + b`` for K classes (``a`` anchors per position, say): two
    probes with 2 and 3 classes give ``a`` and ``b``; an auxiliary classifier in ``state`` is built too."""
    kwargs: dict[str, Any] = {"aux_loss": True} if any(key.startswith("aux_classifier.") for key in state) else {}
    two = _torchvision_build(spec.name, task, num_classes=2, **kwargs).state_dict()
    three = _torchvision_build(spec.name, task, num_classes=3, **kwargs).state_dict()
    varying = [key for key, tensor in two.items() if key in state and three[key].shape != tensor.shape]
    if varying:
        step = three[varying[0]].shape[0] - two[varying[0]].shape[0]
        classes, rest = divmod(state[varying[0]].shape[0] - (two[varying[0]].shape[0] - 2 * step), step)
        if not rest and classes > 0:
            kwargs["num_classes"] = classes
    return _torchvision_build(spec.name, task, **kwargs)


def _torchvision(spec: ModelSpec, weights: str | None) -> tuple[nn.Module, list[str] | None, Preprocessing | None]:
    import torchvision

    task = _torchvision_task(spec.name)
    if task is None:
        raise ModelSpecError(
            f"torchvision has no classification model {spec.name!r}, nor a detection or segmentation one "
            "(see torchvision.models.list_models())"
        )
    try:
        enum = torchvision.models.get_model_weights(spec.name).DEFAULT
    except (ValueError, AttributeError, KeyError):
        enum = None
    # ImageNet's, COCO's (91, with __background__ and N/A) or VOC's (21) names: meta, no download
    categories = list(enum.meta.get("categories") or []) if enum is not None else []
    if weights == DEFAULT_WEIGHTS:
        if enum is None:
            raise CheckpointError(f"torchvision has no pretrained weights for {spec.name!r}")
        try:
            with _download_timeout():
                model = torchvision.models.get_model(spec.name, weights=enum)
        except Exception as error:  # URLError, socket.timeout, HTTPError, ...
            raise _offline_error(spec, error) from None
        return model, categories, _torchvision_preprocessing(enum, model)
    if weights is None:
        model = _torchvision_build(spec.name, task)
        return model, categories, _torchvision_preprocessing(enum, model)
    state = _read_weights(weights)
    if task != "classification":
        model = _torchvision_fitted(spec, task, state)
        _load_state(model, state, spec, weights)
        num_classes = _num_classes(model, (64, 64))  # a detector's without a forward
    else:
        probe = _torchvision_build(spec.name, task)
        num_classes = _classifier_outputs(state, probe) or 1000
        model = probe if num_classes == 1000 else _torchvision_build(spec.name, task, num_classes=num_classes)
        _load_state(model, state, spec, weights)
    return model, categories if len(categories) == num_classes else None, _torchvision_preprocessing(enum, model)


# --- timm ---------------------------------------------------------------------------------------
def _timm(spec: ModelSpec, weights: str | None) -> tuple[nn.Module, list[str] | None, Preprocessing | None]:
    try:
        import timm
        import timm.data
    except ImportError:
        raise ExplainkitError("timm models need timm: pip install 'explainkit[timm]'") from None
    if not timm.is_model(spec.name):
        close = timm.list_models(f"*{spec.name}*")[:5]
        hint = f" (similar: {', '.join(close)})" if close else ""
        raise ModelSpecError(f"timm has no model {spec.name!r}{hint}")
    if weights == DEFAULT_WEIGHTS:
        try:
            with _download_timeout():
                model = timm.create_model(spec.name, pretrained=True)
        except Exception as error:
            raise _offline_error(spec, error) from None
    elif weights is None:
        model = timm.create_model(spec.name, pretrained=False)
    else:
        state = _read_weights(weights)
        probe = timm.create_model(spec.name, pretrained=False)
        num_classes = _classifier_outputs(state, probe)
        model = probe if num_classes in (None, probe.num_classes) else timm.create_model(spec.name, num_classes=num_classes)
        _load_state(model, state, spec, weights)
    config = timm.data.resolve_data_config({}, model=model)
    _, height, width = config["input_size"]
    crop_pct = float(config.get("crop_pct") or 1.0)
    interpolation = config.get("interpolation", "bilinear")
    preprocessing = Preprocessing(
        size=(int(height), int(width)),
        mean=tuple(config["mean"]),
        std=tuple(config["std"]),
        resize=int(math.floor(min(height, width) / crop_pct)) if crop_pct < 1 else None,
        interpolation=interpolation if interpolation in INTERPOLATIONS else "bilinear",
    )
    classes = None
    subset = timm.data.infer_imagenet_subset(model)
    if subset:
        info = timm.data.ImageNetInfo(subset)
        classes = [info.index_to_description(i).split(",")[0].strip() for i in range(int(model.num_classes))]  # type: ignore[arg-type]
    return model, classes, preprocessing


# --- Hugging Face -------------------------------------------------------------------------------
def _hf(spec: ModelSpec, weights: str | None) -> tuple[nn.Module, list[str] | None, Preprocessing | None]:
    try:
        from transformers import AutoImageProcessor
    except ImportError:
        raise ExplainkitError("Hugging Face models need transformers: pip install 'explainkit[hf]'") from None
    directory = Path(spec.name)
    if not (directory / "config.json").is_file():
        raise ModelSpecError(f"spec=hf:{directory}: not a directory written by save_pretrained (no config.json)")
    if weights == DEFAULT_WEIGHTS:
        raise ExplainkitError("hf: models carry their weights in the directory; drop weights=DEFAULT")
    try:
        model = _hf_model_class(directory).from_pretrained(str(directory), local_files_only=True)
    except Exception as error:
        raise CheckpointError(f"cannot load the Hugging Face model in {directory}: {first_line(error)}") from None
    if weights is not None:
        _load_state(model, _read_weights(weights), spec, weights)
    id2label = getattr(model.config, "id2label", None) or {}
    labelled = "For" in type(model).__name__  # a bare backbone (an embedder) has no labels, whatever its config says
    classes = [str(id2label[i]) for i in range(len(id2label))] if labelled and len(id2label) == model.config.num_labels else None
    preprocessing = None
    if (directory / "preprocessor_config.json").is_file():
        try:
            processor = AutoImageProcessor.from_pretrained(str(directory), local_files_only=True)
            preprocessing = _hf_preprocessing(processor)
        except Exception as error:  # an unusual processor: say so, use the defaults
            warnings.warn(f"cannot read the image processor in {directory} ({first_line(error)})", RuntimeWarning, stacklevel=3)
    size = getattr(model.config, "image_size", None)
    if preprocessing is None and isinstance(size, int):  # no processor saved: at least the size the model was built for
        preprocessing = Preprocessing((size, size), IMAGENET_MEAN, IMAGENET_STD)
    return model, classes, preprocessing


def _hf_model_class(directory: Path) -> Any:
    """The ``AutoModel...`` class for what the directory's config says it is: a semantic segmenter,
    a bare backbone (``ViTModel``, ``CLIPVisionModel``: an embedding model) or, by default, a classifier."""
    import json

    import transformers

    try:
        architectures = json.loads((directory / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError, AttributeError):
        architectures = []
    if any(str(name).endswith("ForSemanticSegmentation") for name in architectures):
        return transformers.AutoModelForSemanticSegmentation
    if architectures and not any("For" in str(name) for name in architectures):
        return transformers.AutoModel
    return transformers.AutoModelForImageClassification


def _hf_preprocessing(processor: Any) -> Preprocessing | None:
    size = getattr(processor, "size", None) or {}
    get = size.get if isinstance(size, dict) else lambda key, default=None: getattr(size, key, default)
    crop = getattr(processor, "crop_size", None)
    crop_get = crop.get if isinstance(crop, dict) else (lambda key, default=None: getattr(crop, key, default))
    resample = {0: "nearest", 2: "bilinear", 3: "bicubic"}.get(int(getattr(processor, "resample", 2) or 2), "bilinear")
    mean, std = getattr(processor, "image_mean", None), getattr(processor, "image_std", None)
    if mean is None or std is None:
        return None
    height, width, shortest = get("height"), get("width"), get("shortest_edge")
    if height and width:
        return Preprocessing((int(height), int(width)), tuple(mean), tuple(std), None, resample)
    crop_height, crop_width = (crop_get("height"), crop_get("width")) if crop is not None else (None, None)
    if shortest and crop_height and crop_width:
        return Preprocessing((int(crop_height), int(crop_width)), tuple(mean), tuple(std), int(shortest), resample)
    crop_pct = getattr(processor, "crop_pct", None)
    if shortest and crop_pct:  # ConvNeXt: resize shortest/crop_pct, crop shortest
        return Preprocessing((int(shortest), int(shortest)), tuple(mean), tuple(std), int(shortest / crop_pct), resample)
    if shortest:
        return Preprocessing((int(shortest), int(shortest)), tuple(mean), tuple(std), None, resample)
    return None


# --- the user's own factory ---------------------------------------------------------------------
def _callable(spec: ModelSpec, weights: str | None) -> tuple[nn.Module, list[str] | None, Preprocessing | None]:
    module_name, _, attribute = spec.name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # ImportError, or the module itself failing to import
        raise ModelSpecError(f"spec={spec}: cannot import {module_name!r}: {first_line(error)}") from None
    factory = getattr(module, attribute, None)
    if not callable(factory):
        raise ModelSpecError(f"spec={spec}: {module_name} has no callable {attribute!r}")
    if weights == DEFAULT_WEIGHTS:
        raise ExplainkitError(
            f"weights=DEFAULT needs a library model (torchvision:, timm:); {spec} is your own: pass weights=PATH"
        )
    try:
        model = factory()
    except Exception as error:
        raise ModelSpecError(f"spec={spec}: calling {attribute}() failed: {first_line(error)}") from None
    if not isinstance(model, nn.Module):
        raise ModelSpecError(f"spec={spec}: {attribute}() returned {type(model).__name__}, not a torch.nn.Module")
    if weights is not None:
        _load_state(model, _read_weights(weights), spec, weights)
    names = getattr(model, "classes", None)
    classes = [str(name) for name in names] if isinstance(names, (list, tuple)) else None
    return model, classes, None


LOADERS = {"torchvision": _torchvision, "timm": _timm, "hf": _hf, "callable": _callable}


def _detector_classes(model: nn.Module) -> int | None:
    """The classes a torchvision detector scores (background included), read off its box classifier:
    Faster/Mask R-CNN's ``cls_score``, RetinaNet's and FCOS's ``num_classes``, SSD's ``num_columns``."""
    cls_score = getattr(getattr(getattr(model, "roi_heads", None), "box_predictor", None), "cls_score", None)
    if isinstance(cls_score, nn.Linear):
        return int(cls_score.out_features)
    head = getattr(getattr(model, "head", None), "classification_head", None)
    for attribute in ("num_classes", "num_columns"):
        value = getattr(head, attribute, None)
        if isinstance(value, int):
            return value
    return None


def _num_classes(model: nn.Module, size: tuple[int, int], channels: int = 3) -> int:
    """The model's output width, from one dummy forward (the only generic way across libraries);
    a segmenter's ``out`` channels; a detector's box classes, read off the model without a forward."""
    from explainkit.models.outputs import logits_of

    declared = _detector_classes(model)
    if declared is not None:
        return declared
    with torch.no_grad():
        training = model.training
        model.eval()
        try:
            output = model(torch.zeros(1, channels, *size))
        finally:
            model.train(training)
    # torchvision segmenters: OrderedDict(out=..., aux=...); Hugging Face ones: a ModelOutput (a dict) with 4-D logits
    masks = output.get("out", output.get("logits")) if isinstance(output, dict) else None
    if isinstance(masks, torch.Tensor) and masks.ndim == 4:
        return int(masks.shape[1])
    pooled = output.get("pooler_output", output.get("image_embeds")) if isinstance(output, dict) else None
    if isinstance(pooled, torch.Tensor) and pooled.ndim == 2 and "logits" not in output:  # a Hugging Face embedder
        return int(pooled.shape[1])
    return int(logits_of(output).shape[1])


def load_spec(
    spec: str | ModelSpec,
    weights: str | Path | None = None,
    *,
    classes: str | Path | Sequence[str] | None = None,
    image_size: int | tuple[int, int] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    map_location: str | torch.device = "cpu",
) -> nn.Module:
    """Build the model ``spec`` names, load ``weights``, and attach its card (``model.card``).

    Example:
        >>> model = explainkit.load_spec("torchvision:resnet50", "resnet50.pth")
        >>> model.card.classes[:2], model.card.describe_preprocessing()
    """
    parsed = parse_spec(spec) if isinstance(spec, str) else spec
    weights_arg = str(weights) if weights is not None else None
    if weights_arg is not None and weights_arg != DEFAULT_WEIGHTS and not Path(weights_arg).is_file():
        raise CheckpointError(f"weights={weights_arg}: no such file")
    model, known_classes, preprocessing = LOADERS[parsed.kind](parsed, weights_arg)
    if weights_arg is None and parsed.kind != "hf":  # hf: directories carry their weights
        warnings.warn(f"{parsed} has random weights (no weights=): its maps mean nothing", RuntimeWarning, stacklevel=2)
    card_file = Path(weights_arg).with_suffix(".json") if weights_arg not in (None, DEFAULT_WEIGHTS) else None
    saved = ModelCard.read(card_file) if card_file is not None and card_file.is_file() else None
    if saved is not None:
        preprocessing = Preprocessing(saved.image_size, tuple(saved.mean), tuple(saved.std), saved.resize, saved.interpolation)
    preprocessing = preprocessing or Preprocessing((224, 224), IMAGENET_MEAN, IMAGENET_STD, 256)
    if image_size is not None:
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        preprocessing.size, preprocessing.resize = (int(size[0]), int(size[1])), None
    if mean is not None:
        preprocessing.mean = tuple(mean)
    if std is not None:
        preprocessing.std = tuple(std)
    num_classes = _num_classes(model, preprocessing.size)
    names = read_classes(classes) if classes is not None else (saved.classes if saved is not None else known_classes)
    if names is not None and len(names) != num_classes:
        source = "classes=" if classes is not None else "the model's metadata"
        raise ExplainkitError(f"{source} names {len(names)} classes but {parsed} outputs {num_classes}")
    card = ModelCard(
        architecture=str(parsed),
        num_classes=num_classes,
        classes=list(names) if names is not None else [f"class_{i}" for i in range(num_classes)],
        mean=list(preprocessing.mean),
        std=list(preprocessing.std),
        input_size=[len(preprocessing.mean), *preprocessing.size],
        resize=preprocessing.resize,
        interpolation=preprocessing.interpolation,
    )
    try:
        card.validate()
    except ValueError as error:
        raise ExplainkitError(f"preprocessing for {parsed}: {error}") from None
    model.card = card  # type: ignore[assignment]  # read it back with explainkit.models.model_card
    return model.to(map_location).eval()


__all__ = ["DEFAULT_WEIGHTS", "ModelSpec", "ModelSpecError", "Preprocessing", "load_spec", "parse_spec", "read_classes"]

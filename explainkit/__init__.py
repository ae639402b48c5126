"""explainkit: which parts of an image drive a classifier's score.

Example:
    >>> import explainkit
    >>> model = explainkit.load_model("models/resnet18-cifar10/model.pt")
    >>> cam = explainkit.get_explainer("gradcam", model, layer="layer4")
    >>> maps = cam(images)                      # (N, H, W) in [0, 1]
    >>> per_class = cam(images, targets="all")  # (N, K, H, W)
    >>> vit = explainkit.load_spec("timm:vit_small_patch16_224", "vit.safetensors")  # any classifier
    >>> top5 = explainkit.get_explainer("gradcam", vit)(vit.card.preprocess(pil_image), targets=("topk", 5))
"""

from explainkit._version import __version__
from explainkit.errors import (
    CheckpointError,
    DataError,
    DuplicateExplainerError,
    ExplainkitError,
    ImageReadError,
    LayerNotFoundError,
    UnknownExplainerError,
)
from explainkit.hookspecs import hookimpl
from explainkit.jobs.maps_store import load_maps
from explainkit.models.card import ModelCard
from explainkit.models.sources import load_spec
from explainkit.models.store import build_model, load_model, model_card, save_model
from explainkit.plugins import plugin_manager
from explainkit.registry import get_explainer, list_explainers

__all__ = [
    "CheckpointError",
    "DataError",
    "DuplicateExplainerError",
    "ExplainkitError",
    "ImageReadError",
    "LayerNotFoundError",
    "ModelCard",
    "UnknownExplainerError",
    "build_model",
    "get_explainer",
    "hookimpl",
    "list_explainers",
    "load_maps",
    "load_model",
    "load_spec",
    "model_card",
    "plugin_manager",
    "save_model",
    "__version__",
]

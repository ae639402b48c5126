"""Flags shared by several commands, each group declared once: the model source (explainkit's own
checkpoints with ``--checkpoint``/``--models-dir``, or any classifier with ``--model SPEC``), the
data (``--data-dir``), the device and batch size, the methods and the layer; and the argparse types."""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn as nn

from explainkit.errors import ExplainkitError
from explainkit.explainers.base import Explainer
from explainkit.models.layers import default_layer_and_reason
from explainkit.models.store import load_model, model_card, require_model_path
from explainkit.registry import get_explainer
from explainkit.runtime.device import DEVICE_CHOICES


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    """``--checkpoint``/``--models-dir`` (explainkit's model store) and ``--model SPEC`` with what refines it."""
    parser.add_argument(
        "--checkpoint", help="model weights (.pt/.safetensors) with a .json card beside; default: newest under the model store"
    )
    parser.add_argument("--models-dir", help="model store (default $EXPLAINKIT_MODELS_DIR or ./models)")
    add_spec_flags(parser)


def add_data_flag(parser: argparse.ArgumentParser, help: str | None = None) -> None:  # noqa: A002 - argparse's word
    parser.add_argument(
        "--data-dir", help=help or "ImageFolder tree with train/ and test/ (default $EXPLAINKIT_DATA_DIR, else CIFAR-10 download)"
    )


def add_device_flags(parser: argparse.ArgumentParser, batch_size: int | None = 128) -> None:
    """``--device`` and, unless ``batch_size`` is None, ``--batch-size`` with that default."""
    if batch_size is not None:
        parser.add_argument(
            "--batch-size", type=positive_int, default=batch_size, help=f"images per forward (default {batch_size})"
        )
    parser.add_argument("--device", choices=DEVICE_CHOICES, default="auto", help="default: cuda, else mps, else cpu")


def add_method_flags(parser: argparse.ArgumentParser, default: str) -> None:
    """``--method NAME[,NAME...]`` (also spelled ``--methods``) and ``--layer``."""
    parser.add_argument(
        "--method",
        "--methods",
        dest="methods",
        default=default,
        help=f"NAME[,NAME...] (default {default}; see `explainkit methods`)",
    )
    parser.add_argument(
        "--layer",
        help="dotted submodule path, e.g. layer4 or layer3.1 (default: the model's, printed); "
        "with --fuse, several: layer2,layer3,layer4 (one: the deepest, fused with the 2 stages before it)",
    )
    parser.add_argument(
        "--fuse",
        choices=sorted(FUSE_RULES),
        help="fuse each method's maps at several --layer layers: refine (RefineCAM, the product) or "
        "poly (Poly-CAM, deep to shallow with local normalisation)",
    )


FUSE_RULES = {"refine": "refinecam", "poly": "polycam"}  # --fuse -> the registered fusion explainer


def check_layer_flags(args: argparse.Namespace) -> None:
    """``--layer a,b,c`` names several layers only with ``--fuse``."""
    if args.layer and "," in args.layer and not args.fuse:
        raise ExplainkitError(f"--layer {args.layer} names several layers; add --fuse refine or --fuse poly to fuse them")


def build_explainer(name: str, model: nn.Module, args: argparse.Namespace, **options: object) -> tuple[str, Explainer]:
    """``(key, explainer)`` for ``--method`` ``name``: the method at ``--layer``, or with ``--fuse``
    the fusion explainer over it (key ``refinecam:gradcam``), options passed through to the method."""
    if not args.fuse:
        return name, get_explainer(name, model, layer=args.layer, **options)
    rule = FUSE_RULES[args.fuse]
    return f"{rule}:{name}", get_explainer(rule, model, layer=args.layer, method=name, **options)


def load_model_from_flags(args: argparse.Namespace, device: torch.device) -> nn.Module:
    """The model the flags name: ``--model SPEC``, else ``--checkpoint``, else the newest in the store."""
    if args.model:
        return load_spec_model(args, device)
    return load_model(require_model_path(args.checkpoint, args.models_dir), map_location=device)


def _floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers such as 0.5,0.5,0.5, got {text!r}") from None
    return values


def add_spec_flags(parser: argparse.ArgumentParser) -> None:
    """``--model SPEC`` and what refines it."""
    group = parser.add_argument_group("any model: classifier, segmenter, detector, embedder (instead of --checkpoint)")
    group.add_argument(
        "--model",
        metavar="SPEC",
        help="torchvision:NAME, timm:NAME, hf:DIR (written by save_pretrained) or package.module:callable",
    )
    group.add_argument(
        "--weights",
        metavar="PATH|DEFAULT",
        help="state_dict (.pt/.pth/.safetensors) for --model, or DEFAULT for the library's pretrained weights (needs network once)",
    )
    group.add_argument("--classes", metavar="FILE", help="class names, one per line or a JSON list (default: the model's own)")
    group.add_argument(
        "--image-size", type=positive_int, metavar="N", help="input size N x N (default: the model's own, else 224)"
    )
    group.add_argument(
        "--mean", type=_floats, metavar="M,M,M", help="normalisation mean (default: the model's own, else ImageNet)"
    )
    group.add_argument("--std", type=_floats, metavar="S,S,S", help="normalisation std (default: the model's own, else ImageNet)")


def check_spec_flags(args: argparse.Namespace) -> None:
    """Flags that make no sense together fail before anything runs."""
    if args.model and getattr(args, "checkpoint", None):
        raise ExplainkitError("--model and --checkpoint name two models; pass one")
    refinements = [flag for flag in ("weights", "classes", "image_size", "mean", "std") if getattr(args, flag, None) is not None]
    if refinements and not args.model:
        flags = ", ".join("--" + flag.replace("_", "-") for flag in refinements)
        raise ExplainkitError(f"{flags} refine --model SPEC; a --checkpoint carries its own (in its .json card)")


def load_spec_model(args: argparse.Namespace, device: torch.device) -> nn.Module:
    """The ``--model`` classifier with its card, on ``device``."""
    from explainkit.models.sources import load_spec

    model = load_spec(
        args.model,
        args.weights,
        classes=args.classes,
        image_size=args.image_size,
        mean=args.mean,
        std=args.std,
        map_location=device,
    )
    return model


def announce(model: nn.Module, layer: str | None) -> None:
    """Say on stderr what will run: the model's classes and preprocessing, and the layer and why
    (called once the flags are validated, so a bad flag still fails on one line)."""
    card = model_card(model)
    print(f"explainkit: {card.architecture}: {card.num_classes} classes; {card.describe_preprocessing()}", file=sys.stderr)
    if layer is None:
        chosen, why = default_layer_and_reason(model)
        print(f"explainkit: layer {chosen}: {why} (--layer to choose another)", file=sys.stderr)

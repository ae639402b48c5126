"""The flags that say which model a command runs, shared by ``explain``, ``evaluate`` and ``layers``:
explainkit's own checkpoints (``--checkpoint``, the model store) or any classifier (``--model SPEC``)."""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn as nn

from explainkit.errors import ExplainkitError
from explainkit.models.layers import default_layer_and_reason
from explainkit.models.store import model_card


def _floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers such as 0.5,0.5,0.5, got {text!r}") from None
    return values


def add_spec_flags(parser: argparse.ArgumentParser, positive_int) -> None:
    """``--model SPEC`` and what refines it."""
    group = parser.add_argument_group("any classifier (instead of --checkpoint)")
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

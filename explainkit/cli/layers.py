"""``explainkit layers``: where a CAM can be taken in a model, and how each layer's output is read."""

from __future__ import annotations

import argparse

import torch
import torch.nn as nn

from explainkit.cli.flags import check_spec_flags, load_spec_model
from explainkit.errors import ExplainkitError
from explainkit.models.layers import BLOCK_NORMS, default_layer_and_reason, trace_layers
from explainkit.models.store import load_model, model_card, require_model_path


def _listed(name: str, module: nn.Module, everything: bool) -> bool:
    """Stages, blocks and block norms by default (depth <= 2 and transformer block norms); all with --all."""
    if everything:
        return True
    return name.count(".") <= 1 or name.rsplit(".", 1)[-1] in BLOCK_NORMS


def layer_table(model: nn.Module, input_size: tuple[int, int, int], everything: bool = False) -> list[dict[str, str]]:
    """One row per candidate layer: ``name``, ``shape`` of its output for a ``(1, *input_size)``
    batch, ``reading`` (how explainkit turns it into a map) and ``default`` ("*" for the default
    layer). Reads the same dry forward that picks the default layer."""
    default, _ = default_layer_and_reason(model)
    trace = trace_layers(model, input_size)
    if trace.error is not None:
        raise ExplainkitError(f"the model's forward on a 1x{'x'.join(map(str, input_size))} batch failed: {trace.error}")
    rows = []
    for name, module in model.named_modules():
        if not name or not (_listed(name, module, everything) or name == default):
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


def run_layers(args: argparse.Namespace) -> int:
    check_spec_flags(args)
    device = torch.device("cpu")
    if args.model:
        model = load_spec_model(args, device)
    else:
        model = load_model(require_model_path(args.checkpoint, args.models_dir), map_location=device)
    card = model_card(model)
    print(f"{card.architecture}: {card.num_classes} classes; input {'x'.join(map(str, card.input_size))}")
    rows = layer_table(model, tuple(card.input_size), everything=args.all)  # type: ignore[arg-type]
    if not rows:
        raise ExplainkitError(f"{card.architecture} has no submodules to list")
    default, why = default_layer_and_reason(model)
    name_width = max(len(row["name"]) for row in rows)
    shape_width = max(len(row["shape"]) for row in rows)
    print(f"\n{'layer':<{name_width + 2}}{'output':<{shape_width + 2}}reading")
    for row in rows:
        mark = "*" if row["default"] else " "
        print(f"{mark} {row['name']:<{name_width}}  {row['shape']:<{shape_width}}  {row['reading']}")
    print(f"\n* default: {default} ({why}); pick another with --layer NAME")
    return 0

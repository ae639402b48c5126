"""``explainkit layers``: where a CAM can be taken in a model, and how each layer's output is read."""

from __future__ import annotations

import argparse

import torch

from explainkit.cli.flags import add_model_flags, check_spec_flags, load_model_from_flags
from explainkit.errors import ExplainkitError
from explainkit.models.layers import default_layer_and_reason, layer_table
from explainkit.models.store import model_card


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("layers", help="a model's candidate CAM layers, their output shapes and the default")
    parser.add_argument("--all", action="store_true", help="every submodule, not only stages, blocks and their norms")
    add_model_flags(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    check_spec_flags(args)
    model = load_model_from_flags(args, torch.device("cpu"))
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

"""``explainkit lr-find``: the LR range test (Smith 2017) on the reference recipe."""

from __future__ import annotations

import argparse

import torch.nn as nn

from explainkit.cli.flags import add_data_flag, add_device_flags, positive_int
from explainkit.models.card import ModelCard
from explainkit.runtime.device import select_device
from explainkit.runtime.io import ensure_writable_dir
from explainkit.training.recipes import resolve_recipe


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("lr-find", help="LR range test: suggest a max LR and save lr_find.png")
    add_data_flag(parser)
    parser.add_argument("--out", default="outputs", help="output directory (default outputs/)")
    add_device_flags(parser, batch_size=512)
    parser.add_argument("--train-limit", type=positive_int, help="sweep over a seeded random subset of N images")
    parser.add_argument("--num-iter", type=positive_int, default=100, help="batches in the sweep (default 100)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import torch
    from torch.utils.data import DataLoader

    from explainkit.models.store import resnet18_cifar
    from explainkit.training.lr_find import find_lr
    from explainkit.training.trainer import limit_dataset, load_datasets, make_optimizer

    recipe = resolve_recipe("reference", batch_size=args.batch_size, train_limit=args.train_limit)
    device = select_device(args.device)
    out = ensure_writable_dir(args.out)
    train_set, _, classes = load_datasets(args.data_dir, recipe, ModelCard())
    train_set = limit_dataset(train_set, recipe.train_limit, args.seed, spread=False)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    loader = DataLoader(
        train_set,
        batch_size=recipe.batch_size,
        shuffle=True,
        generator=generator,
        num_workers=1 if device.type == "cpu" else 8,
        pin_memory=device.type == "cuda",
    )
    model = resnet18_cifar(len(classes)).to(device)
    suggested = find_lr(
        model, make_optimizer(recipe, model, 1e-7), nn.CrossEntropyLoss(), loader, device, out, num_iter=args.num_iter
    )
    print(f"suggested LR (steepest gradient): {suggested:.3e}")
    print(out / "lr_find.png")
    return 0

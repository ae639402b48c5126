"""``explainkit lr-find``: the LR range test (Smith 2017), as the recipe runs it (by default the
reference recipe: the course's procedure, Adam from 1e-3 to 10 over 200 batches)."""

from __future__ import annotations

import argparse
from pathlib import Path

from explainkit.cli.flags import add_data_flag, add_device_flags, positive_int
from explainkit.runtime.device import select_device
from explainkit.training.recipes import resolve_recipe


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("lr-find", help="LR range test: suggest a max LR and save lr_find.png")
    add_data_flag(parser)
    parser.add_argument("--out", default="outputs", help="output directory (default outputs/)")
    add_device_flags(parser, batch_size=512)
    parser.add_argument("--train-limit", type=positive_int, help="sweep over a seeded random subset of N images")
    parser.add_argument(
        "--recipe",
        choices=("reference", "default", "quick"),
        default="reference",
        help="whose optimizer, loss, init and augmentation",
    )
    parser.add_argument("--num-iter", type=positive_int, help="batches in the sweep (default: the recipe's; reference 200)")
    parser.add_argument(
        "--start-lr", type=float, help="the sweep's first LR (default: the recipe's; reference 1e-3, the course's Adam LR)"
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from explainkit.training.trainer import TrainConfig, lr_range_test

    recipe = resolve_recipe(
        args.recipe,
        batch_size=args.batch_size,
        train_limit=args.train_limit,
        lr_find_start=args.start_lr,
        lr_find_iters=args.num_iter,
    )
    config = TrainConfig(out=Path(args.out), data_dir=args.data_dir, device=select_device(args.device), seed=args.seed)
    suggested = lr_range_test(recipe, config)
    print(f"suggested LR (steepest gradient): {suggested:.3e}")
    print(config.out / "lr_find.png")
    return 0

"""``explainkit lr-find``: the LR range test (Smith 2017) on the reference recipe."""

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
    parser.add_argument("--num-iter", type=positive_int, default=100, help="batches in the sweep (default 100)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from explainkit.training.trainer import TrainConfig, lr_range_test

    recipe = resolve_recipe("reference", batch_size=args.batch_size, train_limit=args.train_limit)
    config = TrainConfig(out=Path(args.out), data_dir=args.data_dir, device=select_device(args.device), seed=args.seed)
    suggested = lr_range_test(recipe, config, num_iter=args.num_iter)
    print(f"suggested LR (steepest gradient): {suggested:.3e}")
    print(config.out / "lr_find.png")
    return 0

"""``explainkit train``: a CIFAR ResNet18 with a recipe."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from explainkit.cli.flags import add_data_flag, add_device_flags, positive_int
from explainkit.runtime.device import select_device
from explainkit.training.first_model import STORE_FOLDER
from explainkit.training.recipes import resolve_recipe

DEFAULT_OUT = Path("models") / STORE_FOLDER


def default_train_out(models_dir: str | None) -> Path:
    from explainkit.models.store import models_dir as store

    return store(models_dir) / DEFAULT_OUT.name


def run(args: argparse.Namespace) -> int:
    from explainkit.training.trainer import TrainConfig, train

    recipe = resolve_recipe(
        args.recipe,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        optimizer=args.optimizer,
        train_limit=args.train_limit,
        test_limit=args.test_limit,
    )
    config = TrainConfig(
        out=Path(args.out) if args.out else default_train_out(getattr(args, "models_dir", None)),
        data_dir=args.data_dir,
        device=select_device(args.device),
        seed=args.seed,
        resume=args.resume,
        workers=args.workers,
        data_path=args.data_path,
        compile=args.compile,
    )
    result = train(recipe, config)
    print(f"test accuracy {100 * result.test_accuracy:.2f}% after {len(result.history)} epochs", file=sys.stderr)
    for path in result.outputs:
        print(path)
    return 0


def lr_value(text: str) -> float | str:
    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a positive number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"the learning rate must be positive, got {text}")
    return value


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("train", help="train a CIFAR ResNet18 (reference, default or quick recipe)")
    parser.add_argument(
        "--recipe",
        choices=("default", "reference", "quick"),
        default="default",
        help="reference = the course run; default = our GPU recipe; quick = ~5 min on a CPU",
    )
    parser.add_argument("--epochs", type=positive_int, help="epochs (default: the recipe's)")
    parser.add_argument("--batch-size", type=positive_int, help="images per step (default: the recipe's)")
    parser.add_argument("--lr", type=lr_value, help="OneCycle max LR, or 'auto' to run the LR range test first")
    parser.add_argument("--optimizer", choices=("adam", "sgd"), help="default: the recipe's")
    add_data_flag(parser, "ImageFolder tree with train/ and test/ (default $EXPLAINKIT_DATA_DIR, else torchvision CIFAR-10)")
    parser.add_argument("--out", help=f"output directory (default {DEFAULT_OUT}/ in the model store)")
    parser.add_argument("--models-dir", help="model store (default $EXPLAINKIT_MODELS_DIR or ./models)")
    parser.add_argument("--train-limit", type=positive_int, help="train on a seeded random subset of N images")
    parser.add_argument("--test-limit", type=positive_int, help="evaluate on N evenly spaced test images")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/last.ckpt")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--workers", type=int, help="DataLoader workers (default: 1 on CPU, up to 8 on CUDA)")
    parser.add_argument(
        "--data-path",
        choices=("auto", "loader", "device"),
        default="auto",
        help="device = decode the splits once into tensors on the device and augment there; "
        "loader = PIL + albumentations in DataLoader workers; auto (default) = device on CUDA",
    )
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile the model (measured on an H200: slower for this model)"
    )
    add_device_flags(parser, batch_size=None)
    parser.set_defaults(run=run)

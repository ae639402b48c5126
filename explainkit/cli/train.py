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


# Flags that set the Recipe field of the same name (None: the recipe's value).
RECIPE_FLAGS = (
    "epochs",
    "batch_size",
    "lr",
    "optimizer",
    "train_limit",
    "test_limit",
    "horizontal_flip",
    "cutout",
    "cutout_p",
    "cutout_fill",
    "init",
    "label_smoothing",
    "ema_decay",
    "tta_flip",
    "no_decay_bn_bias",
    "bn_bias_lr_mult",
    "lr_find_start",
    "lr_find_iters",
)


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text}")
    return value


def positive_float(text: str) -> float:
    value = non_negative_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError("expected a positive number, got 0")
    return value


def run(args: argparse.Namespace) -> int:
    from explainkit.training.trainer import TrainConfig, train

    recipe = resolve_recipe(args.recipe, **{name: getattr(args, name) for name in RECIPE_FLAGS})
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


def add_recipe_tool_flags(parser: argparse.ArgumentParser) -> None:
    """The recipe's augmentation, init, regularisation and evaluation options (each default: the recipe's)."""
    group = parser.add_argument_group("recipe options (default: the recipe's)")
    group.add_argument(
        "--horizontal-flip", action=argparse.BooleanOptionalAction, help="random horizontal flips (default/quick: on)"
    )
    group.add_argument(
        "--cutout",
        choices=("inside", "canvas"),
        help="where the 16x16 hole goes: inside the image, or on the course's 64x64 canvas then centre-cropped (reference)",
    )
    group.add_argument("--cutout-p", type=non_negative_float, help="probability of the hole (reference 0.2; 0: none)")
    group.add_argument(
        "--cutout-fill",
        choices=("mean", "black"),
        help="hole fill: the dataset mean, or black as albumentations 1.x wrote it (reference)",
    )
    group.add_argument(
        "--init",
        choices=("torchvision", "pytorch"),
        help="conv init: torchvision's kaiming fan_out, or nn.Conv2d's default (reference)",
    )
    group.add_argument("--label-smoothing", type=non_negative_float, help="cross-entropy label smoothing, e.g. 0.2")
    group.add_argument(
        "--ema",
        dest="ema_decay",
        type=non_negative_float,
        metavar="DECAY",
        help="keep an EMA of the weights (e.g. 0.99: 20 epochs of batch 512 are 1,960 steps), evaluate and save it; 0: off",
    )
    group.add_argument(
        "--tta-flip", action=argparse.BooleanOptionalAction, help="evaluate on the mean logits of each test image and its flip"
    )
    group.add_argument(
        "--no-decay-bn-bias", action="store_const", const=True, help="no weight decay on BatchNorm weights/biases and on biases"
    )
    group.add_argument(
        "--bn-bias-lr-mult", type=positive_float, metavar="X", help="the BatchNorm biases' LR is X times the others'"
    )
    group.add_argument(
        "--lr-find-start", type=positive_float, help="--lr auto: the range test's first LR (reference 1e-3, as the course)"
    )
    group.add_argument("--lr-find-iters", type=positive_int, help="--lr auto: batches in the range test (reference 200)")


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
    add_recipe_tool_flags(parser)
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

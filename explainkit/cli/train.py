"""``explainkit train`` and ``explainkit lr-find``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch.nn as nn

from explainkit.data.datasets import check_image_folder, data_dir_from_env
from explainkit.models.card import ModelCard
from explainkit.runtime.device import select_device
from explainkit.runtime.io import ensure_writable_dir
from explainkit.training.first_model import STORE_FOLDER
from explainkit.training.recipes import resolve_recipe

DEFAULT_OUT = Path("models") / STORE_FOLDER


def default_train_out(models_dir: str | None) -> Path:
    from explainkit.models.store import models_dir as store

    return store(models_dir) / DEFAULT_OUT.name


def run_train(args: argparse.Namespace) -> int:
    from explainkit.training.trainer import train

    recipe = resolve_recipe(
        args.recipe,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        optimizer=args.optimizer,
        train_limit=args.train_limit,
        test_limit=args.test_limit,
    )
    device = select_device(args.device)
    root = data_dir_from_env(args.data_dir)
    if root is not None:  # fail on a bad layout before creating anything
        check_image_folder(root, ("train", "test"))
    out = ensure_writable_dir(args.out or default_train_out(getattr(args, "models_dir", None)))
    print(f"training resnet18-cifar with the {recipe.name!r} recipe on {device} into {out}/", file=sys.stderr)
    result = train(
        recipe,
        out,
        data_dir=args.data_dir,
        device=device,
        seed=args.seed,
        resume=args.resume,
        workers=args.workers,
        data_path=args.data_path,
        compile=args.compile,
    )
    print(f"test accuracy {100 * result.test_accuracy:.2f}% after {len(result.history)} epochs", file=sys.stderr)
    for path in result.outputs:
        print(path)
    return 0


def run_lr_find(args: argparse.Namespace) -> int:
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


def add_train_parser(sub, positive_int, device_choices) -> None:
    train = sub.add_parser("train", help="train a CIFAR ResNet18 (reference, default or quick recipe)")
    train.add_argument(
        "--recipe",
        choices=("default", "reference", "quick"),
        default="default",
        help="reference = the course run; default = our GPU recipe; quick = ~5 min on a CPU",
    )
    train.add_argument("--epochs", type=positive_int)
    train.add_argument("--batch-size", type=positive_int)
    train.add_argument("--lr", type=lr_value, help="OneCycle max LR, or 'auto' to run the LR range test first")
    train.add_argument("--optimizer", choices=("adam", "sgd"))
    train.add_argument("--data-dir", help="ImageFolder tree with train/ and test/ (default: torchvision CIFAR-10)")
    train.add_argument("--out", help=f"output directory (default {DEFAULT_OUT}/ in the model store)")
    train.add_argument("--models-dir", help="model store (default $EXPLAINKIT_MODELS_DIR or ./models)")
    train.add_argument("--train-limit", type=positive_int, help="train on a seeded random subset of N images")
    train.add_argument("--test-limit", type=positive_int, help="evaluate on N evenly spaced test images")
    train.add_argument("--resume", action="store_true", help="continue from OUT/last.ckpt")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--workers", type=int, help="DataLoader workers (default: 1 on CPU, up to 8 on CUDA)")
    train.add_argument(
        "--data-path",
        choices=("auto", "loader", "device"),
        default="auto",
        help="device = decode the splits once into tensors on the device and augment there; "
        "loader = PIL + albumentations in DataLoader workers; auto (default) = device on CUDA",
    )
    train.add_argument(
        "--compile", action="store_true", help="torch.compile the model (measured on an H200: slower for this model)"
    )
    train.add_argument("--device", choices=device_choices, default="auto")

    lr_find = sub.add_parser("lr-find", help="LR range test: suggest a max LR and save lr_find.png")
    lr_find.add_argument("--data-dir")
    lr_find.add_argument("--out", default="outputs")
    lr_find.add_argument("--batch-size", type=positive_int, default=512)
    lr_find.add_argument("--train-limit", type=positive_int)
    lr_find.add_argument("--num-iter", type=positive_int, default=100, help="batches in the sweep (default 100)")
    lr_find.add_argument("--device", choices=device_choices, default="auto")
    lr_find.add_argument("--seed", type=int, default=0)

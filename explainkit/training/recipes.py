"""Training recipes. Explicit overrides (the command line's flags) replace a recipe's fields."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, Iterator

from explainkit.errors import ExplainkitError


@dataclass(frozen=True)
class Recipe:
    name: str
    epochs: int
    batch_size: int
    optimizer: str  # "adam" | "sgd"
    lr: float | str  # max LR of OneCycle, or "auto" (LR range test first)
    weight_decay: float
    momentum: float = 0.9
    nesterov: bool = False
    label_smoothing: float = 0.0
    pct_start: float = 0.25
    div_factor: float = 100.0
    final_div_factor: float = 100.0
    anneal_strategy: str = "linear"
    horizontal_flip: bool = False
    cutout_p: float = 0.2
    # "inside": the 16x16 hole lies fully inside the 32x32 image (5% of the pixels at p=0.2);
    # "canvas": the course's geometry, the hole placed on a 64x64 zero-padded canvas then centre-cropped
    # (often partly or wholly outside the image: 2.1% of the pixels at p=0.2).
    cutout: str = "inside"
    cutout_fill: str = "mean"  # "mean": the uint8 dataset mean; "black": 0, what albumentations 1.x wrote for the course
    train_limit: int | None = None
    test_limit: int | None = None
    schedule: str = "onecycle"  # "onecycle" | "constant"
    init: str = "torchvision"  # conv init: "torchvision" (kaiming normal, fan_out) | "pytorch" (nn.Conv2d's default)
    lr_find_start: float = 1e-7  # the LR range test sweeps from here to 10 ...
    lr_find_iters: int = 100  # ... over this many batches
    ema_decay: float = 0.0  # > 0: keep an exponential moving average of the weights, evaluate and save it
    tta_flip: bool = False  # evaluation averages the logits of each image and its horizontal flip
    no_decay_bn_bias: bool = False  # no weight decay on BatchNorm weights/biases and on biases
    bn_bias_lr_mult: float = 1.0  # the BatchNorm biases' LR is this times the others'

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


CHOICES = {
    "cutout": ("inside", "canvas"),
    "cutout_fill": ("mean", "black"),
    "init": ("torchvision", "pytorch"),
    "schedule": ("onecycle", "constant"),
    "anneal_strategy": ("linear", "cos"),
}

RECIPES = {
    # The course assignment, exactly: Adam + OneCycle from the LR range test as the course ran it
    # (torch-lr-finder from Adam's lr=1e-3 to 10 over 200 batches, steepest gradient), pad 40 -> crop 32 ->
    # pad 64 -> one 16x16 hole on the 64x64 canvas, black (albumentations 1.x cast the float mean to
    # uint8 0) -> centre crop 32; no flip; the kuangliu ResNet18's PyTorch-default conv init.
    "reference": Recipe(
        name="reference",
        epochs=20,
        batch_size=512,
        optimizer="adam",
        lr="auto",
        weight_decay=1e-4,
        pct_start=5 / 20,
        div_factor=100,
        final_div_factor=100,
        anneal_strategy="linear",
        cutout="canvas",
        cutout_fill="black",
        init="pytorch",
        lr_find_start=1e-3,
        lr_find_iters=200,
    ),
    # Our GPU recipe: SGD with Nesterov momentum, label smoothing, horizontal flips.
    "default": Recipe(
        name="default",
        epochs=20,
        batch_size=512,
        optimizer="sgd",
        lr=0.2,
        weight_decay=5e-4,
        nesterov=True,
        label_smoothing=0.1,
        pct_start=0.25,
        div_factor=25,
        final_div_factor=1000,
        anneal_strategy="cos",
        horizontal_flip=True,
        cutout_p=0.5,
    ),
    # A CPU recipe that finishes in minutes on 2 cores: a fixed max LR (no range test) on a
    # 4,000-image subset. A constant 0.05 diverged in the first 10 steps here; OneCycle's warm-up to 0.02 does not.
    "quick": Recipe(
        name="quick",
        epochs=2,
        batch_size=64,
        optimizer="sgd",
        lr=0.02,
        weight_decay=5e-4,
        nesterov=True,
        label_smoothing=0.1,
        pct_start=0.25,
        div_factor=10,
        final_div_factor=100,
        anneal_strategy="cos",
        horizontal_flip=True,
        cutout_p=0.0,
        train_limit=4000,
        test_limit=1000,
    ),
}


def _problems(r: Recipe) -> Iterator[str]:
    """Each invalid field of ``r`` as a one-line message naming it."""
    if r.epochs <= 0:
        yield f"epochs={r.epochs}: must be at least 1"
    if r.batch_size <= 0:
        yield f"batch_size={r.batch_size}: must be at least 1"
    if r.lr != "auto" and (not isinstance(r.lr, (int, float)) or not r.lr > 0):
        yield f"lr={r.lr!r}: must be 'auto' or a positive number"
    if r.optimizer not in ("adam", "sgd"):
        yield f"optimizer={r.optimizer!r}: must be adam or sgd"
    for name, allowed in CHOICES.items():
        if getattr(r, name) not in allowed:
            yield f"{name}={getattr(r, name)!r}: must be one of {', '.join(allowed)}"
    ranges = [
        ("cutout_p", 0 <= r.cutout_p <= 1, "must be between 0 and 1"),
        ("label_smoothing", 0 <= r.label_smoothing < 1, "must be in [0, 1)"),
        ("ema_decay", 0 <= r.ema_decay < 1, "must be in [0, 1) (0: no EMA)"),
        ("bn_bias_lr_mult", r.bn_bias_lr_mult > 0, "must be positive"),
        ("lr_find_start", 0 < r.lr_find_start < 10, "must be in (0, 10), the sweep ends at 10"),
        ("lr_find_iters", r.lr_find_iters >= 17, "the LR range test needs at least 17 iterations"),
    ]
    yield from (f"{name}={getattr(r, name)}: {message}" for name, ok, message in ranges if not ok)


def resolve_recipe(name: str, **overrides: Any) -> Recipe:
    """The named recipe with every non-None override applied, validated."""
    if name not in RECIPES:
        raise ExplainkitError(f"recipe={name!r}: unknown recipe; choose from {', '.join(RECIPES)}")
    recipe = replace(RECIPES[name], **{k: v for k, v in overrides.items() if v is not None})
    for problem in _problems(recipe):
        raise ExplainkitError(problem)
    return recipe

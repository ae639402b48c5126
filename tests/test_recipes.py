from __future__ import annotations

import re

import pytest

from explainkit.errors import ExplainkitError
from explainkit.training.recipes import RECIPES, resolve_recipe


def test_reference_recipe_is_the_course_run():
    r = RECIPES["reference"]
    assert (r.epochs, r.batch_size, r.optimizer, r.lr, r.weight_decay) == (20, 512, "adam", "auto", 1e-4)
    assert (r.pct_start, r.div_factor, r.final_div_factor, r.anneal_strategy) == (0.25, 100, 100, "linear")
    assert r.cutout_p == 0.2 and not r.horizontal_flip
    # the course's albumentations 1.x call: the hole on the 64x64 canvas, written black; kuangliu's default init
    assert (r.cutout, r.cutout_fill, r.init) == ("canvas", "black", "pytorch")
    # its LR range test: torch-lr-finder from Adam's lr=1e-3 to 10 over 200 batches
    assert (r.lr_find_start, r.lr_find_iters) == (1e-3, 200)
    # none of the recipe tools the course did not use
    assert (r.ema_decay, r.tta_flip, r.no_decay_bn_bias, r.bn_bias_lr_mult, r.label_smoothing) == (0.0, False, False, 1.0, 0.0)


def test_flags_override_the_recipe():
    r = resolve_recipe("reference", epochs=3, lr=0.01, batch_size=None)
    assert (r.epochs, r.lr, r.batch_size) == (3, 0.01, 512)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"epochs": 0}, "epochs=0: must be at least 1"),
        ({"lr": -0.1}, "lr=-0.1: must be 'auto' or a positive number"),
        ({"batch_size": 0}, "batch_size=0: must be at least 1"),
        ({"optimizer": "lion"}, "optimizer='lion': must be adam or sgd"),
        ({"cutout": "edge"}, "cutout='edge': must be one of inside, canvas"),
        ({"cutout_fill": "red"}, "cutout_fill='red': must be one of mean, black"),
        ({"init": "xavier"}, "init='xavier': must be one of torchvision, pytorch"),
        ({"ema_decay": 1.0}, "ema_decay=1.0: must be in [0, 1)"),
        ({"label_smoothing": 1.5}, "label_smoothing=1.5: must be in [0, 1)"),
        ({"bn_bias_lr_mult": 0.0}, "bn_bias_lr_mult=0.0: must be positive"),
        ({"cutout_p": 2.0}, "cutout_p=2.0: must be between 0 and 1"),
        ({"lr_find_start": 20.0}, "lr_find_start=20.0: must be in (0, 10)"),
        ({"lr_find_iters": 5}, "lr_find_iters=5: the LR range test needs at least 17 iterations"),
    ],
)
def test_bad_values(overrides, message):
    with pytest.raises(ExplainkitError, match=re.escape(message)):
        resolve_recipe("default", **overrides)
    with pytest.raises(ExplainkitError, match="recipe='fast': unknown recipe"):
        resolve_recipe("fast")


def test_train_flags_set_the_recipe_fields(monkeypatch, tmp_path):
    """Every recipe flag of ``explainkit train`` reaches the Recipe field of the same name; absent flags keep the recipe's."""
    from dataclasses import fields
    from pathlib import Path

    from explainkit.cli import build_parser
    from explainkit.cli.train import RECIPE_FLAGS
    from explainkit.training import trainer

    assert set(RECIPE_FLAGS) <= {f.name for f in fields(RECIPES["reference"])}
    seen = []

    def fake_train(recipe, config):
        seen.append(recipe)
        return trainer.TrainResult(Path(config.out) / "model.pt", [], 0.5, [])

    monkeypatch.setattr(trainer, "train", fake_train)
    flags = "--cutout inside --cutout-fill mean --cutout-p 0.5 --init torchvision --label-smoothing 0.2 --ema 0.999"
    flags += " --tta-flip --no-decay-bn-bias --bn-bias-lr-mult 64 --lr-find-start 1e-7 --lr-find-iters 100 --horizontal-flip --epochs 30"
    parser = build_parser()
    for argv in (["--recipe", "reference"], ["--recipe", "reference", *flags.split()]):
        args = parser.parse_args(["train", *argv, "--out", str(tmp_path), "--device", "cpu"])
        assert args.run(args) == 0
    plain, flagged = seen
    assert plain == RECIPES["reference"]
    assert (flagged.cutout, flagged.cutout_fill, flagged.cutout_p, flagged.init) == ("inside", "mean", 0.5, "torchvision")
    assert (flagged.label_smoothing, flagged.ema_decay, flagged.tta_flip, flagged.no_decay_bn_bias) == (0.2, 0.999, True, True)
    assert (flagged.bn_bias_lr_mult, flagged.lr_find_start, flagged.lr_find_iters) == (64.0, 1e-7, 100)
    assert flagged.horizontal_flip and flagged.epochs == 30

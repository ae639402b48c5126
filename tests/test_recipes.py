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
    ],
)
def test_bad_values(overrides, message):
    with pytest.raises(ExplainkitError, match=re.escape(message)):
        resolve_recipe("default", **overrides)
    with pytest.raises(ExplainkitError, match="recipe='fast': unknown recipe"):
        resolve_recipe("fast")

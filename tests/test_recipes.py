from __future__ import annotations

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


@pytest.mark.parametrize("overrides", [{"epochs": 0}, {"lr": -0.1}, {"batch_size": 0}, {"optimizer": "lion"}])
def test_bad_values(overrides):
    with pytest.raises(ExplainkitError):
        resolve_recipe("default", **overrides)
    with pytest.raises(ExplainkitError, match="unknown recipe"):
        resolve_recipe("fast")

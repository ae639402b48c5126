"""The zoo sweep (benchmarks/zoo_sweep.py): Grad-CAM at the default layer of every torchvision
classifier up to the size limit and of each listed timm family, and the supported-models page
generated from it. Models over SLOW_PARAMETERS are marked ``slow`` (CI runs them too)."""

from __future__ import annotations

import re

import pytest

from benchmarks.zoo_sweep import (
    MAX_PARAMETERS,
    PAGE,
    SLOW_PARAMETERS,
    ZooModel,
    page,
    parameter_count,
    sweep_one,
    timm_models,
    torchvision_models,
)

# Models over SLOW_PARAMETERS, by name so that collection stays instant (the
# test checks the list against the real counts); a model over the size limit skips in its test.
_LARGE = ("convnext_base", "efficientnet_b7", "efficientnet_v2_l", "efficientnet_v2_m", "regnet_x_16gf",
                      "regnet_x_32gf", "regnet_y_16gf", "resnet152", "resnext101_32x8d", "resnext101_64x4d", "swin_b",
                      "swin_v2_b", "vgg", "vit_b", "wide_resnet", "alexnet", "beit_base")  # fmt: skip


def _params() -> list:
    models = torchvision_models() + timm_models()
    return [
        pytest.param(
            model,
            id=model.spec,
            marks=[pytest.mark.slow] if model.name.startswith(_LARGE) else [],
        )
        for model in models
    ]


def _page_rows() -> dict[str, str]:
    rows = {}
    for line in PAGE.read_text().splitlines():
        found = re.match(r"\| `([^`]+)` \|", line)
        if found:
            rows[found.group(1)] = line
    return rows


@pytest.mark.parametrize("model", _params())
def test_default_layer_gives_maps_and_matches_the_page(model: ZooModel):
    if model.library == "timm":
        pytest.importorskip("timm")
    if parameter_count(model) > MAX_PARAMETERS:
        pytest.skip(f"{model.spec} is over the sweep's {MAX_PARAMETERS / 1e6:.0f}M parameters")
    result = sweep_one(model)
    assert result.finite and result.shape_ok, result
    assert min(result.spread) > 1e-3, f"{model.spec}: flat maps at {result.layer} ({result.spread})"
    assert result.marked == result.layer, f"explainkit layers marks {result.marked!r}, the explainer used {result.layer!r}"
    assert result.passed
    rows = _page_rows()
    assert rows.get(model.spec) == result.row(), (
        f"docs/supported-models.md is out of date for {model.spec}; run `python -m benchmarks.zoo_sweep`"
    )
    marked_slow = model.name.startswith(_LARGE)
    assert marked_slow == (result.parameters > SLOW_PARAMETERS), f"{model.spec}: {result.parameters / 1e6:.0f}M parameters"


def test_the_page_lists_only_swept_models_and_at_least_thirty_timm_families():
    swept = {model.spec for model in torchvision_models() + timm_models()}
    listed = set(_page_rows())
    assert listed <= swept, f"the page lists models the sweep does not: {sorted(listed - swept)}"
    assert len([spec for spec in listed if spec.startswith("timm:")]) >= 30
    families = {model.family for model in timm_models()}
    assert families == {"cnn", "vit", "hierarchical", "hybrid"}


def test_page_renders_rows_in_the_given_order():
    from benchmarks.zoo_sweep import ZooResult

    model = ZooModel("torchvision", "resnet18", "torchvision")
    result = ZooResult(model, 11e6, (3, 224, 224), "layer4", "nchw", "why", "layer4", True, True, (0.2, 0.3))
    text = page([result, result])
    assert text.count("| `torchvision:resnet18` | torchvision | `layer4` | nchw | why |") == 2
    broken = ZooResult(model, 11e6, (3, 224, 224), "layer4", "nchw", "why", "layer3", True, True, (0.2, 0.3))
    assert result.passed and not broken.passed  # the marked layer must be the one used
    flat = ZooResult(model, 11e6, (3, 224, 224), "layer4", "nchw", "why", "layer4", True, True, (0.2, 0.0))
    assert not flat.passed

"""``explainkit layers``: candidate layers, their shapes and readings, the default marked."""

from __future__ import annotations

import pytest

from explainkit.cli import main
from explainkit.models.layers import layer_table


def test_lists_a_checkpoints_stages_and_marks_the_default(capsys, random_checkpoint):
    assert main(["layers", "--checkpoint", str(random_checkpoint)]) == 0
    out = capsys.readouterr().out
    table = out.split("\n\n")[1].splitlines()[1:]
    rows = {line[2:].split()[0]: line for line in table if line.strip()}
    # ResNet18-CIFAR's measured default is layer3 (README: "layer3 or layer4")
    assert rows["layer3"].startswith("*") and "1x256x8x8" in rows["layer3"] and "nchw" in rows["layer3"]
    assert rows["layer4"].startswith(" ") and "1x512x4x4" in rows["layer4"]
    assert "not a feature map" in rows["fc"]
    assert "layer1.0.conv1" not in rows  # leaves only with --all
    assert "* default: layer3 (measured more faithful than layer4" in out


def test_all_lists_every_submodule(capsys, random_checkpoint):
    assert main(["layers", "--checkpoint", str(random_checkpoint), "--all"]) == 0
    assert "layer1.0.conv1" in capsys.readouterr().out


def test_vision_transformer_rows_say_how_tokens_are_read(capsys):
    assert main(["layers", "--model", "torchvision:vit_b_16"]) == 0
    out = capsys.readouterr().out
    default = next(line for line in out.splitlines() if line.startswith("* encoder"))
    assert "encoder_layer_11.ln_1" in default and "1x197x768" in default and "tokens: 1 prefix + 14x14 grid" in default


def test_swin_stages_are_channels_last():
    pytest.importorskip("torchvision")
    import torchvision

    model = torchvision.models.swin_t(num_classes=10)
    rows = {row["name"]: row for row in layer_table(model, (3, 64, 64))}
    assert rows["features"]["default"] == "*" and rows["features"]["reading"] == "nhwc"


def test_a_wrong_spec_is_one_line(capsys):
    assert main(["layers", "--model", "torchvision:nope"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "torchvision has no classification model 'nope'" in err

"""Model specs: every kind builds the model with its classes and preprocessing; every wrong
spec, module or weights file is one clear error (offline: random-initialised tiny models)."""

from __future__ import annotations

import sys
import urllib.error

import pytest
import torch
import torch.nn as nn
import torchvision

from explainkit.errors import CheckpointError, ExplainkitError
from explainkit.models.sources import ModelSpec, ModelSpecError, load_spec, parse_spec, read_classes
from tests.conftest import save_tiny_hf_vit


def test_parse_spec_kinds():
    assert parse_spec("torchvision:resnet50") == ModelSpec("torchvision", "resnet50")
    assert parse_spec("timm:vit_small_patch16_224") == ModelSpec("timm", "vit_small_patch16_224")
    assert parse_spec("hf:/models/my-vit") == ModelSpec("hf", "/models/my-vit")
    assert parse_spec("my_pkg.nets:build") == ModelSpec("callable", "my_pkg.nets:build")


@pytest.mark.parametrize("bad", ["resnet50", "torchvision:", "k-8:thing", "my-pkg:build", ":x", "pkg.mod:not-a-name"])
def test_parse_spec_rejects_what_names_nothing(bad):
    with pytest.raises(ModelSpecError, match="spec="):
        parse_spec(bad)


def test_torchvision_reads_imagenet_classes_and_weight_transforms():
    with pytest.warns(RuntimeWarning, match="random weights"):
        model = load_spec("torchvision:resnet18")
    card = model.card
    assert card.num_classes == 1000 and card.classes[:2] == ["tench", "goldfish"]
    assert card.image_size == (224, 224) and card.resize == 256 and card.mean == [0.485, 0.456, 0.406]
    assert not model.training


def test_torchvision_local_weights_set_the_number_of_classes(tmp_path):
    torch.manual_seed(0)
    trained = torchvision.models.resnet18(num_classes=4)
    torch.save(trained.state_dict(), tmp_path / "r18.pt")
    (tmp_path / "classes.txt").write_text("ant\nbee\n\ncat\ndog\n")
    model = load_spec("torchvision:resnet18", tmp_path / "r18.pt", classes=tmp_path / "classes.txt")
    assert model.card.classes == ["ant", "bee", "cat", "dog"]
    images = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(model(images), trained.eval()(images))


def test_weights_that_do_not_fit_are_a_clear_error(tmp_path):
    torch.save(torchvision.models.resnet18(num_classes=4).state_dict(), tmp_path / "r18.pt")
    with pytest.raises(CheckpointError, match="do not fit torchvision:resnet50"):
        load_spec("torchvision:resnet50", tmp_path / "r18.pt")
    with pytest.raises(CheckpointError, match="no such file"):
        load_spec("torchvision:resnet18", tmp_path / "missing.pt")


def test_class_names_must_match_the_outputs(tmp_path):
    (tmp_path / "classes.txt").write_text("a\nb\n")
    with pytest.raises(ExplainkitError, match="names 2 classes but torchvision:resnet18 outputs 1000"):
        load_spec("torchvision:resnet18", classes=tmp_path / "classes.txt")


def test_pretrained_weights_offline_are_a_clear_error_not_a_hang(monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(CheckpointError, match="cannot fetch the pretrained weights of torchvision:resnet18.*weights=PATH"):
        load_spec("torchvision:resnet18", "DEFAULT")


def test_unknown_architectures_suggest_what_exists():
    with pytest.raises(ModelSpecError, match="torchvision has no classification model 'resnet5'"):
        load_spec("torchvision:resnet5")
    pytest.importorskip("timm")
    with pytest.raises(ModelSpecError, match="timm has no model"):
        load_spec("timm:no_such_net_at_all")


def test_timm_reads_its_data_config_and_imagenet_names(tmp_path):
    pytest.importorskip("timm")
    import timm
    import timm.data

    net = timm.create_model("resnet18", pretrained=False, num_classes=3)
    torch.save(net.state_dict(), tmp_path / "w.pt")
    model = load_spec("timm:resnet18", tmp_path / "w.pt")
    assert model.card.num_classes == 3 and model.card.classes == ["class_0", "class_1", "class_2"]
    config = timm.data.resolve_data_config({}, model=net)
    assert model.card.image_size == (224, 224) and model.card.resize == int(224 / config["crop_pct"])
    assert model.card.interpolation == config["interpolation"] == "bicubic"
    with pytest.warns(RuntimeWarning):
        imagenet = load_spec("timm:resnet18")
    assert imagenet.card.classes[1] == "goldfish"


def test_hugging_face_directory_with_its_processor_and_labels(tmp_path):
    save_tiny_hf_vit(tmp_path / "vit", {"size": {"height": 32, "width": 32}, "image_mean": [0.5] * 3, "image_std": [0.25] * 3})
    model = load_spec(f"hf:{tmp_path / 'vit'}")
    assert model.card.classes == ["cat", "dog"] and model.card.image_size == (32, 32) and model.card.std == [0.25] * 3
    with pytest.raises(ModelSpecError, match="save_pretrained"):
        load_spec(f"hf:{tmp_path}")


class TinyNet(nn.Module):
    classes = ("left", "right")

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


def build_tiny() -> nn.Module:
    return TinyNet()


def not_a_model():
    return "nope"


def test_the_users_own_factory(tmp_path):
    spec = f"{__name__}:build_tiny"
    torch.save(TinyNet().state_dict(), tmp_path / "tiny.pt")
    model = load_spec(spec, tmp_path / "tiny.pt", image_size=20, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    assert model.card.classes == ["left", "right"] and model.card.image_size == (20, 20) and model.card.resize is None
    with pytest.raises(ModelSpecError, match="cannot import 'no_such_module_xyz'"):
        load_spec("no_such_module_xyz:build")
    with pytest.raises(ModelSpecError, match="has no callable 'missing'"):
        load_spec(f"{__name__}:missing")
    with pytest.raises(ModelSpecError, match="returned str, not a torch.nn.Module"):
        load_spec(f"{__name__}:not_a_model")
    assert __name__ in sys.modules


def test_read_classes_forms(tmp_path):
    (tmp_path / "c.json").write_text('["a", "b"]')
    assert read_classes(tmp_path / "c.json") == ["a", "b"]
    assert read_classes(["x", 1]) == ["x", "1"]
    (tmp_path / "card.json").write_text('{"classes": ["cat", "dog"], "mean": [0.5, 0.5, 0.5]}')
    assert read_classes(tmp_path / "card.json") == ["cat", "dog"]
    (tmp_path / "other.json").write_text('{"names": ["cat"]}')
    with pytest.raises(ExplainkitError, match="without a 'classes' list"):
        read_classes(tmp_path / "other.json")
    with pytest.raises(ExplainkitError, match="classes=.*cannot read"):
        read_classes(tmp_path / "missing.txt")

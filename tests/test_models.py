"""Building, loading (never executing code), saving and finding models."""

from __future__ import annotations

import os
import pickle
import time

import pytest
import torch

import explainkit
from explainkit.errors import CheckpointError, ExplainkitError
from explainkit.models.card import ModelCard
from explainkit.models.store import build_model, newest_model, require_model_path, resnet18_cifar, save_model


def test_resnet18_cifar_stem():
    model = resnet18_cifar(10)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, torch.nn.Identity)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_torchvision_architectures_by_name():
    assert build_model("resnet34", 7).fc.out_features == 7
    with pytest.raises(CheckpointError, match="unknown architecture"):
        build_model("no-such-net", 10)


def test_shared_trained_model_loads(trained_model):
    assert not trained_model.training
    assert trained_model.card.architecture == "resnet18-cifar" and len(trained_model.card.classes) == 10


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_save_load_round_trip(tmp_path, random_model, suffix):
    card = ModelCard(test_accuracy=0.5, epochs=1)
    path = save_model(random_model, card, tmp_path / f"model{suffix}")
    assert path.with_suffix(".json").exists()
    loaded = explainkit.load_model(path)
    assert loaded.card == card
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded(x), random_model(x))
    assert not any(p.name.endswith(".tmp") or ".tmp." in p.name for p in tmp_path.iterdir())


def test_missing_corrupt_and_mismatched_checkpoints(tmp_path, random_model):
    with pytest.raises(CheckpointError, match="not found"):
        explainkit.load_model(tmp_path / "nope.pt")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(CheckpointError, match="corrupt.pt"):
        explainkit.load_model(corrupt)
    mismatched = save_model(random_model, ModelCard(), tmp_path / "m.pt")
    (tmp_path / "m.json").write_text(__import__("json").dumps(ModelCard(architecture="resnet34").to_dict()))
    with pytest.raises(CheckpointError, match="does not fit"):
        explainkit.load_model(mismatched)


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch /tmp/explainkit-pwned",))


def test_loading_never_executes_code(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as handle:
        pickle.dump({"weight": _Exploit()}, handle)
    with pytest.raises(CheckpointError):
        explainkit.load_model(path)
    assert not os.path.exists("/tmp/explainkit-pwned")


def test_model_store_lookup(tmp_path, random_model, monkeypatch):
    monkeypatch.setenv("EXPLAINKIT_MODELS_DIR", str(tmp_path / "store"))
    with pytest.raises(ExplainkitError, match="checkpoint=PATH"):
        require_model_path(None)
    old = save_model(random_model, ModelCard(), tmp_path / "store" / "a" / "model.pt")
    newer = save_model(random_model, ModelCard(), tmp_path / "store" / "b" / "model.pt")
    os.utime(old, (time.time() - 100, time.time() - 100))
    (tmp_path / "store" / "c").mkdir()
    (tmp_path / "store" / "c" / "cardless.pt").write_bytes(b"")  # no card: ignored
    assert newest_model() == newer
    assert require_model_path("explicit.pt") == type(newer)("explicit.pt")

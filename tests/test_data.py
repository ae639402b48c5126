"""Datasets: ImageFolder layout checks, class checks against the card, offline CIFAR-10."""

from __future__ import annotations

import pytest
import torch

from explainkit.data import datasets as data
from explainkit.errors import DataError
from explainkit.models.card import ModelCard


def test_image_folder_split_loads(tiny_folder):
    dataset = data.load_split("test", ModelCard(), tiny_folder)
    image, label = dataset[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and label == 0
    assert len(dataset) == 20


def test_env_var_points_at_data(tiny_folder, monkeypatch):
    monkeypatch.setenv("EXPLAINKIT_DATA_DIR", str(tiny_folder))
    assert len(data.load_split("train", ModelCard())) == 20


def test_wrong_layout_names_data_dir(tmp_path):
    (tmp_path / "stuff").mkdir()
    with pytest.raises(DataError, match="data_dir=.*test/"):
        data.load_split("test", ModelCard(), tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        data.load_split("test", ModelCard(), tmp_path / "missing")


def test_classes_must_be_the_models(tiny_folder):
    card = ModelCard(num_classes=2, classes=["cat", "dog"])
    with pytest.raises(DataError, match="are not classes of the model"):
        data.load_split("test", card, tiny_folder)


def test_a_subset_of_the_models_classes_maps_labels_by_name(tmp_path):
    from PIL import Image

    for name in ("zebra", "ant"):  # folder order: ant (0), zebra (1)
        (tmp_path / "test" / name).mkdir(parents=True)
        Image.new("RGB", (40, 30), "red").save(tmp_path / "test" / name / "a.png")
    classes = ["cat", "zebra", "dog", "ant"]
    card = ModelCard(architecture="x", num_classes=4, classes=classes, input_size=[3, 24, 24], resize=28)
    split = data.load_split("test", card, tmp_path)
    labels = sorted(label for _, label in split)
    assert labels == [1, 3]
    image, _ = split[0]
    assert image.shape == (3, 24, 24)  # shorter side to 28, centre crop 24


def test_no_network_and_no_data_is_a_clear_error(monkeypatch, tmp_path):
    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setenv("EXPLAINKIT_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("EXPLAINKIT_DATA_DIR", raising=False)
    monkeypatch.setattr(data.datasets, "CIFAR10", offline)
    with pytest.raises(DataError, match="data_dir=DIR"):
        data.load_split("test", ModelCard())


def test_real_cifar_folder_matches_card(cifar_dir):
    dataset = data.load_split("test", ModelCard(), cifar_dir)
    assert len(dataset) == 10000

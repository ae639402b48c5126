"""Shared fixtures. Tests that need ../shared (the trained model, the JPEG CIFAR-10) skip with a
reason when it is absent; everything else runs on tiny random-init models and generated images."""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import explainkit
from explainkit.models.card import CIFAR10_CLASSES, ModelCard
from explainkit.models.store import resnet18_cifar, save_model
from explainkit.plugins import reset_plugin_manager

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("EXPLAINKIT_SHARED_DIR", REPO.parent / "shared"))
SHARED_MODEL = SHARED / "models" / "resnet18-cifar10.pt"
SHARED_DATA = SHARED / "data" / "cifar10-jpeg.tar.gz"


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture
def fresh_plugins():
    """A plugin manager loaded afresh for the test, and again after it."""
    reset_plugin_manager()
    yield explainkit.plugin_manager()
    reset_plugin_manager()


@pytest.fixture(scope="session")
def random_model() -> torch.nn.Module:
    """A random-init CIFAR ResNet18 with non-trivial BatchNorm statistics, in eval mode."""
    torch.manual_seed(1)
    model = resnet18_cifar(10)
    model.train()
    with torch.no_grad():  # a few batches so running stats are not the identity
        for _ in range(3):
            model(torch.randn(16, 3, 32, 32))
    model.card = ModelCard()
    return model.eval()


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(6, 3, 32, 32)


@pytest.fixture(scope="session")
def trained_model_path() -> Path:
    if not SHARED_MODEL.exists():
        pytest.skip(f"trained model not found at {SHARED_MODEL} (../shared absent)")
    return SHARED_MODEL


@pytest.fixture(scope="session")
def trained_model(trained_model_path) -> torch.nn.Module:
    return explainkit.load_model(trained_model_path)


@pytest.fixture(scope="session")
def cifar_dir(tmp_path_factory) -> Path:
    """The JPEG CIFAR-10 from ../shared: $EXPLAINKIT_TEST_DATA_DIR (set by .ci/run) or extracted here."""
    given = os.environ.get("EXPLAINKIT_TEST_DATA_DIR")
    if given and (Path(given) / "test").is_dir():
        return Path(given)
    if not SHARED_DATA.exists():
        pytest.skip(f"CIFAR-10 JPEG archive not found at {SHARED_DATA} (../shared absent)")
    target = tmp_path_factory.mktemp("cifar")
    with tarfile.open(SHARED_DATA) as archive:
        archive.extractall(target, filter="data")
    return target / "cifar10-jpeg"


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory) -> Path:
    """A fake CIFAR-10 ImageFolder: 2 random 32x32 JPEGs per class in train/ and test/."""
    root = tmp_path_factory.mktemp("tiny") / "data"
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for name in CIFAR10_CLASSES:
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(2):
                pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i:04d}.jpg")
    return root


@pytest.fixture(scope="session")
def random_checkpoint(tmp_path_factory, random_model) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    return save_model(random_model, ModelCard(), path)


def correlation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-map Pearson correlation of two (N, H, W) stacks."""
    a = a.flatten(1) - a.flatten(1).mean(1, keepdim=True)
    b = b.flatten(1) - b.flatten(1).mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-12)


@pytest.fixture(scope="session")
def color_folder(tmp_path_factory) -> Path:
    """A learnable fake CIFAR-10 ImageFolder: each class a distinct colour plus noise (8 train, 2 test)."""
    root = tmp_path_factory.mktemp("color") / "data"
    rng = np.random.default_rng(1)
    palette = rng.integers(0, 256, (len(CIFAR10_CLASSES), 3))
    for split, count in (("train", 8), ("test", 2)):
        for k, name in enumerate(CIFAR10_CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = np.clip(palette[k] + rng.normal(0, 20, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i:04d}.png")
    return root


def save_tiny_hf_vit(directory: Path, processor: dict | None = None) -> Path:
    """A one-block Hugging Face ViT for 32x32 images labelled cat/dog, written by save_pretrained
    (with an image processor when ``processor`` gives its arguments)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.ViTConfig(
        image_size=32, patch_size=8, num_hidden_layers=1, hidden_size=16, num_attention_heads=2, intermediate_size=32,
        num_labels=2, id2label={0: "cat", 1: "dog"}, label2id={"cat": 0, "dog": 1},
    )  # fmt: skip
    transformers.ViTForImageClassification(config).save_pretrained(directory)
    if processor is not None:
        transformers.ViTImageProcessor(**processor).save_pretrained(directory)
    return directory

"""End to end: explaining test images through the DataLoader vs plain inference over the same loader.

Uses the JPEG CIFAR-10 from ``../shared`` when present (``$EXPLAINKIT_TEST_DATA_DIR`` or extracted
once), else generated images. 2,000 images on CPU, the whole split on CUDA; one round each.
"""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

from benchmarks.conftest import full_size
from explainkit.data.datasets import limit_evenly, load_split
from explainkit.explainers.gradient import GradCAM
from explainkit.jobs.explain import scan
from explainkit.models.card import ModelCard
from explainkit.training.device_data import DeviceSplit, decode_image_folder, normalize

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10-jpeg.tar.gz"


@pytest.fixture(scope="module")
def test_split(tmp_path_factory, request):
    given = os.environ.get("EXPLAINKIT_TEST_DATA_DIR")
    root = Path(given) if given else None
    if root is None and SHARED_DATA.exists():
        root = tmp_path_factory.mktemp("cifar")
        with tarfile.open(SHARED_DATA) as archive:
            archive.extractall(root, filter="data")
        root = root / "cifar10-jpeg"
    if root is not None and (root / "test").is_dir():
        dataset, source = load_split("test", ModelCard(), root), "JPEG CIFAR-10 test split"
        decoded = decode_image_folder(root / "test")
    else:
        generated = torch.randint(0, 256, (2000, 3, 32, 32), dtype=torch.uint8)
        card = ModelCard()
        dataset = TensorDataset(normalize(generated, card.mean, card.std), torch.randint(0, 10, (2000,)))
        decoded, source = DeviceSplit(generated, dataset.tensors[1], list(card.classes)), "generated images"
    return dataset, source, decoded


@pytest.fixture(params=["cpu", "cuda"])
def e2e_device(request):
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    return torch.device(request.param)


@pytest.mark.parametrize("mode", ["inference", "explain"])
def test_end_to_end(benchmark, bench_model, test_split, e2e_device, mode, request):
    dataset, source, _ = test_split
    if not full_size(request.config):
        count = 8
    else:
        count = request.config.getoption("e2e_images") or (2000 if e2e_device.type == "cpu" else len(dataset))
    count = min(count, len(dataset))
    subset = limit_evenly(dataset, count)
    batch = 64 if e2e_device.type == "cpu" else 1024
    model = bench_model.to(e2e_device)
    explainers = {"gradcam": GradCAM(model, "layer4")} if mode == "explain" else None
    benchmark.group = f"{e2e_device.type}-end-to-end"
    benchmark.extra_info.update(
        case=f"end to end: {'gradcam over' if explainers else 'inference over'} DataLoader",
        layer="layer4" if explainers else "-",
        device=e2e_device.type,
        batch=batch,
        dtype="fp32",
        threads=torch.get_num_threads(),
        images=count,
        source=source,
        machine=torch.cuda.get_device_name() if e2e_device.type == "cuda" else "cpu",
    )
    benchmark.pedantic(lambda: scan(model, subset, e2e_device, batch, explainers), rounds=1, warmup_rounds=0, iterations=1)


@pytest.mark.parametrize("mode", ["inference", "all classes"])
def test_device_resident(benchmark, bench_model, test_split, e2e_device, mode, request):
    """The whole split as one normalised tensor on the device: inference vs every class's GradCAM
    at layer4 (one batched backward per batch of 1,024), no loader in the way."""
    _, source, decoded = test_split
    count = len(decoded) if full_size(request.config) else 8
    if full_size(request.config) and e2e_device.type == "cpu":
        count = min(count, request.config.getoption("e2e_images") or 2000)
    card = ModelCard()
    images = normalize(decoded.images[:count].to(e2e_device), card.mean, card.std, channels_last=e2e_device.type == "cuda")
    batch = 64 if e2e_device.type == "cpu" else 1024
    model = bench_model.to(e2e_device)
    if e2e_device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    explainer = GradCAM(model, "layer4")

    def run():
        for start in range(0, count, batch):
            chunk = images[start : start + batch]
            if mode == "inference":
                with torch.inference_mode():
                    model(chunk)
            else:
                explainer(chunk, targets="all")
        if e2e_device.type == "cuda":
            torch.cuda.synchronize()

    benchmark.group = f"{e2e_device.type}-device-resident"
    benchmark.extra_info.update(
        case=f"device-resident split: {'gradcam all classes' if mode != 'inference' else 'inference'}",
        layer="layer4" if mode != "inference" else "-",
        device=e2e_device.type,
        batch=batch,
        dtype="fp32",
        threads=torch.get_num_threads(),
        images=count,
        source=source,
        machine=torch.cuda.get_device_name() if e2e_device.type == "cuda" else "cpu",
    )
    benchmark.pedantic(run, rounds=3, warmup_rounds=1, iterations=1)

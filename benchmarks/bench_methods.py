"""The newer CAM methods side by side, in one run: explainkit's native version of each against
pytorch-grad-cam 1.5.7's (``benchmarks/cases.py``'s ``pgc_new``), and against torch-cam 0.5's
Finer-CAM, RefineCAM and LeGrad (``torchcam_new``).

* CNN methods (``finercam``, ``shapleycam``, ``kpcacam``, ``fem``, ``fullgrad``,
  ``guided-gradcam``, ``refinecam``; ``polycam`` and ``opticam``, which neither peer has, against
  the floor only): ResNet18-CIFAR (random init: speed does not depend on the weights) at
  ``layer4`` (RefineCAM and Poly-CAM: ``layer2``, ``layer3``, ``layer4``; RefineCAM on
  Grad-CAM++ in all three libraries), CPU, batch 32, fp32; one target
  (each image's predicted class) and all ten classes. Group ``cpu-b32-fp32``, with its own
  forward floor, as ``bench_explainers.py`` names groups (``benchmarks/report.py`` tables it).
* ViT methods (``rollout``, ``chefer2021``, ``legrad``; torch-cam's LeGrad over every block beside
  ``legrad``): a torchvision ViT with the architecture of ``../shared/models/vit-tiny-cifar10``
  (6 blocks, 4 heads, width 128, 4x4 patches of 32x32 images; random init), group
  ``cpu-vit-b32-fp32`` with its own floor (``measure`` names the group ``cpu-b32-fp32``; the
  recorded one is renamed after).

A native method that is not registered yet is skipped, naming it, so the file runs before and
after the native methods land. Peers are called as their docs show (``cases.py``): one call per
class for all classes, except pytorch-grad-cam's KPCA-CAM and FEM (one call: their maps ignore
the target) and its Guided Grad-CAM (``GradCAM`` and then ``GuidedBackpropReLUModel``, which
takes one image per call: a call per image and class).

Run: ``pytest benchmarks/bench_methods.py --benchmark-only`` (batch 32), ``--bench-size toy``
(batch 4, one round each: exercised, not measured); an ordinary ``pytest`` run executes every
case once, untimed, at batch 4. Ratios: explainkit's median time vs the peer's on the same work
(``--write-results --results-path PATH``; report.py's throughput table has both cases).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torchvision.models.vision_transformer import VisionTransformer

import explainkit
from benchmarks import cases
from benchmarks.bench_explainers import measure
from benchmarks.conftest import full_size
from explainkit.registry import accepts_option, require_explainer

KINDS = ("single target", "all classes")
CNN = ("finercam", "shapleycam", "kpcacam", "fem", "fullgrad", "guided-gradcam", "refinecam", "polycam", "opticam")
VIT = ("rollout", "chefer2021", "legrad")
FUSED = ["layer2", "layer3", "layer4"]  # the layers the fusion methods (RefineCAM) combine

PGC_LABELS = {"guided-gradcam": "Guided Grad-CAM", **{k: v for k, v in cases.PGC_NEW_CLASSES.items() if k != "guided-gradcam"}}


def _vit_group(prepared) -> str:
    return f"cpu-vit-b{prepared[3]}-fp32"  # measure() names the group by device, batch and dtype; the ViT has its own


def _batch(config) -> int:
    return 32 if full_size(config) else 4


def _rounds(config, kind: str, peer: bool) -> int:
    if not full_size(config):
        return 1
    return 3 if peer and kind == "all classes" else 5


@pytest.fixture(scope="module")
def cnn(request, bench_model):
    batch = _batch(request.config)
    torch.manual_seed(0)
    images = torch.randn(batch, 3, 32, 32)
    return bench_model.to("cpu"), images, torch.device("cpu"), batch, None


@pytest.fixture(scope="module")
def vit(request):
    batch = _batch(request.config)
    torch.manual_seed(0)
    model = VisionTransformer(image_size=32, patch_size=4, num_layers=6, num_heads=4, hidden_dim=128, mlp_dim=256, num_classes=10)
    return model.eval(), torch.randn(batch, 3, 32, 32), torch.device("cpu"), batch, None


def _native(name: str, model, **options):
    """explainkit's registered ``name`` (skipped while it is not registered). RefineCAM and
    Poly-CAM fuse ``FUSED``; RefineCAM on Grad-CAM++, the base both peers use."""
    if name not in explainkit.list_explainers():
        pytest.skip(f"explainkit has no native {name!r} registered yet")
    registration = require_explainer(name)
    if name in ("refinecam", "polycam"):
        options.update({"layers": FUSED} if accepts_option(registration, "layers") else {"layer": "layer4"})
    if name == "refinecam" and accepts_option(registration, "method"):
        options["method"] = "gradcam++"
    return explainkit.get_explainer(name, model, **options)


def _columns(model, images, kind: str) -> list[list[int]]:
    """One class per image per call: each image's predicted class, or every class in turn."""
    if kind == "all classes":
        return [[k] * len(images) for k in range(cases.NUM_CLASSES)]
    with torch.no_grad():
        return [model(images).argmax(1).tolist()]


@dataclass(frozen=True)
class Case:
    """One timed case: a library's ``method`` for one ``kind`` of targets at ``layer``; the first
    three go to ``extra_info``, so a report can pair explainkit with each peer on the same work."""

    method: str
    library: str
    kind: str
    layer: str

    @property
    def title(self) -> str:
        if self.library == "explainkit":
            return f"{self.method} {self.kind}"
        label = {"pytorch-grad-cam": PGC_LABELS, "torch-cam": cases.TORCHCAM_NEW_CLASSES}[self.library][self.method]
        return f"{self.library} {label} {self.kind}"


def _timed(benchmark, prepared, case: Case, fn, rounds: int, group: str | None = None):
    """``measure`` (interleaved forward floor) of ``case``, returning what the last call returned;
    ``group`` renames the recorded group (``measure`` names it by device, batch and dtype)."""
    kept = {}

    def run():
        kept["out"] = fn()
        return kept["out"]

    benchmark.extra_info.update(method=case.method, library=case.library, kind=case.kind)
    measure(benchmark, prepared, case.title, run, case.layer, rounds=rounds)
    if group is not None and benchmark.stats is not None:
        benchmark.stats.group = group
    return kept["out"]


def _maps_shape(prepared, kind: str) -> tuple[int, ...]:
    n = prepared[3]
    return (n, 32, 32) if kind == "single target" else (n, cases.NUM_CLASSES, 32, 32)


def _layers(name: str) -> list[str]:
    return FUSED if name in ("refinecam", "polycam") else ["layer4"]


def test_forward_floor(benchmark, cnn, request):
    model, images = cnn[:2]
    measure(
        benchmark, cnn, "forward (inference_mode)", cases.forward(model, images), rounds=21 if full_size(request.config) else 1
    )


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", CNN)
def test_native(benchmark, cnn, name, kind, request):
    if name == "opticam" and kind == "all classes" and full_size(request.config):
        pytest.skip("Opti-CAM optimises a mask per image and class: ~2.5 min per call at batch 4 on 2 CPU cores")
    model, images = cnn[:2]
    explainer = _native(name, model, **({} if name in ("refinecam", "polycam") else {"layer": "layer4"}))
    targets = "all" if kind == "all classes" else None
    run = lambda: explainer(images, targets=targets)  # noqa: E731
    maps = _timed(
        benchmark, cnn, Case(name, "explainkit", kind, "+".join(_layers(name))), run, _rounds(request.config, kind, False)
    )
    assert tuple(maps.shape) == _maps_shape(cnn, kind) and float(maps.max()) <= 1 + 1e-6


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", list(cases.PGC_NEW_CLASSES))
def test_pytorch_grad_cam(benchmark, cnn, name, kind, request):
    pytest.importorskip("pytorch_grad_cam")
    model, images = cnn[:2]
    run = cases.pgc_new(name, model, images, _layers(name), _columns(model, images, kind))
    rounds = _rounds(request.config, kind, True)
    maps = _timed(benchmark, cnn, Case(name, "pytorch-grad-cam", kind, "+".join(_layers(name))), run, rounds)
    calls = 1 if kind == "single target" or name in cases.PGC_TARGET_FREE else cases.NUM_CLASSES
    assert len(maps) == calls and all(m.shape[:3] == (len(images), 32, 32) for m in maps)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", ["finercam", "refinecam"])
def test_torch_cam(benchmark, cnn, name, kind, request):
    pytest.importorskip("torchcam")
    model, images = cnn[:2]
    columns = _columns(model, images, kind)
    run = cases.torchcam_new(name, model, images, _layers(name), columns)
    rounds = _rounds(request.config, kind, True)
    maps = _timed(benchmark, cnn, Case(name, "torch-cam", kind, "+".join(_layers(name))), run, rounds)
    assert len(maps) == len(columns) and all(m[0].shape[0] == len(images) for m in maps)


def test_vit_forward_floor(benchmark, vit, request):
    model, images = vit[:2]
    rounds = 21 if full_size(request.config) else 1
    measure(benchmark, vit, "forward (inference_mode)", cases.forward(model, images), rounds=rounds)
    if benchmark.stats is not None:
        benchmark.stats.group = _vit_group(vit)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", VIT)
def test_vit_native(benchmark, vit, name, kind, request):
    model, images = vit[:2]
    explainer = _native(name, model)
    targets = "all" if kind == "all classes" else None
    run = lambda: explainer(images, targets=targets)  # noqa: E731
    layer = explainer.layer_name or "its default blocks"
    maps = _timed(
        benchmark, vit, Case(name, "explainkit", kind, layer), run, _rounds(request.config, kind, False), _vit_group(vit)
    )
    assert tuple(maps.shape) == _maps_shape(vit, kind) and float(maps.max()) <= 1 + 1e-6


@pytest.mark.parametrize("kind", KINDS)
def test_vit_torch_cam_legrad(benchmark, vit, kind, request):
    pytest.importorskip("torchcam")
    model, images = vit[:2]
    run = cases.torchcam_new("legrad", model, images, list(model.encoder.layers), _columns(model, images, kind))
    rounds = _rounds(request.config, kind, True)
    maps = _timed(benchmark, vit, Case("legrad", "torch-cam", kind, "encoder.layers (all)"), run, rounds, _vit_group(vit))
    assert all(m[0].shape == (len(images), 8, 8) for m in maps)

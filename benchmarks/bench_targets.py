"""Targets beyond a class: explainkit's one batched call against pytorch-grad-cam on the same work.

For each task the same model, layer and images go through Grad-CAM in both libraries, one map
per image, box or label:

* segmentation: LR-ASPP MobileNetV3 (4 classes) at ``backbone.16``, ``SegmentationRegion(c)`` for
  the class predicted most vs ``SemanticSegmentationTarget(c, mask)`` per image (same masks);
* detection: Faster R-CNN MobileNetV3-320-FPN (5 classes) at ``backbone.body.16``,
  ``DetectionBoxes(max_boxes=4)`` (4 boxes per image, one ``(N, 4, H, W)`` call) vs one
  pytorch-grad-cam call per box column, each with a ``FasterRCNNBoxScoreTarget`` per image;
* multi-label: ResNet18 (20 labels) at ``layer4``, ``MultiLabel(labels=[0, 3, 7, 11])`` vs one
  call per label with ``ClassifierOutputTarget``;
* similarity: ResNet18 embeddings (``fc = Identity``) at ``layer4``, ``Similarity(reference)`` vs
  the tutorial's ``SimilarityToConceptTarget``;
* Finer-CAM: ResNet18 (10 classes) at ``layer4``, ``ClassDifference()`` vs ``FinerCAM``'s default call.

Run: ``pytest benchmarks/bench_targets.py --benchmark-only`` (CPU, full size); add
``--write-results --results-path PATH`` for the table (``benchmarks/report.py``, group
``cpu-targets``) and paste it into ``RESULTS.md``'s "Targets beyond a class" section. An ordinary
``pytest`` run executes each case once, untimed, at a small size (and checks the maps' shapes).

Each explainkit explainer is built once, outside the timed function; pytorch-grad-cam is used as
its documentation shows, inside its ``with`` block (its constructor registers two hooks: µs).
Before every round of a pytorch-grad-cam case one explainkit call on the same work is timed too
(untimed by pytest-benchmark), so the ratio has an interleaved form that the CPU's drift between
cases does not skew (as the floor in ``bench_explainers.py``).

The random-weight MobileNets are made non-degenerate first (speed does not depend on the weights,
but the work does: boxes, masks): uninitialised, their activations vanish to ~1e-9, so every box
scores the same and every pixel gets one class. Their BatchNorm statistics are measured on the
benchmark's images, the segmenter's heads drawn with std 1 and the detector's class logits with
std 0.5 (seeded), so boxes get distinct scores.
"""

from __future__ import annotations

import statistics
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import pytest
import torch
import torch.nn as nn
from torchvision.models import detection, resnet18, segmentation

from benchmarks.conftest import full_size, timed
from explainkit.explainers.gradient import GradCAM
from explainkit.targets import ClassDifference, DetectionBoxes, MultiLabel, SegmentationRegion, Similarity, Target, embed

TASKS = ("segmentation", "detection", "multi-label", "similarity", "finer-cam")
GROUP = "cpu-targets"
BOXES = 4
LABELS = (0, 3, 7, 11)


@dataclass
class Work:
    """One task's model, layer, images and explainkit target, plus what pytorch-grad-cam needs to do
    the same: ``pgc_model`` (the model or its wrapper) and ``pgc_calls`` (one targets list, or
    ``None`` for its default, per call)."""

    task: str
    model: nn.Module
    layer: str
    images: torch.Tensor
    target: Target
    maps: int  # maps per call (images x boxes or labels)
    pgc_model: nn.Module
    pgc_calls: Callable[[], list[Any]]
    pgc_method: str = "GradCAM"
    details: dict[str, Any] = field(default_factory=dict)


class OutWrapper(nn.Module):
    """pytorch-grad-cam's ``SegmentationModelOutputWrapper``: the ``"out"`` tensor of the dict."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)["out"]


class SimilarityToConceptTarget:
    """pytorch-grad-cam's similarity target (its "Pixel Attribution for embeddings" tutorial)."""

    def __init__(self, features: torch.Tensor) -> None:
        self.features = features

    def __call__(self, model_output: torch.Tensor) -> torch.Tensor:
        return torch.nn.CosineSimilarity(dim=0)(model_output, self.features)


def calibrate_batchnorm(model: nn.Module, body: nn.Module, images: torch.Tensor) -> None:
    """BatchNorm statistics of ``body`` measured on ``images`` (one plain average), then eval mode."""
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None
    body.train()
    with torch.no_grad():
        body(images)
    model.eval()


def _segmentation(full: bool) -> Work:
    torch.manual_seed(0)
    images = torch.rand(8, 3, 128, 128) if full else torch.rand(4, 3, 64, 64)
    model = segmentation.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=4)
    calibrate_batchnorm(model, model.backbone, images)
    for head in (model.classifier.low_classifier, model.classifier.high_classifier):
        nn.init.normal_(head.weight, std=1.0)
    with torch.no_grad():
        predicted = model(images)["out"].argmax(dim=1)
    category = int(predicted.flatten().bincount(minlength=4).argmax())
    masks = (predicted == category).float().numpy()

    def calls() -> list[Any]:
        from pytorch_grad_cam.utils.model_targets import SemanticSegmentationTarget

        return [[SemanticSegmentationTarget(category, mask) for mask in masks]]

    wrapped = OutWrapper(model)
    return Work("segmentation", model, "backbone.16", images, SegmentationRegion(category), len(images), wrapped, calls)


def _detection(full: bool) -> Work:
    torch.manual_seed(0)
    images = torch.rand(2, 3, 128, 128) if full else torch.rand(1, 3, 64, 64)
    model = detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None, num_classes=5, box_score_thresh=0.05
    )
    calibrate_batchnorm(model, model.backbone, model.transform(list(images))[0].tensors)
    torch.nn.init.normal_(model.roi_heads.box_predictor.cls_score.weight, std=0.5)
    with torch.no_grad():
        found = model(images)
    # The threshold that keeps at least BOXES boxes in every image (max_boxes keeps exactly BOXES):
    # the detector sorts its detections by score, as DetectionBoxes keeps them.
    threshold = min(float(d["scores"][BOXES - 1]) for d in found)
    kept = [(d["boxes"][d["scores"] >= threshold][:BOXES].numpy(), d["labels"][d["scores"] >= threshold][:BOXES]) for d in found]

    def calls() -> list[Any]:
        from pytorch_grad_cam.utils.model_targets import FasterRCNNBoxScoreTarget

        return [[FasterRCNNBoxScoreTarget([int(labels[j])], [boxes[j]]) for boxes, labels in kept] for j in range(BOXES)]

    target = DetectionBoxes(score_threshold=threshold, max_boxes=BOXES)
    work = Work("detection", model, "backbone.body.16", images, target, len(images) * BOXES, model, calls)
    work.details["score_threshold"] = threshold
    return work


def _classifier(num_classes: int | None, full: bool) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = resnet18(weights=None, num_classes=num_classes or 1000)
    if num_classes is None:
        model.fc = nn.Identity()
    images = torch.rand(16, 3, 64, 64) if full else torch.rand(4, 3, 32, 32)
    return model.eval(), images


def _multilabel(full: bool) -> Work:
    model, images = _classifier(20, full)

    def calls() -> list[Any]:
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        return [[ClassifierOutputTarget(k)] * len(images) for k in LABELS]

    target = MultiLabel(labels=list(LABELS))
    return Work("multi-label", model, "layer4", images, target, len(images) * len(LABELS), model, calls)


def _similarity(full: bool) -> Work:
    model, images = _classifier(None, full)
    torch.manual_seed(1)
    reference = embed(model, torch.rand(1, *images.shape[1:]))[0]
    return Work(
        "similarity",
        model,
        "layer4",
        images,
        Similarity(reference),
        len(images),
        model,
        lambda: [[SimilarityToConceptTarget(reference)] * len(images)],
    )


def _finer(full: bool) -> Work:
    model, images = _classifier(10, full)
    return Work("finer-cam", model, "layer4", images, ClassDifference(), len(images), model, lambda: [None], "FinerCAM")


BUILDERS = {
    "segmentation": _segmentation,
    "detection": _detection,
    "multi-label": _multilabel,
    "similarity": _similarity,
    "finer-cam": _finer,
}


@pytest.fixture(scope="module", params=TASKS)
def work(request) -> Work:
    return BUILDERS[request.param](full_size(request.config))


def ours(work: Work) -> Callable[[], torch.Tensor]:
    explainer = GradCAM(work.model, work.layer)  # built once, outside the timed function
    return lambda: explainer(work.images, targets=work.target)


def pgc(work: Work) -> Callable[[], list[np.ndarray]]:
    """pytorch-grad-cam: one call per targets list (a box or label column), inside its ``with`` block."""
    import pytorch_grad_cam  # peers import on use: the GPU image lacks them

    method = getattr(pytorch_grad_cam, work.pgc_method)
    layer = work.model.get_submodule(work.layer)
    calls = work.pgc_calls()

    def run() -> list[np.ndarray]:
        with warnings.catch_warnings(), method(model=work.pgc_model, target_layers=[layer]) as cam:
            warnings.simplefilter("ignore")  # its deprecation noise, once per call
            return [cam(input_tensor=work.images, targets=targets) for targets in calls]

    return run


def _record(benchmark, work: Work, library: str) -> None:
    benchmark.group = GROUP
    case = f"{work.task}: {library}"
    benchmark.extra_info.update(
        case=case,
        task=work.task,
        library=library,
        layer=work.layer,
        device="cpu",
        batch=len(work.images),
        dtype="fp32",
        threads=torch.get_num_threads(),
        images=len(work.images),
        maps=work.maps,
        size=list(work.images.shape[-2:]),
        machine="cpu",
        **work.details,
    )


def _rounds(request, cheap: bool) -> int:
    if not full_size(request.config):  # --bench-size toy (the GPU script's dry run): exercised, not measured
        return 2
    return 9 if cheap else 7


def test_ours(benchmark, work, request):
    _record(benchmark, work, "explainkit")
    maps = benchmark.pedantic(ours(work), rounds=_rounds(request, True), warmup_rounds=1, iterations=1)
    n, (h, w) = len(work.images), work.images.shape[-2:]
    expected = (n, h, w) if work.maps == n else (n, work.maps // n, h, w)
    assert tuple(maps.shape) == expected


def test_pytorch_grad_cam(benchmark, work, request):
    pytest.importorskip("pytorch_grad_cam")
    _record(benchmark, work, "pytorch-grad-cam")
    ours_run, ours_times = ours(work), []

    def time_ours():  # interleaved: one explainkit call before every round, untimed by pytest-benchmark
        start = time.perf_counter()
        ours_run()
        ours_times.append(time.perf_counter() - start)

    maps = benchmark.pedantic(pgc(work), setup=time_ours, rounds=_rounds(request, False), warmup_rounds=1, iterations=1)
    if timed(request.config):  # round i of pytorch-grad-cam ran right after ours_interleaved_s[i]
        benchmark.extra_info["ours_interleaved_s"] = ours_times[1:]
        benchmark.extra_info["ours_interleaved_median_s"] = statistics.median(ours_times[1:])
    h, w = work.images.shape[-2:]
    assert sum(m.shape[0] for m in maps) == work.maps and all(m.shape[1:] == (h, w) for m in maps)

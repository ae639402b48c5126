"""Small random-weight torchvision models for the tasks beyond classification, made to give maps
that are not all zero; importable as ``--model tests.task_models:detector`` in CLI tests."""

from __future__ import annotations

import torch
import torch.nn as nn
from torchvision.models import detection, resnet18, segmentation


def _calibrate_batchnorm(module: nn.Module, run, batches: int = 2) -> None:
    """BatchNorm statistics measured on random images: left at their initial values, the
    activations of a random MobileNet vanish to ~1e-12 and every map is zero."""
    for norm in module.modules():
        if isinstance(norm, nn.BatchNorm2d):
            norm.momentum = None  # a plain average over the calibration batches
    module.train()
    with torch.no_grad():
        for _ in range(batches):
            run()
    module.eval()


def segmenter() -> nn.Module:
    """LR-ASPP MobileNetV3 with 4 classes and a head that does not give every pixel one class."""
    torch.manual_seed(0)
    model = segmentation.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=4).eval()
    for head in (model.classifier.low_classifier, model.classifier.high_classifier):
        nn.init.normal_(head.weight, std=1.0)
    model.classes = ["background", "sky", "road", "car"]
    return model


def detector() -> nn.Module:
    """Faster R-CNN MobileNetV3-320 with 5 classes, calibrated, its class logits scaled to a standard
    deviation of 1.5 (calibrated but unscaled they are ~30 and every softmax saturates)."""
    torch.manual_seed(0)
    model = detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None, num_classes=5, box_score_thresh=0.05
    )
    _calibrate_batchnorm(model.backbone, lambda: model.backbone(torch.rand(4, 3, 320, 320)))
    model.eval()
    seen: dict[str, torch.Tensor] = {}
    hook = model.roi_heads.box_predictor.register_forward_hook(lambda module, inputs, output: seen.update(logits=output[0]))
    with torch.no_grad():
        model(torch.rand(2, 3, 64, 64))
        hook.remove()
        model.roi_heads.box_predictor.cls_score.weight /= seen["logits"].std() / 1.5
    model.classes = ["__background__", "cat", "dog", "car", "tree"]
    return model


def tagger() -> nn.Module:
    """ResNet18 with 6 sigmoid labels."""
    torch.manual_seed(0)
    model = resnet18(weights=None, num_classes=6).eval()
    model.classes = ["person", "dog", "grass", "sky", "car", "tree"]
    return model


def embedder() -> nn.Module:
    """ResNet18 without its classifier: 512-dimensional embeddings."""
    torch.manual_seed(0)
    model = resnet18(weights=None)
    model.fc = nn.Identity()
    return model.eval()

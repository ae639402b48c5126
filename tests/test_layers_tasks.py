"""Default CAM layers and model specs for torchvision's detectors and segmenters: their backbones
return dicts of levels (FPN, IntermediateLayerGetter, SSD's feature extractors), so the default is
the backbone output, a plain (N, C, h, w) tensor, that every level is built from. Small random
builds, offline (no weights, no ImageNet backbone)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torchvision

from explainkit.models.card import ModelCard
from explainkit.models.layers import default_layer_and_reason, layer_table, trace_layers
from explainkit.models.sources import load_spec


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny batches through detectors' many small ops: a thread pool's hand-offs cost more than they
    save, and on a busy CPU far more (a 320-pixel Faster R-CNN: 0.1 s on one thread, seconds on two)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _build(name: str, **kwargs) -> torch.nn.Module:
    return torchvision.models.get_model(name, weights=None, weights_backbone=None, **kwargs).eval()


TASKS = {  # model -> (builder kwargs, its default layer, words of the reason)
    "fasterrcnn_mobilenet_v3_large_320_fpn": (dict(num_classes=3), "backbone.body.16", "FPN"),
    "retinanet_resnet50_fpn": (dict(num_classes=3, min_size=128, max_size=128), "backbone.body.layer4", "FPN"),
    "ssdlite320_mobilenet_v3_large": (dict(num_classes=3), "backbone.features.0", "SSD's first"),
    "lraspp_mobilenet_v3_large": (dict(num_classes=3), "backbone.16", "last stage of the backbone"),
    "fcn_resnet50": (dict(num_classes=3), "backbone.layer4", "last stage of the backbone"),
}


@pytest.mark.parametrize("name", TASKS)
def test_the_default_layer_of_a_detector_or_segmenter_is_a_backbone_tensor(name):
    kwargs, expected, words = TASKS[name]
    torch.manual_seed(0)
    model = _build(name, **kwargs)
    model.card = ModelCard(architecture=f"torchvision:{name}", num_classes=3, classes=list("abc"), input_size=[3, 96, 128])
    layer, why = default_layer_and_reason(model)  # one dry forward on a 96x128 zero image
    assert layer == expected and words in why and "dict of levels, which a CAM cannot use" in why
    assert not any(m._forward_hooks for m in model.modules())
    trace = trace_layers(model)
    # detectors resize the image themselves (SSDLite squashes it to 320x320): their maps follow that
    assert trace.resized == {"fasterrcnn_mobilenet_v3_large_320_fpn": (320, 448), "retinanet_resnet50_fpn": (96, 128)}.get(
        name, (320, 320) if name.startswith("ssd") else None
    )
    rows = {row["name"]: row for row in layer_table(model, (3, 96, 128))}  # the same trace
    assert rows[layer]["default"] == "*" and rows[layer]["reading"] == "nchw"
    assert rows["backbone"]["reading"] == "returns OrderedDict: not usable"
    stages = [row for row in rows if row.rpartition(".")[0] == layer.rpartition(".")[0]]
    assert len(stages) > 1 or name.startswith("ssd")  # the stages of a backbone that returns levels are listed too
    seen = []
    handle = model.get_submodule(layer).register_forward_hook(lambda module, inputs, output: seen.append(output))
    try:
        with torch.no_grad():
            output = model([torch.rand(3, 96, 128)] if "_fpn" in name or name.startswith("ssd") else torch.rand(1, 3, 96, 128))
    finally:
        handle.remove()
    assert isinstance(seen[0], torch.Tensor) and seen[0].ndim == 4 and seen[0].shape[-2:].numel() > 1
    if isinstance(output, list):  # detectors: one dict of boxes per image
        assert set(output[0]) >= {"boxes", "labels", "scores"}
    else:  # segmenters: OrderedDict(out=...) at the image's size
        assert output["out"].shape == (1, 3, 96, 128)


@pytest.fixture
def no_downloads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("tried to download weights")

    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", refuse)


def test_specs_build_detectors_and_segmenters_offline_with_coco_and_voc_names(no_downloads):
    with pytest.warns(RuntimeWarning, match="random weights"):
        detector = load_spec("torchvision:fasterrcnn_mobilenet_v3_large_320_fpn")
    card = detector.card
    assert card.num_classes == 91 and card.classes[:2] == ["__background__", "person"]
    # the detector resizes and normalises inside its forward: its own min_size, no normalisation here
    assert card.image_size == (320, 320) and card.resize is None and card.mean == [0, 0, 0] and card.std == [1, 1, 1]
    assert default_layer_and_reason(detector)[0] == "backbone.body.16"
    with pytest.warns(RuntimeWarning, match="random weights"):
        segmenter = load_spec("torchvision:lraspp_mobilenet_v3_large", image_size=64)
    card = segmenter.card
    assert card.num_classes == 21 and card.classes[:2] == ["__background__", "aeroplane"]
    assert card.mean == [0.485, 0.456, 0.406]
    assert default_layer_and_reason(segmenter)[0] == "backbone.16"


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("fasterrcnn_mobilenet_v3_large_320_fpn", {}),
        ("retinanet_resnet50_fpn", {}),  # classes x anchors per position in its head
        ("deeplabv3_mobilenet_v3_large", {"aux_loss": True}),
    ],
)
def test_local_weights_set_a_detectors_or_segmenters_classes(name, kwargs, tmp_path, no_downloads):
    torch.manual_seed(0)
    trained = _build(name, num_classes=5, **kwargs)
    torch.save(trained.state_dict(), tmp_path / "model.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no random-weights warning: the weights are loaded
        model = load_spec(f"torchvision:{name}", tmp_path / "model.pt", image_size=64)
    assert model.card.num_classes == 5 and model.card.classes[0] == "class_0"
    loaded = model.state_dict()
    assert all(torch.equal(tensor, loaded[key]) for key, tensor in trained.state_dict().items())


def test_an_unknown_torchvision_name_names_the_tasks():
    from explainkit.models.sources import ModelSpecError

    with pytest.raises(ModelSpecError, match="no classification model 'fasterrcnn_r50', nor a detection or segmentation one"):
        load_spec("torchvision:fasterrcnn_r50")

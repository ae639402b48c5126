"""``explain --task``: the task read off the model's output, checks before anything is written,
figures and summaries for segmentation, detection, multi-label and similarity, end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from explainkit.cli import main
from explainkit.errors import ExplainkitError
from explainkit.jobs.tasks import TaskOptions, infer_task, prepare_task
from explainkit.models.card import ModelCard
from explainkit.targets import DetectionBoxes, MultiLabel, SegmentationRegion, Similarity
from tests import task_models

DETECTOR_FLAGS = ["--model", "tests.task_models:detector", "--mean", "0,0,0", "--std", "1,1,1", "--image-size", "64"]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> list[str]:
    folder = tmp_path_factory.mktemp("pictures")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(2):
        pixels = (rng.random((48, 64, 3)) * 255).astype(np.uint8)
        pixels[10:30, 20:45] = (200, 30, 30)
        path = folder / f"picture{i}.png"
        Image.fromarray(pixels).save(path)
        paths.append(str(path))
    return paths


def test_infer_task_reads_the_output():
    boxes = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0), "scores": torch.zeros(0)}]
    assert infer_task(boxes) == "detect"
    assert infer_task({"out": torch.zeros(1, 3, 4, 4)}) == "segment"
    assert infer_task(torch.zeros(1, 3, 4, 4)) == "segment"
    assert infer_task(torch.zeros(1, 10)) == "classify"
    assert infer_task(torch.zeros(1, 512), has_reference=True) == "similarity"


@pytest.mark.parametrize(
    "build, options, kind",
    [
        (task_models.segmenter, TaskOptions(), SegmentationRegion),
        (task_models.segmenter, TaskOptions(class_name="car"), SegmentationRegion),
        (task_models.tagger, TaskOptions(task="multilabel"), MultiLabel),
        (task_models.detector, TaskOptions(score_threshold=0.2), DetectionBoxes),
    ],
)
def test_prepare_task_picks_the_target(build, options, kind):
    model = build()
    card = ModelCard(num_classes=len(model.classes), classes=list(model.classes), input_size=[3, 64, 64])
    prepared = prepare_task(model, card, torch.rand(2, 3, 64, 64), options)
    assert isinstance(prepared.target, kind)
    if options.class_name == "car":
        assert prepared.target.category == 3


def test_prepare_task_classify_is_none_and_similarity_needs_a_reference():
    model = task_models.embedder()
    card = ModelCard(num_classes=1000, classes=[str(i) for i in range(1000)], input_size=[3, 64, 64])
    images = torch.rand(1, 3, 64, 64)
    assert prepare_task(task_models.tagger(), ModelCard(num_classes=6, classes=list("abcdef")), images, TaskOptions()) is None
    with pytest.raises(ExplainkitError, match="add --reference IMAGE"):
        prepare_task(model, card, images, TaskOptions(task="similarity"))
    prepared = prepare_task(model, card, images, TaskOptions(reference=torch.rand(1, 3, 64, 64)))
    assert isinstance(prepared.target, Similarity)


def test_unknown_class_name_lists_the_classes():
    model = task_models.segmenter()
    card = ModelCard(num_classes=4, classes=list(model.classes), input_size=[3, 64, 64])
    with pytest.raises(ExplainkitError, match="--class 'boat' is not one of the model's classes: background, sky, road, car"):
        prepare_task(model, card, torch.rand(1, 3, 64, 64), TaskOptions(class_name="boat"))


def test_explain_segment_end_to_end(files, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["explain", "--model", "tests.task_models:segmenter", "--image-size", "64", "--image", *files]
    assert main([*args, "--out", str(out), "--methods", "gradcam,eigencam"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task"] == "segment" and summary["model_output"].startswith("a dict with 'out' (2, 4, 64, 64)")
    assert [f["file"] for f in summary["figures"]] == ["segment.png", "segment_eigencam.png"]
    assert all(row["region_pixels"] > 0 for row in summary["explained"])
    report = (out / "report.html").read_text()
    assert "segment: gradcam" in report and "What was explained" in report
    assert (out / "segment.png").stat().st_size > 10_000


def test_explain_detect_end_to_end(files, tmp_path):
    out = tmp_path / "out"
    flags = ["--image", *files, "--out", str(out), "--score-threshold", "0.2", "--methods", "gradcam,ablationcam"]
    assert main(["explain", *DETECTOR_FLAGS, *flags]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task"] == "detect" and summary["layer"]["gradcam"] == "backbone.body.16"
    boxes = [box for row in summary["explained"] for box in row["boxes"]]
    assert boxes and all(box["score"] >= 0.2 and box["label"] in task_models.detector().classes for box in boxes)
    assert {"detect.png", "detect_ablationcam.png", "report.html"} <= {p.name for p in out.iterdir()}


def test_a_detector_that_finds_nothing_says_so_and_writes_nothing(files, tmp_path, capsys):
    out = tmp_path / "out"
    untrained = ["--model", "torchvision:fasterrcnn_mobilenet_v3_large_320_fpn", "--image-size", "64"]  # finds nothing
    assert main(["explain", *untrained, "--image", files[0], "--out", str(out), "--score-threshold", "0.3"]) == 2
    assert "the detector found nothing scoring >= 0.3 in these images (no detections at all)" in capsys.readouterr().err
    assert not out.exists()


def test_explain_multilabel_and_similarity_end_to_end(files, tmp_path):
    tags = tmp_path / "tags"
    assert (
        main(["explain", "--model", "tests.task_models:tagger", "--task", "multilabel", "--image", *files, "--out", str(tags)])
        == 0
    )
    labels = json.loads((tags / "summary.json").read_text())["explained"][0]["labels"]
    assert labels and all(label["probability"] > 0.5 for label in labels)
    alike = tmp_path / "alike"
    flags = ["--model", "tests.task_models:embedder", "--reference", files[1], "--image", *files, "--out", str(alike)]
    assert main(["explain", *flags]) == 0
    explained = json.loads((alike / "summary.json").read_text())["explained"]
    assert explained[1]["cosine_similarity"] == pytest.approx(1.0, abs=1e-4)  # the reference itself
    assert explained[0]["cosine_similarity"] < 1.0


@pytest.mark.parametrize(
    "flags, words",
    [
        (["--task", "detect"], "--task detect explains image files: add --image"),
        (["--task", "segment", "--image", "x.png", "--save-maps"], "--save-maps stores classification maps"),
        (["--task", "detect", "--image", "x.png", "--reference", "y.png"], "--reference is for --task similarity"),
        (["--task", "similarity", "--image", "x.png"], "add --reference IMAGE"),
        (["--task", "detect", "--image", "x.png", "--class", "cat"], "--class names a segmentation class or a label"),
        (["--image", "x.png", "--score-threshold", "1.5"], "--score-threshold is a probability in \\(0, 1\\), got 1.5"),
    ],
)
def test_task_flags_that_do_not_fit_fail_before_anything_runs(flags, words, tmp_path, capsys):
    assert main(["explain", "--model", "tests.task_models:tagger", "--out", str(tmp_path / "out"), *flags]) == 2
    assert words.replace("\\", "") in capsys.readouterr().err.replace("\\", "")
    assert not (tmp_path / "out").exists()


def test_a_task_that_does_not_fit_the_model_says_what_it_returns(files, tmp_path, capsys):
    out = tmp_path / "out"
    assert (
        main(["explain", "--model", "tests.task_models:tagger", "--task", "detect", "--image", files[0], "--out", str(out)]) == 2
    )
    assert "but the model returns a (1, 6) tensor" in capsys.readouterr().err
    assert not out.exists()


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    labels = {0: "background", 1: "cat", 2: "dog"}
    segformer = transformers.SegformerConfig(
        num_encoder_blocks=2,
        depths=[1, 1],
        sr_ratios=[2, 1],
        hidden_sizes=[16, 32],
        patch_sizes=[7, 3],
        strides=[4, 2],
        num_attention_heads=[1, 2],
        decoder_hidden_size=32,
        num_labels=3,
        id2label=labels,
        label2id={v: k for k, v in labels.items()},
        image_size=64,
    )
    transformers.SegformerForSemanticSegmentation(segformer).save_pretrained(folder / "segformer")
    vit = transformers.ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    transformers.ViTModel(vit).save_pretrained(folder / "vit")
    return folder


def test_hugging_face_segmenter_and_embedder_end_to_end(hf_models, files, tmp_path):
    seg = tmp_path / "seg"
    assert main(["explain", "--model", f"hf:{hf_models / 'segformer'}", "--image", *files, "--out", str(seg)]) == 0
    summary = json.loads((seg / "summary.json").read_text())
    assert summary["task"] == "segment" and summary["model_output"].startswith("a SemanticSegmenterOutput")
    # the decode head returns the logits themselves: the default is the fused features before them
    assert summary["layer"]["gradcam"] == "decode_head.dropout"
    alike = tmp_path / "alike"
    flags = ["--model", f"hf:{hf_models / 'vit'}", "--reference", files[0], "--image", *files, "--out", str(alike)]
    assert main(["explain", *flags]) == 0
    explained = json.loads((alike / "summary.json").read_text())["explained"]
    assert explained[0]["cosine_similarity"] == pytest.approx(1.0, abs=1e-4)
